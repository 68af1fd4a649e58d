"""Loss against compute on the compute frontier: L(C) = E + A / C^gamma through the runs
that no cheaper run beats, fitted (and bootstrapped) as the other laws are."""

import numpy as np

from analysis.fit import FitError, LawFit, bootstrap, fit_law

MIN_FRONTIER = 4  # three parameters and one point to spare


def frontier(flops: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Indices of the runs with lower loss than every run of less or equal compute."""
    order = np.lexsort((loss, flops))
    keep, best = [], np.inf
    for i in order:
        if loss[i] < best:
            keep.append(i)
            best = loss[i]
    return np.array(keep, int)


def fit_frontier(flops: np.ndarray, loss: np.ndarray, starts: int | None = 32) -> LawFit:
    idx = frontier(flops, loss)
    if len(idx) < MIN_FRONTIER:
        raise FitError(
            f"L(C) needs at least {MIN_FRONTIER} runs on the compute frontier (each beating "
            f"every cheaper run); has {len(idx)} of {len(loss)} runs"
        )
    return fit_law([flops[idx]], loss[idx], starts=starts)


def bootstrap_frontier(fit: LawFit, flops, loss, resamples: int, seed: int = 0) -> LawFit:
    samples = []
    for idx in bootstrap(len(loss), resamples, seed):
        front = idx[frontier(flops[idx], loss[idx])]
        if len(np.unique(flops[front])) < MIN_FRONTIER:
            samples.append(np.full(3, np.nan))
            continue
        samples.append(fit_law([flops[front]], loss[front], starts=4, extra=[fit.theta]).theta)
    fit.samples = np.array(samples)
    return fit
