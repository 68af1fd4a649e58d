"""A study's downstream tasks for the report, each through analysis/tasks.py's two steps:
which tasks the trials measured, which are too close to chance to predict, and for the
rest each mix's predicted 8B accuracy with its flags, the accuracy difference of every
pair of mixes beside the paper's finding where it gives one, and the backtest.

A task is a probe (probe_<name>_bpb its task loss, probe_<name>_acc its accuracy; an exact
answer of several characters is never guessed, so its chance is 0) or a local task
(task_<name>_bpb, task_<name>_acc, its chance task_<name>_chance). A task whose every
trial's accuracy is within NEAR_CHANCE of chance is listed, not fitted: its accuracy has
not begun to rise, so no sigmoid can be read from it.
"""

from itertools import combinations

import numpy as np

from analysis.diagnostics import (
    law_flags,
    prediction_flags,
    sigmoid_flags,
    sigmoid_reach_flags,
)
from analysis.extrapolate import PAPER_TOKENS, paper_target
from analysis.fit import interval
from analysis.table import TASK_METRIC, by_mix, columns
from analysis.tasks import TaskLadder, backtest_task, fit_ladder, paper_predictions

NEAR_CHANCE = 0.05  # accuracy above chance that no trial reaches: nothing learnt yet
PROBE_CHANCE = 0.0

# What the paper says of a task, by our task's name and the pair of mix families
# (Waleffe et al. 2024, abstract: its tables give the per-task numbers).
PAPER_FINDINGS = {
    ("phonebook", frozenset({"Mamba-2", "Transformer"})): "Mamba-2 behind the Transformer",
    ("phonebook", frozenset({"Mamba", "Transformer"})): "Mamba behind the Transformer",
    ("mmlu", frozenset({"Mamba-2", "Transformer"})): "Mamba-2 behind the Transformer (5-shot)",
    ("mmlu", frozenset({"Mamba", "Transformer"})): "Mamba behind the Transformer (5-shot)",
}
PAPER_SUMMARY = (
    "The paper (Waleffe et al. 2024, abstract) at 8B: the Mamba-2-Hybrid beats the "
    "Transformer on all 12 of its standard tasks, +2.65 points on average; Mamba and "
    "Mamba-2 lag the Transformer on five-shot MMLU and Phonebook."
)


def measured_tasks(rows: list[dict]) -> list[tuple[str, str]]:
    """(kind, name) of every task some trial logged both an accuracy and a loss of."""
    found: dict[tuple[str, str], set[str]] = {}
    for row in rows:
        for key in row:
            if match := TASK_METRIC.match(key):
                kind, name, measure = match.groups()
                found.setdefault((kind, name), set()).add(measure)
    return sorted(task for task, measures in found.items() if {"acc", "bpb"} <= measures)


def _estimate(value: float, samples: np.ndarray) -> dict:
    lo, hi = interval(samples)
    return {"value": float(value), "lo": lo, "hi": hi}


def _params(fit) -> dict[str, dict]:
    samples = fit.sample_params()
    return {name: _estimate(value, samples[name]) for name, value in fit.params().items()}


def _flags(ladder: TaskLadder, rows: list[dict], loss_key: str) -> dict:
    """The flags of each mix's task-loss law and each family's sigmoid."""
    out = {}
    for mix, law in ladder.losses.items():
        params, tokens, loss = columns(by_mix(rows)[mix], "params", "tokens", loss_key)
        out[mix] = law_flags(law, [params, tokens], loss, "task L(N, D)")
    for family, curve in ladder.accuracies.items():
        out[family] = sigmoid_flags(curve, "accuracy sigmoid")
    return out


def _predictions(ladder: TaskLadder, rows: list[dict], loss_key: str) -> list[dict]:
    """paper_predictions with each one's reach and flags: on the task loss, its law's and
    its plausibility; on the accuracy, those, the sigmoid's and how far it reads past
    the sigmoid's data."""
    fitted, mixes = _flags(ladder, rows, loss_key), {m.label: m for m in ladder.losses}
    groups, out = by_mix(rows), []
    for p in paper_predictions(ladder):
        mix = mixes[p["mix"]]
        params, flops, loss = columns(groups[mix], "params", "flops", loss_key)
        family = [r for r in rows if r["mix"].family == mix.family]
        target = paper_target(mix)
        on_loss = fitted[mix] + prediction_flags("task loss", p["loss"], loss)
        reach = sigmoid_reach_flags("accuracy", p["loss"]["value"], columns(family, loss_key)[0])
        p["reach"] = {"N": target.params / params.max(),
                      "C": target.flops_per_token * PAPER_TOKENS[0] / flops.max()}  # fmt: skip
        p["flags"] = {"loss": on_loss, "accuracy": on_loss + fitted[mix.family] + reach}
        out.append(p)
    return out


def _differences(name: str, ladder: TaskLadder, predictions: list[dict]) -> list[dict]:
    """Accuracy of A minus B for every pair of mixes, each at its 8B configuration (sample
    i of one with sample i of the other), the paper's finding beside it."""
    flags = {(p["mix"], p["D"]): p["flags"]["accuracy"] for p in predictions}
    mixes = [m for m in ladder.losses if ladder.can_predict(m)]
    out = []
    for a, b in combinations(mixes, 2):
        ta, tb = paper_target(a), paper_target(b)
        for tokens in PAPER_TOKENS:
            diff = ladder.predict_samples(a, ta.params, tokens) - ladder.predict_samples(
                b, tb.params, tokens
            )
            point = (ladder.predict(a, ta.params, tokens)["accuracy"]["value"]
                     - ladder.predict(b, tb.params, tokens)["accuracy"]["value"])  # fmt: skip
            finite = diff[np.isfinite(diff)]
            out.append({
                "a": a.label, "b": b.label, "tokens": tokens, "diff": _estimate(point, diff),
                "p_a_better": float(np.mean(finite > 0)),
                "flagged": [f"{m.label}, {f}" for m in (a, b) for f in flags[m.label, tokens]],
                "paper": PAPER_FINDINGS.get((name, frozenset({a.family, b.family})), ""),
            })  # fmt: skip
    return out


def analyze_task(
    kind: str, name: str, rows: list[dict], resamples: int, seed: int, cutoff: float | None
) -> dict:
    """One task: listed as near chance, or fitted, predicted at 8B and backtested."""
    prefix = f"{kind}_{name}"
    loss_key, accuracy_key = f"{prefix}_bpb", f"{prefix}_acc"
    rows = [r for r in rows if np.isfinite(r.get(loss_key, np.nan)) and accuracy_key in r]
    accuracy = columns(rows, accuracy_key)[0]
    chance = PROBE_CHANCE
    if kind == "task":
        chance = float(np.mean([r[f"{prefix}_chance"] for r in rows]))
    out = {
        "task": name,
        "kind": kind,
        "loss_key": loss_key,
        "accuracy_key": accuracy_key,
        "points": len(rows),
        "chance": chance,
        "best_accuracy": float(accuracy.max()),
    }
    if accuracy.max() < chance + NEAR_CHANCE:
        return out | {"status": "near chance"}
    ladder = fit_ladder(rows, prefix, loss_key, accuracy_key, resamples, seed)
    predictions = _predictions(ladder, rows, loss_key)
    return out | {
        "status": "fitted",
        "predictions": predictions,
        "differences": _differences(name, ladder, predictions),
        "fits": {
            "loss": {m.label: _params(f) for m, f in ladder.losses.items()},
            "accuracy": {k: _params(f) for k, f in ladder.accuracies.items()},
        },
        "backtest": backtest_task(rows, prefix, loss_key, accuracy_key, cutoff, resamples, seed),
        "notes": ladder.notes,
    }


def analyze_tasks(
    rows: list[dict], resamples: int, seed: int = 0, cutoff: float | None = None
) -> list[dict]:
    """Every measured task of the fitted points ``rows`` (a seed of its own per task)."""
    return [
        analyze_task(kind, name, rows, resamples, seed + i, cutoff)
        for i, (kind, name) in enumerate(measured_tasks(rows))
    ]
