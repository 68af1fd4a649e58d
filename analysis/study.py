"""A study's whole analysis: every fit per layer mix, with bootstrap intervals, and what
they predict at the paper's scale. Fits use one point per (mix, N, D), the envelope of
the best-tuned trials; each fit and prediction carries its diagnostic flags; a backtest
refits without the largest trials and predicts them; each downstream task the trials
measured gets its own two-step fit (analysis/task_study.py). Where points are too few, the
reason replaces the fit."""

from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

from analysis.backtest import backtest
from analysis.diagnostics import Flag, isoflop_flags, law_flags, prediction_flags
from analysis.envelope import envelope
from analysis.extrapolate import (
    DECODE_BATCHES,
    PAPER_TOKENS,
    Target,
    compute_optimal,
    decode_tokens_per_s,
    first_crossover,
    flops_law,
    is_hybrid_axis,
    paper_target,
)
from analysis.fit import FitError, LawFit, fit_nd, interval
from analysis.frontier import bootstrap_frontier, fit_frontier
from analysis.isoflop import IsoFlopFit, bootstrap_isoflop, fit_isoflop
from analysis.table import Mix, by_mix, columns
from analysis.task_study import analyze_tasks
from arch.allocation import MAMBA2


@dataclass
class MixAnalysis:
    mix: Mix
    rows: list[dict]  # the envelope: one per (N, D), what the fits use
    trials: list[dict]  # every finished trial of the mix
    target: Target
    flops_law: np.ndarray
    law: LawFit | None = None
    isoflop: IsoFlopFit | None = None
    frontier: LawFit | None = None
    notes: list[str] = field(default_factory=list)  # what could not be fitted, and why
    flags: dict[str, list[Flag]] = field(default_factory=dict)  # per fit: "L(N, D)", ...

    def optimal(self, compute) -> dict[str, np.ndarray]:
        """Compute-optimal N, D, L at each compute: the full fit, shape (C,)."""
        return {
            k: v[0] for k, v in compute_optimal(self.law.theta, self.flops_law, compute).items()
        }

    def optimal_samples(self, compute) -> dict[str, np.ndarray]:
        return compute_optimal(self.law.samples, self.flops_law, compute)


def analyze_mix(mix: Mix, trials: list[dict], resamples: int, seed: int = 0) -> MixAnalysis:
    rows = envelope(trials)
    params, tokens, fpt, flops, loss = columns(
        rows, "params", "tokens", "flops_per_token", "flops", "val_loss"
    )
    target = paper_target(mix)
    result = MixAnalysis(mix, rows, trials, target, flops_law(params, fpt, target))
    try:
        result.law = fit_nd(params, tokens, loss, resamples, seed)
        result.flags["L(N, D)"] = law_flags(result.law, [params, tokens], loss, "L(N, D)")
    except FitError as err:
        result.notes.append(str(err))
    try:
        fit = fit_isoflop(params, tokens, flops, loss)
        result.isoflop = bootstrap_isoflop(fit, params, tokens, flops, loss, resamples, seed)
        result.flags["IsoFLOP"] = isoflop_flags(result.isoflop)
    except FitError as err:
        result.notes.append(str(err))
    try:
        result.frontier = bootstrap_frontier(
            fit_frontier(flops, loss), flops, loss, resamples, seed
        )
        result.flags["L(C)"] = law_flags(result.frontier, [flops], loss, "L(C)")
    except FitError as err:
        result.notes.append(str(err))
    return result


@dataclass
class StudyAnalysis:
    mixes: list[MixAnalysis]
    predictions: list[dict]  # per mix: the 8B losses and compute-optimal sizes, with intervals
    comparisons: list[dict]  # per pair of mixes: the 8B loss difference and its certainty
    crossovers: list[dict]  # per pair: where one overtakes the other on the compute frontier
    ratio_curves: dict[str, list[dict]]  # compute label -> loss against attention share
    compute_grid: np.ndarray
    notes: list[str]
    backtest: dict  # held-out trials predicted from refits without them
    tasks: list[dict]  # per downstream task: predicted 8B accuracy, or why not fitted


def _estimate(point: float, samples: np.ndarray) -> dict:
    lo, hi = interval(samples)
    return {"value": float(point), "lo": lo, "hi": hi}


def decode_key(batch: int) -> str:
    return f"decode tokens/s@batch {batch}"


def _law_estimates(m: MixAnalysis, compute: float) -> dict[str, dict]:
    t, out = m.target, {}
    for tokens in PAPER_TOKENS:
        out[loss_key(tokens)] = _estimate(
            m.law.predict(t.params, tokens), m.law.predict_samples(t.params, tokens)
        )
    point, samples = m.optimal([compute]), m.optimal_samples([compute])
    for key in ("N_opt", "D_opt", "L_opt"):
        out[key] = _estimate(point[key][0], samples[key][:, 0])
    return out


def _isoflop_estimates(m: MixAnalysis, compute: float) -> dict[str, dict]:
    iso, s = m.isoflop, m.isoflop.samples
    return {
        "isoflop N_opt": _estimate(
            iso.n_opt(compute), [iso.n_opt(compute, law) for law in s[:, :2]]
        ),
        "isoflop D_opt": _estimate(
            iso.d_opt(compute), [iso.d_opt(compute, law) for law in s[:, 2:]]
        ),
    }


def _frontier_estimates(m: MixAnalysis, compute: float) -> dict[str, dict]:
    return {
        "frontier L(C)": _estimate(m.frontier.predict(compute), m.frontier.predict_samples(compute))
    }


# Each fit's estimates at the 8B compute, by the fit's name in MixAnalysis.flags.
ESTIMATES = (
    ("L(N, D)", lambda m: m.law, _law_estimates),
    ("IsoFLOP", lambda m: m.isoflop, _isoflop_estimates),
    ("L(C)", lambda m: m.frontier, _frontier_estimates),
)


def loss_key(tokens: float) -> str:
    return f"loss@{tokens:.2g}"


def _is_loss(key: str) -> bool:
    return key.startswith("loss@") or key in ("L_opt", "frontier L(C)")


def estimate_flags(m: MixAnalysis, source: str, key: str, estimate: dict) -> list[Flag]:
    """An estimate's flags: its fit's, and for a loss whether the data make it plausible."""
    own = prediction_flags(key, estimate, columns(m.rows, "val_loss")[0]) if _is_loss(key) else []
    return m.flags.get(source, []) + own


def reach(m: MixAnalysis, compute: float) -> dict[str, float]:
    """How far the 8B target lies beyond the mix's largest trial, in N and in C."""
    params, flops = columns(m.rows, "params", "flops")
    return {"N": m.target.params / params.max(), "C": compute / flops.max()}


def predictions(m: MixAnalysis) -> dict:
    """The mix at its 8B configuration: losses at the paper's token counts, the
    compute-optimal split of the compute the 8B model spends on the first of them, and
    its modelled decode speed (known from the configuration alone, fitted or not); each
    estimate's flags, and how far the extrapolation reaches."""
    t = m.target
    compute = t.flops_per_token * PAPER_TOKENS[0]
    row = {"mix": m.mix.label, "config": t.name, "params": t.params, "compute": compute}
    row["reach"] = reach(m, compute)
    for batch in DECODE_BATCHES:
        row[decode_key(batch)] = decode_tokens_per_s(t.config, batch)
    row["flags"] = {}
    for source, fitted, estimates in ESTIMATES:
        if fitted(m) is None:
            continue
        for key, estimate in estimates(m, compute).items():
            row[key] = estimate
            flags = estimate_flags(m, source, key, estimate)
            if flags:
                row["flags"][key] = flags
    return row


def compare(a: MixAnalysis, b: MixAnalysis) -> list[dict]:
    """Loss of a minus loss of b at each paper token count, each at its own 8B size. Mixes
    are resampled independently, so sample i of one pairs with sample i of the other.
    ``flagged`` lists the flags of either mix's law or predicted loss."""
    out = []
    for tokens in PAPER_TOKENS:
        sa = a.law.predict_samples(a.target.params, tokens)
        sb = b.law.predict_samples(b.target.params, tokens)
        pa, pb = a.law.predict(a.target.params, tokens), b.law.predict(b.target.params, tokens)
        diff = sa - sb
        finite = diff[np.isfinite(diff)]
        flagged = [
            f"{m.mix.label}, {flag}"
            for m, point, samples in ((a, pa, sa), (b, pb, sb))
            for flag in estimate_flags(m, "L(N, D)", loss_key(tokens), _estimate(point, samples))
        ]
        out.append(
            {
                "a": a.mix.label,
                "b": b.mix.label,
                "tokens": tokens,
                "diff": _estimate(pa - pb, diff),
                "p_a_better": float(np.mean(finite < 0)),
                "flagged": flagged,
            }
        )
    return out


def crossover(a: MixAnalysis, b: MixAnalysis, grid: np.ndarray) -> dict:
    """Where the compute-optimal loss of a and b cross, from the smallest trial's compute;
    ``flagged`` lists the flags of either mix's L(N, D), which the frontier comes from."""
    lo = min(r["flops"] for r in a.rows + b.rows)
    c = grid[grid >= lo]
    la, lb = a.optimal(c)["L_opt"], b.optimal(c)["L_opt"]
    sa, sb = a.optimal_samples(c)["L_opt"], b.optimal_samples(c)["L_opt"]
    found = [first_crossover(c, x, y) for x, y in zip(sa, sb, strict=True)]
    point = first_crossover(c, la, lb)
    return {
        "a": a.mix.label,
        "b": b.mix.label,
        "C": _estimate(point, np.array(found)),
        "fraction_with_crossover": float(np.mean(np.isfinite(found))),
        "better_at_end": a.mix.label if la[-1] < lb[-1] else b.mix.label,
        "range": (float(c[0]), float(c[-1])),
        "flagged": [f"{m.mix.label}, {f}" for m in (a, b) for f in m.flags.get("L(N, D)", [])],
    }


def ratio_curves(fitted: list[MixAnalysis], budgets: dict[str, float]) -> dict[str, list[dict]]:
    """Compute-optimal loss against attention share at each fixed compute, per SSM kind."""
    curves = {}
    on_axis = [m for m in fitted if is_hybrid_axis(m.mix)]
    for label, compute in budgets.items():
        points = []
        for m in sorted(on_axis, key=lambda m: (m.mix.ssm, m.mix.attention)):
            point = m.optimal([compute])["L_opt"][0]
            samples = m.optimal_samples([compute])["L_opt"][:, 0]
            estimate = _estimate(point, samples)
            flags = estimate_flags(m, "L(N, D)", "L_opt", estimate)
            points.append(
                {
                    "mix": m.mix.label,
                    "ssm": m.mix.ssm,
                    "attention": m.mix.attention,
                    "mlp": m.mix.mlp,
                    "C": compute,
                    **estimate,
                    "flagged": [f"{m.mix.label}, {flag}" for flag in flags],
                }
            )
        curves[label] = points
    return curves


def analyze(
    rows: list[dict], resamples: int = 200, seed: int = 0, holdout: float | None = None
) -> StudyAnalysis:
    """Every fit of every mix; ``holdout``, a compute in FLOPs, picks the backtest's held-out
    trials (those above it; None: each mix's largest model size)."""
    notes = [] if rows else ["no finished trials with a val_loss in the store"]
    # A seed of its own per mix: mixes are resampled independently of each other.
    groups = by_mix(rows).items()
    mixes = [analyze_mix(mix, group, resamples, seed + i) for i, (mix, group) in enumerate(groups)]
    fitted = [m for m in mixes if m.law is not None]
    if len(fitted) < 2:
        notes.append(
            "comparisons, crossovers and the hybrid-ratio curve need L(N, D) fits of at "
            f"least 2 layer mixes; {len(fitted)} fitted"
        )
    top = max((m.target.flops_per_token * PAPER_TOKENS[-1] for m in mixes), default=1e24)
    bottom = min((r["flops"] for r in rows), default=1e15) / 10
    grid = np.geomspace(bottom, 10 * top, 400)
    budgets = {}
    if rows:
        budgets["largest study compute"] = max(r["flops"] for r in rows)
    paper_hybrid = paper_target(Mix(MAMBA2, 0.08, 0.5))  # the paper's 8B hybrid
    budgets["hybrid_8b at 1.1T tokens"] = paper_hybrid.flops_per_token * PAPER_TOKENS[0]
    return StudyAnalysis(
        mixes=mixes,
        predictions=[predictions(m) for m in mixes],
        comparisons=[row for a, b in combinations(fitted, 2) for row in compare(a, b)],
        crossovers=[crossover(a, b, grid) for a, b in combinations(fitted, 2)],
        ratio_curves=ratio_curves(fitted, budgets) if len(fitted) >= 2 else {},
        compute_grid=grid,
        notes=notes,
        backtest=backtest([(m.mix, m.rows) for m in mixes], holdout, resamples, seed),
        tasks=analyze_tasks([r for m in mixes for r in m.rows], resamples, seed, holdout),
    )
