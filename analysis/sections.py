"""The report's sections on how far its numbers can be trusted: how trials became the
fitted points (the hyperparameter envelope), the backtest, and what each mix's trials
were (position encoding, repeated data)."""

from collections import Counter

import numpy as np

from analysis.blocks import Block, est, num
from analysis.envelope import summary
from analysis.study import StudyAnalysis

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
