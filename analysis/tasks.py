"""Downstream accuracy from the small runs, in the two steps of Bhagia et al. (2024),
"Establishing Task Scaling Laws via Compute-Efficient Model Ladders":

1. a task's loss (the loss of its correct answers) as L(N, D) per mix, fitted and
   bootstrapped as the validation loss is (analysis/fit.py);
2. accuracy as a sigmoid of that loss, acc = a / (1 + exp(-k (L - L0))) + b, fitted per
   mix family: hybrids and SSMs may turn loss into accuracy differently from Transformers.

Both steps are bootstrapped; a prediction pushes bootstrap sample i of the mix's loss law
through bootstrap sample i of its family's sigmoid, so its interval carries both.
"""

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares

from analysis.backtest import held_out, log_scatter, predicted, rule, summary
from analysis.extrapolate import PAPER_TOKENS, paper_target
from analysis.fit import FitError, LawFit, bootstrap, fit_nd, interval
from analysis.table import Mix, by_mix, columns

SIGMOID_PARAMS = ("a", "k", "L0", "b")
MIN_SIGMOID_POINTS = 6  # four parameters, and some points to spare


def sigmoid(theta: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Accuracy at ``loss``; theta (..., 4) broadcasts against loss (...), so S samples of
    theta against S losses give S accuracies."""
    a, k, l0, b = np.moveaxis(np.asarray(theta, float), -1, 0)
    with np.errstate(over="ignore"):  # exp overflows to inf far up a steep curve: a/inf = 0
        return a / (1 + np.exp(-k * (np.asarray(loss, float) - l0))) + b


@dataclass
class SigmoidFit:
    """theta = (a, k, L0, b); ``samples`` are bootstrap refits; ``residuals`` the points'
    accuracies less the fit's."""

    theta: np.ndarray
    residuals: np.ndarray
    samples: np.ndarray = field(default_factory=lambda: np.empty((0, 4)))

    def params(self, theta: np.ndarray | None = None) -> dict[str, float]:
        t = self.theta if theta is None else theta
        return {name: float(v) for name, v in zip(SIGMOID_PARAMS, t, strict=True)}

    def sample_params(self) -> dict[str, np.ndarray]:
        return {name: self.samples[:, i] for i, name in enumerate(SIGMOID_PARAMS)}

    def predict(self, loss: np.ndarray) -> np.ndarray:
        return sigmoid(self.theta, loss)


def _jacobian(theta: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """d sigmoid / d (a, k, L0, b) at each loss: exact, and several times faster than the
    solver's finite differences (the bootstraps make thousands of solves)."""
    a, k, l0, _ = theta
    with np.errstate(over="ignore"):  # as in sigmoid: s = 0 there, exactly its limit
        s = 1 / (1 + np.exp(-k * (loss - l0)))
    slope = a * s * (1 - s)
    return np.stack([s, slope * (loss - l0), -slope * k, np.ones_like(loss)], axis=1)


def _solve(start: np.ndarray, loss: np.ndarray, accuracy: np.ndarray) -> np.ndarray:
    # a and b are shares of answers, each in [0, 1] (a + b <= 1 is no box bound: left free)
    lower, upper = [0, -np.inf, -np.inf, 0], [1, np.inf, np.inf, 1]
    res = least_squares(lambda t: sigmoid(t, loss) - accuracy, start,
                        jac=lambda t: _jacobian(t, loss), bounds=(lower, upper))  # fmt: skip
    return res.x


def fit_sigmoid(loss: np.ndarray, accuracy: np.ndarray) -> SigmoidFit:
    """The sigmoid through the points (FitError if too few to support it)."""
    loss, accuracy = np.asarray(loss, float), np.asarray(accuracy, float)
    if len(loss) < MIN_SIGMOID_POINTS or len(np.unique(loss)) < 3:
        raise FitError(f"accuracy(loss) needs {MIN_SIGMOID_POINTS} points of 3+ distinct losses")
    best = _best_theta(loss, accuracy)
    return SigmoidFit(best, accuracy - sigmoid(best, loss))


def _best_theta(loss: np.ndarray, accuracy: np.ndarray, extra: list[np.ndarray] = ()):
    """Least squares from starts spanning the loss range's steepness (accuracy falls as
    loss rises, so k < 0), and any ``extra`` starts; the best wins."""
    spread = np.ptp(loss) or 1.0
    low, high = accuracy.min(), accuracy.max()
    starts = [
        np.array([max(high - low, 1e-3), -steep / spread, np.median(loss), low])
        for steep in (1.0, 4.0, 16.0)
    ]
    thetas = [_solve(s, loss, accuracy) for s in [*starts, *extra]]
    return min(thetas, key=lambda t: np.sum((sigmoid(t, loss) - accuracy) ** 2))


def bootstrap_sigmoid(
    fit: SigmoidFit, loss: np.ndarray, accuracy: np.ndarray, resamples: int, seed: int = 0
) -> SigmoidFit:
    """Refit on each resample, starting from the full fit as well (a resample of few
    distinct losses still refits: the fit's bounds and starts keep it finite)."""
    fit.samples = np.array(
        [
            _best_theta(loss[idx], accuracy[idx], extra=[fit.theta])
            for idx in bootstrap(len(loss), resamples, seed)
        ]
    )
    return fit


def _estimate(value: float, samples: np.ndarray) -> dict:
    lo, hi = interval(samples)
    return {"value": float(value), "lo": lo, "hi": hi}


@dataclass
class TaskLadder:
    """One task's two steps: a loss law per mix, an accuracy sigmoid per mix family."""

    task: str
    losses: dict[Mix, LawFit]
    accuracies: dict[str, SigmoidFit]
    notes: list[str]

    def can_predict(self, mix: Mix) -> bool:
        return mix in self.losses and mix.family in self.accuracies

    def predict_samples(self, mix: Mix, params: float, tokens: float) -> np.ndarray:
        """Accuracy under each paired bootstrap sample of the two steps."""
        laws = self.losses[mix].predict_samples(params, tokens)
        return sigmoid(self.accuracies[mix.family].samples, laws)

    def predict(self, mix: Mix, params: float, tokens: float) -> dict:
        """The task loss and accuracy at (N, D), each with its 95% interval."""
        law, curve = self.losses[mix], self.accuracies[mix.family]
        loss = float(law.predict(params, tokens))
        return {
            "loss": _estimate(loss, law.predict_samples(params, tokens)),
            "accuracy": _estimate(curve.predict(loss), self.predict_samples(mix, params, tokens)),
        }


def fit_ladder(
    rows: list[dict], task: str, loss_key: str, accuracy_key: str, resamples: int, seed: int = 0
) -> TaskLadder:
    """Both steps from trial rows holding the task's loss and accuracy under the given keys;
    a mix or family whose points cannot support its fit gets a note instead."""
    rows = [r for r in rows if np.isfinite(r.get(loss_key, np.nan))]
    losses, accuracies, notes = {}, {}, []
    for i, (mix, mix_rows) in enumerate(by_mix(rows).items()):
        params, tokens, loss = columns(mix_rows, "params", "tokens", loss_key)
        try:
            losses[mix] = fit_nd(params, tokens, loss, resamples, seed + i)
        except FitError as err:
            notes.append(f"{task}, {mix.label}: {err}")
    families: dict[str, list[dict]] = {}
    for row in rows:
        families.setdefault(row["mix"].family, []).append(row)
    for family, family_rows in families.items():
        loss, accuracy = columns(family_rows, loss_key, accuracy_key)
        try:
            fit = fit_sigmoid(loss, accuracy)
            accuracies[family] = bootstrap_sigmoid(fit, loss, accuracy, resamples, seed)
        except FitError as err:
            notes.append(f"{task}, {family}: {err}")
    return TaskLadder(task, losses, accuracies, notes)


def paper_predictions(ladder: TaskLadder) -> list[dict]:
    """Each mix's task loss and accuracy at its 8B configuration, at 1.1T and 3.5T tokens."""
    out = []
    for mix in ladder.losses:
        if not ladder.can_predict(mix):
            continue
        target = paper_target(mix)
        for tokens in PAPER_TOKENS:
            out.append({"task": ladder.task, "mix": mix.label, "N": target.params,
                        "D": tokens, **ladder.predict(mix, target.params, tokens)})  # fmt: skip
    return out


def backtest_task(
    rows: list[dict], task: str, loss_key: str, accuracy_key: str, cutoff: float | None,
    resamples: int, seed: int = 0,
) -> dict:  # fmt: skip
    """Both steps refitted without each mix's held-out trials (as analysis/backtest.py holds
    them out), and those trials' task loss and accuracy predicted. A trial scatters about
    the law and the sigmoid, which the fitted curves do not: the task loss's interval is the
    loss backtest's (the bootstrap's laws times the refit's log-residuals), the accuracy's
    is over the paired bootstrap samples plus the refit's accuracy residuals (each sample
    with each residual). Accuracy errors are in points (100 x the share of answers): a
    relative error of an accuracy near 0 says little."""
    rows = [r for r in rows if np.isfinite(r.get(loss_key, np.nan))]
    kept, out = [], []
    for mix_rows in by_mix(rows).values():
        held = held_out(mix_rows, cutoff)
        kept += [r for r, h in zip(mix_rows, held, strict=True) if not h]
        out += [r for r, h in zip(mix_rows, held, strict=True) if h]
    ladder = fit_ladder(kept, task, loss_key, accuracy_key, resamples, seed)
    kept_by_mix, trials = by_mix(kept), []
    for row in out:
        mix = row["mix"]
        if not ladder.can_predict(mix):
            continue
        law = ladder.losses[mix]
        scatter = log_scatter(law, kept_by_mix[mix], loss_key)
        samples = ladder.predict_samples(mix, row["params"], row["tokens"])
        lo, hi = interval(np.add.outer(samples, ladder.accuracies[mix.family].residuals))
        value = ladder.predict(mix, row["params"], row["tokens"])["accuracy"]["value"]
        observed = row[accuracy_key]
        accuracy = {"observed": observed, "predicted": {"value": value, "lo": lo, "hi": hi},
                    "error_points": 100 * (value - observed),
                    "inside": bool(lo <= observed <= hi)}  # fmt: skip
        trials.append({"task": task, **predicted(mix.label, row, law, scatter, loss_key),
                       "accuracy": accuracy})  # fmt: skip
    accuracies = [t["accuracy"] for t in trials]
    return {"rule": rule(cutoff), "trials": trials, "notes": ladder.notes,
            "summary": {"loss": summary(trials),
                        "accuracy": summary(accuracies, "error_points")}}  # fmt: skip
