"""Packing several small trials per GPU against running them one at a time.

Runs small trials through the real scheduler (local Ray, sqlite MLflow): 16 of them
with the GPU shares the scheduler estimates (packed), and one of each pattern (4) with
a whole GPU per trial, so one at a time — the same trials, fewer of them, to keep the
run short; aggregate tokens/s is a rate, so the two compare. Prints both rates, their
ratio, and the share of wall time in which no trial was training (from the trials'
MLflow step timestamps), which counts Ray start-up, worker imports, CUDA init and
MLflow bookkeeping against us.

    python bench/packing.py [--tokens 8M] [--out FILE]
"""

import argparse
import json
import tempfile
import textwrap
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from runners.driver import StudyOptions
from runners.scheduler import run_study
from runners.spec import load_spec

SPEC = """
name: {name}
model: {{preset: tiny, d_model: 256, n_heads: 4, d_state: 64, ssm_headdim: 64, chunk_size: 64}}
data: {{seq_len: 512}}
training: {{tokens: {tokens}, batch_size: 16, lr: 1.0e-3}}
sweep:
  pattern: ["*-*-", "MMMM", "M*M-", "M-M-"]
  seed: {seeds}
"""


def idle_share(client: MlflowClient, study: str, start: float, end: float) -> float:
    """1 - (union of the trials' training intervals) / wall time."""
    exp = client.get_experiment_by_name(study)
    intervals = []
    for run in client.search_runs([exp.experiment_id], "tags.kind = 'trial'"):
        history = client.get_metric_history(run.info.run_id, "train_loss")
        if history:
            first, last = min(m.timestamp for m in history), max(m.timestamp for m in history)
            intervals.append((first / 1000, last / 1000))
    covered, cursor = 0.0, start
    for a, b in sorted(intervals):
        a, b = max(a, cursor), min(b, end)
        if b > a:
            covered += b - a
            cursor = b
    return 1 - covered / (end - start)


def run(folder: Path, name: str, gpus_per_trial: float | None, seeds: list, tokens: str) -> dict:
    path = folder / f"{name}.yaml"
    path.write_text(textwrap.dedent(SPEC.format(name=name, seeds=seeds, tokens=tokens)))
    spec, trials = load_spec(path)
    options = StudyOptions(results_dir=folder / "results", gpus_per_trial=gpus_per_trial)
    start = time.time()
    rows = run_study(spec, trials, options)
    end = time.time()
    tokens = sum(r["tokens"] for r in rows if r["status"] == "finished")
    client = MlflowClient(options.uri())
    return {
        "mode": name, "trials": len(rows), "finished": sum(r["status"] == "finished" for r in rows),
        "wall_s": end - start, "tokens_per_s": tokens / (end - start),
        "idle_share": idle_share(client, name, start, end),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", default="8M", help="per trial")
    parser.add_argument("--out")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        one = run(folder, "one_at_a_time", 1.0, [0], args.tokens)
        packed = run(folder, "packed", None, [0, 1, 2, 3], args.tokens)
    packed["speedup"] = packed["tokens_per_s"] / one["tokens_per_s"]
    for r in (one, packed):
        print(json.dumps(r), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps([one, packed], indent=1))


if __name__ == "__main__":
    main()
