"""Packing several small trials per GPU against running them one at a time.

Runs the same 16 tiny trials twice through the real scheduler (local Ray, sqlite
MLflow): once with a whole GPU per trial (one at a time), once with the shares the
scheduler estimates. Prints aggregate tokens/s of each, the ratio, and the share of
wall time in which no trial was training (from the trials' MLflow step timestamps).

    python bench/packing.py [--out FILE]
"""

import argparse
import json
import tempfile
import textwrap
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from runners.scheduler import StudyOptions, run_study
from runners.spec import load_spec

SPEC = """
name: {name}
model: {{preset: tiny, n_layers: 4}}
data: {{seq_len: 256}}
training: {{tokens: 1.6M, batch_size: 16, lr: 3.0e-3}}
sweep:
  pattern: ["*-*-", "MMMM", "M*M-", "M-M-"]
  seed: [0, 1, 2, 3]
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


def run(folder: Path, name: str, gpus_per_trial: float | None) -> dict:
    path = folder / f"{name}.yaml"
    path.write_text(textwrap.dedent(SPEC.format(name=name)))
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
    parser.add_argument("--out")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        one = run(folder, "one_at_a_time", 1.0)
        packed = run(folder, "packed", None)
    packed["speedup"] = packed["tokens_per_s"] / one["tokens_per_s"]
    for r in (one, packed):
        print(json.dumps(r), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps([one, packed], indent=1))


if __name__ == "__main__":
    main()
