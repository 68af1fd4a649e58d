"""Mamba-2's causal depthwise conv1d + SiLU as Triton kernels, forward and backward.

``causal_conv1d_silu(x, weight, bias)``: x (b, L, channels) in the channels-last layout of
in_proj's output (any batch/time strides), weight (channels, width), bias (channels,) ->
silu(bias + sum_k weight[:, k] x[t - width + 1 + k]) as (b, L, channels), contiguous, so the
x, B and C split from it reach the scan without copies. The reference is
``F.silu(F.conv1d(x.transpose(1, 2), weight[:, None], bias, padding=width - 1,
groups=channels)[..., :L]).transpose(1, 2)``, as in ``arch.mamba2.Mamba2``, which moves
the tensor through memory several times.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from arch.kernels.tuning import choices

_CONFIGS = choices(
    [triton.Config({"BT": bt, "BD": bd}, num_warps=w)
     for bt, bd in ((32, 128), (64, 128), (32, 256), (16, 256)) for w in (4, 8)],
    small=triton.Config({"BT": 16, "BD": 16}, num_warps=1),
)  # fmt: skip
# The backward keeps width x BT x BD fp32 partial weight gradients in registers: small tiles.
_BWD_CONFIGS = choices(
    [triton.Config({"BT": bt, "BD": bd, "STEPS": steps}, num_warps=w)
     for bt, bd, w in ((16, 128, 8), (8, 128, 4), (16, 64, 4), (32, 64, 8), (8, 256, 8))
     for steps in (8, 32)],
    small=triton.Config({"BT": 16, "BD": 16, "STEPS": 2}, num_warps=1),
)  # fmt: skip


@triton.jit
def _load_x(x_ptr, b, src, d, L, Dm, s_x_b, s_x_t):
    """x at times src (zero outside the sequence), channels d, src and d broadcast
    against each other: fp32, of their broadcast shape."""
    ok = (src >= 0) & (src < L) & (d < Dm)
    x = tl.load(x_ptr + b * s_x_b + src * s_x_t + d, mask=ok, other=0.0)
    return x.to(tl.float32)


@triton.jit
def _conv_pre(x_ptr, w_ptr, bias_ptr, b, t, d, L, Dm, s_x_b, s_x_t, K: tl.constexpr):
    """bias + the causal conv at times t, channels d: fp32 (BT, BD)."""
    acc = tl.load(bias_ptr + d, mask=d < Dm, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(K):
        x = _load_x(x_ptr, b, (t - (K - 1) + k)[:, None], d[None, :], L, Dm, s_x_b, s_x_t)
        w = tl.load(w_ptr + d * K + k, mask=d < Dm, other=0.0).to(tl.float32)
        acc += x * w[None, :]
    return acc


@triton.autotune(_CONFIGS, key=["Dm", "K"], cache_results=True)
@triton.jit
def _conv_fwd(x_ptr, w_ptr, bias_ptr, y_ptr, L, Dm, s_x_b, s_x_t,
              K: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BT + tl.arange(0, BT)
    d = tl.program_id(2) * BD + tl.arange(0, BD)
    pre = _conv_pre(x_ptr, w_ptr, bias_ptr, b, t, d, L, Dm, s_x_b, s_x_t, K)
    out = (b * L + t[:, None]) * Dm + d[None, :]
    tl.store(y_ptr + out, pre * tl.sigmoid(pre), mask=(t < L)[:, None] & (d < Dm)[None, :])


@triton.autotune(_CONFIGS, key=["Dm", "K"], cache_results=True)
@triton.jit
def _conv_dpre(x_ptr, w_ptr, bias_ptr, dy_ptr, dpre_ptr, L, Dm, s_x_b, s_x_t,
               K: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):  # fmt: skip
    """The pre-activation gradient dy * silu'(pre), pre recomputed: fp32 (b, L, Dm)."""
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BT + tl.arange(0, BT)
    d = tl.program_id(2) * BD + tl.arange(0, BD)
    pre = _conv_pre(x_ptr, w_ptr, bias_ptr, b, t, d, L, Dm, s_x_b, s_x_t, K)
    ok = (t < L)[:, None] & (d < Dm)[None, :]
    out = (b * L + t[:, None]) * Dm + d[None, :]
    dy = tl.load(dy_ptr + out, mask=ok, other=0.0).to(tl.float32)
    sig = tl.sigmoid(pre)
    tl.store(dpre_ptr + out, dy * sig * (1.0 + pre * (1.0 - sig)), mask=ok)


@triton.autotune(_BWD_CONFIGS, key=["Dm", "K"], reset_to_zero=["dw_ptr", "dbias_ptr"],
                 cache_results=True)  # fmt: skip
@triton.jit
def _conv_bwd(x_ptr, w_ptr, dpre_ptr, dx_ptr, dw_ptr, dbias_ptr, L, Dm, s_x_b, s_x_t,
              K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
              STEPS: tl.constexpr):  # fmt: skip
    """Over STEPS blocks of BT times: dx at times t gathers dpre at t .. t + K - 1. The
    weight and bias gradients are summed per element and over the block's times only once,
    at the end: summing over times at every step synchronised the warps each time, and the
    kernel ran at a fifth of the memory bandwidth."""
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(2) * BD + tl.arange(0, BD)
    dm = d < Dm
    kk = tl.arange(0, KP)
    dw = tl.zeros((KP, BT, BD), dtype=tl.float32)  # [k, t]: dpre[t] * x[t - K + 1 + k]
    dbias = tl.zeros((BT, BD), dtype=tl.float32)
    for step in range(STEPS):
        t = (tl.program_id(1) * STEPS + step) * BT + tl.arange(0, BT)
        dx = tl.zeros((BT, BD), dtype=tl.float32)
        for j in tl.static_range(K):  # dpre at times t + j, zero past the end
            ok = (t + j < L)[:, None] & dm[None, :]
            dpre = tl.load(dpre_ptr + (b * L + t[:, None] + j) * Dm + d[None, :], mask=ok,
                           other=0.0)  # fmt: skip
            w = tl.load(w_ptr + d * K + (K - 1 - j), mask=dm, other=0.0).to(tl.float32)
            dx += dpre * w[None, :]
            if j == 0:  # each time's dpre once: the weight and bias gradients
                dbias += dpre
                # x at t - K + 1 + k for every k (rows k >= K, padding, are never stored)
                src = t[None, :, None] - (K - 1) + kk[:, None, None]
                x = _load_x(x_ptr, b, src, d[None, None, :], L, Dm, s_x_b, s_x_t)
                dw += dpre[None, :, :] * x
        tl.store(dx_ptr + (b * L + t[:, None]) * Dm + d[None, :], dx,
                 mask=(t < L)[:, None] & dm[None, :])  # fmt: skip
    tl.atomic_add(dbias_ptr + d, tl.sum(dbias, axis=0), mask=dm, sem="relaxed")
    tl.atomic_add(
        dw_ptr + d[None, :] * K + kk[:, None],
        tl.sum(dw, axis=1),
        mask=dm[None, :] & (kk[:, None] < K),
        sem="relaxed",
    )


def _grid(b: int, L: int, Dm: int):
    def grid(meta):
        span = meta["BT"] * meta.get("STEPS", 1)
        return b, triton.cdiv(L, span), triton.cdiv(Dm, meta["BD"])

    return grid


# Custom ops rather than an autograd.Function behind torch.compiler.disable: torch.compile
# keeps one graph around them (no graph break), knowing their outputs from the fakes.
@torch.library.custom_op("hybridscale::causal_conv1d_silu", mutates_args=())
def causal_conv1d_silu(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """x (b, L, channels), weight (channels, width), bias (channels,) -> (b, L, channels)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    b, L, Dm = x.shape
    weight = weight.contiguous()
    y = torch.empty(b, L, Dm, device=x.device, dtype=x.dtype)
    _conv_fwd[_grid(b, L, Dm)](x, weight, bias, y, L, Dm, x.stride(0), x.stride(1),
                               K=weight.shape[1])  # fmt: skip
    return y


@causal_conv1d_silu.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("hybridscale::causal_conv1d_silu_backward", mutates_args=())
def _backward(x: Tensor, weight: Tensor, bias: Tensor, dy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if x.stride(-1) != 1:
        x = x.contiguous()
    b, L, Dm = x.shape
    weight, dy = weight.contiguous(), dy.contiguous()
    # Two passes: dpre once per element (recomputing the conv), then dx and the weight
    # gradients from it (a single pass recomputed dpre at each of the K shifts).
    dpre = torch.empty(b, L, Dm, device=x.device, dtype=torch.float32)
    _conv_dpre[_grid(b, L, Dm)](x, weight, bias, dy, dpre, L, Dm, x.stride(0), x.stride(1),
                                K=weight.shape[1])  # fmt: skip
    dx = torch.empty(b, L, Dm, device=x.device, dtype=x.dtype)
    dw = torch.zeros(weight.shape, device=x.device, dtype=torch.float32)
    dbias = torch.zeros(Dm, device=x.device, dtype=torch.float32)
    _conv_bwd[_grid(b, L, Dm)](x, weight, dpre, dx, dw, dbias, L, Dm,
                               x.stride(0), x.stride(1), K=weight.shape[1],
                               KP=triton.next_power_of_2(weight.shape[1]))  # fmt: skip
    return dx, dw.to(weight.dtype), dbias.to(bias.dtype)


@_backward.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor, dy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return x.new_empty(x.shape), torch.empty_like(weight), torch.empty_like(bias)


def _save(ctx, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


causal_conv1d_silu.register_autograd(
    lambda ctx, dy: _backward(*ctx.saved_tensors, dy), setup_context=_save
)
