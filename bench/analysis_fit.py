"""Time of a Chinchilla-style scaling-law fit with bootstrap intervals, on this machine.

Fits L(N, D) = E + A/N^alpha + B/D^beta to the reconstructed Chinchilla runs (the 240 the
replication keeps) as analysis.fit does for a study, then refits 1000 bootstrap
resamples. Prints the seconds each part took and the fitted parameters with intervals.

    python bench/analysis_fit.py [--resamples 1000] [--data ../shared/datasets/chinchilla/...]
"""

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

from analysis.fit import bootstrap_law, fit_law, interval

DATA = Path(__file__).resolve().parents[2] / "shared/datasets/chinchilla/svg_extracted_data.csv"


def chinchilla(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    n, c, loss = (
        np.array([float(r[k]) for r in rows]) for k in ("Model Size", "Training FLOP", "loss")
    )
    keep = np.argsort(loss)[:-5]  # as the replication: drop the 5 highest-loss runs
    return n[keep], c[keep] / (6 * n[keep]), loss[keep]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out")
    args = parser.parse_args()
    if not args.data.exists():
        raise SystemExit(f"{args.data}: no Chinchilla data (it lives in ../shared/datasets)")
    n, d, loss = chinchilla(args.data)
    start = time.perf_counter()
    fit = fit_law([n, d], loss)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    bootstrap_law(fit, [n, d], loss, resamples=args.resamples)
    boot_s = time.perf_counter() - start
    samples = fit.sample_params()
    result = {
        "runs": len(loss), "resamples": args.resamples,
        "fit_s": round(fit_s, 2), "bootstrap_s": round(boot_s, 2),
        "total_s": round(fit_s + boot_s, 2), "target_s": 30,
        "params": {k: round(float(v), 5) for k, v in fit.params().items()},
        "intervals": {k: [round(x, 5) for x in interval(v)] for k, v in samples.items()},
    }  # fmt: skip
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
