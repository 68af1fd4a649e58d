#!/usr/bin/env bash
# bench/device_fast.sh's sections past one call's 10-minute limit. The GPU machine keeps a
# process that started a session of its own (setsid) running between calls while it stays
# warm, so the first call starts the sections so, and every call, the first included, waits
# up to WAIT seconds (default 570) for them to end or for one more section's JSON, and brings
# back what they wrote so far: their JSON and logs in $OUT/device_detached.tar.gz with the
# studies' records (results tables, MLflow store, train.log), and device_fast.sh's output.
#   bash bench/device_detached.sh wsd A_350m   # first call: start them, then wait
#   bash bench/device_detached.sh              # each later call, at once: wait again
set -u
dir=/tmp/device_detached
if [ $# -gt 0 ] && [ ! -f "$dir/started" ]; then
  # From a copy of the tree: each call copies the tree afresh, and a section that started
  # during that copy failed to import (A_350m, 2026-12-08).
  mkdir -p "$dir/out" "$dir/tree" && touch "$dir/started"
  tar -cf - --exclude=./.git --exclude=./.venv . | tar -xf - -C "$dir/tree"
  (cd "$dir/tree" && OUT=$dir/out setsid nohup bash -c "bash bench/device_fast.sh $*; touch $dir/done" \
    > "$dir/out/device_fast.log" 2>&1 < /dev/null &)
fi
[ -f "$dir/started" ] || { echo "nothing started: name the sections"; exit 2; }
# Back as soon as a section writes its JSON, so no later section can keep it from coming back.
touch "$dir/called"
until [ -f "$dir/done" ] || [ "$SECONDS" -ge "${WAIT:-570}" ] \
  || [ -n "$(find "$dir/out" -name '*.json' -newer "$dir/called")" ]; do sleep 5; done
[ -f "$dir/done" ] && echo "== all sections ended" || echo "== still running after ${SECONDS}s"
tail -n 40 "$dir/out/device_fast.log"
# The studies' records without their checkpoints, data shards and compile caches.
tar -czf "${OUT:-/tmp}/device_detached.tar.gz" --exclude='*.pt' --exclude=cache --exclude=data \
  -C / "${dir#/}/out" $(cd / && find tmp/device_fast/work -maxdepth 1 \( -name 'wsd_*' -o -name 'study_*' \) 2>/dev/null)
