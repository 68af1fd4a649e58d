#!/usr/bin/env bash
# Issues 26 and 29's GPU measurements, each a section with its own time limit (so a slow one
# cannot starve the next), run in the order named (default: all; about 35 minutes), no
# network needed:
#   branching  a WSD study's trials with budgets branched and alone (bench/study_wall.py);
#   wsd        the whole WSD study, branched then alone, each cold in a process and results
#              folder of its own (about 20 minutes: past one call, see device_detached.sh);
#   compile    scaling_1gpu's small trials under the study's defaults and eager (the same);
#   study      the whole scaling_1gpu, defaults then eager, as wsd (about 25 minutes);
#   A_350m     through the trainer a study runs (compile: auto, the study's defaults): the
#              350M Transformer's MFU and the hybrid's tokens/s against it, beside the
#              nanoGPT-style baseline in its own compiled loop (bench/train_throughput.py),
#              and how long each loop leaves the GPU idle between kernels (--gaps);
#   B_small    a small trial eager, compiled and in CUDA graphs at scaling_1gpu's two
#              largest shapes: where graphs start to pay (HYBRIDSCALE_GRAPHS_BELOW);
#   B_cross    compiled against CUDA graphs from 14M to 60M parameters: where they stop;
#   C_ssd      the SSD scan, ours against mamba_ssm's and, where fla-core imports,
#              chunk_simple_gla's, at the scaling studies' small shapes and the issue grid.
#              fla compiles and autotunes its kernels at its first call: minutes.
# Rows are kept as they are measured, and a compact table of them ends the output. Needs
# ray, mlflow, optuna and pydantic importable (PYTHONPATH, or .device/site.tar.xz as for
# bench/device_study.sh), mamba_ssm's Triton files in .vendor/ for C, fla-core on
# PYTHONPATH or as .device/fla_core-*.whl (optional). HYBRIDSCALE_AUTOTUNE defaults to 0
# here, as device_study.sh's (set it to 1 to pay and measure the kernels' search, minutes on
# a fresh machine), except in A_350m, which measures a study's defaults: the search on.
#   bash bench/device_fast.sh [SECTION...]   # JSON and logs to $OUT (or /tmp/device_fast)
set -u
out=${OUT:-/tmp/device_fast}
work=/tmp/device_fast/work  # data shards, the compile and autotune cache: shared by A and B
mkdir -p "$out" "$work"
if [ -f .device/site.tar.xz ]; then
  mkdir -p /tmp/site && [ -f /tmp/site/.done ] || { tar -xJf .device/site.tar.xz -C /tmp/site && touch /tmp/site/.done; }
  PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
for wheel in .device/fla_core-*.whl; do
  [ -f "$wheel" ] && { [ -d /tmp/fla ] || python3 -m zipfile -e "$wheel" /tmp/fla; PYTHONPATH=/tmp/fla:$PYTHONPATH; }
done
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
export HYBRIDSCALE_AUTOTUNE=${HYBRIDSCALE_AUTOTUNE:-0}
python3 -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)"
python3 -c "import sys; sys.path.insert(0, '.vendor'); import fla; print('fla-core', fla.__version__)" 2>/dev/null || echo "fla-core: not importable, C runs without chunk_simple_gla"
echo "HYBRIDSCALE_AUTOTUNE=$HYBRIDSCALE_AUTOTUNE"

section() {  # name, seconds, command...
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
  echo "   exit $?, $((SECONDS - start)) s; last lines:"
  grep -v '^\s*$' "$out/$name.log" | grep -v Warning | tail -n 4 | sed 's/^/   /'
}

pair() {  # name, spec, compare, settings...: each cold, in a process and folder of its own
  local name=$1 spec=$2 compare=$3 setting
  shift 3
  for setting in "$@"; do
    section "${name}_$setting" 1500 python3 bench/study_wall.py "$spec" --compare "$compare" \
      --only "$setting" --results "$work/${name}_$setting" --out "$out/${name}_$setting.json"
  done
}

run() {
  case $1 in
    branching) section branching 420 python3 bench/study_wall.py studies/scaling_1gpu_wsd.yaml \
      --compare branching --max-params 1M --results "$work/branching" --out "$out/branching.json" ;;
    wsd) pair wsd studies/scaling_1gpu_wsd.yaml branching branched alone ;;
    study) pair study studies/scaling_1gpu.yaml compile defaults eager ;;
    compile) section compile 540 python3 bench/study_wall.py studies/scaling_1gpu.yaml \
      --compare compile --max-params 0.6M --results "$work/compile" --out "$out/compile.json" ;;
    A_350m) section A_350m 420 env HYBRIDSCALE_AUTOTUNE=1 python3 bench/train_throughput.py --sizes 350m \
      --models nanogpt transformer hybrid --batch 24 --seq-len 2048 --steps 30 \
      --work "$work" --out "$out/A_350m.json" --gaps "$work/traces" ;;
    B_small) section B_small 130 python3 bench/train_throughput.py --sizes d224x16 d128x12 \
      --models transformer hybrid --batch 32 --seq-len 512 --steps 20 \
      --compile false true graphs --work "$work" --out "$out/B_small.json" ;;
    B_cross) section B_cross 420 python3 bench/train_throughput.py --sizes d384x16 d512x16 \
      d768x16 --models transformer hybrid --batch 32 --seq-len 512 --steps 30 \
      --compile true graphs --work "$work" --out "$out/B_cross.json" ;;
    C_ssd) section C_grid 360 python3 bench/ssd_kernels.py --no-extras --no-reference \
      --fla-unchecked --out "$out/C_grid.json"
      section C_ssd 200 python3 bench/ssd_kernels.py --small --no-extras --no-reference \
      --fla-unchecked --d-models 128 512 1024 --seqlens 512 2048 --out "$out/C_ssd.json" ;;
    *) echo "no section $1" ;;
  esac
}
for name in ${*:-branching compile A_350m B_small C_ssd}; do run "$name"; done

python3 - "$out" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
for name in ("branching", "wsd_branched", "wsd_alone", "compile", "study_defaults", "study_eager"):  # one study pair each: its JSON as it is
    if (out / f"{name}.json").exists():
        print(f"\n{name}: {(out / f'{name}.json').read_text()}")
def cell(v):
    if isinstance(v, float):
        return f"{v:,.0f}" if v >= 1000 else f"{v:.3g}"
    return "" if v is None else str(v)
for name, cols in [
    ("A_350m", ["model", "compile", "batch", "tokens_per_s", "mfu", "first_step_s", "vs_nanogpt", "vs_transformer", "step_ms", "gpu_idle", "error"]),
    ("B_small", ["size", "model", "compile", "params", "tokens_per_s", "first_step_s", "vs_eager", "vs_transformer", "error"]),
    ("B_cross", ["size", "model", "compile", "params", "tokens_per_s", "mfu", "first_step_s", "vs_transformer", "error"]),
    ("C_grid", ["op", "seqlen", "impl", "fwd_ms", "fwd_bwd_ms", "fwd_bwd_vs_baseline", "kernel_fwd_bwd_ms", "vs_gla_kernels", "max_rel_dev", "error"]),
    ("C_ssd", ["op", "seqlen", "impl", "fwd_bwd_ms", "fwd_bwd_vs_baseline", "kernel_fwd_bwd_ms", "vs_gla_kernels", "error"]),
]:
    path, log = out / f"{name}.json", out / f"{name}.log"
    if path.exists():
        rows = json.loads(path.read_text())
    else:  # cut off before writing it: the rows the log printed as they came
        lines = log.read_text().splitlines() if log.exists() else []
        rows = [json.loads(line) for line in lines if line.startswith("{")]
    print(f"\n{name}: {len(rows)} rows")
    if rows:
        print(" | ".join(cols))
        for r in rows:
            print(" | ".join(cell(r.get(c)) for c in cols))
EOF
