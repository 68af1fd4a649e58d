"""The report's sections beyond the loss fits: how trials became the fitted points (the
hyperparameter envelope), the backtest, downstream tasks at 8B, and what each mix's
trials were (position encoding, repeated data)."""

from collections import Counter

import numpy as np

from analysis.blocks import Block, Footnotes, est, noted, num, times
from analysis.envelope import summary
from analysis.extrapolate import PAPER_TOKENS
from analysis.study import StudyAnalysis
from analysis.task_study import NEAR_CHANCE, PAPER_SUMMARY

REPEATED_EPOCHS = 4  # more passes over the corpus than this: repeated data shows in loss


def _edge_note(label: str, edges: list[dict]) -> Block:
    where = "; ".join(
        f"N {num(e['N'])}, D {num(e['D'])}: lr {num(e['lr'])}, the {e['edge']} of "
        f"{', '.join(map(num, e['lrs']))}"
        for e in edges
    )
    return Block(
        "p",
        f"{label}: the chosen lr is at the edge of those tried ({where}); the best lr may "
        "lie outside them, and the point's loss be higher than tuned.",
    )


def envelope_section(study: StudyAnalysis) -> list[Block]:
    """Per mix: trials, fitted points, the rule that made one of the other, the lrs."""
    rows, notes = [], []
    for m in study.mixes:
        s = summary(m.rows)
        edges = s["lr_at_edge"]
        rows.append(
            (
                m.mix.label,
                s["trials"],
                s["points"],
                s["rule"],
                ", ".join(map(num, s["lrs"])) or "n/a",
                f"{len(edges)} of {s['points']}",
            )
        )
        notes += [_edge_note(m.mix.label, edges)] if edges else []
    text = (
        "The fits use one point per (mix, N, D): the mean val_loss over seeds of each "
        "training setting (lr and the other training knobs), then the setting of lowest mean."
    )
    header = ("mix", "trials", "fitted points", "rule", "lrs tried", "chosen lr at an edge")
    return [
        Block("h2", "From trials to fitted points"),
        Block("p", text),
        Block("table", header=header, rows=tuple(rows)),
        *notes,
    ]


def _backtest_text(backtest: dict) -> str:
    s = backtest["summary"]
    text = (
        f"Each mix's L(N, D), refitted by the same procedure and bootstrap without its "
        f"held-out trials ({backtest['rule']}), predicts them. The interval is over the "
        "bootstrap's laws and the refit's own residual scatter, since one trial's loss "
        "carries its seed's noise. "
    )
    if not s["total"]:
        return text + "No held-out trial could be predicted."
    return text + (
        f"Mean |error| {s['mean_abs_error_pct']:.2f}%, max {s['max_abs_error_pct']:.2f}%; "
        f"{s['inside']} of {s['total']} observed losses inside their 95% intervals."
    )


def backtest_section(study: StudyAnalysis) -> list[Block]:
    backtest = study.backtest
    rows = tuple(
        (
            t["mix"],
            t["trial"],
            num(t["N"]),
            num(t["D"]),
            f"{t['observed']:.4f}",
            est(t["predicted"]),
            f"{t['error_pct']:+.2f}",
            "yes" if t["inside"] else "no",
        )
        for t in backtest["trials"]
    )
    header = ("mix", "trial", "N", "D", "observed", "predicted [95%]", "error %", "inside")
    out = [
        Block("h2", "Backtest: predicting held-out trials"),
        Block("p", _backtest_text(backtest)),
    ]
    if rows:
        out.append(Block("table", header=header, rows=rows))
    return out + [Block("p", note) for note in backtest["notes"]]


TASK_TEXT = (
    "Each task's loss (bits per byte of its correct answers) is fitted as L(N, D) per mix, "
    "then accuracy as a sigmoid of that loss per mix family (Bhagia et al. 2024); a "
    "prediction pushes each bootstrap sample of the law through the matching sample of the "
    "sigmoid, so its 95% interval carries both. Probes score exact answers (chance 0); "
    "local tasks pick the choice of lowest loss. Reach: the 8B N and its compute at "
    f"{PAPER_TOKENS[0] / 1e12:.2g}T tokens over those of the mix's largest trial measured."
)


def _task_label(task: dict) -> str:
    return f"{task['task']} (probe)" if task["kind"] == "probe" else task["task"]


def _points(e: dict) -> dict:
    return {key: 100 * e[key] for key in ("value", "lo", "hi")}


def _task_predictions(fitted: list[dict]) -> list[Block]:
    notes, rows = Footnotes(), []
    for task in fitted:
        by_mix: dict[str, dict] = {}
        for p in task["predictions"]:
            by_mix.setdefault(p["mix"], {})[p["D"]] = p
        for mix, at in by_mix.items():
            first = at[PAPER_TOKENS[0]]
            reach = f"{times(first['reach']['N'])} in N, {times(first['reach']['C'])} in C"
            cells = [
                notes.mark(est(at[d][kind]), noted(mix, at[d]["flags"][kind]))
                for d in PAPER_TOKENS
                for kind in ("loss", "accuracy")
            ]
            rows.append((_task_label(task), mix, reach, *cells))
    if not rows:
        return []
    header = ("task", "mix", "reach") + tuple(
        f"{kind} at {d / 1e12:.2g}T" for d in PAPER_TOKENS for kind in ("task loss", "accuracy")
    )
    return [Block("table", header=header, rows=tuple(rows)), *notes.blocks()]


def _task_differences(fitted: list[dict]) -> list[Block]:
    notes, rows = Footnotes(), []
    for task in fitted:
        for c in task["differences"]:
            p = "rests on a flagged fit" if c["flagged"] else f"{c['p_a_better']:.2f}"
            rows.append((_task_label(task), c["a"], c["b"], f"{c['tokens'] / 1e12:.2g}T",
                         notes.mark(est(_points(c["diff"])), c["flagged"]), p,
                         c["paper"] or "-"))  # fmt: skip
    if not rows:
        return []
    text = (
        "Accuracy of A minus accuracy of B in points, each at its 8B configuration; "
        "positive means A is better. P(A better): the share of bootstrap pairs in which A "
        "is; not given where either prediction is flagged. " + PAPER_SUMMARY
    )
    header = ("task", "A", "B", "tokens", "accuracy A - B (points)", "P(A better)", "paper")
    return [
        Block("p", text),
        Block("table", header=header, rows=tuple(rows)),
        *notes.blocks(),
    ]


def _task_backtests(fitted: list[dict]) -> list[Block]:
    rows = []
    for task in fitted:
        loss, accuracy = (task["backtest"]["summary"][k] for k in ("loss", "accuracy"))
        if not loss["total"]:
            continue
        rows.append((_task_label(task), loss["total"],
                     f"{loss['mean_abs_error_pct']:.2f} (max {loss['max_abs_error_pct']:.2f})",
                     f"{loss['inside']} of {loss['total']}",
                     f"{accuracy['mean_abs_error_points']:.2f} "
                     f"(max {accuracy['max_abs_error_points']:.2f})",
                     f"{accuracy['inside']} of {accuracy['total']}"))  # fmt: skip
    rule = fitted[0]["backtest"]["rule"] if fitted else ""
    text = (
        f"Both steps refitted without the held-out trials ({rule}), which they predict: "
        "the task loss's error in percent, the accuracy's in points; inside: observed "
        "values within their 95% intervals."
    )
    header = ("task", "held out", "task loss: mean (max) error %", "inside",
              "accuracy: mean (max) error, points", "inside")  # fmt: skip
    if not rows:
        return [Block("p", f"{text} No held-out trial could be predicted.")]
    return [Block("p", text), Block("table", header=header, rows=tuple(rows))]


def _near_chance(task: dict) -> str:
    return (
        f"{_task_label(task)}: every trial's accuracy within {100 * NEAR_CHANCE:.0f} points "
        f"of chance ({100 * task['chance']:.3g}%; best {100 * task['best_accuracy']:.3g}% over "
        f"{task['points']} points): too noisy to predict, not fitted."
    )


def task_section(study: StudyAnalysis) -> list[Block]:
    """Predicted 8B accuracy per task and mix, the mixes' differences beside the paper's,
    the backtest per task, and the tasks too close to chance to fit."""
    if not study.tasks:
        return []
    fitted = [t for t in study.tasks if t["status"] == "fitted"]
    out = [Block("h2", "Downstream tasks at 8B"), Block("p", TASK_TEXT)]
    if fitted:
        out += _task_predictions(fitted) + _task_differences(fitted) + _task_backtests(fitted)
    out += [Block("p", _near_chance(t)) for t in study.tasks if t["status"] == "near chance"]
    notes = [n for t in fitted for n in t["notes"]]
    notes += [f"backtest: {n}" for t in fitted for n in t["backtest"]["notes"]]
    return out + [Block("p", note) for note in dict.fromkeys(notes)]


def _rope(fraction: float) -> str:
    return f"RoPE on {fraction:.0%} of each head" if fraction > 0 else "none"


def _trials(n: int) -> str:
    return f"{n} trial" if n == 1 else f"{n} trials"


def position_encoding(attention: float, trials: list[dict]) -> str:
    """How the mix's attention knows position: RoPE on a share of each head or none, each
    with its trial count where the trials differ."""
    if not attention:
        return "no attention layers"
    counts = Counter(r["rotary_fraction"] for r in trials)
    if len(counts) == 1:
        return _rope(next(iter(counts)))
    return "; ".join(f"{_rope(f)} ({_trials(counts[f])})" for f in sorted(counts))


def epochs_cell(epochs: float) -> str:
    """Epochs over the training corpus, as a warning past REPEATED_EPOCHS."""
    if not epochs > REPEATED_EPOCHS:
        return num(epochs)
    return f"trained up to {num(epochs)} epochs over the corpus: repeated data"


def most_epochs(trials: list[dict]) -> float:
    logged = [r["epochs"] for r in trials if np.isfinite(r["epochs"])]
    return max(logged, default=np.nan)


def data_section(study: StudyAnalysis) -> list[Block]:
    rows = tuple(
        (
            m.mix.label,
            position_encoding(m.mix.attention, m.trials),
            epochs_cell(most_epochs(m.trials)),
        )
        for m in study.mixes
    )
    return [
        Block("h2", "Position encoding and data"),
        Block(
            "table", header=("mix", "position encoding", "most epochs over the corpus"), rows=rows
        ),
    ]
