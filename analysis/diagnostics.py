"""Flags on fits whose numbers look fine but are not: a law that dropped a term, an
interval the bootstrap never moved, a prediction the data cannot support.

analysis/fit.py fits L = E + sum_i A_i / x_i^alpha_i with log E and log A_i free, so no
parameter meets a hard bound: "at its bound" means a log-parameter ran off toward -inf,
the optimiser's way of deleting a term. For each L(N, D) and L(C) law, with L_min the
smallest loss of the points it was fitted to:

- E collapsed: E < 1e-6 L_min. The law is a pure power law, falling without a floor, so
  far extrapolations fall toward 0.
- a term vanished: A_i / x_i^alpha_i < 1e-6 L_min at every observed x_i (its amplitude
  collapsed or its exponent drowned it): the input no longer affects the law.
- an exponent implausible: alpha_i < 0.02 (the term is nearly a constant, traded against
  E) or alpha_i > 2 (past Hoffmann's grid of starts and any published language-model law;
  the amplitude explodes to compensate).
- an interval degenerate: zero width (hi - lo <= 1e-9 |value|: every refit stayed where
  it started, as on the flat objective around a collapsed parameter, so the interval says
  nothing), or a NaN or infinite bound.
- E's interval reaches 0: its lower bound is collapsed (above), the data give no floor.

For an IsoFLOP fit: an exponent a (N_opt ~ C^a) or b (D_opt ~ C^b) outside (0, 1), i.e. a
compute-optimal size or token count that shrinks with compute or outgrows it, or a
degenerate interval of either.

For a task's accuracy sigmoid, acc = a / (1 + exp(-k (L - L0))) + b (analysis/tasks.py):
a collapsed to 0 (accuracy does not depend on task loss), k >= 0 (accuracy does not rise
as task loss falls), a + b > 1 (the curve tops out above perfect accuracy), or a
degenerate interval of a parameter off its box bound (a and b lie in [0, 1]; a floor b
pinned at 0 in every resample is a task whose chance is 0, not a fault). An accuracy
predicted at a task loss below the lowest the sigmoid was fitted to by more than the span
of those losses reads the curve far past its data.

A predicted loss is implausible when below half of L_min, or when its interval is
undefined. Published language-model laws do not halve the loss over the reaches analysed
here: Hoffmann et al.'s compute-optimal loss falls 34% from 1e18 to 1e21 FLOPs and 46%
over the million-fold reach to 1e24. A loss under half comes from a term that fell
without a floor, not from the data.
"""

from dataclasses import dataclass

import numpy as np

from analysis.fit import LawFit, interval
from analysis.isoflop import IsoFlopFit

COLLAPSED = 1e-6  # of the smallest observed loss: a term this small is a deleted term
EXPONENT_RANGE = (0.02, 2.0)
ZERO_WIDTH = 1e-9
PLAUSIBLE_SHARE = 0.5  # predictions below this share of the smallest observed loss


@dataclass(frozen=True)
class Flag:
    source: str  # the fit, "L(N, D)", "IsoFLOP" or "L(C)", or "prediction"
    name: str  # the parameter or prediction it concerns
    text: str

    def __str__(self) -> str:
        return f"{self.source}: {self.text}"


Found = list[tuple[str, str]]  # (parameter or prediction, what is wrong with it)


def _interval_flags(name: str, value: float, samples: np.ndarray) -> Found:
    if not len(samples):
        return []  # no bootstrap, no interval to judge
    lo, hi = interval(samples)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return [(name, f"{name}'s interval is unbounded or undefined ([{lo:.3g}, {hi:.3g}])")]
    if hi - lo <= ZERO_WIDTH * abs(value):
        return [
            (
                name,
                f"{name}'s interval has zero width ({lo:.3g}): no bootstrap refit "
                "moved it, so it says nothing of the uncertainty",
            )
        ]
    return []


def _term_flags(fit: LawFit, x: list[np.ndarray], floor: float) -> Found:
    found = []
    params = fit.params()
    amplitudes, exponents = list(params)[1 : 1 + fit.k], list(params)[1 + fit.k :]
    for amp, power, values in zip(amplitudes, exponents, x, strict=True):
        largest = params[amp] / np.min(values) ** params[power]
        if largest < floor:
            found.append(
                (
                    amp,
                    f"{amp} / x^{power} is at most {largest:.3g} over the data, "
                    f"below {COLLAPSED:g} of the smallest loss: the term vanished",
                )
            )
        lo, hi = EXPONENT_RANGE
        if not lo <= params[power] <= hi:
            found.append(
                (power, f"{power} = {params[power]:.3g} is outside the plausible {lo:g} to {hi:g}")
            )
    return found


def _e_flags(fit: LawFit, floor: float) -> Found:
    e = fit.params()["E"]
    if e < floor:
        return [
            (
                "E",
                f"E = {e:.3g} is below {COLLAPSED:g} of the smallest loss: collapsed "
                "to 0, the law has no floor",
            )
        ]
    e_lo = interval(fit.sample_params()["E"])[0] if len(fit.samples) else e
    if e_lo < floor:
        return [("E", f"E's interval reaches 0 ({e_lo:.3g}): the data give no floor")]
    return []


def law_flags(fit: LawFit, x: list[np.ndarray], loss: np.ndarray, source: str) -> list[Flag]:
    """Flags of an L(N, D) or L(C) law (``source``) fitted to inputs ``x`` and ``loss``."""
    floor = COLLAPSED * float(np.min(loss))
    found = _e_flags(fit, floor) + _term_flags(fit, x, floor)
    samples = fit.sample_params()
    for name, value in fit.params().items():
        found += _interval_flags(name, value, samples[name])
    return [Flag(source, name, text) for name, text in found]


def isoflop_flags(fit: IsoFlopFit) -> list[Flag]:
    found = []
    for name, value, column in (("a", fit.n_law[1], 1), ("b", fit.d_law[1], 3)):
        if not 0 < value < 1:
            found.append((name, f"{name} = {value:.3g} is outside (0, 1)"))
        found += _interval_flags(name, value, fit.samples[:, column])
    return [Flag("IsoFLOP", name, text) for name, text in found]


def sigmoid_flags(fit, source: str) -> list[Flag]:
    """Flags of an accuracy sigmoid (an analysis.tasks.SigmoidFit) named ``source``."""
    p, found = fit.params(), []
    if p["a"] < COLLAPSED:
        found.append(("a", f"a = {p['a']:.3g}: accuracy does not depend on task loss"))
    if p["k"] >= 0:
        found.append(("k", f"k = {p['k']:.3g} >= 0: accuracy does not rise as task loss falls"))
    if p["a"] + p["b"] > 1 + COLLAPSED:
        found.append(("a", f"a + b = {p['a'] + p['b']:.3g}: the curve tops out above 1"))
    samples = fit.sample_params()
    for name, value in p.items():
        if name in ("a", "b") and min(value, 1 - value) < COLLAPSED:
            continue  # at its box bound: pinned there, not undetermined
        found += _interval_flags(name, value, samples[name])
    return [Flag(source, name, text) for name, text in found]


def sigmoid_reach_flags(name: str, loss: float, fitted: np.ndarray) -> list[Flag]:
    """Flags of an accuracy read off a sigmoid at task loss ``loss``, fitted to ``fitted``."""
    lowest, span = float(np.min(fitted)), float(np.ptp(fitted))
    if loss >= lowest - span:
        return []
    text = (f"task loss {loss:.3g} is below the sigmoid's lowest fitted loss ({lowest:.3g}) "
            f"by more than their span ({span:.3g}): the accuracy reads the curve far past "
            "its data")  # fmt: skip
    return [Flag(f"prediction {name}", name, text)]


def prediction_flags(name: str, estimate: dict, loss: np.ndarray) -> list[Flag]:
    """Flags of a predicted loss {"value", "lo", "hi"} from a fit to observed ``loss``."""
    smallest = float(np.min(loss))
    found = []
    if estimate["value"] < PLAUSIBLE_SHARE * smallest:
        found.append(
            (
                name,
                f"predicted {estimate['value']:.3g} is below half the smallest "
                f"observed loss ({smallest:.4g}): not plausible from these data",
            )
        )
    if not (np.isfinite(estimate["lo"]) and np.isfinite(estimate["hi"])):
        found.append((name, "the interval is undefined"))
    return [Flag(f"prediction {name}", name, text) for name, text in found]
