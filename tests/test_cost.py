import math

from arch.accounting import flops_per_token, param_counts
from runners.cost import Throughput, load_throughput, study_cost
from runners.spec import load_spec
from tests.test_spec import ROOT, cli

TABLE = Throughput(gpu="test", points=[
    {"params": 1e6, "tokens_per_s": 1e12, "source": "a"},
    {"params": 1e8, "tokens_per_s": 1e14, "source": "b"},
])  # fmt: skip


def test_rate_interpolates_in_log_log_and_extrapolates_outside():
    # Halfway in log(params) between the points is halfway in log(rate): 1e13 at 1e7.
    assert math.isclose(TABLE.rate(10**7)[0], 1e13, rel_tol=1e-9)
    assert TABLE.rate(10**7)[1] is False
    assert TABLE.rate(10**6) == (1e12, False)  # on a point: measured
    assert TABLE.rate(10**8) == (1e14, False)
    assert TABLE.rate(10**5) == (1e12, True)  # below: the smallest's tokens/s, flagged
    # above: the largest's FLOP/s held, so 10x the parameters train 1/10 the tokens/s
    assert math.isclose(TABLE.rate(10**9)[0], 1e13) and TABLE.rate(10**9)[1]


def test_study_cost_sums_each_trials_tokens_over_its_rate():
    _, trials = load_spec(ROOT / "studies" / "smoke.yaml")
    cost = study_cost(trials, TABLE)
    flops = [flops_per_token(t.model, t.data.seq_len)["training"] * t.tokens for t in trials]
    # Every smoke trial is below 1M parameters: each runs at the table's 1e12 tokens/s.
    assert all(param_counts(t.model)["total"] < 1e6 for t in trials)
    assert math.isclose(cost.flops, sum(flops), rel_tol=1e-12)
    tokens = sum(t.tokens for t in trials)
    assert math.isclose(cost.gpu_hours, tokens / 1e12 / 3600, rel_tol=1e-12)
    assert cost.outside == len(trials)


def test_shipped_throughput_table_loads():
    table = load_throughput("h100")
    assert table.gpu == "H100" and all(p.source for p in table.points)


def test_plan_prints_position_encoding_and_cost():
    result = cli("plan", "studies/scaling_1gpu.yaml")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = lines[1].split()
    assert "position" in header
    transformer = next(line for line in lines if line.split()[1].startswith("*-*-"))
    assert "RoPE 50%" in transformer
    assert "training FLOPs" in lines[-1] and "GPU-hours on one H100" in lines[-1]


def test_plan_of_the_wsd_study_saves_a_third_of_its_training_flops(capsys):
    """Each size's shorter budgets train only their decay (the last 20% of their steps),
    counted here by hand from the trial table."""
    from runners.cli import main

    assert main(["plan", str(ROOT / "studies" / "scaling_1gpu_wsd.yaml")]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    _, trials = load_spec(ROOT / "studies" / "scaling_1gpu_wsd.yaml")
    alone = spent = 0.0
    longest = {}
    for t in trials:
        key = (t.model.pattern, t.model.d_model)
        longest[key] = max(longest.get(key, 0), t.tokens)
    for t in trials:
        flops = flops_per_token(t.model, t.data.seq_len)["training"] * t.tokens
        alone += flops
        if t.tokens == longest[(t.model.pattern, t.model.d_model)]:
            spent += flops
        else:
            steps = math.ceil(t.tokens / (32 * 512))
            decay_start = steps - round(0.2 * steps)
            spent += flops * (1 - decay_start * 32 * 512 / t.tokens)
    assert 1 - spent / alone >= 0.30
    assert f"training FLOPs {alone:.3g}, {spent:.3g} with budgets branched" in last
    assert f"({1 - spent / alone:.0%} fewer)" in last
