"""The two-step task fit (analysis/tasks.py) on synthetic ladders drawn from known laws and
sigmoids: it recovers them within its intervals and predicts a larger model's accuracy."""

import numpy as np
import pytest

from analysis.fit import interval
from analysis.table import mix_of, trial_row
from analysis.tasks import backtest_task, fit_ladder, paper_predictions, sigmoid

LOSS, ACC = "task/t/loss", "task/t/acc"
# Per mix: its pattern and ratios, its task-loss law and its family's sigmoid.
TRUE = {
    "transformer": (("*-", 0.5, 0.5), dict(E=1.9, A=480.0, B=420.0, alpha=0.35, beta=0.29),
                    dict(a=0.6, k=-3.0, L0=3.6, b=0.25)),
    "hybrid": (("MM*-", 0.25, 0.5), dict(E=1.85, A=430.0, B=400.0, alpha=0.34, beta=0.28),
               dict(a=0.5, k=-4.0, L0=3.3, b=0.3)),
}  # fmt: skip
SIZES = np.geomspace(1e7, 3e8, 5)
TOKENS_PER_PARAM = (5, 10, 20, 40)
RESAMPLES = 100


def true_loss(law: dict, n, d):
    return law["E"] + law["A"] / n ** law["alpha"] + law["B"] / d ** law["beta"]


def true_accuracy(curve: dict, loss):
    return sigmoid(np.array([curve[p] for p in ("a", "k", "L0", "b")]), loss)


def ladder_rows(seed: int, loss_noise: float = 0.005, acc_noise: float = 0.01) -> list[dict]:
    """Every mix at every (size, tokens per parameter), its task loss and accuracy drawn
    about the true law and sigmoid."""
    rng = np.random.default_rng(seed)
    rows = []
    for name, ((pattern, attention, mlp), law, curve) in TRUE.items():
        for n in SIZES:
            for ratio in TOKENS_PER_PARAM:
                d = ratio * n
                loss = true_loss(law, n, d) * np.exp(rng.normal(0, loss_noise))
                accuracy = true_accuracy(curve, loss) + rng.normal(0, acc_noise)
                extra = {LOSS: loss, ACC: accuracy}
                rows.append(trial_row(f"{name}-{n:.0f}-{ratio}", pattern, n, d, 6 * n * d,
                                      loss, attention, mlp, **extra))  # fmt: skip
    return rows


@pytest.fixture(scope="module")
def ladder():
    return fit_ladder(ladder_rows(seed=0), "t", LOSS, ACC, RESAMPLES, seed=0)


def mix(name: str):
    pattern, attention, mlp = TRUE[name][0]
    return mix_of(pattern, attention, mlp)


@pytest.mark.parametrize("name", TRUE)
def test_recovers_the_loss_law_and_sigmoid_within_their_intervals(ladder, name):
    _, law, curve = TRUE[name]
    fitted_law = ladder.losses[mix(name)]
    fitted_curve = ladder.accuracies[mix(name).family]
    for fit, truth in ((fitted_law, law), (fitted_curve, curve)):
        samples = fit.sample_params()
        for param, value in truth.items():
            lo, hi = interval(samples[param])
            assert lo <= value <= hi, (name, param, value, (lo, hi))
    # the families' sigmoids are told apart: each one's k interval excludes the other's
    other = next(n for n in TRUE if n != name)
    lo, hi = interval(fitted_curve.sample_params()["k"])
    assert not lo <= TRUE[other][2]["k"] <= hi


@pytest.mark.parametrize("name", TRUE)
def test_predicts_a_larger_models_accuracy_within_its_interval(ladder, name):
    _, law, curve = TRUE[name]
    n, d = 1e9, 2e10  # three times the largest size, at 20 tokens per parameter
    predicted = ladder.predict(mix(name), n, d)
    loss = true_loss(law, n, d)
    assert predicted["loss"]["lo"] <= loss <= predicted["loss"]["hi"]
    accuracy = float(true_accuracy(curve, loss))
    assert predicted["accuracy"]["lo"] <= accuracy <= predicted["accuracy"]["hi"]


def test_backtest_predicts_the_held_out_largest_size(ladder):
    rows = {r["trial"]: r for r in ladder_rows(seed=1)}
    result = backtest_task(list(rows.values()), "t", LOSS, ACC, None, RESAMPLES, seed=1)
    held = result["trials"]
    assert len(held) == len(TRUE) * len(TOKENS_PER_PARAM)
    assert {r["N"] for r in held} == {SIZES[-1]}
    loss, accuracy = result["summary"]["loss"], result["summary"]["accuracy"]
    assert loss["inside"] == accuracy["inside"] == len(held)
    assert loss["mean_abs_error_pct"] < 1 and accuracy["mean_abs_error_points"] < 2
    for t in held:  # the trial's own task loss and accuracy, the accuracy error in points
        assert (t["observed"], t["accuracy"]["observed"]) == (rows[t["trial"]][LOSS],
                                                             rows[t["trial"]][ACC])  # fmt: skip
        error = 100 * (t["accuracy"]["predicted"]["value"] - t["accuracy"]["observed"])
        assert t["accuracy"]["error_points"] == pytest.approx(error)


def test_paper_predictions_at_both_token_counts(ladder):
    rows = paper_predictions(ladder)
    assert [(r["mix"], r["D"]) for r in rows] == [
        (m.label, d) for m in ladder.losses for d in (1.1e12, 3.5e12)
    ]
    for r in rows:
        assert r["accuracy"]["lo"] <= r["accuracy"]["value"] <= r["accuracy"]["hi"]
    # more tokens, lower task loss, higher accuracy (the sigmoid falls with loss)
    for short, long in zip(rows[::2], rows[1::2], strict=True):
        assert long["loss"]["value"] < short["loss"]["value"]
        assert long["accuracy"]["value"] > short["accuracy"]["value"]
