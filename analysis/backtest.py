"""Backtests: does L(N, D) predict trials it has not seen? Each mix is refitted, by the
same procedure and bootstrap, without its held-out trials (those above a compute cutoff,
or by default its largest model size), and each held-out trial's loss is predicted with
its 95% interval: the 8B extrapolation in miniature. One trial's loss carries the noise
of its seed, which the law's mean does not, so the interval is over the bootstrap's laws
times the refit's own log-residuals (each law with each residual)."""

import numpy as np

from analysis.fit import FitError, LawFit, fit_nd, interval
from analysis.table import Mix, columns


def held_out(rows: list[dict], cutoff: float | None) -> np.ndarray:
    """Which rows a backtest holds out: above ``cutoff`` FLOPs, or (None) the largest size."""
    params, flops = columns(rows, "params", "flops")
    return flops > cutoff if cutoff is not None else params == params.max()


def rule(cutoff: float | None) -> str:
    if cutoff is None:
        return "each mix's largest model size held out"
    return f"trials above {cutoff:.3g} FLOPs held out"


def log_scatter(fit: LawFit, rows: list[dict], key: str = "val_loss") -> np.ndarray:
    """The rows' log-residuals about the law: how far one trial's loss strays from it."""
    params, tokens, loss = columns(rows, "params", "tokens", key)
    return np.log(loss) - np.log(fit.predict(params, tokens))


def predicted(
    label: str, row: dict, fit: LawFit, scatter: np.ndarray, key: str = "val_loss"
) -> dict:
    """The row's loss under ``key`` against the law's prediction and its interval."""
    value = float(fit.predict(row["params"], row["tokens"]))
    laws = fit.predict_samples(row["params"], row["tokens"])
    lo, hi = interval(np.outer(laws, np.exp(scatter)))
    observed = row[key]
    return {
        "mix": label,
        "trial": row["trial"],
        "N": row["params"],
        "D": row["tokens"],
        "observed": observed,
        "predicted": {"value": value, "lo": lo, "hi": hi},
        "error_pct": 100 * (value - observed) / observed,
        "inside": bool(lo <= observed <= hi),
    }


def backtest_mix(
    mix: Mix, rows: list[dict], cutoff: float | None, resamples: int, seed: int = 0
) -> tuple[list[dict], str | None]:
    """The mix's held-out trials, predicted; or a note saying why there are none."""
    out = held_out(rows, cutoff)
    if not out.any():
        return [], f"{mix.label}: no trial held out ({rule(cutoff)})"
    kept = [r for r, o in zip(rows, out, strict=True) if not o]
    params, tokens, loss = columns(kept, "params", "tokens", "val_loss")
    try:
        fit = fit_nd(params, tokens, loss, resamples, seed)
    except FitError as err:
        return [], f"{mix.label}: cannot refit without the held-out trials: {err}"
    scatter = log_scatter(fit, kept)
    found = [predicted(mix.label, r, fit, scatter) for r, o in zip(rows, out, strict=True) if o]
    return found, None


def summary(trials: list[dict], error: str = "error_pct") -> dict:
    """Mean and max |error| (in percent, or the unit ``error`` names), and how many
    observed values fell inside their intervals."""
    errors = np.abs([t[error] for t in trials])
    return {
        f"mean_abs_{error}": float(errors.mean()) if len(errors) else None,
        f"max_abs_{error}": float(errors.max()) if len(errors) else None,
        "inside": sum(t["inside"] for t in trials),
        "total": len(trials),
    }


def backtest(
    mixes: list[tuple[Mix, list[dict]]], cutoff: float | None, resamples: int, seed: int = 0
) -> dict:
    """Every mix's backtest (a seed of its own per mix, as the analysis fits them)."""
    trials, notes = [], []
    for i, (mix, rows) in enumerate(mixes):
        predicted, note = backtest_mix(mix, rows, cutoff, resamples, seed + i)
        trials += predicted
        notes += [note] if note else []
    return {"rule": rule(cutoff), "trials": trials, "notes": notes, "summary": summary(trials)}
