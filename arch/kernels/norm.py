"""Mamba-2's gated RMSNorm as Triton kernels, forward and backward.

``rmsnorm_gated(x, z, weight, eps, group_size)`` = RMSNorm(x * silu(z)) * weight, per group
of ``group_size`` channels: ``arch.layers.mamba2.RMSNormGated`` (mamba_ssm's with
norm_before_gate=False) in one pass over x and z forward and one back, in fp32.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from arch.kernels.tuning import autotune, choices

_CONFIGS = choices([triton.Config({}, num_warps=w) for w in (4, 8, 16)],
                   small=triton.Config({}, num_warps=1))  # fmt: skip


@triton.jit
def _gated(x_ptr, z_ptr, row, cols, ok, s_x, s_z):
    x = tl.load(x_ptr + row * s_x + cols, mask=ok, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + row * s_z + cols, mask=ok, other=0.0).to(tl.float32)
    sig = tl.sigmoid(z)
    return x, z, sig, x * z * sig


@autotune(_CONFIGS, key=["GS"])
@triton.jit
def _norm_fwd(x_ptr, z_ptr, w_ptr, out_ptr, rstd_ptr, GS, eps, s_x, s_z,
              BLOCK: tl.constexpr):  # fmt: skip
    row, grp = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = grp * GS + tl.arange(0, BLOCK)
    ok = tl.arange(0, BLOCK) < GS
    _, _, _, g = _gated(x_ptr, z_ptr, row, cols, ok, s_x, s_z)
    rstd = 1.0 / tl.sqrt(tl.sum(g * g, axis=0) / GS + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * tl.num_programs(1) * GS + cols, g * rstd * w, mask=ok)
    tl.store(rstd_ptr + row * tl.num_programs(1) + grp, rstd)


@autotune(_CONFIGS, key=["GS"], reset_to_zero=["dw_ptr"])
@triton.jit
def _norm_bwd(x_ptr, z_ptr, w_ptr, rstd_ptr, dout_ptr, dx_ptr, dz_ptr, dw_ptr,
              M, GS, s_x, s_z, s_dout, s_dx, s_dz, ROWS, BLOCK: tl.constexpr):  # fmt: skip
    """ROWS rows of one group; the weight's gradient is summed over them and added into
    dw_ptr, so that no buffer of per-program partial sums is written and then reduced by
    another kernel."""
    start, grp = tl.program_id(0).to(tl.int64) * ROWS, tl.program_id(1)
    cols = grp * GS + tl.arange(0, BLOCK)
    ok = tl.arange(0, BLOCK) < GS
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    for row in range(start, tl.minimum(start + ROWS, M)):
        x, z, sig, g = _gated(x_ptr, z_ptr, row, cols, ok, s_x, s_z)
        rstd = tl.load(rstd_ptr + row * tl.num_programs(1) + grp)
        n = g * rstd
        dout = tl.load(dout_ptr + row * s_dout + cols, mask=ok, other=0.0).to(tl.float32)
        dw += dout * n
        dn = dout * w
        dg = rstd * (dn - n * tl.sum(dn * n, axis=0) / GS)
        tl.store(dx_ptr + row * s_dx + cols, dg * z * sig, mask=ok)
        tl.store(dz_ptr + row * s_dz + cols, dg * x * sig * (1.0 + z * (1.0 - sig)), mask=ok)
    tl.atomic_add(dw_ptr + cols, dw, mask=ok, sem="relaxed")


def _rows(t: Tensor) -> Tensor:
    """(..., d) -> (rows, d) with unit channel stride, a view where possible."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


# Custom ops, so torch.compile keeps one graph around them (see arch/kernels/conv.py).
@torch.library.custom_op("hybridscale::rmsnorm_gated", mutates_args=())
def rmsnorm_gated_forward(
    x: Tensor, z: Tensor, weight: Tensor, eps: float, group_size: int
) -> tuple[Tensor, Tensor]:
    """(out, rstd per row and group)."""
    shape = x.shape
    x, z = _rows(x), _rows(z)
    M, D = x.shape
    out = torch.empty(M, D, device=x.device, dtype=x.dtype)
    rstd = torch.empty(M, D // group_size, device=x.device, dtype=torch.float32)
    block = triton.next_power_of_2(group_size)
    _norm_fwd[(M, D // group_size)](x, z, weight, out, rstd, group_size, eps, x.stride(0),
                                    z.stride(0), BLOCK=block)  # fmt: skip
    return out.view(shape), rstd


@rmsnorm_gated_forward.register_fake
def _(x: Tensor, z: Tensor, weight: Tensor, eps: float, group_size: int):
    rows = x.numel() // x.shape[-1]
    return x.new_empty(x.shape), x.new_empty(rows, x.shape[-1] // group_size, dtype=torch.float32)


def rmsnorm_gated_backward(
    x: Tensor, z: Tensor, weight: Tensor, rstd: Tensor, dout: Tensor, group_size: int,
    dx: Tensor, dz: Tensor,
) -> Tensor:  # fmt: skip
    """Writes the gradients of x and z into dx and dz, (..., d) views of any row stride
    (slices of wider buffers, say); returns the weight's, in fp32."""
    x, z, dout = _rows(x), _rows(z), _rows(dout)
    dx, dz = dx.view(-1, dx.shape[-1]), dz.view(-1, dz.shape[-1])
    M, D = x.shape
    programs = min(M, 1024)  # enough to fill the GPU; each sums dw over its rows
    rows = triton.cdiv(M, programs)
    programs = triton.cdiv(M, rows)
    dw = torch.zeros(D, device=x.device, dtype=torch.float32)
    _norm_bwd[(programs, D // group_size)](
        x, z, weight, rstd, dout, dx, dz, dw, M, group_size, x.stride(0), z.stride(0),
        dout.stride(0), dx.stride(0), dz.stride(0), rows,
        BLOCK=triton.next_power_of_2(group_size),
    )  # fmt: skip
    return dw


@torch.library.custom_op("hybridscale::rmsnorm_gated_backward", mutates_args=())
def _backward(
    x: Tensor, z: Tensor, weight: Tensor, rstd: Tensor, dout: Tensor, group_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    dz = torch.empty(z.shape, device=x.device, dtype=z.dtype)
    dw = rmsnorm_gated_backward(x, z, weight, rstd, dout, group_size, dx, dz)
    return dx, dz, dw.to(weight.dtype)


@_backward.register_fake
def _(x: Tensor, z: Tensor, weight: Tensor, rstd: Tensor, dout: Tensor, group_size: int):
    return x.new_empty(x.shape), z.new_empty(z.shape), torch.empty_like(weight)


def _save(ctx, inputs: tuple, output: tuple) -> None:
    x, z, weight, _, ctx.group_size = inputs
    ctx.save_for_backward(x, z, weight, output[1])


def _grads(ctx, dout: Tensor, _drstd: Tensor) -> tuple:
    return *_backward(*ctx.saved_tensors, dout, ctx.group_size), None, None


rmsnorm_gated_forward.register_autograd(_grads, setup_context=_save)


def rmsnorm_gated(x: Tensor, z: Tensor, weight: Tensor, eps: float, group_size: int) -> Tensor:
    """x, z (..., d), weight (d,) -> (..., d) in x's dtype."""
    return rmsnorm_gated_forward(x, z, weight, eps, group_size)[0]
