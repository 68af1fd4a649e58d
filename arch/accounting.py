"""Exact parameter counts and FLOPs per token, in closed form, from the config alone: the
sums of what each layer type declares in its module of arch/layers/ (the formulas are there).

Parameters: the embedding V d; the LM head V d unless tied; every layer's own, plus its
block's norm d; the final norm d.

FLOPs per token, forward (a multiply-add is 2 FLOPs; training = 3 x forward): 2 x every
weight-matrix parameter (the LM head included, the embedding lookup not), plus each
layer's sequence term beyond its matmuls (attention's scores and values over the full
L x L square, an SSM's scan, a conv). Norms, activations and softmax are left out, as is
usual.
"""

from arch.config import ModelConfig
from arch.registry import layer_type, layer_types


def layer_params(symbol: str, c: ModelConfig) -> int:
    """One layer's parameters, its block's norm included."""
    t = layer_type(symbol)
    return t.matrix_params(c) + t.other_params(c) + c.d_model


def param_counts(c: ModelConfig) -> dict[str, int]:
    """Parameters by layer type (block norms counted with their layer), and the total."""
    counts = {"embedding": c.vocab_size * c.d_model}
    counts["lm_head"] = 0 if c.tie_embeddings else c.vocab_size * c.d_model
    for t in layer_types():  # a type the pattern lacks need not fit the config's shape
        n = c.pattern.count(t.symbol)
        counts[t.name] = n * layer_params(t.symbol, c) if n else 0
    counts["final_norm"] = c.d_model
    counts["total"] = sum(counts.values())
    return counts


def matrix_params(c: ModelConfig) -> int:
    """Parameters of every weight matrix a token's forward pass multiplies by, the LM head
    included (tied or not), the embedding table not."""
    layers = sum(layer_type(symbol).matrix_params(c) for symbol in c.pattern)
    return c.vocab_size * c.d_model + layers


def flops_per_token(c: ModelConfig, seq_len: int) -> dict[str, int]:
    """Forward and training (3 x forward) FLOPs per token at this sequence length."""
    sequence = sum(layer_type(symbol).sequence_flops(c, seq_len) for symbol in c.pattern)
    forward = 2 * matrix_params(c) + sequence
    return {"forward": forward, "training": 3 * forward}
