"""Search throughput on one GPU: an Optuna search of small hybrids, several trials sharing
the GPU, through the real search driver (local Ray, journal storage, sqlite MLflow).

Prints trials per hour (every trial that trained, pruned ones included, and finished
ones alone), the GPU's utilisation sampled once a second by a background thread over the
whole run (Ray start-up and worker imports included: that idle time is ours too), the
trials' states and the best pattern found. No new trial starts after --minutes, so the
run ends within about one trial's length of it.

    python bench/search.py [--trials 24] [--parallel 8] [--tokens 2e6] [--minutes 6.5]
"""

import argparse
import json
import statistics
import tempfile
import textwrap
import time
from pathlib import Path

from gpu_util import GpuSampler  # bench/, beside this script

SPEC = """
name: bench_search
model: {{preset: tiny, d_model: 256, n_heads: 4, d_state: 64, ssm_headdim: 32, chunk_size: 64}}
data: {{seq_len: 512}}
training: {{tokens: {tokens}, batch_size: 16, lr: 2.0e-3, eval_every_tokens: {eval_every}}}
search:
  trials: {trials}
  parallel: {parallel}
  startup_trials: 6
  budget: {{params: 3M, tolerance: 0.1}}
  space:
    mamba2: {{low: 2, high: 8}}
    attention: {{low: 0, high: 3}}
    mlp: {{low: 0, high: 4}}
    attention_placement: [even, free]
    d_state: [32, 64, 128]
    lr: {{low: 1.0e-3, high: 1.0e-2, log: true}}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--tokens", type=float, default=2e6, help="training tokens per trial")
    parser.add_argument("--minutes", type=float, default=6.5, help="start no trial after this")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()

    from runners.driver import StudyOptions
    from runners.search import SearchOptions, run_search
    from runners.search_space import load_search

    folder = Path(tempfile.mkdtemp(prefix="bench_search_"))
    tokens = int(args.tokens)
    path = folder / "bench_search.yaml"
    path.write_text(textwrap.dedent(SPEC.format(
        tokens=tokens, eval_every=tokens // 4, trials=args.trials, parallel=args.parallel
    )))  # fmt: skip
    spec = load_search(path)
    start = time.time()
    with GpuSampler() as sampler:
        report = run_search(
            spec, StudyOptions(results_dir=folder / "results"),
            SearchOptions(timeout_s=args.minutes * 60),
        )  # fmt: skip
    hours = (time.time() - start) / 3600
    states = {}
    for row in report.rows:
        states[row["state"]] = states.get(row["state"], 0) + 1
    trained = sum(1 for row in report.rows if row["mlflow_run_id"])
    util = [gpus[0] for gpus in sampler.samples]  # the one GPU a search runs on
    result = {
        "trials": len(report.rows),
        "states": states,
        "wall_s": round(hours * 3600, 1),
        "trials_per_hour": round(trained / hours, 1),
        "finished_per_hour": round(states.get("complete", 0) / hours, 1),
        "gpu_util_mean_pct": round(statistics.mean(util), 1) if util else None,
        "gpu_util_median_pct": statistics.median(util) if util else None,
        "gpu_util_samples": len(util),
        "best_pattern": report.best[0]["pattern"] if report.best else None,
        "best_val_loss": report.best[0]["val_loss"] if report.best else None,
        "tokens_per_trial": tokens,
        "parallel": args.parallel,
        "results": str(folder / "results"),
    }
    print(json.dumps(result, indent=2))
    print("\n| trials | wall s | trials/h | finished/h | GPU util mean % | median % |")
    print("|---|---|---|---|---|---|")
    print(f"| {result['trials']} | {result['wall_s']} | {result['trials_per_hour']} | "
          f"{result['finished_per_hour']} | {result['gpu_util_mean_pct']} | "
          f"{result['gpu_util_median_pct']} |")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
