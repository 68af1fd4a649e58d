"""What tells the analysis's reader how far to trust it: rows that carry what was really
trained, one fitted point per (mix, N, D), flags on degenerate fits, backtests, and the
report sections that show them."""

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from test_analysis import TRUE, isoflop_design, law

from analysis.backtest import backtest
from analysis.blocks import times
from analysis.diagnostics import law_flags, prediction_flags
from analysis.envelope import envelope, rule
from analysis.fit import LawFit, fit_law, fit_nd
from analysis.plots import largest_budget_accuracy, probe_accuracy
from analysis.report import blocks, to_markdown
from analysis.sections import epochs_cell, position_encoding
from analysis.study import analyze
from analysis.table import load_runs, mix_of, trial_row
from records.store import default_tracking_uri, experiment_id


def design():
    n, d, c, _ = isoflop_design(noise=0.0)
    return n, d, c


def rows_of(pattern, n, d, c, loss, **extra):
    return [
        trial_row(f"{pattern}-{i}", pattern, *v, **extra)
        for i, v in enumerate(zip(n, d, c, loss, strict=True))
    ]


# ---- rows ------------------------------------------------------------------------------


def test_rows_carry_tokens_trained_settings_epochs_and_probes(tmp_path):
    uri = default_tracking_uri(tmp_path)
    client = MlflowClient(uri)
    exp = experiment_id(client, "rows", uri)

    def run(trial, planned, params, metrics):
        tags = {
            "kind": "trial",
            "hybridscale.trial_id": trial,
            "hybridscale.pattern": "M*M-",
            "hybridscale.params": 1e6,
            "hybridscale.flops_per_token": 6e6,
            "hybridscale.tokens": planned,
            "hybridscale.status": "finished",
        }
        run_id = client.create_run(exp, tags={k: str(v) for k, v in tags.items()}).info.run_id
        for key, value in params.items():
            client.log_param(run_id, key, value)
        for key, value in {"val_loss": 3.0, **metrics}.items():
            client.log_metric(run_id, key, value)

    run(
        "a",
        1000,
        {
            "training.lr": "0.001",
            "training.seed": "2",
            "training.batch_size": "16",
            "training.compile": "True",
            "training.tokens": "1000",
            "model.rotary_fraction": "0.5",
        },
        {"tokens": 1024, "epochs": 6.5, "probe_phonebook_acc": 0.25, "probe_mqar_acc": 0.75},
    )
    run("b", 2000, {}, {})
    a, b = sorted(load_runs(client, "rows"), key=lambda r: r["trial"])
    # D is the tokens trained (whole steps: 1024), not the 1000 planned; C follows it.
    assert a["tokens"] == 1024 and a["flops"] == 6e6 * 1024
    assert (a["lr"], a["seed"], a["rotary_fraction"], a["epochs"]) == (1e-3, 2, 0.5, 6.5)
    assert a["setting"] == (("batch_size", "16"),)  # seed, lr, tokens, compile are not knobs
    assert (a["probe_phonebook_acc"], a["probe_mqar_acc"]) == (0.25, 0.75)
    # A run without the final metrics falls back to the tag and the defaults.
    assert b["tokens"] == 2000 and np.isnan(b["epochs"]) and b["lr"] is None
    assert b["rotary_fraction"] == 0 and not any(k.startswith("probe_") for k in b)


# ---- the hyperparameter envelope ----------------------------------------------------------


def tuned_rows():
    """At every (N, D): lr 1e-3 the best, over two seeds 1% either side of the law (mean:
    the law); lr 3e-4 5% and lr 3e-3 20% worse."""
    n, d, c = design()
    truth = law(n, d)
    rows = []
    for lr, seed, factor in ((1e-3, 0, 1.01), (1e-3, 1, 0.99), (3e-4, 0, 1.05), (3e-3, 0, 1.2)):
        rows += rows_of("MMMM", n, d, c, truth * factor, lr=lr, seed=seed)
    return rows, n, d, truth


def test_envelope_keeps_the_best_lr_averaged_over_seeds():
    rows, n, d, truth = tuned_rows()
    points = envelope(rows)
    assert len(points) == len(n)
    by_nd = {(p["params"], p["tokens"]): p for p in points}
    for ni, di, ti in zip(n, d, truth, strict=True):
        p = by_nd[ni, di]
        assert p["val_loss"] == pytest.approx(ti, rel=1e-12)  # (1.01 + 0.99) / 2
        assert (p["lr"], p["seeds"], p["trials"], p["settings"]) == (1e-3, 2, 4, 3)
        assert p["lrs"] == [3e-4, 1e-3, 3e-3] and p["lr_at_edge"] is None
    assert rule(points) == "best lr of 3, mean over 2 seeds"
    # The fit gets one point per (N, D), and so the law the best runs follow...
    (mix,) = analyze(rows, resamples=3).mixes
    assert mix.law.n_points == len(n) and len(mix.trials) == 4 * len(n)
    assert mix.law.params() == pytest.approx(TRUE, rel=1e-3)
    # ...where all trials together would have moved it: the envelope is what holds it.
    naive = fit_law([np.tile(n, 4), np.tile(d, 4)], np.array([r["val_loss"] for r in rows]))
    assert naive.params()["E"] > 1.05 * TRUE["E"]


def test_envelope_says_when_the_chosen_lr_is_at_an_edge_or_other_knobs_differ():
    best_high = [
        trial_row("a", "MMMM", 1e6, 1e8, 6e14, 3.1, lr=1e-3),
        trial_row("b", "MMMM", 1e6, 1e8, 6e14, 3.0, lr=3e-3),
    ]
    (point,) = envelope(best_high)
    assert (point["lr"], point["lr_at_edge"]) == (3e-3, "highest")
    knobs = [
        trial_row(
            f"t{i}",
            "MMMM",
            1e6,
            1e8,
            6e14,
            3.0 + i,
            lr=1e-3,
            seed=0,
            setting=(("batch_size", str(b)),),
        )
        for i, b in enumerate([8, 16])
    ]
    (point,) = envelope(knobs)
    assert point["val_loss"] == 3.0 and point["settings"] == 2
    assert rule([point]) == "best setting of 2, mean over 1 seed"


# ---- diagnostics --------------------------------------------------------------------------


def texts(flags):
    return [str(f) for f in flags]


def test_a_healthy_fit_is_not_flagged():
    n, d, _, loss = isoflop_design(noise=0.002)
    fit = fit_nd(n, d, loss, resamples=20)
    assert law_flags(fit, [n, d], loss, "L(N, D)") == []
    estimate = {"value": float(fit.predict(8e9, 1.1e12)), "lo": 1.8, "hi": 1.9}
    assert prediction_flags("loss@1.1e+12", estimate, loss) == []


def test_a_law_without_a_floor_is_flagged():
    n, d, _ = design()
    pure = law(n, d, {**TRUE, "E": 0.0})  # a pure power law: nothing for E to fit
    fit = fit_nd(n, d, pure, resamples=5)
    found = texts(law_flags(fit, [n, d], pure, "L(N, D)"))
    assert any("E = " in t and "collapsed to 0" in t for t in found), found
    noisy = pure * np.exp(np.random.default_rng(0).normal(0, 0.002, len(n)))
    fit = fit_nd(n, d, noisy, resamples=20)
    found = texts(law_flags(fit, [n, d], noisy, "L(N, D)"))
    assert any("E's interval reaches 0" in t for t in found), found


def test_the_degenerate_fit_seen_on_real_trials_is_flagged():
    """E at 6e-33 and every bootstrap refit where it started: zero-width intervals."""
    theta = np.array([np.log(50.0), np.log(80.0), 0.3, 0.25, np.log(6e-33)])
    fit = LawFit(theta, 1e-3, 12, samples=np.tile(theta, (20, 1)))
    x = [np.geomspace(1e6, 1e8, 12), np.geomspace(1e8, 1e10, 12)]
    found = law_flags(fit, x, np.full(12, 3.0), "L(N, D)")
    assert {f.name for f in found} == {"E", "A", "B", "alpha", "beta"}
    assert "L(N, D): E = 6e-33 is below 1e-06 of the smallest loss" in str(found[0])
    assert sum("zero width" in f.text for f in found) == 5
    # An exploding exponent and a vanished term: alpha 2.5, and B / D^beta below 3e-6.
    theta = np.array([np.log(1e16), np.log(1e-8), 2.5, 0.25, np.log(1.5)])
    found = law_flags(LawFit(theta, 1e-3, 12), x, np.full(12, 3.0), "L(N, D)")
    assert [f.name for f in found] == ["alpha", "B"]


def test_a_prediction_below_half_the_smallest_loss_is_flagged():
    loss = np.array([3.4, 3.1, 3.2])
    low = {"value": 1.5, "lo": 1.4, "hi": 1.6}  # 1.5 < 3.1 / 2
    (flag,) = prediction_flags("loss@1.1e+12", low, loss)
    assert "below half the smallest observed loss (3.1)" in flag.text
    assert prediction_flags("loss@1.1e+12", {**low, "value": 1.6}, loss) == []
    (flag,) = prediction_flags("loss@1.1e+12", {**low, "value": 1.6, "hi": np.nan}, loss)
    assert flag.text == "the interval is undefined"


def test_comparisons_on_a_flagged_fit_say_so():
    n, d, c, loss = isoflop_design(noise=0.002)
    rows = rows_of("*-*-", n, d, c, loss)
    rows += rows_of("MMMM", n, d, c, law(n, d, {**TRUE, "E": 0.0}))
    study = analyze(rows, resamples=5)
    for comparison in study.comparisons:
        assert any(f.startswith("Mamba-2, L(N, D): E = ") for f in comparison["flagged"])
        assert not any(f.startswith("Transformer") for f in comparison["flagged"])
    healthy, pure = study.predictions
    assert healthy["mix"] == "Transformer" and "loss@1.1e+12" not in healthy["flags"]
    assert any(f.name == "E" for f in pure["flags"]["loss@1.1e+12"])
    markdown = to_markdown(blocks(study, "flags", 5))
    line = next(r for r in markdown.splitlines() if r.startswith("| Transformer | Mamba-2 | 1.1T"))
    assert line.split(" | ")[-1].startswith("rests on a flagged fit [!1,"), line
    assert "[!1] Mamba-2, L(N, D): E = " in markdown


def test_crossovers_and_ratio_curves_on_a_flagged_fit_say_so():
    n, d, c, loss = isoflop_design(noise=0.002)
    rows = rows_of("*-*-", n, d, c, loss) + rows_of("M*M-", n, d, c, loss * 0.98)
    rows += rows_of("MMMM", n, d, c, law(n, d, {**TRUE, "E": 0.0}))
    study = analyze(rows, resamples=5)
    for crossing in study.crossovers:
        pair = {crossing["a"], crossing["b"]}
        assert any(f.startswith("Mamba-2, L(N, D)") for f in crossing["flagged"]) == (
            "Mamba-2" in pair
        ), crossing
    for points in study.ratio_curves.values():
        flagged = {p["mix"]: p["flagged"] for p in points}
        assert flagged["Mamba-2"] and all(f.startswith("Mamba-2") for f in flagged["Mamba-2"])
        assert [v for k, v in flagged.items() if k != "Mamba-2"] == [[]]
    markdown = to_markdown(blocks(study, "flags", 5))
    curve = markdown[markdown.index("## Hybrid-ratio curve") :]
    row = next(r for r in curve.splitlines() if r.startswith("| Mamba-2 |"))
    assert "[!" in row and "L(N, D): E = " in curve


# ---- backtests ----------------------------------------------------------------------------


def test_backtest_predicts_the_largest_size_from_the_rest():
    n, d, c, loss = isoflop_design(noise=0.002)
    mix = mix_of("MMMM")
    result = backtest([(mix, rows_of("MMMM", n, d, c, loss))], None, resamples=20)
    assert result["rule"] == "each mix's largest model size held out"
    assert [t["N"] for t in result["trials"]] == [1e10] * int(np.sum(n == n.max()))
    s = result["summary"]
    assert s["max_abs_error_pct"] < 0.5 and s["inside"] >= 0.6 * s["total"]
    # The largest size 10% above the law: the law from the rest misses it by 1/1.1 - 1.
    worse = np.where(n == n.max(), 1.1, 1.0) * loss
    result = backtest([(mix, rows_of("MMMM", n, d, c, worse))], None, resamples=20)
    for t in result["trials"]:
        assert t["error_pct"] == pytest.approx(100 * (1 / 1.1 - 1), abs=0.6)
        assert not t["inside"]
    assert result["summary"]["inside"] == 0


def test_backtest_by_compute_cutoff_and_a_mix_too_small_to_refit():
    n, d, c = design()
    rows = rows_of("MMMM", n, d, c, law(n, d))
    result = backtest([(mix_of("MMMM"), rows)], 3e20, resamples=3)
    assert result["rule"] == "trials above 3e+20 FLOPs held out"
    assert len(result["trials"]) == int(np.sum(c > 3e20)) and result["notes"] == []
    three_sizes = [
        trial_row(f"t{i}", "*-*-", p, t, 6 * p * t, 3.0)
        for i, (p, t) in enumerate([(1e6, 1e8), (2e6, 1e8), (4e6, 2e8)])
    ]
    result = backtest([(mix_of("*-*-"), three_sizes)], None, resamples=3)
    (note,) = result["notes"]
    assert note.startswith("Transformer: cannot refit without the held-out trials: ")
    assert "3 distinct model sizes (has 2)" in note and result["summary"]["total"] == 0


# ---- report pieces ------------------------------------------------------------------------


def test_reach_is_written_to_two_figures():
    assert times(2712.0) == "x2,700"
    assert times(1.23e6) == "x1.2e6"
    assert times(8.54) == "x8.5"


def test_position_encoding_and_repeated_data_are_named():
    rope = trial_row("a", "M*M-", 1e6, 1e8, 6e14, 3.0, rotary_fraction=0.5)
    none = trial_row("b", "M*M-", 1e6, 1e8, 6e14, 3.0)
    assert position_encoding(0.25, [rope, rope]) == "RoPE on 50% of each head"
    assert position_encoding(0.25, [none]) == "none"
    assert position_encoding(0.25, [rope, none, none]) == (
        "none (2 trials); RoPE on 50% of each head (1 trial)"
    )
    assert position_encoding(0.0, [rope]) == "no attention layers"
    assert epochs_cell(6.2) == "trained up to 6.2 epochs over the corpus: repeated data"
    assert epochs_cell(3.0) == "3" and epochs_cell(np.nan) == "n/a"


def test_probe_accuracy_is_taken_at_each_size_largest_compute():
    def trial(params, flops, acc):
        return trial_row("t", "M*M-", params, 1e8, flops, 3.0, probe_mqar_acc=acc)

    trials = [
        trial(1e6, 1e15, 0.1),
        trial(1e6, 2e15, 0.3),
        trial(1e6, 2e15, 0.5),
        trial(4e6, 1e15, 0.9),
    ]
    assert largest_budget_accuracy(trials, "probe_mqar_acc") == pytest.approx([0.9, 0.4])
    n, d, c = design()
    rows = rows_of("M*M-", n, d, c, law(n, d), probe_mqar_acc=0.5)
    study = analyze(rows + rows_of("*-*-", n, d, c, law(n, d)), resamples=2)
    assert probe_accuracy(study)[:4] == b"\x89PNG"
    hybrid = next(m for m in study.mixes if m.mix.attention == 0.25)
    hybrid.trials = [{k: v for k, v in r.items() if k != "probe_mqar_acc"} for r in rows]
    assert probe_accuracy(study) is None
