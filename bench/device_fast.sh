#!/usr/bin/env bash
# Issue 29's measurements in one call on one GPU (about 7 minutes; no network):
#   A. through the trainer a study runs (compile: auto, the study's defaults): the 350M
#      Transformer's MFU and the hybrid's tokens/s against it, beside the nanoGPT-style
#      baseline in its own compiled loop (bench/train_throughput.py);
#   B. a small trial eager, compiled and in CUDA graphs (compile: false, true, graphs) at
#      scaling_1gpu's two largest shapes: where graphs start to pay (HYBRIDSCALE_GRAPHS_BELOW);
#   C. the SSD scan at the scaling studies' small shapes: ours, mamba_ssm's and, where
#      fla-core imports, chunk_simple_gla's (bench/ssd_kernels.py --small).
# Each section has its own time limit, so a slow one cannot starve the next; rows are
# kept as they are measured, and a compact table of all of them ends the output. Needs
# ray, mlflow, optuna and pydantic importable (PYTHONPATH, or .device/site.tar.xz as for
# bench/device_study.sh), mamba_ssm's Triton files in .vendor/ for C, fla-core on
# PYTHONPATH (optional). HYBRIDSCALE_AUTOTUNE defaults to 0 here, as device_study.sh's:
# set it to 1 to pay (and measure) the kernels' search, minutes on a fresh machine.
#   bash bench/device_fast.sh            # JSON and logs to $OUT (or /tmp/device_fast)
set -u
out=${OUT:-/tmp/device_fast}
work=/tmp/device_fast/work  # data shards, the compile and autotune cache: shared by A and B
mkdir -p "$out" "$work"
if [ -f .device/site.tar.xz ]; then
  mkdir -p /tmp/site && [ -f /tmp/site/.done ] || { tar -xJf .device/site.tar.xz -C /tmp/site && touch /tmp/site/.done; }
  PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
export HYBRIDSCALE_AUTOTUNE=${HYBRIDSCALE_AUTOTUNE:-0}
python3 -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)"
python3 -c "import fla; print('fla-core', fla.__version__)" 2>/dev/null || echo "fla-core: not importable, C runs without chunk_simple_gla"
echo "HYBRIDSCALE_AUTOTUNE=$HYBRIDSCALE_AUTOTUNE"

section() {  # name, seconds, command...
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
  echo "   exit $?, $((SECONDS - start)) s; last lines:"
  grep -v '^\s*$' "$out/$name.log" | grep -v Warning | tail -n 4 | sed 's/^/   /'
}

section A_350m 220 python3 bench/train_throughput.py --sizes 350m \
  --models nanogpt transformer hybrid --batch 16 --seq-len 2048 --steps 10 \
  --work "$work" --out "$out/A_350m.json"
section B_small 130 python3 bench/train_throughput.py --sizes d224x16 d128x12 \
  --models transformer hybrid --batch 32 --seq-len 512 --steps 20 \
  --compile false true graphs --work "$work" --out "$out/B_small.json"
section C_ssd 70 python3 bench/ssd_kernels.py --small --no-extras --no-reference \
  --d-models 128 512 1024 --seqlens 512 2048 --out "$out/C_ssd.json"

python3 - "$out" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
def cell(v):
    if isinstance(v, float):
        return f"{v:,.0f}" if v >= 1000 else f"{v:.3g}"
    return "" if v is None else str(v)
for name, cols in [
    ("A_350m", ["model", "compile", "batch", "tokens_per_s", "mfu", "first_step_s", "vs_nanogpt", "vs_transformer", "error"]),
    ("B_small", ["size", "model", "compile", "params", "tokens_per_s", "first_step_s", "vs_eager", "vs_transformer", "error"]),
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
