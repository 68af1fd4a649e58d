"""Exact parameter counts and FLOPs per token, in closed form, from the config alone.

Parameters (d = d_model, V = vocab, f = d_ffn, E = expand * d, N = d_state,
g = ssm_ngroups, H = E / ssm_headdim, K = d_conv, r = ceil(d / 16), kv = n_kv_heads * d / n_heads):
  embedding V d; LM head V d unless tied; every block's norm and the final norm d each
  attention   2 d^2 + 2 d kv                     (q, k/v, out projections, no biases)
  MLP         d f (2 d f with SwiGLU) + f d      (up, down)
  Mamba-2     d (2E + 2gN + H) + (E + 2gN)(K + 1) + 3H + E + E d
              (in_proj, conv1d with bias, dt_bias / A_log / D, gated norm, out_proj)
  Mamba-1     2 d E + E (K + 1) + E (r + 2N) + (r + 1) E + E N + E + E d
              (in_proj, conv1d, x_proj, dt_proj with bias, A_log, D, out_proj)

FLOPs per token, forward (a multiply-add is 2 FLOPs; training = 3 x forward):
  matmuls     2 x (every weight-matrix parameter, the LM head included, the embedding
              lookup not)
  attention   4 d L per layer at sequence length L (scores and values, counted over the
              full L x L square, the convention of the 6N + 12 layers d L rule)
  Mamba-2 SSD 2 Q (E + gN) + 4 N E per layer with chunk Q: the chunk's C B^T and
              scores x X products, plus the chunk states and their outputs
  Mamba-1     9 E N per layer for the selective scan (as mamba_ssm counts it)
  conv1d      2 K x (conv channels) per Mamba layer
Norms, activations and softmax are left out, as is usual.
"""

import math

from arch.allocation import ATTENTION, MAMBA1, MAMBA2, MLP, SYMBOL_NAMES
from arch.config import ModelConfig


def _d_ffn(c: ModelConfig) -> int:
    return c.d_ffn or 4 * c.d_model


def _kv_dim(c: ModelConfig) -> int:
    return (c.n_kv_heads or c.n_heads) * (c.d_model // c.n_heads)


def _layer_matrix_params(symbol: str, c: ModelConfig) -> int:
    """Parameters of a layer's weight matrices (what matmul FLOPs are counted on)."""
    d, E = c.d_model, c.expand * c.d_model
    if symbol == ATTENTION:
        return 2 * d * d + 2 * d * _kv_dim(c)
    if symbol == MLP:
        f = _d_ffn(c)
        return (2 if c.mlp_activation == "swiglu" else 1) * d * f + f * d
    if symbol == MAMBA2:
        gN, H = c.ssm_ngroups * c.d_state, E // c.ssm_headdim
        return d * (2 * E + 2 * gN + H) + E * d
    if symbol == MAMBA1:
        r, N = math.ceil(d / 16), c.mamba1_d_state
        return 2 * d * E + E * (r + 2 * N) + r * E + E * d
    raise ValueError(f"unknown layer symbol {symbol!r}")


def _layer_other_params(symbol: str, c: ModelConfig) -> int:
    """Vectors and convolutions: biases, conv kernels, SSM parameters, norms."""
    E = c.expand * c.d_model
    if symbol == MAMBA2:
        conv, H = E + 2 * c.ssm_ngroups * c.d_state, E // c.ssm_headdim
        return conv * (c.d_conv + 1) + 3 * H + E
    if symbol == MAMBA1:
        return E * (c.d_conv + 1) + E + E * c.mamba1_d_state + E
    return 0


def param_counts(c: ModelConfig) -> dict[str, int]:
    """Parameters by layer type (block norms counted with their layer), and the total."""
    counts = {"embedding": c.vocab_size * c.d_model}
    counts["lm_head"] = 0 if c.tie_embeddings else c.vocab_size * c.d_model
    for symbol, name in SYMBOL_NAMES.items():
        per_layer = _layer_matrix_params(symbol, c) + _layer_other_params(symbol, c) + c.d_model
        counts[name] = c.pattern.count(symbol) * per_layer
    counts["final_norm"] = c.d_model
    counts["total"] = sum(counts.values())
    return counts


def _layer_sequence_flops(symbol: str, c: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs per token beyond the layer's matmuls."""
    E = c.expand * c.d_model
    if symbol == ATTENTION:
        return 4 * c.d_model * seq_len
    if symbol == MAMBA2:
        gN = c.ssm_ngroups * c.d_state
        chunk = min(c.chunk_size, seq_len)
        return 2 * chunk * (E + gN) + 4 * c.d_state * E + 2 * c.d_conv * (E + 2 * gN)
    if symbol == MAMBA1:
        return 9 * E * c.mamba1_d_state + 2 * c.d_conv * E
    return 0


def flops_per_token(c: ModelConfig, seq_len: int) -> dict[str, int]:
    """Forward and training (3 x forward) FLOPs per token at this sequence length."""
    forward = 2 * c.vocab_size * c.d_model  # the LM head, tied or not
    for symbol in c.pattern:
        forward += 2 * _layer_matrix_params(symbol, c) + _layer_sequence_flops(symbol, c, seq_len)
    return {"forward": forward, "training": 3 * forward}
