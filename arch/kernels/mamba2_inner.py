"""Mamba-2's path between its two projections as one op, for training: in_proj's output
[z, xBC, dt] -> causal conv + SiLU over xBC -> SSD scan -> gated RMSNorm with z, the input
of out_proj (mamba_ssm's ``mamba_split_conv1d_scan_combined``, less the projections).

One op around the conv, scan and norm kernels rather than their three ops side by side,
so that neither direction copies between them: the forward reads z, xBC and dt where
in_proj wrote them, and the backward writes their gradients straight into one buffer of
in_proj's output shape. Apart, torch.compile made z contiguous, split the conv's output
and concatenated the three gradients: ~15 ms of a 350M hybrid's 220 ms step on an H100.
"""

import torch
from torch import Tensor

from arch.kernels.conv import causal_conv1d_silu, conv_silu_backward
from arch.kernels.norm import rmsnorm_gated_backward, rmsnorm_gated_forward
from arch.kernels.ssd_triton import ssd_chunked_backward, ssd_chunked_forward


class _Parts:
    """Where z, xBC and dt lie in in_proj's output, and x, B and C in xBC: from the
    parameters' shapes."""

    def __init__(self, conv_weight: Tensor, A: Tensor, ngroups: int, headdim: int) -> None:
        self.heads, self.headdim, self.ngroups = A.shape[0], headdim, ngroups
        self.inner, self.conv = self.heads * headdim, conv_weight.shape[0]
        self.group_width = (self.conv - self.inner) // 2  # of B and of C, all groups

    def zxbcdt(self, t: Tensor) -> list[Tensor]:
        return t.split([self.inner, self.conv, self.heads], dim=-1)

    def xbc(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (b, L, heads, headdim), B and C (b, L, groups, state): views."""
        x, B, C = t.split([self.inner, self.group_width, self.group_width], dim=-1)
        heads, groups = (self.heads, self.headdim), (self.ngroups, -1)
        return x.unflatten(-1, heads), B.unflatten(-1, groups), C.unflatten(-1, groups)


# flexible_layout: torch.compile passes in_proj's output as it laid it out (rows padded to
# 128 bytes, say) rather than copying it to the contiguous layout the op was traced with;
# the kernels take any batch and time strides.
@torch.library.custom_op(
    "hybridscale::mamba2_inner", mutates_args=(), tags=(torch.Tag.flexible_layout,)
)
def _forward(
    zxbcdt: Tensor, conv_weight: Tensor, conv_bias: Tensor, dt_bias: Tensor, A: Tensor,
    D: Tensor, norm_weight: Tensor, ngroups: int, headdim: int, chunk_size: int, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(out_proj's input, then what the backward reuses: the conv's output, the scan's,
    the norm's rstd, and the scan's dt, log decays, C.B and chunk states)."""
    parts = _Parts(conv_weight, A, ngroups, headdim)
    z, xBC, dt = parts.zxbcdt(zxbcdt)
    xBC = causal_conv1d_silu(xBC, conv_weight, conv_bias)
    x, B, C = parts.xbc(xBC)
    y, _final, *scan_saved, _ungated = ssd_chunked_forward(
        x, dt, A, B, C, chunk_size, D, None, dt_bias, True, None
    )
    out, rstd = rmsnorm_gated_forward(y.flatten(-2), z, norm_weight, eps, parts.inner // ngroups)
    return out, xBC, y, rstd, *scan_saved


@_forward.register_fake
def _(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, ngroups, headdim,
      chunk_size, eps):  # fmt: skip
    parts = _Parts(conv_weight, A, ngroups, headdim)
    b, L, _ = zxbcdt.shape
    NC, f32 = (L + chunk_size - 1) // chunk_size, torch.float32
    state = parts.group_width // ngroups
    decays = zxbcdt.new_empty(b, parts.heads, NC, chunk_size, dtype=f32)
    return (zxbcdt.new_empty(b, L, parts.inner), zxbcdt.new_empty(b, L, parts.conv),
            zxbcdt.new_empty(b, L, parts.heads, headdim),
            zxbcdt.new_empty(b * L, ngroups, dtype=f32), decays, torch.empty_like(decays),
            zxbcdt.new_empty(b, NC, ngroups, chunk_size, chunk_size, dtype=f32),
            zxbcdt.new_empty(b, NC, parts.heads, headdim, state))  # fmt: skip


@torch.library.custom_op(
    "hybridscale::mamba2_inner_backward", mutates_args=(), tags=(torch.Tag.flexible_layout,)
)
def _backward(
    dout: Tensor, zxbcdt: Tensor, conv_weight: Tensor, conv_bias: Tensor, dt_bias: Tensor,
    A: Tensor, D: Tensor, norm_weight: Tensor, xBC: Tensor, y: Tensor, rstd: Tensor,
    dtp: Tensor, a: Tensor, cb: Tensor, states: Tensor, ngroups: int, headdim: int,
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Gradients of zxbcdt, conv_weight, conv_bias, dt_bias, A, D and norm_weight."""
    parts = _Parts(conv_weight, A, ngroups, headdim)
    z, xBC_in, dt = parts.zxbcdt(zxbcdt)
    # Contiguous whatever zxbcdt's layout, as the fake says; every column written below.
    grad = torch.empty(zxbcdt.shape, device=zxbcdt.device, dtype=zxbcdt.dtype)
    dz, dxBC_in, ddt = parts.zxbcdt(grad)
    dy = torch.empty_like(y)
    dnorm = rmsnorm_gated_backward(y.flatten(-2), z, norm_weight, rstd, dout,
                                   parts.inner // ngroups, dy.flatten(-2), dz)  # fmt: skip
    dxBC = torch.empty_like(xBC)
    dx, dB, dC = parts.xbc(dxBC)
    x, B, C = parts.xbc(xBC)
    into = {"x": dx, "B": dB, "C": dC, "dt": ddt}
    scan = ssd_chunked_backward(dy, x, dt, A, B, C, chunk_size, D, dt_bias, True,
                                (dtp, a, cb, states), into)  # fmt: skip
    dconv_weight, dconv_bias = conv_silu_backward(xBC_in, conv_weight, conv_bias, dxBC, dxBC_in)
    return (grad, dconv_weight.to(conv_weight.dtype), dconv_bias.to(conv_bias.dtype),
            scan["dt_bias"], scan["A"], scan["D"], dnorm.to(norm_weight.dtype))  # fmt: skip


@_backward.register_fake
def _(dout, zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, *_saved_and_sizes):
    params = (conv_weight, conv_bias, dt_bias, A, D, norm_weight)
    return zxbcdt.new_empty(zxbcdt.shape), *(torch.empty_like(p) for p in params)


def _save(ctx, inputs: tuple, output: tuple) -> None:
    *tensors, ctx.ngroups, ctx.headdim, ctx.chunk_size, _eps = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the saved outputs
    ctx.save_for_backward(*tensors, *output[1:])


def _grads(ctx, dout: Tensor, *_saved) -> tuple:
    grads = _backward(dout, *ctx.saved_tensors, ctx.ngroups, ctx.headdim, ctx.chunk_size)
    return *grads, None, None, None, None


_forward.register_autograd(_grads, setup_context=_save)


def mamba2_inner(
    zxbcdt: Tensor, conv_weight: Tensor, conv_bias: Tensor, dt_bias: Tensor, A: Tensor,
    D: Tensor, norm_weight: Tensor, ngroups: int, headdim: int, chunk_size: int, eps: float,
) -> Tensor:  # fmt: skip
    """zxbcdt (b, L, 2 inner + 2 groups state + heads), conv_weight (conv channels, width),
    A, D, dt_bias (heads,), norm_weight (inner,) -> out_proj's input (b, L, inner), with
    ``arch.layers.mamba2.Mamba2``'s conv, scan (softplus on dt + dt_bias) and gated norm."""
    return _forward(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, ngroups,
                    headdim, chunk_size, eps)[0]  # fmt: skip
