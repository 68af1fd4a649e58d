"""Saturating power laws fitted as Hoffmann et al. (2022) and Besiroglu et al. (2024) do.

A law of k inputs x_1..x_k is  L = E + sum_i A_i / x_i^alpha_i,  fitted in log space as
log L = logsumexp(a_i - alpha_i log x_i, e)  with a_i = log A_i, e = log E: the Huber loss
(delta 1e-3) of log-loss residuals, minimised by L-BFGS-B from a grid of initialisations.
Chinchilla's L(N, D) is the law with x = (N, D); loss against compute, L(C), the law of one.

Uncertainty comes from the bootstrap: resample the points with replacement and refit.
"""

from dataclasses import dataclass, field
from functools import cache

import numpy as np
from scipy.optimize import minimize
from scipy.special import huber
from threadpoolctl import ThreadpoolController

DELTA = 1e-3
# Hoffmann's grid: exponents 0..2 by 0.5, e in -1..1 by 0.5, a_i in 0..25 by 5.
EXPONENT_GRID = np.arange(0.0, 2.01, 0.5)
E_GRID = np.arange(-1.0, 1.01, 0.5)
A_GRID = np.arange(0.0, 25.1, 5.0)
MIN_SIZES, MIN_TOKEN_COUNTS, MIN_TRIALS = 3, 3, 6  # what an L(N, D) fit needs at least


class FitError(ValueError):
    """The points cannot support the fit; the message says what is missing."""


@dataclass
class LawFit:
    """theta = (a_1..a_k, alpha_1..alpha_k, e); ``samples`` are bootstrap refits."""

    theta: np.ndarray
    objective: float
    n_points: int
    samples: np.ndarray = field(default_factory=lambda: np.empty((0, 0)))

    @property
    def k(self) -> int:
        return (len(self.theta) - 1) // 2

    def params(self, theta: np.ndarray | None = None) -> dict[str, float]:
        """Named parameters: E, A_i and alpha_i (Chinchilla's A, B, alpha, beta for k=2)."""
        t = self.theta if theta is None else theta
        names = ["A", "B"] if self.k == 2 else [f"A{i}" for i in range(self.k)]
        powers = ["alpha", "beta"] if self.k == 2 else [f"alpha{i}" for i in range(self.k)]
        out = {"E": float(np.exp(t[-1]))}
        out.update({n: float(np.exp(t[i])) for i, n in enumerate(names)})
        out.update({n: float(t[self.k + i]) for i, n in enumerate(powers)})
        return out

    def sample_params(self) -> dict[str, np.ndarray]:
        """Each named parameter over the bootstrap samples."""
        rows = [self.params(t) for t in self.samples]
        return {name: np.array([r[name] for r in rows]) for name in self.params()}

    def predict(self, *x: np.ndarray, theta: np.ndarray | None = None) -> np.ndarray:
        t = self.theta if theta is None else theta
        x = np.broadcast_arrays(*(np.asarray(v, float) for v in x))
        logx = np.log(np.stack([v.ravel() for v in x]))
        return np.exp(log_predict(t, logx)).reshape(x[0].shape)

    def predict_samples(self, *x: np.ndarray) -> np.ndarray:
        """Predictions under every bootstrap sample: shape (samples, *x's shape)."""
        return np.stack([self.predict(*x, theta=t) for t in self.samples])


def _logsumexp(terms: np.ndarray, axis: int) -> np.ndarray:
    # numpy's own: scipy's array-API wrapper costs more than the sums on small inputs
    top = terms.max(axis, keepdims=True)
    return (top + np.log(np.exp(terms - top).sum(axis, keepdims=True))).squeeze(axis)


def log_predict(theta: np.ndarray, logx: np.ndarray) -> np.ndarray:
    """theta (..., 2k + 1) against logx (k, n): log L of shape (..., n)."""
    k = logx.shape[0]
    a, alpha, e = theta[..., :k, None], theta[..., k : 2 * k, None], theta[..., -1:, None]
    terms = a - alpha * logx
    return _logsumexp(np.concatenate([terms, np.broadcast_to(e, terms[..., :1, :].shape)], -2), -2)


def objective(theta: np.ndarray, logx: np.ndarray, logy: np.ndarray) -> np.ndarray:
    """Sum of Huber losses of log-space residuals; vectorised over leading axes of theta."""
    return huber(DELTA, log_predict(theta, logx) - logy).sum(-1)


def _value_and_grad(theta: np.ndarray, logx: np.ndarray, logy: np.ndarray):
    k = logx.shape[0]
    terms = np.empty((k + 1, logx.shape[1]))
    terms[:k] = theta[:k, None] - theta[k : 2 * k, None] * logx
    terms[k] = theta[-1]
    pred = _logsumexp(terms, 0)
    weights = np.exp(terms - pred)  # d pred / d (each term)
    r = pred - logy
    dr = np.clip(r, -DELTA, DELTA)  # Huber's derivative
    grad = np.concatenate([weights[:k] @ dr, -(weights[:k] * logx) @ dr, [weights[k] @ dr]])
    return huber(DELTA, r).sum(), grad


def _polish(start: np.ndarray, logx: np.ndarray, logy: np.ndarray) -> tuple[np.ndarray, float]:
    # The Huber objective is tiny (~1e-3): tight tolerances, or L-BFGS-B stops at once.
    res = minimize(
        _value_and_grad,
        start,
        args=(logx, logy),
        jac=True,
        method="L-BFGS-B",
        options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 2000},
    )
    return res.x, float(res.fun)


def grid(k: int) -> np.ndarray:
    """Hoffmann's grid of initialisations for a law of k inputs."""
    axes = [A_GRID] * k + [EXPONENT_GRID] * k + [E_GRID]
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 2 * k + 1)


@cache
def _blas() -> ThreadpoolController:
    """The loaded BLAS libraries, found once: finding them takes ~3 ms with torch loaded,
    which a bootstrap of hundreds of fits paid at every fit."""
    return ThreadpoolController()


def fit_law(
    x: list[np.ndarray], y: np.ndarray, starts: int | None = 32, extra: list[np.ndarray] = ()
) -> LawFit:
    """Fit L = E + sum A_i / x_i^alpha_i to y. L-BFGS-B runs from the ``starts`` grid points
    of lowest objective (all of the grid with None) and any ``extra`` starts; the best wins."""
    logx, logy = np.log(np.stack(x)).astype(float), np.log(np.asarray(y, float))
    candidates = grid(len(x)) if starts != 0 else np.empty((0, 2 * len(x) + 1))
    if starts is not None and starts < len(candidates):
        values = objective(candidates, logx, logy)
        candidates = candidates[np.argsort(values)[:starts]]
    if len(extra):
        candidates = np.vstack([candidates, *extra])
    # L-BFGS-B's tiny BLAS calls slow down by 10x and more when BLAS spreads them on threads.
    with _blas().limit(limits=1, user_api="blas"):
        best = min((_polish(c, logx, logy) for c in candidates), key=lambda r: r[1])
    return LawFit(best[0], best[1], len(y))


def bootstrap(n_points: int, resamples: int, seed: int = 0) -> np.ndarray:
    """Index arrays of ``resamples`` bootstrap resamples of n points."""
    return np.random.default_rng(seed).integers(0, n_points, (resamples, n_points))


def bootstrap_law(
    fit: LawFit, x: list[np.ndarray], y: np.ndarray, resamples: int, seed: int = 0, starts: int = 0
) -> LawFit:
    """Refit on each resample from the full fit (and the best ``starts`` grid points). A
    resample moves the optimum a little, so the full fit alone starts close enough: on the
    Chinchilla runs, 60 resamples refitted from it and from 4 more grid points agreed within
    3e-3 in every log-parameter, at half the time (bench/analysis_fit.py)."""
    samples = []
    for idx in bootstrap(len(y), resamples, seed):
        refit = fit_law([v[idx] for v in x], y[idx], starts=starts, extra=[fit.theta])
        samples.append(refit.theta)
    fit.samples = np.array(samples)
    return fit


def fit_nd(params, tokens, loss, resamples: int, seed: int = 0) -> LawFit:
    """L(N, D) as the analysis fits it: the points checked (FitError if too few), the law
    fitted and bootstrapped."""
    check_law_points(params, tokens)
    return bootstrap_law(fit_law([params, tokens], loss), [params, tokens], loss, resamples, seed)


def interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central percentile interval of bootstrap values (NaNs, failed refits, dropped)."""
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    if not len(values):
        return (float("nan"), float("nan"))
    tail = 50 * (1 - level)
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def check_law_points(params: np.ndarray, tokens: np.ndarray) -> None:
    """Raise FitError saying what L(N, D) lacks: sizes, token counts, or independent N and D."""
    sizes, counts = len(np.unique(params)), len(np.unique(tokens))
    missing = []
    if sizes < MIN_SIZES:
        missing.append(f"{MIN_SIZES} distinct model sizes (has {sizes})")
    if counts < MIN_TOKEN_COUNTS:
        missing.append(f"{MIN_TOKEN_COUNTS} distinct token counts (has {counts})")
    if len(params) < MIN_TRIALS:
        missing.append(f"{MIN_TRIALS} points of distinct (N, D) (has {len(params)})")
    if missing:
        raise FitError(f"L(N, D) needs at least {', '.join(missing)}")
    if abs(np.corrcoef(np.log(params), np.log(tokens))[0, 1]) > 0.999:
        raise FitError(
            "L(N, D) cannot separate N from D: tokens grow in step with parameters "
            "(fixed tokens per parameter); needs several token counts per model size"
        )
