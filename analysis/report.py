"""The analysis report: one list of blocks (headings, text, tables, figures) rendered twice,
as Markdown beside its PNGs and as one self-contained HTML file (images inline, base64),
written to ``results/<study>/analysis/`` and logged to the study's MLflow parent run."""

import base64
import html
import json
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient

from analysis.blocks import Block, Footnotes, est, noted, num, times
from analysis.diagnostics import Flag
from analysis.envelope import summary as envelope_summary
from analysis.extrapolate import DECODE_BATCHES, PAPER_SEQ_LEN, PAPER_TOKENS
from analysis.fit import interval
from analysis.plots import FIGURES
from analysis.sections import (
    backtest_section,
    data_section,
    envelope_section,
    epochs_cell,
    task_section,
)
from analysis.study import StudyAnalysis, analyze, decode_key, loss_key
from analysis.table import load_runs
from records.trial_run import find_study_run


def _with_interval(value: float, samples: np.ndarray) -> str:
    return f"{num(value)} [{', '.join(map(num, interval(samples)))}]"


def _param_table(fits: list[tuple[str, object, list[Flag]]], notes: Footnotes) -> Block | None:
    """Named parameters of each fitted law, with their bootstrap intervals and flags."""
    rows = []
    for label, fit, flags in fits:
        samples = fit.sample_params()
        cells = [
            notes.mark(
                _with_interval(v, samples[k]), noted(label, [f for f in flags if f.name == k])
            )
            for k, v in fit.params().items()
        ]
        rows.append((label, fit.n_points, num(fit.objective), *cells))
    if not rows:
        return None
    names = tuple(fits[0][1].params())
    return Block("table", header=("mix", "points", "Huber objective", *names), rows=tuple(rows))


def _summary(study: StudyAnalysis, name: str, resamples: int) -> list[Block]:
    n_trials = sum(len(m.trials) for m in study.mixes)
    n_points = sum(len(m.rows) for m in study.mixes)
    trials = [r for m in study.mixes for r in m.trials]
    flops, spent = sum(r["flops"] for r in trials), sum(r["spent_flops"] for r in trials)
    branched = sum(r["spent_flops"] < r["flops"] for r in trials)
    shared = f": {branched} budgets branched from a longer run of their model" if branched else ""
    out = [
        Block("h1", f"Scaling analysis: {name}"),
        Block(
            "p",
            f"{n_trials} finished trials, {n_points} fitted points, in {len(study.mixes)} "
            f"layer mixes. Intervals are 95% bootstrap percentiles over {resamples} "
            "resamples of each mix's points. A number marked [!n] rests on a fit the "
            "diagnostics flag; note n, below its table, says why.",
        ),
        Block(
            "p",
            f"Training compute: {num(flops)} FLOPs in the trials' curves (each trial's C "
            f"below), {num(spent)} FLOPs spent{shared}.",
        ),
    ]
    missing = study.notes + [f"{m.mix.label}: {note}" for m in study.mixes for note in m.notes]
    if missing:
        out.append(Block("h2", "What could not be fitted"))
        out.extend(Block("p", note) for note in missing)
    return out


def _comparisons(study: StudyAnalysis) -> list[Block]:
    if not study.comparisons:
        return []
    notes, rows = Footnotes(), []
    for c in study.comparisons:
        p = "rests on a flagged fit" if c["flagged"] else f"{c['p_a_better']:.2f}"
        rows.append(
            (
                c["a"],
                c["b"],
                f"{c['tokens'] / 1e12:.2g}T",
                notes.mark(est(c["diff"]), c["flagged"]),
                notes.mark(p, c["flagged"]),
            )
        )
    text = (
        "Loss of A minus loss of B, each at its 8B configuration; negative means A is "
        "better. P(A better) is the share of bootstrap pairs in which A has the lower loss; "
        "where either mix's fit or predicted loss is flagged it is not given."
    )
    header = ("A", "B", "tokens", "loss A - loss B", "P(A better)")
    return [
        Block("h2", "Which mix wins at 8B"),
        Block("p", text),
        Block("table", header=header, rows=tuple(rows)),
        *notes.blocks(),
    ]


PREDICTION_TEXT = (
    f"N from arch.accounting; compute C is the configuration's training FLOPs per token at "
    f"sequence length {PAPER_SEQ_LEN} times {PAPER_TOKENS[0] / 1e12:.2g}T tokens. Reach: "
    "the 8B N and C over those of the mix's largest trial, how far the laws extrapolate. "
    "N_opt, D_opt, L_opt: the compute-optimal split of C under L(N, D); IsoFLOP N_opt from "
    "Approach 2's power law; L(C) from the frontier fit. Splitting C into N and D uses FLOPs "
    "per token as a power law of N through the mix's trials and its 8B configuration. "
    "Decode tokens/s: tokens generated per second over a batch of sequences, each "
    f"{PAPER_SEQ_LEN} tokens in, as arch/decode_cost.py models fused decode kernels on an "
    "H100 at its default, uncalibrated constants (bench/decode.py measures and calibrates)."
)
ESTIMATE_KEYS = ("N_opt", "D_opt", "L_opt", "isoflop N_opt", "isoflop D_opt", "frontier L(C)")


def _reach(p: dict) -> str:
    return f"{times(p['reach']['N'])} in N, {times(p['reach']['C'])} in C"


def _predictions(study: StudyAnalysis) -> list[Block]:
    notes = Footnotes()
    losses = [loss_key(t) for t in PAPER_TOKENS]

    def cell(p: dict, key: str) -> str:
        return notes.mark(est(p.get(key)), noted(p["mix"], p["flags"].get(key, [])))

    rows = tuple(
        (
            p["mix"],
            p["config"],
            num(p["params"]),
            num(p["compute"]),
            _reach(p),
            *(cell(p, k) for k in losses),
            *(num(p[decode_key(b)]) for b in DECODE_BATCHES),
            *(cell(p, k) for k in ESTIMATE_KEYS),
        )
        for p in study.predictions
    )
    header = (
        "mix",
        "configuration",
        "N",
        "C",
        "reach",
        *(f"loss at {t / 1e12:.2g}T" for t in PAPER_TOKENS),
        *(f"decode tokens/s, batch {b}" for b in DECODE_BATCHES),
        *ESTIMATE_KEYS,
    )
    return [
        Block("h2", "Predictions at the paper's 8B configurations"),
        Block("p", PREDICTION_TEXT),
        Block("table", header=header, rows=rows),
        *notes.blocks(),
    ]


def _crossovers(study: StudyAnalysis) -> list[Block]:
    if not study.crossovers:
        return []
    notes, rows = Footnotes(), []
    for c in study.crossovers:
        at = est(c["C"]) if np.isfinite(c["C"]["value"]) else "none in range"
        rows.append(
            (
                c["a"],
                c["b"],
                notes.mark(at, c["flagged"]),
                f"{c['fraction_with_crossover']:.2f}",
                notes.mark(c["better_at_end"], c["flagged"]),
                f"{num(c['range'][0])} - {num(c['range'][1])}",
            )
        )
    header = (
        "A",
        "B",
        "first crossover C",
        "share of resamples crossing",
        "better at the end",
        "C range searched",
    )
    return [
        Block("h2", "Crossovers on the compute-optimal frontier"),
        Block("table", rows=tuple(rows), header=header),
        *notes.blocks(),
    ]


def _ratio_curves(study: StudyAnalysis) -> list[Block]:
    out = []
    for label, points in study.ratio_curves.items():
        if len(points) >= 2:
            notes = Footnotes()
            rows = tuple(
                (p["mix"], p["attention"], notes.mark(est(p), p["flagged"])) for p in points
            )
            header = ("mix", "attention share", "compute-optimal loss")
            out.append(Block("h2", f"Hybrid-ratio curve at {label} (C = {num(points[0]['C'])})"))
            out.append(Block("table", header=header, rows=rows))
            out.extend(notes.blocks())
    return out


def _isoflop_table(study: StudyAnalysis, notes: Footnotes) -> list[Block]:
    iso = [m for m in study.mixes if m.isoflop is not None]
    if not iso:
        return []
    rows = []
    for m in iso:
        fit, flags = m.isoflop, m.flags.get("IsoFLOP", [])
        cells = [
            notes.mark(
                _with_interval(law[1], fit.samples[:, column]),
                noted(m.mix.label, [f for f in flags if f.name == name]),
            )
            for name, law, column in (("a", fit.n_law, 1), ("b", fit.d_law, 3))
        ]
        rows.append((m.mix.label, len(fit.budgets), *cells))
    return [
        Block("p", "IsoFLOP (Approach 2): N_opt ~ C^a, D_opt ~ C^b"),
        Block("table", header=("mix", "budgets", "a", "b"), rows=tuple(rows)),
    ]


def _fits(study: StudyAnalysis) -> list[Block]:
    notes, out = Footnotes(), [Block("h2", "Fits")]
    laws = (
        ("L(N, D) = E + A / N^alpha + B / D^beta (Approach 3)", "L(N, D)", lambda m: m.law),
        ("L(C) = E + A0 / C^alpha0 on the compute frontier", "L(C)", lambda m: m.frontier),
    )
    for title, source, fitted in laws:
        fits = [
            (m.mix.label, fitted(m), m.flags.get(source, []))
            for m in study.mixes
            if fitted(m) is not None
        ]
        table = _param_table(fits, notes)
        if table is not None:
            out.extend([Block("p", title), table])
    return out + _isoflop_table(study, notes) + notes.blocks()


def _figures(study: StudyAnalysis) -> list[Block]:
    out = [Block("h2", "Figures")]
    for fig_name, draw in FIGURES.items():
        png = draw(study)
        if png is not None:
            out.append(Block("figure", fig_name, png=png))
    return out


def _trials(study: StudyAnalysis) -> list[Block]:
    header = ("mix", "trial", "pattern", "N", "D", "C", "lr", "seed", "epochs", "val_loss")
    rows = tuple(
        (
            m.mix.label,
            r["trial"],
            r["pattern"],
            num(r["params"]),
            num(r["tokens"]),
            num(r["flops"]),
            num(r["lr"]),
            r["seed"],
            epochs_cell(r["epochs"]),
            f"{r['val_loss']:.4f}",
        )
        for m in study.mixes
        for r in m.trials
    )
    return [Block("h2", "Trials"), Block("table", header=header, rows=rows)]


def blocks(study: StudyAnalysis, name: str, resamples: int) -> list[Block]:
    sections = (
        _summary(study, name, resamples),
        envelope_section(study),
        _comparisons(study),
        _predictions(study),
        backtest_section(study),
        task_section(study),
        _crossovers(study),
        _ratio_curves(study),
        _fits(study),
        data_section(study),
        _figures(study),
        _trials(study),
    )
    return [block for section in sections for block in section]


def to_markdown(report: list[Block]) -> str:
    lines = []
    for b in report:
        if b.kind in ("h1", "h2"):
            lines += [("# " if b.kind == "h1" else "## ") + b.text, ""]
        elif b.kind == "p":
            lines += [b.text, ""]
        elif b.kind == "table":
            lines.append("| " + " | ".join(map(str, b.header)) + " |")
            lines.append("|" + "---|" * len(b.header))
            lines += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in b.rows]
            lines.append("")
        elif b.kind == "figure":
            lines += [f"![{b.text}](figures/{b.text}.png)", ""]
    return "\n".join(lines)


def to_html(report: list[Block]) -> str:
    parts = []
    for b in report:
        if b.kind in ("h1", "h2", "p"):
            parts.append(f"<{b.kind}>{html.escape(b.text)}</{b.kind}>")
        elif b.kind == "table":
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in b.header)
            body = "".join(
                "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                for r in b.rows
            )
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
        elif b.kind == "figure":
            data = base64.b64encode(b.png).decode()
            parts.append(f'<img alt="{b.text}" src="data:image/png;base64,{data}">')
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse;font-size:13px;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:100%}"
    )
    title = html.escape(report[0].text)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
        f"<style>{style}</style></head><body>{''.join(parts)}</body></html>"
    )


def _json(value):
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    return str(value)  # a Mix, a Flag: their text


def write(report: list[Block], study: StudyAnalysis, out_dir: Path) -> Path:
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    for b in report:
        if b.kind == "figure":
            (out_dir / "figures" / f"{b.text}.png").write_bytes(b.png)
    (out_dir / "report.md").write_text(to_markdown(report))
    (out_dir / "report.html").write_text(to_html(report))
    summary = {
        "predictions": study.predictions,
        "comparisons": study.comparisons,
        "crossovers": study.crossovers,
        "ratio_curves": study.ratio_curves,
        "notes": study.notes + [n for m in study.mixes for n in m.notes],
        "diagnostics": {m.mix.label: m.flags for m in study.mixes},
        "envelope": {m.mix.label: envelope_summary(m.rows) for m in study.mixes},
        "backtest": study.backtest,
        "tasks": study.tasks,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=_json))
    return out_dir


def run(
    client: MlflowClient,
    study: str,
    out_dir: Path,
    resamples: int = 200,
    seed: int = 0,
    holdout: float | None = None,
) -> tuple[Path, str | None]:
    """Analyse the study's finished trials, write the report, log it to the parent run
    (if the study has one). ``holdout``: the backtest's compute cutoff (None: each mix's
    largest size). Returns the report folder and the parent run id."""
    analysis = analyze(load_runs(client, study), resamples, seed, holdout)
    report = blocks(analysis, study, resamples)
    write(report, analysis, out_dir)
    parent = find_study_run(client, study)
    if parent is not None:
        client.log_artifacts(parent, str(out_dir), "analysis")
    return out_dir, parent
