"""Where each layer type goes in a hybrid stack.

Symbols follow Megatron-LM's hybrid models: ``M`` Mamba-2, ``*`` attention,
``-`` MLP. Other layer types (arch/registry.py: ``m`` Mamba-1, ...) are our extensions;
ratio-based allocation never produces them.

``allocate_layers`` places layers exactly where Megatron-LM's
``mamba_hybrid_layer_allocation`` does, so a pattern named by ratios here is
the pattern the paper trained.
"""

from collections import Counter

from arch.registry import layer_types

MAMBA2, ATTENTION, MLP = "M", "*", "-"


def allocate_layers(n_layers: int, attention_ratio: float, mlp_ratio: float) -> str:
    """The layer pattern Megatron-LM allocates for these target ratios.

    Attention layers are spread evenly with Mamba sections before, between and
    after them; MLP layers then replace evenly spaced Mamba layers, leaning to
    the right. Counts are ``round(n_layers * ratio)`` (Python's round, as
    Megatron-LM uses).
    """
    if n_layers < 1:
        raise ValueError(f"n_layers must be at least 1, got {n_layers}")
    for name, ratio in (("attention_ratio", attention_ratio), ("mlp_ratio", mlp_ratio)):
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"{name} {ratio} is not in [0, 1]")
    if attention_ratio + mlp_ratio > 1.0:
        raise ValueError(f"attention_ratio + mlp_ratio = {attention_ratio + mlp_ratio:g} exceeds 1")

    layers = [MAMBA2] * n_layers
    n_attention = round(n_layers * attention_ratio)
    n_mamba = n_layers - n_attention
    _spread(layers, ATTENTION, gap=n_mamba / (n_attention + 1))

    n_mlp = round(n_layers * mlp_ratio)
    if n_mlp > 0:
        _spread(layers, MLP, gap=(n_mamba - n_mlp) / n_mlp)
    return "".join(layers)


def _spread(layers: list[str], symbol: str, gap: float) -> None:
    """Turn Mamba-2 slots into ``symbol`` every ``gap`` Mamba-2 slots.

    A running budget starts at ``gap``; each Mamba-2 slot passed spends one, and
    a slot is converted when less than half a slot of budget is left.
    """
    budget = gap
    for i, current in enumerate(layers):
        if current != MAMBA2:
            continue
        if budget < 0.5:
            layers[i] = symbol
            budget += gap
        else:
            budget -= 1


def validate_pattern(pattern: str) -> str:
    """Return ``pattern`` if every symbol is a known layer type, else raise ValueError."""
    if not pattern:
        raise ValueError("pattern is empty")
    known = {t.symbol: t.label for t in layer_types()}
    bad = sorted(set(pattern) - set(known))
    if bad:
        use = ", ".join(f"{symbol} ({label})" for symbol, label in known.items())
        raise ValueError(
            f"pattern {pattern!r} has unknown symbol(s) {' '.join(map(repr, bad))}; use {use}"
        )
    return pattern


def layer_counts(pattern: str) -> dict[str, int]:
    """Number of layers of each type, keyed by readable name."""
    counts = Counter(pattern)
    return {t.name: counts[t.symbol] for t in layer_types()}
