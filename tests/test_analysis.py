"""Scaling-law fits against known laws and the published Chinchilla refit."""

import csv
from pathlib import Path

import numpy as np
import pytest

from analysis.extrapolate import compute_optimal, crossovers, paper_target
from analysis.fit import FitError, bootstrap_law, check_law_points, fit_law, interval, objective
from analysis.frontier import fit_frontier, frontier
from analysis.isoflop import bootstrap_isoflop, fit_isoflop
from analysis.study import analyze
from analysis.table import Mix, mix_of, trial_row
from arch.accounting import flops_per_token, param_counts
from arch.config import ModelConfig
from arch.decode_cost import decode_seconds_per_token

CHINCHILLA = (
    Path(__file__).resolve().parents[2] / "shared/datasets/chinchilla/svg_extracted_data.csv"
)
# Hoffmann et al. 2022's published law, eq. 10: the truth our synthetic data are drawn from.
TRUE = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}


def law(n, d, p=TRUE):
    return p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]


def isoflop_design(noise: float, seed: int = 0):
    """Five compute budgets, eight sizes each (C = 6 N D), log-normal noise on the loss."""
    rng = np.random.default_rng(seed)
    c = np.repeat(np.geomspace(1e18, 1e21, 5), 8)
    n = np.tile(np.geomspace(3e7, 1e10, 8), 5)
    d = c / (6 * n)
    keep = d >= 1e8
    n, d, c = n[keep], d[keep], c[keep]
    return n, d, c, law(n, d) * np.exp(rng.normal(0, noise, len(n)))


def test_fit_recovers_a_known_law_within_bootstrap_intervals():
    n, d, _, loss = isoflop_design(noise=0.005)
    fit = bootstrap_law(fit_law([n, d], loss), [n, d], loss, resamples=50)
    samples = fit.sample_params()
    for name, truth in TRUE.items():
        lo, hi = interval(samples[name])
        assert lo <= truth <= hi, (name, truth, lo, hi)
    assert fit.params()["E"] == pytest.approx(TRUE["E"], rel=0.05)
    assert fit.params()["alpha"] == pytest.approx(TRUE["alpha"], abs=0.03)
    # The extrapolation to 8B parameters and 1.1T tokens, far beyond the data.
    truth = law(8e9, 1.1e12)
    lo, hi = interval(fit.predict_samples(8e9, 1.1e12))
    assert lo <= truth <= hi
    assert fit.predict(8e9, 1.1e12) == pytest.approx(truth, rel=0.01)


def test_noiseless_fit_is_exact_and_one_input_laws_fit_too():
    n, d, c, _ = isoflop_design(noise=0.0)
    fit = fit_law([n, d], law(n, d))
    assert fit.params() == pytest.approx(TRUE, rel=1e-3)
    x = np.geomspace(1e15, 1e21, 12)
    one = fit_law([x], 2.0 + 1e3 / x**0.15)
    assert one.params() == pytest.approx({"E": 2.0, "A0": 1e3, "alpha0": 0.15}, rel=1e-3)


def test_isoflop_profiles_find_the_compute_optimal_exponent():
    n, d, c, loss = isoflop_design(noise=0.002)
    fit = bootstrap_isoflop(fit_isoflop(n, d, c, loss), n, d, c, loss, resamples=50)
    assert len(fit.budgets) == 5
    # Under C = 6 N D the law's optimum is N_opt ~ C^(beta / (alpha + beta)).
    exponent = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
    assert fit.n_law[1] == pytest.approx(exponent, abs=0.03)
    assert fit.d_law[1] == pytest.approx(1 - exponent, abs=0.03)
    lo, hi = interval(fit.samples[:, 1])
    assert lo < fit.n_law[1] < hi and hi - lo < 0.1


def test_compute_optimal_matches_the_closed_form():
    a, b = TRUE["alpha"], TRUE["beta"]
    theta = np.log([TRUE["A"], TRUE["B"], 1.0])
    theta = np.array([theta[0], theta[1], a, b, np.log(TRUE["E"])])
    compute = np.array([1e20, 1e23])
    got = compute_optimal(theta, np.array([np.log(6.0), 1.0]), compute)  # C = 6 N D
    g = (a * TRUE["A"] / (b * TRUE["B"])) ** (1 / (a + b))  # Hoffmann et al., eq. 4
    expected = g * (compute / 6) ** (b / (a + b))
    np.testing.assert_allclose(got["N_opt"][0], expected, rtol=0.02)
    np.testing.assert_allclose(got["L_opt"][0], law(expected, compute / (6 * expected)), rtol=1e-4)


def test_frontier_keeps_only_runs_no_cheaper_run_beats():
    flops = np.array([1.0, 2.0, 2.0, 3.0, 4.0, 5.0])
    loss = np.array([5.0, 4.0, 4.5, 4.2, 3.0, 3.5])
    assert frontier(flops, loss).tolist() == [0, 1, 4]
    with pytest.raises(FitError, match="at least 4 runs on the compute frontier .*; has 3 of 6"):
        fit_frontier(flops, loss)


def test_crossovers_are_found_where_the_difference_changes_sign():
    c = np.geomspace(1e18, 1e24, 61)
    a, b = 3.0 - 0.1 * np.log10(c / 1e18), 2.8 - 0.05 * np.log10(c / 1e18)  # cross at 1e22
    ((found, leader),) = crossovers(c, a, b)
    assert found == pytest.approx(1e22, rel=0.01) and leader == "a"
    assert crossovers(c, a, a + 1) == []


def test_too_few_points_say_what_is_missing():
    with pytest.raises(FitError, match="at least 3 distinct model sizes \\(has 2\\)"):
        check_law_points(np.array([1e6, 1e6, 2e6, 2e6, 2e6, 1e6]), np.array([1, 2, 3, 1, 2, 3.0]))
    n = np.geomspace(1e6, 1e8, 6)
    with pytest.raises(FitError, match="cannot separate N from D"):
        check_law_points(n, 20 * n)
    rows = [trial_row(f"t{i}", "MMMM", p, 20 * p, 120 * p * p, 3.0 - i / 10)
            for i, p in enumerate([1e6, 2e6, 1e6])]  # fmt: skip
    study = analyze(rows, resamples=5)
    (mamba,) = study.mixes
    assert mamba.law is None and mamba.isoflop is None and mamba.frontier is None
    assert any("at least 3 distinct model sizes (has 2)" in note for note in mamba.notes)
    assert any("need L(N, D) fits of at least 2 layer mixes" in note for note in study.notes)
    assert "loss@1.1e+12" not in study.predictions[0]  # no meaningless number
    # The 8B Mamba-2's decode speed needs no fit: it is there all the same.
    mamba2_8b = ModelConfig(pattern="M" * 56, d_model=4096, d_state=128, ssm_headdim=64,
                            ssm_ngroups=8, vocab_size=256000, tie_embeddings=False)  # fmt: skip
    speed = study.predictions[0]["decode tokens/s@batch 8"]
    assert speed == pytest.approx(1 / decode_seconds_per_token(mamba2_8b, 8, 4096), rel=1e-12)


def test_mixes_and_their_8b_configurations():
    assert mix_of("*-*-") == Mix("", 0.5, 0.5) and mix_of("*-*-").label == "Transformer"
    assert mix_of("M" * 8).label == "Mamba-2" and mix_of("mmmm").label == "Mamba"
    hybrid = ModelConfig(n_layers=56, attention_ratio=0.08, mlp_ratio=0.5, d_model=4096,
                         n_heads=32, n_kv_heads=8, d_ffn=16384, mlp_activation="gelu",
                         d_state=128, ssm_headdim=64, ssm_ngroups=8, vocab_size=256000,
                         tie_embeddings=False)  # fmt: skip
    target = paper_target(mix_of(hybrid.pattern, 0.08, 0.5))
    assert target.name == "hybrid_8b" and target.params == 8_654_517_248  # README's count
    assert target.flops_per_token == flops_per_token(hybrid, 4096)["training"]
    assert paper_target(mix_of("*-" * 4)).params == 8_539_869_184
    other = paper_target(mix_of("M*M-"))  # a mix the paper has no 8B model of
    assert other.name == "hybrid_8b shape at this mix"
    shaped = ModelConfig(**{**hybrid.model_dump(exclude={"pattern", "n_layers"}), "n_layers": 56,
                            "attention_ratio": 0.25, "mlp_ratio": 0.25})  # fmt: skip
    assert other.params == param_counts(shaped)["total"]


@pytest.fixture(scope="module")
def chinchilla():
    if not CHINCHILLA.exists():
        pytest.skip(f"Chinchilla reference data not found at {CHINCHILLA} (needs ../shared)")
    with CHINCHILLA.open() as f:
        rows = list(csv.DictReader(f))
    n, c, loss = (
        np.array([float(r[k]) for r in rows]) for k in ("Model Size", "Training FLOP", "loss")
    )
    keep = np.argsort(loss)[:-5]  # as the replication: drop the 5 highest-loss runs
    n, c, loss = n[keep], c[keep], loss[keep]
    return n, c / (6 * n), loss


def test_chinchilla_fit_matches_the_published_refit(chinchilla):
    n, d, loss = chinchilla
    assert len(loss) == 240
    fit = fit_law([n, d], loss)
    # Besiroglu et al. 2024, Hoffmann's method reproduced: the published grid-fit row.
    assert fit.objective == pytest.approx(0.00101827, rel=1e-4)
    p = fit.params()
    assert p["E"] == pytest.approx(1.81724, rel=1e-3)
    assert p["A"] == pytest.approx(477.84, rel=1e-2)
    assert p["alpha"] == pytest.approx(0.34731, abs=1e-3)
    assert p["B"] == pytest.approx(2143.86, rel=5e-2)  # the poorly identified direction
    assert p["beta"] == pytest.approx(0.36718, abs=5e-3)
    # Hoffmann et al.'s own published values fit these data clearly worse.
    published = np.log([406.4, 410.7, 1.0])
    published = np.array([published[0], published[1], 0.34, 0.28, np.log(1.69)])
    assert objective(published, np.log(np.stack([n, d])), np.log(loss)) > 1.5 * fit.objective


def test_chinchilla_bootstrap_intervals_agree_with_the_published_ones(chinchilla):
    n, d, loss = chinchilla
    fit = bootstrap_law(fit_law([n, d], loss), [n, d], loss, resamples=30)
    samples = fit.sample_params()
    # Besiroglu et al.'s 95% intervals (4,000 resamples); ours (30) must overlap each and
    # hold their headline E and alpha.
    published = {"E": (1.769, 1.871), "A": (285, 744), "B": (1042, 5810),
                 "alpha": (0.317, 0.373), "beta": (0.331, 0.415)}  # fmt: skip
    for name, (plo, phi) in published.items():
        lo, hi = interval(samples[name])
        assert lo < phi and hi > plo, (name, lo, hi)
    assert interval(samples["E"])[0] < 1.82 < interval(samples["E"])[1]
    assert interval(samples["alpha"])[0] < 0.3478 < interval(samples["alpha"])[1]


def test_hybrid_ratio_curve_orders_mixes_by_their_laws():
    n, d, c, _ = isoflop_design(noise=0.0)
    rng = np.random.default_rng(1)
    rows = []
    for pattern, e in (("MMMM", 1.80), ("M*M-", 1.70), ("*-*-", 1.75)):
        loss = law(n, d, {**TRUE, "E": e}) * np.exp(rng.normal(0, 0.002, len(n)))
        rows += [
            trial_row(f"{pattern}{i}", pattern, *v)
            for i, v in enumerate(zip(n, d, c, loss, strict=True))
        ]
    study = analyze(rows, resamples=5)
    curve = study.ratio_curves["hybrid_8b at 1.1T tokens"]
    assert [p["attention"] for p in curve] == [0.0, 0.25]  # SSM mixes only
    assert curve[0]["value"] - curve[1]["value"] == pytest.approx(0.10, abs=0.02)
    assert all(p["lo"] <= p["value"] <= p["hi"] for p in curve)
    assert len(study.comparisons) == 2 * 3 and len(study.crossovers) == 3
