"""The report's figures: each function draws one and returns PNG bytes. Figures are made
without pyplot (no global state, no GUI backend: Agg renders them)."""

import io

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from analysis.extrapolate import PAPER_TOKENS
from analysis.fit import interval
from analysis.study import StudyAnalysis
from analysis.table import columns


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _band(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    bounds = np.array([interval(column) for column in samples.T])
    return bounds[:, 0], bounds[:, 1]


def _colors(n: int) -> list:
    return [colormaps["tab10"](i % 10) for i in range(n)]


def loss_vs_compute(study: StudyAnalysis) -> bytes | None:
    """Every trial, each mix's L(C) frontier fit and its compute-optimal L(N, D) curve."""
    if not study.mixes:
        return None
    fig = Figure(figsize=(7.5, 5))
    ax = fig.subplots()
    for m, color in zip(study.mixes, _colors(len(study.mixes)), strict=True):
        flops, loss = columns(m.rows, "flops", "val_loss")
        ax.scatter(flops, loss, s=14, color=color, alpha=0.6, label=m.mix.label)
        c = np.geomspace(flops.min(), flops.max() * 100, 120)
        if m.frontier is not None:
            ax.plot(c, m.frontier.predict(c), color=color, ls="--", lw=1)
        if m.law is not None:
            ax.plot(c, m.optimal(c)["L_opt"], color=color, lw=1.5)
            ax.fill_between(c, *_band(m.optimal_samples(c)["L_opt"]), color=color, alpha=0.2)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="training FLOPs",
        ylabel="validation loss",
        title="Loss against compute (solid: compute-optimal L(N, D); dashed: L(C) frontier)",
    )
    ax.legend(fontsize=8)
    return _png(fig)


def isoflop_profiles(study: StudyAnalysis) -> bytes | None:
    fitted = [m for m in study.mixes if m.isoflop is not None]
    if not fitted:
        return None
    fig = Figure(figsize=(5 * len(fitted), 4))
    axes = fig.subplots(1, len(fitted), squeeze=False)
    for ax, m in zip(axes[0], fitted, strict=True):
        params, loss = columns(m.rows, "params", "val_loss")
        for budget, color in zip(m.isoflop.budgets, _colors(len(m.isoflop.budgets)), strict=True):
            idx = budget["idx"]
            ax.scatter(params[idx], loss[idx], s=14, color=color, label=f"C={budget['C']:.2g}")
            logn = np.linspace(np.log(params[idx]).min(), np.log(params[idx]).max(), 60)
            ax.plot(np.exp(logn), np.polyval(budget["n_coef"], logn), color=color, lw=1)
            ax.axvline(budget["N_opt"], color=color, ls=":", lw=1)
        ax.set(xscale="log", xlabel="parameters N", ylabel="validation loss", title=m.mix.label)
        ax.legend(fontsize=7)
    fig.suptitle("IsoFLOP profiles (dotted: the parabola's minimum, N_opt)")
    return _png(fig)


def optimal_sizes(study: StudyAnalysis) -> bytes | None:
    """N_opt(C) from IsoFLOP profiles (points, power law) and from L(N, D) (line, band)."""
    fitted = [m for m in study.mixes if m.isoflop is not None or m.law is not None]
    if not fitted:
        return None
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    c = study.compute_grid
    for m, color in zip(fitted, _colors(len(fitted)), strict=True):
        if m.isoflop is not None:
            budgets = m.isoflop.budgets
            ax.scatter([b["C"] for b in budgets], [b["N_opt"] for b in budgets], color=color)
            ax.plot(c, m.isoflop.n_opt(c), color=color, ls="--", lw=1)
        if m.law is not None:
            ax.plot(c, m.optimal(c)["N_opt"], color=color, lw=1.5, label=m.mix.label)
            ax.fill_between(c, *_band(m.optimal_samples(c)["N_opt"]), color=color, alpha=0.2)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="training FLOPs",
        ylabel="compute-optimal N",
        title="Compute-optimal size (solid: L(N, D); dashed, points: IsoFLOP)",
    )
    ax.legend(fontsize=8)
    return _png(fig)


def predictions_8b(study: StudyAnalysis) -> bytes | None:
    rows = [r for r in study.predictions if f"loss@{PAPER_TOKENS[0]:.2g}" in r]
    if not rows:
        return None
    fig = Figure(figsize=(7, 0.6 * len(rows) + 2))
    ax = fig.subplots()
    for j, (tokens, color) in enumerate(zip(PAPER_TOKENS, _colors(2), strict=True)):
        est = [r[f"loss@{tokens:.2g}"] for r in rows]
        y = np.arange(len(rows)) + 0.15 * (2 * j - 1)
        value = np.array([e["value"] for e in est])
        err = np.abs(np.array([[e["lo"], e["hi"]] for e in est]).T - value)
        ax.errorbar(
            value,
            y,
            xerr=err,
            fmt="o",
            color=color,
            capsize=3,
            label=f"{tokens / 1e12:.2g}T tokens",
        )
    ax.set_yticks(np.arange(len(rows)), [f"{r['mix']}\n{r['params'] / 1e9:.2f}B" for r in rows])
    ax.set(xlabel="predicted loss (95% bootstrap interval)", title="Predicted loss at 8B")
    ax.legend(fontsize=8)
    return _png(fig)


def ratio_curve(study: StudyAnalysis) -> bytes | None:
    curves = {k: v for k, v in study.ratio_curves.items() if len(v) >= 2}
    if not curves:
        return None
    fig = Figure(figsize=(5.5 * len(curves), 4))
    axes = fig.subplots(1, len(curves), squeeze=False)
    for ax, (label, points) in zip(axes[0], curves.items(), strict=True):
        for ssm, color in zip(sorted({p["ssm"] for p in points}), _colors(2), strict=False):
            line = [p for p in points if p["ssm"] == ssm]
            x = np.array([p["attention"] for p in line])
            value = np.array([p["value"] for p in line])
            err = np.abs(np.array([[p["lo"], p["hi"]] for p in line]).T - value)
            ax.errorbar(
                x,
                value,
                yerr=err,
                fmt="o-",
                color=color,
                capsize=3,
                label={"M": "Mamba-2", "m": "Mamba"}[ssm],
            )
        ax.set(
            xlabel="attention share of layers",
            ylabel="compute-optimal loss",
            title=f"{label} (C = {points[0]['C']:.2g})",
        )
        ax.legend(fontsize=8)
    fig.suptitle("Hybrid-ratio curve: loss against attention share at fixed compute")
    return _png(fig)


def fit_residuals(study: StudyAnalysis) -> bytes | None:
    fitted = [m for m in study.mixes if m.law is not None]
    if not fitted:
        return None
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    for m, color in zip(fitted, _colors(len(fitted)), strict=True):
        params, tokens, loss = columns(m.rows, "params", "tokens", "val_loss")
        ax.scatter(loss, m.law.predict(params, tokens), s=12, color=color, label=m.mix.label)
    low, high = ax.get_xlim()
    ax.plot([low, high], [low, high], color="grey", lw=1)
    ax.set(xlabel="observed loss", ylabel="L(N, D) fit", title="Parametric fit against data")
    ax.legend(fontsize=8)
    return _png(fig)


PROBE_SIZES = 3  # lines per probe: each mix's largest sizes, more would crowd the plot


def probe_names(study: StudyAnalysis) -> list[str]:
    keys = {k for m in study.mixes for r in m.trials for k in r}
    return sorted(k for k in keys if k.startswith("probe_") and k.endswith("_acc"))


def largest_budget_accuracy(trials: list[dict], probe: str) -> list[float]:
    """Per model size, largest first: the probe's accuracy at that size's largest compute
    (the mean over the trials there, seeds or settings)."""
    measured = [r for r in trials if probe in r]
    out = []
    for size in sorted({r["params"] for r in measured}, reverse=True):
        at_size = [r for r in measured if r["params"] == size]
        top = max(r["flops"] for r in at_size)
        out.append(float(np.mean([r[probe] for r in at_size if r["flops"] == top])))
    return out


def _ordinal(rank: int) -> str:
    return "largest size" if rank == 0 else f"{rank + 1}{'nd' if rank == 1 else 'rd'} largest"


def probe_accuracy(study: StudyAnalysis) -> bytes | None:
    """Each probe's accuracy against attention share: one line per size rank within each
    mix (its largest, 2nd, 3rd largest model), at that size's largest compute."""
    probes = probe_names(study)
    if not probes:
        return None
    fig = Figure(figsize=(5.5 * len(probes), 4))
    axes = fig.subplots(1, len(probes), squeeze=False)
    for ax, probe in zip(axes[0], probes, strict=True):
        lines: dict[int, list[tuple[float, float]]] = {}
        for m in study.mixes:
            accuracies = largest_budget_accuracy(m.trials, probe)[:PROBE_SIZES]
            for rank, accuracy in enumerate(accuracies):
                lines.setdefault(rank, []).append((m.mix.attention, accuracy))
        for rank, color in zip(sorted(lines), _colors(len(lines)), strict=True):
            x, y = zip(*sorted(lines[rank]), strict=True)
            ax.plot(x, y, "o-", color=color, label=_ordinal(rank))
        name = probe.removeprefix("probe_").removesuffix("_acc")
        ax.set(xlabel="attention share of layers", ylabel="accuracy", title=name, ylim=(0, 1.02))
        ax.legend(fontsize=8)
    fig.suptitle("Probe accuracy against attention share (each size at its largest compute)")
    return _png(fig)


FIGURES = {
    "loss_vs_compute": loss_vs_compute,
    "isoflop_profiles": isoflop_profiles,
    "optimal_sizes": optimal_sizes,
    "predictions_8b": predictions_8b,
    "ratio_curve": ratio_curve,
    "fit_residuals": fit_residuals,
    "probe_accuracy": probe_accuracy,
}
