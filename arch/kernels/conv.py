"""Mamba-2's causal depthwise conv1d + SiLU as Triton kernels, forward and backward.

``causal_conv1d_silu(x, weight, bias)``: x (b, L, channels) in the channels-last layout of
in_proj's output (any batch/time strides), weight (channels, width), bias (channels,) ->
silu(bias + sum_k weight[:, k] x[t - width + 1 + k]) as (b, L, channels), contiguous, so the
x, B and C split from it reach the scan without copies. The reference is
``F.silu(F.conv1d(x.transpose(1, 2), weight[:, None], bias, padding=width - 1,
groups=channels)[..., :L]).transpose(1, 2)``, as in ``arch.layers.mamba2.Mamba2``, which moves
the tensor through memory several times.

``conv_silu_backward(x, weight, bias, dy, dx)``: its backward, in one pass over x and dy,
writing x's gradient into a given dx (for ops that fuse the conv with its neighbours).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from arch.kernels.tuning import autotune, choices

# Both passes walk spans of T times a row of BD channels at a time, R rows a loop
# iteration: loaded together (R) and prefetched by Triton's pipeliner (STAGES). Two to four
# channels a thread: eight would hold 128 fp32 registers of the backward's windows and sums.
_WALK_CONFIGS = choices(
    [triton.Config({"T": t, "BD": bd, "R": r, "STAGES": s}, num_warps=w)
     for t in (128, 64) for bd, w in ((256, 2), (128, 1), (256, 4)) for r, s in ((4, 3), (8, 1))],
    small=triton.Config({"T": 8, "BD": 16, "R": 4, "STAGES": 1}, num_warps=1),
)  # fmt: skip


@triton.jit
def _rows(d, Dm, ok):
    """Channels d of a row that exists where ok, a scalar, holds: the bound, not a splat of
    ok, since the interpreter splats a scalar condition into int32, which masks reject."""
    return d < tl.where(ok, Dm, 0)


@triton.jit
def _params(w_ptr, bias_ptr, d, Dm, K: tl.constexpr):
    """The K weights, a tuple of rows, and the bias at channels d: fp32."""
    dm = d < Dm
    w = ()
    for k in tl.static_range(K):
        w += (tl.load(w_ptr + d * K + k, mask=dm, other=0.0).to(tl.float32),)
    return w, tl.load(bias_ptr + d, mask=dm, other=0.0).to(tl.float32)


@triton.jit
def _pre(xs, w, bias, K: tl.constexpr):
    """The pre-activation at t from the window xs of x at t - K + 1 .. t."""
    pre = bias
    for k in tl.static_range(K):
        pre += w[k] * xs[k]
    return pre


@triton.jit
def _walk(x_row, y_row, t_lo, L, d, Dm, s_x_t, w, bias, xs, K: tl.constexpr,
          R: tl.constexpr, OWN: tl.constexpr):  # fmt: skip
    """R steps forward in time from t_lo. The window xs, a tuple of rows, oldest first: x at
    t - K + 1 .. t - 1 before the step at t. A step loads x at t (zero outside the
    sequence) and, where OWN, writes y at t. The R rows are loaded first, all in flight
    together, as in _walk_back."""
    x_in = ()
    for r in tl.static_range(R):
        t = t_lo + r
        x_in += (tl.load(x_row + t * s_x_t, mask=_rows(d, Dm, (t >= 0) & (t < L)), other=0.0),)
    for r in tl.static_range(R):
        xs += (x_in[r].to(tl.float32),)
        if OWN:
            t = t_lo + r
            pre = _pre(xs, w, bias, K)
            tl.store(y_row + t * Dm, pre * tl.sigmoid(pre), mask=_rows(d, Dm, t < L))
        xs = xs[1:]
    return xs


@autotune(_WALK_CONFIGS, key=["Dm", "K"])
@triton.jit
def _conv_fwd(x_ptr, w_ptr, bias_ptr, y_ptr, L, Dm, s_x_b, s_x_t, K: tl.constexpr,
              T: tl.constexpr, BD: tl.constexpr, R: tl.constexpr,
              STAGES: tl.constexpr):  # fmt: skip
    """y at times t0 .. t0 + T - 1 of one sequence, channels d, in one walk forward in
    time, a row of BD channels a step, R steps a loop iteration, with a window of the last
    K - 1 x rows in registers: each x row is loaded once (and K - 1 halo rows before the
    span), where loading an x tile at each of the K shifts read it K times."""
    tl.static_assert(T % R == 0)
    b = tl.program_id(0).to(tl.int64)
    t0 = tl.program_id(1) * T
    d = tl.program_id(2) * BD + tl.arange(0, BD)
    x_row, y_row = x_ptr + b * s_x_b + d, y_ptr + b * L * Dm + d
    w, bias = _params(w_ptr, bias_ptr, d, Dm, K)
    xs = (tl.zeros((BD,), dtype=tl.float32),) * (K - 1)
    xs = _walk(x_row, y_row, t0 - (K - 1), L, d, Dm, s_x_t, w, bias, xs, K, R=K - 1, OWN=False)
    # R >= K - 1, so the window a loop iteration hands on is all its own values (see _conv_bwd)
    for i in tl.range(T // R, num_stages=STAGES):
        xs = _walk(x_row, y_row, t0 + i * R, L, d, Dm, s_x_t, w, bias, xs, K, R=R, OWN=True)


@triton.jit
def _walk_back(x_row, dy_row, dx_row, t_hi, L, dy_end, d, Dm, s_x_t, s_dy_t, s_dx_t, w,
               bias, xs, dpres, dw, dbias, K: tl.constexpr, R: tl.constexpr,
               OWN: tl.constexpr):  # fmt: skip
    """R steps back in time from t_hi. Windows, as tuples of rows, oldest first: x at
    t - K + 2 .. t and dpre at t + 1 .. t + K - 1 before the step at t. A step loads x at
    t - K + 1 (zero before the start) and dy at t (zero from dy_end) and, where OWN, writes
    dx at t and adds into dw and dbias. The R rows are loaded first, all in flight
    together: the compiler cannot tell dx from x and dy, so a load after a store waits."""
    x_in, dy_in = (), ()
    for r in tl.static_range(R):
        t = t_hi - r
        src = t - (K - 1)
        ok = (src >= 0) & (src < L)
        x_in += (tl.load(x_row + src * s_x_t, mask=_rows(d, Dm, ok), other=0.0),)
        dy_in += (tl.load(dy_row + t * s_dy_t, mask=_rows(d, Dm, t < dy_end), other=0.0),)
    for r in tl.static_range(R):
        t = t_hi - r
        xs = (x_in[r].to(tl.float32),) + xs  # x at t - K + 1 .. t
        pre = _pre(xs, w, bias, K)
        sig = tl.sigmoid(pre)
        dpre = dy_in[r].to(tl.float32) * sig * (1.0 + pre * (1.0 - sig))
        dpres = (dpre,) + dpres  # dpre at t .. t + K - 1
        if OWN:
            dx = tl.zeros_like(dpre)
            for j in tl.static_range(K):
                dx += w[K - 1 - j] * dpres[j]
            tl.store(dx_row + t * s_dx_t, dx, mask=_rows(d, Dm, t < L))
            sums = ()
            for k in tl.static_range(K):
                sums += (dw[k] + dpre * xs[k],)
            dw, dbias = sums, dbias + dpre
        xs, dpres = xs[: K - 1], dpres[: K - 1]
    return xs, dpres, dw, dbias


@autotune(_WALK_CONFIGS, key=["Dm", "K"], reset_to_zero=["dw_ptr", "dbias_ptr"])
@triton.jit
def _conv_bwd(x_ptr, w_ptr, bias_ptr, dy_ptr, dx_ptr, dw_ptr, dbias_ptr, L, Dm,
              s_x_b, s_x_t, s_dy_b, s_dy_t, s_dx_b, s_dx_t, K: tl.constexpr, T: tl.constexpr,
              BD: tl.constexpr, R: tl.constexpr, STAGES: tl.constexpr):  # fmt: skip
    """dx, dw and dbias at times t0 .. t0 + T - 1 of one sequence, channels d, in one walk
    back in time, a row of BD channels a step, R steps a loop iteration, with windows of x
    and of the pre-activation gradient dpre in registers: each x and dy row is loaded once
    (and K - 1 halo rows at each end), and dpre never goes to memory. The walk starts
    2 (K - 1) steps past the span: K - 1 steps fill the x window (dy masked, so their dpre
    is zero), K - 1 more the dpre window with the next span's first dpre."""
    tl.static_assert(T % R == 0)
    b = tl.program_id(0).to(tl.int64)
    t0 = tl.program_id(1) * T
    d = tl.program_id(2) * BD + tl.arange(0, BD)
    dm = d < Dm
    rows = x_ptr + b * s_x_b + d, dy_ptr + b * s_dy_b + d, dx_ptr + b * s_dx_b + d
    w, bias = _params(w_ptr, bias_ptr, d, Dm, K)
    zero = tl.zeros((BD,), dtype=tl.float32)
    xs, dpres, dw, dbias = (zero,) * (K - 1), (zero,) * (K - 1), (zero,) * K, zero
    dy_end = tl.minimum(L, t0 + T + K - 1)
    xs, dpres, dw, dbias = _walk_back(*rows, t0 + T + 2 * (K - 1) - 1, L, dy_end, d, Dm, s_x_t,
                                      s_dy_t, s_dx_t, w, bias, xs, dpres, dw, dbias, K,
                                      R=2 * (K - 1), OWN=False)  # fmt: skip
    # R >= K - 1, so the windows a loop iteration hands on are all its own values: Triton
    # software-pipelines no loop that passes on values from two iterations back.
    for i in tl.range(T // R, num_stages=STAGES):
        xs, dpres, dw, dbias = _walk_back(*rows, t0 + T - 1 - i * R, L, dy_end, d, Dm, s_x_t,
                                          s_dy_t, s_dx_t, w, bias, xs, dpres, dw, dbias, K,
                                          R=R, OWN=True)  # fmt: skip
    # Atomics rather than a buffer of partial sums and a reduction: each program adds
    # (K + 1) BD values, L / T programs to an address, nothing next to its rows' traffic.
    tl.atomic_add(dbias_ptr + d, dbias, mask=dm, sem="relaxed")
    for k in tl.static_range(K):
        tl.atomic_add(dw_ptr + d * K + k, dw[k], mask=dm, sem="relaxed")


def _grid(b: int, L: int, Dm: int):
    """Programs over (batch, spans of T times, blocks of BD channels)."""
    return lambda meta: (b, triton.cdiv(L, meta["T"]), triton.cdiv(Dm, meta["BD"]))


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


def conv_silu_backward(
    x: Tensor, weight: Tensor, bias: Tensor, dy: Tensor, dx: Tensor
) -> tuple[Tensor, Tensor]:
    """The backward of ``causal_conv1d_silu`` for ops that fuse it with its neighbours: x,
    dy and dx (b, L, channels) of any batch and time strides, unit channel stride (dx a
    slice of a wider buffer, say: only its own columns are written). Writes x's gradient
    into dx, in dx's dtype; returns the weight's and the bias's, in fp32."""
    b, L, Dm = x.shape
    K = weight.shape[1]
    for name, t, shape in (("dy", dy, x.shape), ("dx", dx, x.shape), ("bias", bias, (Dm,))):
        if t.shape != shape:
            raise ValueError(f"conv_silu_backward: {name} of shape {tuple(t.shape)}, not {shape}")
    for name, t in (("x", x), ("dy", dy), ("dx", dx)):
        if t.stride(-1) != 1:
            raise ValueError(f"conv_silu_backward: {name} needs unit channel stride")
    weight, bias = weight.contiguous(), bias.contiguous()
    dw = torch.zeros(Dm, K, device=x.device, dtype=torch.float32)
    dbias = torch.zeros(Dm, device=x.device, dtype=torch.float32)
    _conv_bwd[_grid(b, L, Dm)](
        x, weight, bias, dy, dx, dw, dbias, L, Dm, x.stride(0), x.stride(1), dy.stride(0),
        dy.stride(1), dx.stride(0), dx.stride(1), K=K,
    )  # fmt: skip
    return dw, dbias


@torch.library.custom_op("hybridscale::causal_conv1d_silu_backward", mutates_args=())
def _backward(x: Tensor, weight: Tensor, bias: Tensor, dy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    x, dy = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, dy))
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    dw, dbias = conv_silu_backward(x, weight, bias, dy, dx)
    return dx, dw.to(weight.dtype), dbias.to(bias.dtype)


@_backward.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor, dy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return x.new_empty(x.shape), torch.empty_like(weight), torch.empty_like(bias)


def _save(ctx, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


causal_conv1d_silu.register_autograd(
    lambda ctx, dy: _backward(*ctx.saved_tensors, dy), setup_context=_save
)
