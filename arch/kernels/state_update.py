"""One decode step of Mamba-2's SSD recurrence as a single Triton kernel.

``ssd_step_triton`` has ``arch.ssd.ssd_step``'s signature: the state (b, h, p, n), fp32 and
contiguous, is updated in place and y (b, h, p) is returned. One program per (batch, head,
block of headdim) reads its slice of the state once and writes it once.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _ssd_step_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr,
    H, G, P, N,
    HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    g = h // (H // G)
    p = tl.program_id(1) * BP + tl.arange(0, BP)
    n = tl.arange(0, BN)
    pm, nm = p < P, n < N
    dt = tl.load(dt_ptr + bh).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + h).to(tl.float32)
    if SOFTPLUS:
        dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(tl.minimum(dt, 20.0))))
    decay = tl.exp(dt * tl.load(A_ptr + h).to(tl.float32))
    x = tl.load(x_ptr + bh * P + p, mask=pm, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + (b * G + g) * N + n, mask=nm, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + (b * G + g) * N + n, mask=nm, other=0.0).to(tl.float32)
    ptrs = state_ptr + (bh * P + p[:, None]) * N + n[None, :]
    both = pm[:, None] & nm[None, :]
    state = tl.load(ptrs, mask=both, other=0.0) * decay + (dt * x)[:, None] * Bv[None, :]
    tl.store(ptrs, state, mask=both)
    y = tl.sum(state * Cv[None, :], axis=1)
    if HAS_D:
        if D_PER_P:
            y += x * tl.load(D_ptr + h * P + p, mask=pm, other=0.0).to(tl.float32)
        else:
            y += x * tl.load(D_ptr + h).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + bh * P + p, mask=pm, other=0.0).to(tl.float32)
        y *= z * tl.sigmoid(z)
    tl.store(y_ptr + bh * P + p, y, mask=pm)


@torch.compiler.disable
def ssd_step_triton(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
) -> Tensor:
    """``arch.ssd.ssd_step`` as one kernel launch."""
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError("ssd_step_triton needs a contiguous fp32 state")
    batch, nheads, headdim = x.shape
    ngroups, dstate = B.shape[1:]
    x, dt, B, C = x.contiguous(), dt.contiguous(), B.contiguous(), C.contiguous()
    D = D.contiguous() if D is not None else None
    z = z.contiguous() if z is not None else None
    y = torch.empty_like(x)
    block_p = min(triton.next_power_of_2(headdim), 32)
    _ssd_step_kernel[(batch * nheads, triton.cdiv(headdim, block_p))](
        state, x, dt, A, B, C, D, z, dt_bias, y, nheads, ngroups, headdim, dstate,
        HAS_D=D is not None, D_PER_P=D is not None and D.dim() == 2, HAS_Z=z is not None,
        HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, BP=block_p,
        BN=triton.next_power_of_2(dstate),
    )  # fmt: skip
    return y
