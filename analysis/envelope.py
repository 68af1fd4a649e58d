"""The hyperparameter envelope: one point per (mix, N, D) for the fits.

Trials of one model size and token count that differ only in training settings (lr,
other knobs) and seed are one point of the law. Fitting them all would weight a point by
its number of trials and pull the law toward badly tuned runs. So, per (mix, N, D): the
mean val_loss over seeds of each setting, then the setting of lowest mean; the law is
the envelope of the best-tuned runs, as the scaling-law papers fit it. The point's task
metrics are its setting's means over seeds too."""

import numpy as np

from analysis.table import TASK_METRIC


def _setting(row: dict) -> tuple:
    # rotary_fraction keeps models of different position encoding apart: never averaged.
    return (row["lr"], row["rotary_fraction"], row["setting"])


def _best(group: list[dict]) -> dict:
    """The row of a (mix, N, D) group's best setting, its loss the mean over seeds."""
    settings: dict[tuple, list[dict]] = {}
    for row in group:
        settings.setdefault(_setting(row), []).append(row)
    means = {key: float(np.mean([r["val_loss"] for r in rows])) for key, rows in settings.items()}
    key = min(means, key=means.get)
    chosen = settings[key]
    lrs = sorted({r["lr"] for r in group if r["lr"] is not None})
    tasks = {k for r in chosen for k in r if TASK_METRIC.match(k)}
    return {
        **chosen[0],
        **{k: float(np.mean([r[k] for r in chosen if k in r])) for k in tasks},
        "val_loss": means[key],
        "trials": len(group),
        "settings": len(settings),
        "seeds": len(chosen),
        "lrs": lrs,
        "lr_at_edge": lr_edge(chosen[0]["lr"], lrs),
    }


def lr_edge(lr: float | None, lrs: list[float]) -> str | None:
    """Whether the chosen lr is the "lowest" or "highest" of several tried (else None)."""
    if len(lrs) < 2 or lr is None:
        return None
    return "lowest" if lr == lrs[0] else "highest" if lr == lrs[-1] else None


def envelope(rows: list[dict]) -> list[dict]:
    """One row per (mix, params, tokens): its best setting's mean loss over seeds, with
    how many trials it stands for, the lrs tried, the number of settings and of seeds."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["mix"], row["params"], row["tokens"]), []).append(row)
    return [_best(group) for group in groups.values()]


def _span(values: list[int]) -> str:
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def rule(rows: list[dict]) -> str:
    """How one mix's envelope rows were formed, e.g. "best lr of 3, mean over 2 seeds"."""
    # Settings beyond lr (other knobs, position encoding) make it a choice of setting.
    what = "lr" if all(r["settings"] == max(len(r["lrs"]), 1) for r in rows) else "setting"
    k, s = _span([r["settings"] for r in rows]), _span([r["seeds"] for r in rows])
    choice = f"one {what}" if k == "1" else f"best {what} of {k}"
    return f"{choice}, mean over {s} seed{'' if s == '1' else 's'}"


def summary(rows: list[dict]) -> dict:
    """One mix's envelope: trials, fitted points, the rule, the lrs tried, and the points
    whose chosen lr is at an edge of those tried."""
    return {
        "trials": sum(r["trials"] for r in rows),
        "points": len(rows),
        "rule": rule(rows),
        "lrs": sorted({lr for r in rows for lr in r["lrs"]}),
        "lr_at_edge": [
            {
                "N": r["params"],
                "D": r["tokens"],
                "lr": r["lr"],
                "edge": r["lr_at_edge"],
                "lrs": r["lrs"],
            }
            for r in rows
            if r["lr_at_edge"]
        ],
    }
