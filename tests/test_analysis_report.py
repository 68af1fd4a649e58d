"""`hybridscale analyze` on a real sqlite MLflow store holding runs tagged as the trainer
tags them: the report is written, holds its figures, and is logged to the parent run; its
task table recovers a local task's known law and sigmoids at 8B and lists a probe at
chance as unfitted."""

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from arch.accounting import param_counts
from arch.config import ModelConfig
from arch.decode_cost import H100, decode_seconds_per_token
from records.store import default_tracking_uri, experiment_id
from runners.cli import main

ROOT = Path(__file__).resolve().parent.parent

# Two mixes drawn from known laws: the hybrid has the lower loss at every scale.
LAWS = {
    "*-*-": {"E": 1.80, "A": 400.0, "B": 1200.0, "alpha": 0.34, "beta": 0.30},
    "M*M-": {"E": 1.70, "A": 400.0, "B": 1200.0, "alpha": 0.34, "beta": 0.30},
}


# A local multiple-choice task (chance 0.25): its loss law per mix, its sigmoid per family.
TASK_LAWS = {
    "*-*-": {"E": 0.5, "A": 60.0, "B": 200.0, "alpha": 0.3, "beta": 0.3},
    "M*M-": {"E": 0.45, "A": 60.0, "B": 180.0, "alpha": 0.3, "beta": 0.3},
}
SIGMOIDS = {"*-*-": {"a": 0.7, "k": -4.0, "L0": 1.2, "b": 0.25},
            "M*M-": {"a": 0.65, "k": -5.0, "L0": 1.1, "b": 0.25}}  # fmt: skip
MIX_LABELS = {"*-*-": "Transformer", "M*M-": "Mamba-2-Hybrid (attn 0.25, mlp 0.25)"}


def law(p, n, d):
    return p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]


def sigmoid(p, loss):
    return p["a"] / (1 + np.exp(-p["k"] * (loss - p["L0"]))) + p["b"]


def task_metrics(rng, pattern, n, d) -> dict:
    """The local task's loss and accuracy drawn about the truth, and a probe at chance."""
    loss = law(TASK_LAWS[pattern], n, d) * np.exp(rng.normal(0, 0.003))
    return {"task_quiz_bpb": loss, "task_quiz_chance": 0.25,
            "task_quiz_acc": sigmoid(SIGMOIDS[pattern], loss) + rng.normal(0, 0.005),
            "probe_mqar_bpb": 3.0 + rng.normal(0, 0.1),
            "probe_mqar_acc": rng.uniform(0, 0.03)}  # fmt: skip


def trial_run(
    client, exp, parent, trial, pattern, params, tokens, loss, status="finished", **metrics
):
    tags = {"kind": "trial", "hybridscale.study": "e2e", "hybridscale.trial_id": trial,
            "hybridscale.pattern": pattern, "hybridscale.params": params,
            "hybridscale.flops_per_token": 6 * params, "hybridscale.tokens": tokens,
            "hybridscale.status": status, "mlflow.parentRunId": parent}  # fmt: skip
    run = client.create_run(exp, tags={k: str(v) for k, v in tags.items()})
    for key, value in {"val_loss": loss, **metrics}.items():
        client.log_metric(run.info.run_id, key, value)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    results = root / "results"
    uri = default_tracking_uri(results)
    client = MlflowClient(uri)
    exp = experiment_id(client, "e2e", uri)
    parent = client.create_run(exp, tags={"hybridscale.study": "e2e", "kind": "study"})
    parent = parent.info.run_id
    rng = np.random.default_rng(0)
    for pattern, p in LAWS.items():
        for c in np.geomspace(1e17, 1e20, 4):
            for n in np.geomspace(1e7, 1e9, 5):
                d = c / (6 * n)
                loss = law(p, n, d) * np.exp(rng.normal(0, 0.002))
                trial_run(client, exp, parent, f"{pattern}-{c:.0e}-{n:.0e}", pattern, int(n),
                          int(d), loss, **task_metrics(rng, pattern, int(n), int(d)))  # fmt: skip
    # A mix with two sizes only, and a failed trial that must not count.
    for i, n in enumerate([1e7, 2e7, 1e7]):
        trial_run(client, exp, parent, f"mamba-{i}", "MMMM", int(n), int(20 * n), 3.0 + i)
    trial_run(client, exp, parent, "failed", "*-*-", int(1e8), int(1e9), 0.1, status="failed")
    spec = root / "e2e.yaml"
    spec.write_text("name: e2e\nmodel: {preset: tiny}\ntraining: {tokens: 1M}\n")
    argv = ["analyze", str(spec), "--results", str(results), "--resamples", "20"]
    assert main(argv) == 0
    return client, parent, results / "e2e" / "analysis"


def test_report_is_written_with_embedded_figures(store):
    _, _, out = store
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 4
    markdown = (out / "report.md").read_text()
    for figure in ("loss_vs_compute", "isoflop_profiles", "predictions_8b", "fit_residuals"):
        assert f"![{figure}](figures/{figure}.png)" in markdown
        assert (out / "figures" / f"{figure}.png").read_bytes()[:4] == b"\x89PNG"
    # The too-small mix is reported, not fitted.
    assert "Mamba-2: L(N, D) needs at least 3 distinct model sizes (has 2)" in markdown
    assert "| failed |" not in markdown and "| mamba-2 |" in markdown  # trial ids


def test_predictions_recover_the_laws_at_8b(store):
    _, _, out = store
    summary = json.loads((out / "summary.json").read_text())
    by_mix = {p["mix"]: p for p in summary["predictions"]}
    for pattern, label in (
        ("*-*-", "Transformer"),
        ("M*M-", "Mamba-2-Hybrid (attn 0.25, mlp 0.25)"),
    ):
        p = by_mix[label]
        truth = law(LAWS[pattern], p["params"], 1.1e12)
        est = p["loss@1.1e+12"]
        # Coverage of the intervals is tested in test_analysis.py on a richer design; from
        # 20 runs two decades below, the 8B loss still comes within a few percent.
        assert est["value"] == pytest.approx(truth, rel=0.03)
        assert est["lo"] < est["value"] < est["hi"]
    (first, _) = [c for c in summary["comparisons"] if c["a"] == "Transformer"]
    assert first["b"].startswith("Mamba-2-Hybrid") and first["p_a_better"] < 0.05
    assert first["diff"]["value"] > 0.03  # the Transformer is worse (by 0.094) at 8B


def test_report_is_logged_to_the_parent_run(store):
    client, parent, _ = store
    logged = {a.path for a in client.list_artifacts(parent, "analysis")}
    assert {"analysis/report.html", "analysis/report.md", "analysis/summary.json"} <= logged


def test_unknown_study_is_a_clear_error(tmp_path, capsys):
    spec = tmp_path / "nothing.yaml"
    spec.write_text("name: nothing\nmodel: {preset: tiny}\ntraining: {tokens: 1M}\n")
    assert main(["analyze", str(spec), "--results", str(tmp_path / "results")]) == 2
    assert "no runs of study 'nothing'" in capsys.readouterr().err


def test_a_store_of_another_mlflow_version_is_a_one_line_error(tmp_path):
    spec = tmp_path / "nothing.yaml"
    spec.write_text("name: nothing\nmodel: {preset: tiny}\ntraining: {tokens: 1M}\n")
    results = tmp_path / "results"
    MlflowClient(f"sqlite:///{results / 'mlflow.db'}").search_experiments()  # creates it
    with sqlite3.connect(results / "mlflow.db") as db:  # as an unknown MLflow would leave it
        db.execute("UPDATE alembic_version SET version_num = 'fffffffffff0'")
    # A new process: this one keeps the store it opened, checked once.
    cmd = [sys.executable, "-m", "runners.cli", "analyze", str(spec), "--results", str(results)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    err = [line for line in done.stderr.splitlines() if " INFO " not in line]
    assert len(err) == 1 and err[0].startswith("error: the MLflow store: "), done.stderr
    assert "schema" in err[0], err


def test_crossovers_and_ratio_curve_follow_the_laws(store):
    _, _, out = store
    summary = json.loads((out / "summary.json").read_text())
    # The hybrid's law is lower everywhere: no crossover, the hybrid ahead at the end.
    (pair,) = summary["crossovers"]
    assert pair["fraction_with_crossover"] < 0.1
    assert pair["better_at_end"].startswith("Mamba-2-Hybrid")
    # One fitted SSM mix only (the Transformer is not on the attention-share axis).
    assert all(len(points) == 1 for points in summary["ratio_curves"].values())


def preset(name: str, **changes) -> ModelConfig:
    path = Path(__file__).resolve().parent.parent / "configs" / "model" / f"{name}.yaml"
    return ModelConfig(**{**yaml.safe_load(path.read_text()), **changes})


def markdown_table(markdown: str, first_columns: str) -> list[dict]:
    """The first table whose header starts with ``first_columns``, e.g. "mix | trial"."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_columns} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)))
    return rows


def test_predictions_carry_decode_speed_at_8b(store):
    """Beside each mix's predicted 8B loss, the cost model's decode tokens/s at batch 1 and
    8 and 4K context, recomputed here from the 8B configurations."""
    _, _, out = store
    configs = {
        "Transformer": preset("transformer_8b"),
        "Mamba-2": preset("mamba2_8b"),  # MMMM: no attention, no MLP
        # A mix the paper has no model of: the 8B hybrid's shape at the mix's ratios.
        "Mamba-2-Hybrid (attn 0.25, mlp 0.25)": preset(
            "hybrid_8b", attention_ratio=0.25, mlp_ratio=0.25
        ),
    }
    expected = {
        (mix, batch): 1 / decode_seconds_per_token(config, batch, 4096)
        for mix, config in configs.items()
        for batch in (1, 8)
    }
    table = {r["mix"]: r for r in markdown_table((out / "report.md").read_text(),
                                                 "mix | configuration")}  # fmt: skip
    summary = {p["mix"]: p for p in json.loads((out / "summary.json").read_text())["predictions"]}
    page = (out / "report.html").read_text()
    assert set(table) == set(configs)
    for (mix, batch), speed in expected.items():
        shown = table[mix][f"decode tokens/s, batch {batch}"]
        assert float(shown) == pytest.approx(speed, rel=5e-4)  # printed to 4 digits
        assert f"<td>{shown}</td>" in page
        assert summary[mix][f"decode tokens/s@batch {batch}"] == pytest.approx(speed, rel=1e-12)
    # Beside the loss: the column right after the predicted losses (after N, C and reach).
    assert list(table["Transformer"])[5:9] == [
        "loss at 1.1T", "loss at 3.5T", "decode tokens/s, batch 1", "decode tokens/s, batch 8"
    ]  # fmt: skip
    for mix, config in configs.items():
        # Decoding one sequence cannot beat reading every bf16 weight at the H100's bandwidth.
        assert expected[mix, 1] < H100.bandwidth / (2 * param_counts(config)["total"])
        assert expected[mix, 8] > expected[mix, 1]  # a batch shares the weight reads
    # The paper's point: at batch 8, 4K context, the KV cache makes the Transformer slowest.
    assert expected["Transformer", 8] < min(v for (m, b), v in expected.items() if b == 8
                                            and m != "Transformer")  # fmt: skip


def test_summary_carries_reach_backtest_envelope_and_diagnostics(store):
    _, _, out = store
    summary = json.loads((out / "summary.json").read_text())
    p = {p["mix"]: p for p in summary["predictions"]}["Transformer"]
    # Its largest trial: N = 1e9 at the largest budget, C = 1e20 (to int rounding).
    assert p["reach"]["N"] == pytest.approx(p["params"] / 1e9, rel=1e-12)
    assert p["reach"]["C"] == pytest.approx(p["compute"] / 1e20, rel=1e-6)
    table = markdown_table((out / "report.md").read_text(), "mix | configuration")
    assert {r["mix"]: r for r in table}["Transformer"]["reach"].startswith("x8.5 in N, x")
    backtest = summary["backtest"]
    assert backtest["rule"] == "each mix's largest model size held out"
    # 1e9 parameters at each of 4 budgets, in the two mixes that can be refitted.
    assert [t["N"] for t in backtest["trials"]] == [int(1e9)] * 8
    assert backtest["summary"]["total"] == 8 and backtest["summary"]["max_abs_error_pct"] < 1
    (note,) = backtest["notes"]
    assert note.startswith("Mamba-2: cannot refit without the held-out trials")
    assert summary["diagnostics"]["Transformer"]["L(N, D)"] == []
    # The Mamba-2 mix's two trials of one (N, D) are one fitted point.
    assert {k: summary["envelope"]["Mamba-2"][k] for k in ("trials", "points")} == {
        "trials": 3,
        "points": 2,
    }


def test_holdout_backtests_the_trials_above_a_compute(store, tmp_path):
    _, _, out = store
    results = out.parents[1]
    argv = ["analyze", str(results.parent / "e2e.yaml"), "--results", str(results),
            "--resamples", "5", "--holdout", "3e19", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    backtest = json.loads((tmp_path / "summary.json").read_text())["backtest"]
    assert backtest["rule"] == "trials above 3e+19 FLOPs held out"
    # The five sizes of the 1e20 budget in each of the two fitted mixes.
    assert len(backtest["trials"]) == 10 and backtest["summary"]["max_abs_error_pct"] < 1
    rows = markdown_table((tmp_path / "report.md").read_text(), "mix | trial | N | D | observed")
    assert [r["trial"] for r in rows] == [t["trial"] for t in backtest["trials"]]
    assert all(r["trial"].split("-")[-2] == "1e+20" for r in rows)


def test_task_table_recovers_the_task_laws_and_sigmoids_at_8b(store):
    _, _, out = store
    summary = json.loads((out / "summary.json").read_text())
    quiz, mqar = summary["tasks"]  # sorted: the probe first
    quiz, mqar = (mqar, quiz) if quiz["task"] == "mqar" else (quiz, mqar)
    assert (quiz["status"], quiz["chance"]) == ("fitted", 0.25)
    truth = {}
    for p in quiz["predictions"]:
        pattern = next(k for k, label in MIX_LABELS.items() if label == p["mix"])
        loss = law(TASK_LAWS[pattern], p["N"], p["D"])
        truth[p["mix"], p["D"]] = accuracy = sigmoid(SIGMOIDS[pattern], loss)
        assert p["loss"]["lo"] <= loss <= p["loss"]["hi"], p
        assert p["accuracy"]["lo"] <= accuracy <= p["accuracy"]["hi"], p
        assert p["accuracy"]["value"] == pytest.approx(accuracy, abs=0.01)
    assert len(truth) == 4  # two mixes at 1.1T and 3.5T tokens
    for family, params in quiz["fits"]["accuracy"].items():
        pattern = {"Transformer": "*-*-", "Mamba-2-Hybrid": "M*M-"}[family]
        for name, value in SIGMOIDS[pattern].items():
            assert params[name]["lo"] <= value <= params[name]["hi"], (family, name)
    for c in quiz["differences"]:  # the Transformer against the hybrid, each at its 8B size
        diff = truth[c["a"], c["tokens"]] - truth[c["b"], c["tokens"]]
        assert c["diff"]["lo"] <= diff <= c["diff"]["hi"]
    backtest = quiz["backtest"]["summary"]
    assert backtest["loss"]["total"] == 8 and backtest["loss"]["max_abs_error_pct"] < 2
    assert backtest["accuracy"]["max_abs_error_points"] < 3
    # The report's table: a row per mix, the accuracy columns holding the summary's numbers.
    markdown = (out / "report.md").read_text()
    rows = {r["mix"]: r for r in markdown_table(markdown, "task | mix | reach")}
    assert set(rows) == set(MIX_LABELS.values()) and rows["Transformer"]["task"] == "quiz"
    first = next(p for p in quiz["predictions"] if p["mix"] == "Transformer")
    assert rows["Transformer"]["accuracy at 1.1T"].startswith(f"{first['accuracy']['value']:.4g} [")
    (held,) = markdown_table(markdown, "task | held out")
    assert held["held out"] == "8"
    # The probe at chance is listed, not fitted.
    assert mqar["status"] == "near chance" and "predictions" not in mqar
    assert "mqar (probe): every trial's accuracy within 5 points of chance" in markdown
