"""The analysis report: one list of blocks (headings, text, tables, figures) rendered twice,
as Markdown beside its PNGs and as one self-contained HTML file (images inline, base64),
written to ``results/<study>/analysis/`` and logged to the study's MLflow parent run."""

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient

from analysis.extrapolate import DECODE_BATCHES, PAPER_SEQ_LEN, PAPER_TOKENS
from analysis.fit import interval
from analysis.plots import FIGURES
from analysis.study import StudyAnalysis, analyze, decode_key
from analysis.table import load_runs

STUDY_TAG = "hybridscale.study"  # the scheduler's tag on a study's parent run


@dataclass
class Block:
    kind: str  # "h1" | "h2" | "p" | "table" | "figure"
    text: str = ""
    header: tuple = ()
    rows: tuple = ()
    png: bytes = b""


def _num(x: float) -> str:
    if x is None or not np.isfinite(x):
        return "n/a"
    return f"{x:.4g}" if 1e-3 <= abs(x) < 1e5 else f"{x:.3g}"


def _est(e: dict | None) -> str:
    if not e:
        return ""
    return f"{_num(e['value'])} [{_num(e['lo'])}, {_num(e['hi'])}]"


def _param_table(fits: list[tuple[str, object]]) -> Block | None:
    """Named parameters of each fitted law, with their bootstrap intervals."""
    rows = []
    for label, fit in fits:
        samples = fit.sample_params()
        cells = [
            f"{_num(v)} [{', '.join(map(_num, interval(samples[k])))}]"
            for k, v in fit.params().items()
        ]
        rows.append((label, fit.n_points, _num(fit.objective), *cells))
    if not rows:
        return None
    names = tuple(fits[0][1].params())
    return Block("table", header=("mix", "points", "Huber objective", *names), rows=tuple(rows))


def blocks(study: StudyAnalysis, name: str, resamples: int) -> list[Block]:
    out = [Block("h1", f"Scaling analysis: {name}")]
    n_trials = sum(len(m.rows) for m in study.mixes)
    out.append(
        Block(
            "p",
            f"{n_trials} finished trials in {len(study.mixes)} layer mixes. "
            f"Intervals are 95% bootstrap percentiles over {resamples} resamples "
            "of each mix's trials.",
        )
    )
    missing = study.notes + [f"{m.mix.label}: {note}" for m in study.mixes for note in m.notes]
    if missing:
        out.append(Block("h2", "What could not be fitted"))
        out.extend(Block("p", note) for note in missing)

    if study.comparisons:
        out.append(Block("h2", "Which mix wins at 8B"))
        out.append(
            Block(
                "p",
                "Loss of A minus loss of B, each at its 8B configuration; "
                "negative means A is better. P(A better) is the share of "
                "bootstrap pairs in which A has the lower loss.",
            )
        )
        out.append(
            Block(
                "table",
                header=("A", "B", "tokens", "loss A - loss B", "P(A better)"),
                rows=tuple(
                    (
                        c["a"],
                        c["b"],
                        f"{c['tokens'] / 1e12:.2g}T",
                        _est(c["diff"]),
                        f"{c['p_a_better']:.2f}",
                    )
                    for c in study.comparisons
                ),
            )
        )

    out.append(Block("h2", "Predictions at the paper's 8B configurations"))
    out.append(
        Block(
            "p",
            f"N from arch.accounting; compute C is the configuration's training "
            f"FLOPs per token at sequence length {PAPER_SEQ_LEN} times "
            f"{PAPER_TOKENS[0] / 1e12:.2g}T tokens. N_opt, D_opt, L_opt: the "
            "compute-optimal split of C under L(N, D); IsoFLOP N_opt from "
            "Approach 2's power law; L(C) from the frontier fit. Splitting C into N and D "
            "uses FLOPs per token as a power law of N through the mix's trials and its 8B "
            "configuration. Decode tokens/s: tokens generated per second over a batch of "
            f"sequences, each {PAPER_SEQ_LEN} tokens in, as arch/decode_cost.py models "
            "fused decode kernels on an H100 at its default, uncalibrated constants "
            "(bench/decode.py measures and calibrates).",
        )
    )
    keys = [f"loss@{t:.2g}" for t in PAPER_TOKENS] + [
        "N_opt",
        "D_opt",
        "L_opt",
        "isoflop N_opt",
        "isoflop D_opt",
        "frontier L(C)",
    ]
    titles = [f"loss at {t / 1e12:.2g}T" for t in PAPER_TOKENS] + keys[2:]
    speeds = [f"decode tokens/s, batch {b}" for b in DECODE_BATCHES]
    out.append(
        Block(
            "table",
            header=("mix", "configuration", "N", "C", *titles[:2], *speeds, *titles[2:]),
            rows=tuple(
                (
                    p["mix"],
                    p["config"],
                    _num(p["params"]),
                    _num(p["compute"]),
                    *(_est(p.get(k)) for k in keys[:2]),
                    *(_num(p[decode_key(b)]) for b in DECODE_BATCHES),
                    *(_est(p.get(k)) for k in keys[2:]),
                )
                for p in study.predictions
            ),
        )
    )

    if study.crossovers:
        out.append(Block("h2", "Crossovers on the compute-optimal frontier"))
        rows = []
        for c in study.crossovers:
            at = _est(c["C"]) if np.isfinite(c["C"]["value"]) else "none in range"
            rows.append(
                (
                    c["a"],
                    c["b"],
                    at,
                    f"{c['fraction_with_crossover']:.2f}",
                    c["better_at_end"],
                    f"{_num(c['range'][0])} - {_num(c['range'][1])}",
                )
            )
        out.append(
            Block(
                "table",
                rows=tuple(rows),
                header=(
                    "A",
                    "B",
                    "first crossover C",
                    "share of resamples crossing",
                    "better at the end",
                    "C range searched",
                ),
            )
        )

    for label, points in study.ratio_curves.items():
        if len(points) >= 2:
            out.append(Block("h2", f"Hybrid-ratio curve at {label} (C = {_num(points[0]['C'])})"))
            out.append(
                Block(
                    "table",
                    header=("mix", "attention share", "compute-optimal loss"),
                    rows=tuple((p["mix"], p["attention"], _est(p)) for p in points),
                )
            )

    out.append(Block("h2", "Fits"))
    fitted = [(m.mix.label, m.law) for m in study.mixes if m.law is not None]
    for title, table in (
        ("L(N, D) = E + A / N^alpha + B / D^beta (Approach 3)", _param_table(fitted)),
        (
            "L(C) = E + A0 / C^alpha0 on the compute frontier",
            _param_table([(m.mix.label, m.frontier) for m in study.mixes if m.frontier]),
        ),
    ):
        if table is not None:
            out.extend([Block("p", title), table])
    iso = [m for m in study.mixes if m.isoflop is not None]
    if iso:
        rows = []
        for m in iso:
            s = m.isoflop.samples
            rows.append(
                (
                    m.mix.label,
                    len(m.isoflop.budgets),
                    f"{_num(m.isoflop.n_law[1])} [{', '.join(map(_num, interval(s[:, 1])))}]",
                    f"{_num(m.isoflop.d_law[1])} [{', '.join(map(_num, interval(s[:, 3])))}]",
                )
            )
        out.append(Block("p", "IsoFLOP (Approach 2): N_opt ~ C^a, D_opt ~ C^b"))
        out.append(Block("table", header=("mix", "budgets", "a", "b"), rows=tuple(rows)))

    out.append(Block("h2", "Figures"))
    for fig_name, draw in FIGURES.items():
        png = draw(study)
        if png is not None:
            out.append(Block("figure", fig_name, png=png))

    out.append(Block("h2", "Trials"))
    out.append(
        Block(
            "table",
            header=("mix", "trial", "pattern", "N", "D", "C", "val_loss"),
            rows=tuple(
                (
                    m.mix.label,
                    r["trial"],
                    r["pattern"],
                    _num(r["params"]),
                    _num(r["tokens"]),
                    _num(r["flops"]),
                    f"{r['val_loss']:.4f}",
                )
                for m in study.mixes
                for r in m.rows
            ),
        )
    )
    return out


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
    return str(value)


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
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=_json))
    return out_dir


def parent_run(client: MlflowClient, study: str) -> str | None:
    found = client.get_experiment_by_name(study)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id], f"tags.`{STUDY_TAG}` = '{study}' and tags.kind = 'study'"
    )
    return runs[0].info.run_id if runs else None


def run(
    client: MlflowClient, study: str, out_dir: Path, resamples: int = 200, seed: int = 0
) -> tuple[Path, str | None]:
    """Analyse the study's finished trials, write the report, log it to the parent run
    (if the study has one). Returns the report folder and the parent run id."""
    analysis = analyze(load_runs(client, study), resamples, seed)
    report = blocks(analysis, study, resamples)
    write(report, analysis, out_dir)
    parent = parent_run(client, study)
    if parent is not None:
        client.log_artifacts(parent, str(out_dir), "analysis")
    return out_dir, parent
