"""Mamba-2's state-space duality (SSD) scan in plain PyTorch: the reference path.

Per head, with a scalar decay a_t = exp(dt_t A):
    h_t = a_t h_{t-1} + dt_t x_t B_t^T      (h: headdim x d_state)
    y_t = h_t C_t + D x_t,                   then y * silu(z) when gated.
The chunked form computes this in blocks of ``chunk_size`` steps: inside a chunk as
a masked quadratic (attention-like) product, across chunks by passing one state per
chunk. Argument conventions are those of mamba_ssm's ``mamba_chunk_scan_combined``.
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _dt(dt: Tensor, dt_bias: Tensor | None, dt_softplus: bool, dtype: torch.dtype) -> Tensor:
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    return F.softplus(dt) if dt_softplus else dt


def _skip_and_gate(y: Tensor, x: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    """y + D x, then the gate; D is (nheads,) or (nheads, headdim)."""
    if D is not None:
        D = D.to(y.dtype)
        y = y + x.to(y.dtype) * (D[:, None] if D.dim() == 1 else D)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def prefix_sum(x: Tensor, dim: int = -1) -> Tensor:
    """torch.cumsum by log2(T) shifted adds (Hillis-Steele). The same sums, in a form
    torch.compile handles on CUDA: Inductor's scan codegen fails on the chunk cumsums
    (torch 2.11, "list indices must be integers or slices, not NoneType")."""
    x = x.movedim(dim, -1)
    shift = 1
    while shift < x.shape[-1]:
        x = x + F.pad(x[..., :-shift], (shift, 0))
        shift *= 2
    return x.movedim(-1, dim)


def segment_sums(x: Tensor) -> Tensor:
    """(..., T) -> (..., T, T) with [i, j] = x[j+1] + ... + x[i] for j <= i, else -inf.

    Summing masked copies directly (not differencing one long cumsum) keeps the exponent
    exact when decays are large, and exp() of it is never of a positive number.
    """
    T = x.shape[-1]
    lower = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    rows = x[..., None].expand(*x.shape, T)  # [i, j] = x[i]
    sums = prefix_sum(rows.masked_fill(~lower.tril(-1), 0), dim=-2)
    return sums.masked_fill(~lower, float("-inf"))


def ssd_chunked(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    initial_states: Tensor | None = None,
    return_final_states: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """x (b, L, h, p), dt (b, L, h), A (h,), B and C (b, L, g, n) -> y like x.

    Any L: the tail is padded with dt = 0 (no decay, no input), which leaves the state,
    and so the final state, untouched. Accumulates in fp32 (fp64 stays fp64).
    """
    batch, seqlen, nheads, headdim = x.shape
    ngroups = B.shape[2]
    dtype = _compute_dtype(x)
    dt = _dt(dt, dt_bias, dt_softplus, dtype)
    pad = (-seqlen) % chunk_size
    Q = chunk_size
    chunks = (seqlen + pad) // Q

    def blocks(t: Tensor) -> Tensor:  # (b, L, ...) -> (b, chunks, Q, ...), padded with zeros
        t = F.pad(t.to(dtype), (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(batch, chunks, Q, *t.shape[2:])

    xc, dtc = blocks(x), blocks(dt)
    # Heads share their group's B and C.
    Bc = blocks(B).repeat_interleave(nheads // ngroups, dim=3)  # (b, c, Q, h, n)
    Cc = blocks(C).repeat_interleave(nheads // ngroups, dim=3)
    dA = (dtc * A.to(dtype)).permute(0, 3, 1, 2)  # (b, h, c, Q)
    dA_cum = prefix_sum(dA)
    xdt = xc * dtc[..., None]  # (b, c, Q, h, p)

    # 1. Inside each chunk: y_l = sum_{s<=l} C_l.B_s exp(dA_{s+1..l}) dt_s x_s.
    decay = segment_sums(dA).exp()  # (b, h, c, Q, Q)
    y = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Cc, Bc, decay, xdt)

    # 2. The state each chunk leaves behind, from its own inputs alone.
    to_end = (dA_cum[..., -1:] - dA_cum).exp()  # (b, h, c, Q)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bc, to_end, xdt)

    # 3. Pass states across chunks: state entering chunk k = sum over earlier chunks.
    if initial_states is None:
        initial_states = torch.zeros(batch, nheads, headdim, B.shape[-1], dtype=dtype,
                                     device=x.device)  # fmt: skip
    states = torch.cat((initial_states.to(dtype)[:, None], states), dim=1)  # (b, c+1, h, p, n)
    chunk_decay = segment_sums(F.pad(dA_cum[..., -1], (1, 0))).exp()  # (b, h, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    entering, final = states[:, :-1], states[:, -1]

    # 4. What the entering state contributes to each position of its chunk.
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, entering, dA_cum.exp())

    y = y.reshape(batch, chunks * Q, nheads, headdim)[:, :seqlen]
    y = _skip_and_gate(y, x, D, z).to(x.dtype)
    return (y, final) if return_final_states else y


def ssd_step(
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
    """One decode step: x (b, h, p), dt (b, h), B and C (b, g, n); state (b, h, p, n) is
    updated in place. Returns y (b, h, p)."""
    nheads, ngroups = x.shape[1], B.shape[1]
    dtype = state.dtype
    dt = _dt(dt, dt_bias, dt_softplus, dtype)
    B = B.to(dtype).repeat_interleave(nheads // ngroups, dim=1)  # (b, h, n)
    C = C.to(dtype).repeat_interleave(nheads // ngroups, dim=1)
    decay = (dt * A.to(dtype)).exp()
    state.mul_(decay[..., None, None]).add_(
        (dt[..., None] * x.to(dtype))[..., None] * B[:, :, None]
    )
    y = (state * C[:, :, None]).sum(-1)
    return _skip_and_gate(y, x, D, z).to(x.dtype)
