import pytest

from arch.allocation import allocate_layers, layer_counts, validate_pattern

# The Mamba-2-Hybrid 8B of "An Empirical Study of Mamba-based Language Models"
# (NVIDIA, 2024) as published in Megatron-LM's hybrid example (--hybrid-override-pattern).
PAPER_8B_HYBRID = "M-M-M--M-M*-M-M-M-M--M*-M-M-M-M-M*--M-M-M-M-M*-M--M-M-M-"


def test_paper_8b_hybrid():
    pattern = allocate_layers(56, 0.08, 0.5)
    assert pattern == PAPER_8B_HYBRID
    present = {name: n for name, n in layer_counts(pattern).items() if n}
    assert present == {"mamba2": 24, "attention": 4, "mlp": 28}


# Worked by hand from Megatron-LM's rule: round(n * ratio) layers of a type; a budget
# starting at the Mamba-section length, spent one per Mamba slot, converts a slot when
# under 0.5 and is then refilled.
@pytest.mark.parametrize(
    "n, attention, mlp, expected",
    [
        (1, 0.0, 0.0, "M"),
        (4, 0.0, 0.0, "MMMM"),
        (10, 0.2, 0.2, "MMM*-M*MM-"),
        (10, 0.3, 0.3, "M-*MM*-*M-"),
        (10, 0.0, 0.5, "M-M-M-M-M-"),
        (10, 0.5, 0.0, "M*M*M**M*M"),
        (48, 0.1, 0.0, "MMMMMMM*MMMMMMM*MMMMMMMM*MMMMMMM*MMMMMMM*MMMMMMM"),
        # 1 attention, section 1.5: budgets 1.5, 0.5, -0.5 -> slot 2; then 1 MLP, gap 2
        (4, 0.25, 0.25, "MM*-"),
        # section 0.5: slot 0 spends it, slot 1 turns; the MLP gap is 0 -> slot 0 turns
        (2, 0.5, 0.5, "-*"),
        # round(2.94) = 3 attention, section 0.75: budgets .75, -.25, .5, -.5, .25, 1
        (6, 0.49, 0.0, "M*M**M"),
        # round(2.7) = 3 MLP leaves no Mamba: Megatron-LM gives an all-MLP stack
        (3, 0.0, 0.9, "---"),
    ],
)
def test_hand_computed(n, attention, mlp, expected):
    assert allocate_layers(n, attention, mlp) == expected


@pytest.mark.parametrize("n", [1, 7, 24, 56, 97])
@pytest.mark.parametrize("attention, mlp", [(0.0, 0.0), (0.08, 0.5), (0.25, 0.25), (0.5, 0.0)])
def test_counts_follow_rounding(n, attention, mlp):
    counts = layer_counts(allocate_layers(n, attention, mlp))
    assert counts["attention"] == round(n * attention)
    assert counts["mlp"] == round(n * mlp)
    assert counts["mamba2"] == n - round(n * attention) - round(n * mlp)


@pytest.mark.parametrize(
    "args, message",
    [
        ((0, 0.1, 0.1), "n_layers"),
        ((8, -0.1, 0.0), "attention_ratio"),
        ((8, 0.0, 1.5), "mlp_ratio"),
        ((8, 0.6, 0.6), "exceeds 1"),
    ],
)
def test_impossible_allocations(args, message):
    with pytest.raises(ValueError, match=message):
        allocate_layers(*args)


def test_pattern_symbols():
    assert validate_pattern("Mm*-") == "Mm*-"
    with pytest.raises(ValueError, match="unknown symbol"):
        validate_pattern("M*X")
    with pytest.raises(ValueError, match="empty"):
        validate_pattern("")
