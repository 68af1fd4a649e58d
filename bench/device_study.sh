#!/usr/bin/env bash
# One call on the lent GPU machine (see ../shared/device/README.md): resume a study for
# $2 seconds, interrupt it (running trials checkpoint), and pack its results, without
# checkpoints or shards, into $OUT/results.tgz. Run with carry [".device"], where
# .device/site.tar.xz holds ray/optuna/mlflow/pydantic for a machine without network.
# A fresh machine starts from the finished trials of .device/results.tgz (a previous
# call's tarball, copied there; the data and compile caches stay behind: they are rebuilt); a warm one keeps its own results/, checkpoints included,
# so calls chained within the machine's idle window lose nothing.
#   bash bench/device_study.sh studies/scaling_1gpu.yaml 540
spec=${1:?a study spec}
budget=${2:-500}
mkdir -p /tmp/site && [ -f /tmp/site/.done ] || { tar -xJf .device/site.tar.xz -C /tmp/site && touch /tmp/site/.done; }
[ -d results ] || { [ -f .device/results.tgz ] && tar xzf .device/results.tgz; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HYBRIDSCALE_AUTOTUNE=0
mkdir -p results/bench
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 1 >> results/bench/smi.csv &
smi=$!
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
start=$(date +%s)
timeout -s INT -k 90 "$budget" python3 -m runners.cli study "$spec" --results results 2>&1 | grep -v "^\s*$" | tail -n 150
echo "study call took $(( $(date +%s) - start )) s"
kill $smi
tar czf "$OUT/results.tgz" --exclude='*.pt' --exclude='shards' --exclude='ray_train' \
  --exclude='tokenizers' --exclude='results/data' --exclude='results/cache' results
