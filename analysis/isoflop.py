"""IsoFLOP profiles (Hoffmann et al.'s Approach 2): at each compute budget, a parabola of
loss against log N (and against log D) whose vertex is the compute-optimal size; across
budgets, power laws N_opt = k_N C^a and D_opt = k_D C^b."""

from dataclasses import dataclass, field

import numpy as np

from analysis.fit import FitError, bootstrap

BUDGET_TOLERANCE = 0.05  # runs within 0.05 decades (12%) of compute share a budget
MIN_SIZES = 3  # a parabola needs three sizes
MIN_BUDGETS = 3  # a power law needs a line through more than two points to be checked


@dataclass
class IsoFlopFit:
    budgets: list[dict]  # per budget: C, its points, the parabolas, N_opt, D_opt
    n_law: np.ndarray  # (log k_N, a): log N_opt = log k_N + a log C
    d_law: np.ndarray
    samples: np.ndarray = field(default_factory=lambda: np.empty((0, 4)))  # (n_law, d_law)

    def n_opt(self, c, law=None):
        law = self.n_law if law is None else law
        return np.exp(law[0] + law[1] * np.log(c))

    def d_opt(self, c, law=None):
        law = self.d_law if law is None else law
        return np.exp(law[0] + law[1] * np.log(c))


def budgets(flops: np.ndarray) -> list[np.ndarray]:
    """Indices of runs grouped by compute budget (runs within the tolerance of the first)."""
    order = np.argsort(flops)
    groups, start = [], 0
    logc = np.log10(flops[order])
    for i in range(1, len(order) + 1):
        if i == len(order) or logc[i] - logc[start] > BUDGET_TOLERANCE:
            groups.append(order[start:i])
            start = i
    return groups


def _vertex(logx: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, float] | None:
    """The parabola through (log x, loss) and its minimum, if it has one inside the range."""
    coef = np.polyfit(logx, loss, 2)
    if coef[0] <= 0:
        return None
    vertex = -coef[1] / (2 * coef[0])
    if not logx.min() <= vertex <= logx.max():
        return None
    return coef, float(vertex)


def _fit(params: np.ndarray, tokens: np.ndarray, flops: np.ndarray, loss: np.ndarray):
    profiles, skipped = [], []
    for idx in budgets(flops):
        c = float(np.exp(np.log(flops[idx]).mean()))
        if len(np.unique(params[idx])) < MIN_SIZES:
            continue
        n_fit = _vertex(np.log(params[idx]), loss[idx])
        d_fit = _vertex(np.log(tokens[idx]), loss[idx])
        if n_fit is None or d_fit is None:
            skipped.append(c)
            continue
        profiles.append(
            {
                "C": c,
                "idx": idx,
                "n_coef": n_fit[0],
                "d_coef": d_fit[0],
                "N_opt": np.exp(n_fit[1]),
                "D_opt": np.exp(d_fit[1]),
            }
        )
    return profiles, skipped


def fit_isoflop(params, tokens, flops, loss) -> IsoFlopFit:
    """Raises FitError naming what is missing when fewer than MIN_BUDGETS budgets have a
    profile with a minimum inside their sampled sizes."""
    profiles, skipped = _fit(params, tokens, flops, loss)
    if len(profiles) < MIN_BUDGETS:
        sizes = [len(np.unique(params[i])) for i in budgets(flops)]
        why = f"{len(profiles)} usable of {len(sizes)} (distinct sizes per budget: {sizes}"
        if skipped:
            where = ", ".join(f"{c:.3g}" for c in skipped)
            why += f"; no minimum inside the sampled sizes at C = {where}"
        raise FitError(
            f"IsoFLOP needs at least {MIN_BUDGETS} compute budgets (runs within 12% of one "
            f"compute) with {MIN_SIZES}+ model sizes each, bracketing the loss minimum; has {why})"
        )
    logc = np.log([p["C"] for p in profiles])
    n_law = np.polyfit(logc, np.log([p["N_opt"] for p in profiles]), 1)[::-1]
    d_law = np.polyfit(logc, np.log([p["D_opt"] for p in profiles]), 1)[::-1]
    return IsoFlopFit(profiles, n_law, d_law)


def bootstrap_isoflop(
    fit: IsoFlopFit, params, tokens, flops, loss, resamples: int, seed: int = 0
) -> IsoFlopFit:
    """Refit on resampled trials; a resample that loses a profile gives NaNs (dropped later)."""
    samples = []
    for idx in bootstrap(len(loss), resamples, seed):
        try:
            refit = fit_isoflop(params[idx], tokens[idx], flops[idx], loss[idx])
            samples.append(np.concatenate([refit.n_law, refit.d_law]))
        except FitError:
            samples.append(np.full(4, np.nan))
    fit.samples = np.array(samples)
    return fit
