"""Causal attention with grouped-query heads and optional RoPE (``*``)."""

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from arch.allocation import ATTENTION
from arch.registry import LayerType, register

if TYPE_CHECKING:
    from arch.config import ModelConfig


def rotary_frequencies(dim: int, base: float = 10000.0) -> Tensor:
    """The dim // 2 angular frequencies of RoPE over ``dim`` rotated channels."""
    return 1.0 / base ** (torch.arange(0, dim, 2).float() / dim)


# An opaque op, so a compiled step reads the tables: Inductor inlined cos and sin into the
# rotation's forward and backward kernels, computing them for every element of q and k
# (RoPE added 5.8 ms to a 350M Transformer's 170 ms step on an H200).
@torch.library.custom_op("hybridscale::rotary_tables", mutates_args=())
def rotary_tables(positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin of shape (seqlen, dim // 2) for the rotated part of each head."""
    angles = positions.float()[:, None] * inv_freq.float()[None, :]
    return angles.cos(), angles.sin()


@rotary_tables.register_fake
def _(positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    shape = (positions.shape[0], inv_freq.shape[0])
    return tuple(torch.empty(shape, device=positions.device) for _ in range(2))


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first 2 * cos.shape[-1] channels of x (..., head_dim); cos and sin
    broadcast against x's leading dimensions."""
    half = cos.shape[-1]
    x1, x2, x_pass = x.split([half, half, x.shape[-1] - 2 * half], dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((rotated.to(x.dtype), x_pass), dim=-1)


class Attention(nn.Module):
    """Causal multi-head attention with grouped-query heads, no biases, optional rotary."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        rotary_fraction: float = 0.0,
    ) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads or n_heads
        self.head_dim = d_model // n_heads
        # rotate an even number of channels per head; 0 means no position embedding at all
        self.rotary_dim = int(self.head_dim * rotary_fraction) // 2 * 2
        # A buffer, so a compiled step reads the frequencies rather than recomputing them for
        # every element (non-persistent: not a weight, not in checkpoints).
        self.register_buffer("inv_freq", rotary_frequencies(self.rotary_dim), persistent=False)
        # q, k and v from one matmul (one weight read, one launch), split per head after
        self.qkv_proj = nn.Linear(d_model, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim,
                                  bias=False)  # fmt: skip
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # The frequencies stay fp32 under model.to(bfloat16): rounded, every rotation of a
        # model trained in fp32 would shift, the more the later the position.
        self.inv_freq = rotary_frequencies(self.rotary_dim).to(self.inv_freq.device)
        return self

    def forward(self, x: Tensor, cache: dict | None = None) -> Tensor:
        batch, seqlen, _ = x.shape
        heads = self.qkv_proj(x).view(batch, seqlen, -1, self.head_dim)
        q, k, v = heads.split([self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=2)
        static = cache is not None and "pos" in cache
        if static:  # the position is a tensor, so a captured step replays at the next one
            start = cache["pos"] if seqlen == 1 else 0
        else:
            start = cache["k"].shape[2] if cache else 0
        positions = torch.arange(seqlen, device=x.device) + start
        if self.rotary_dim:  # rotated in the (batch, seqlen, heads) layout of the projection
            cos, sin = rotary_tables(positions, self.inv_freq)
            cos, sin = cos[:, None], sin[:, None]
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if static:
            cache["k"].index_copy_(2, positions, k.to(cache["k"].dtype))  # (autocast)
            cache["v"].index_copy_(2, positions, v.to(cache["v"].dtype))
            cache["pos"].copy_(positions[-1] + 1)
            if seqlen == 1:
                k, v = cache["k"], cache["v"]
        elif cache is not None:
            if cache:
                k = torch.cat((cache["k"], k), dim=2)
                v = torch.cat((cache["v"], v), dim=2)
            cache["k"], cache["v"] = k, v
        if k.shape[2] == seqlen:  # the queries are the whole sequence
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            out = attend_to_cache(q, k, v, positions)
        return self.out_proj(out.transpose(1, 2).reshape(batch, seqlen, -1))

    def allocate_cache(
        self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> dict:
        shape = (batch, self.n_kv_heads, max_len, self.head_dim)
        return {
            "k": torch.zeros(shape, device=device, dtype=dtype),
            "v": torch.zeros(shape, device=device, dtype=dtype),
            "pos": torch.zeros((), dtype=torch.long, device=device),
        }


def attend_to_cache(q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
    """Queries q (batch, heads, seqlen, head_dim) at ``positions`` against the cached keys
    k, v (batch, kv_heads, keys, head_dim), each query seeing the keys up to its position.

    Decoding reads the whole cache for one query: a matrix-vector product, bound by memory
    bandwidth. Plain matmuls split it over the keys, where fused attention kernels split
    over queries and leave most of the GPU idle; folding each group's query heads into rows
    reads every key/value head once.
    """
    batch, n_heads, seqlen, head_dim = q.shape
    groups = n_heads // k.shape[1]
    q = q.reshape(batch, k.shape[1], groups * seqlen, head_dim) * head_dim**-0.5
    scores = q @ k.transpose(-1, -2)  # (batch, kv_heads, groups * seqlen, keys)
    visible = torch.arange(k.shape[2], device=q.device) <= positions[:, None]
    scores.masked_fill_(~visible.repeat(groups, 1), float("-inf"))
    return (scores.softmax(-1) @ v).view(batch, n_heads, seqlen, head_dim)


def head_dim(c: "ModelConfig") -> int:
    return c.d_model // c.n_heads


def kv_dim(c: "ModelConfig") -> int:
    """Channels of K (and of V): the KV heads' share of d_model."""
    return (c.n_kv_heads or c.n_heads) * head_dim(c)


def _check(c: "ModelConfig") -> None:
    if c.d_model % c.n_heads:
        raise ValueError(f"d_model {c.d_model} is not divisible by n_heads {c.n_heads}")
    if c.n_heads % (c.n_kv_heads or c.n_heads):
        raise ValueError(f"n_heads {c.n_heads} is not divisible by n_kv_heads {c.n_kv_heads}")


register(
    LayerType(
        symbol=ATTENTION,
        name="attention",
        label="attention",
        build=lambda c: Attention(c.d_model, c.n_heads, c.n_kv_heads, c.rotary_fraction),
        matrix_params=lambda c: 2 * c.d_model**2 + 2 * c.d_model * kv_dim(c),  # q, k/v, out
        # scores and values, counted over the full L x L square (the convention of the
        # 6N + 12 layers d L rule)
        sequence_flops=lambda c, seq_len: 4 * c.d_model * seq_len,
        decode_flops=lambda c, context: 4 * c.n_heads * head_dim(c) * context,
        kv_cache_values=lambda c, context: 2 * kv_dim(c) * context,
        fused_launches=6,
        check=_check,
        width_multiple=lambda get: get("n_heads"),
    )
)
