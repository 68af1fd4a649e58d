"""Mamba-1: the selective state-space layer, with a parallel (chunked) scan in plain PyTorch.

Shapes follow mamba_ssm's ``selective_scan_fn``: u, delta (batch, d_inner, seqlen);
A (d_inner, d_state); B, C (batch, d_state, seqlen); state h (batch, d_inner, d_state):
    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,    y_t = C_t . h_t + D u_t,
and with a gate z the output is y * silu(z).
"""

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from arch.layers.common import conv_step, keep_conv_inputs, store
from arch.registry import LayerType, register

if TYPE_CHECKING:
    from arch.config import ModelConfig

# Not one of Megatron-LM's symbols: ours, so pure Mamba-1 baselines fit the same patterns.
MAMBA1 = "m"


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _discretize(
    delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool, dtype: torch.dtype
) -> Tensor:
    """delta (batch, d_inner, ...) -> dt in the compute dtype, bias added before softplus."""
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype).view(-1, *([1] * (dt.dim() - 2)))
    return F.softplus(dt) if delta_softplus else dt


def _output(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    """Add the skip connection D u and apply the gate, in y's (compute) dtype."""
    if D is not None:
        y = y + D.to(y.dtype).view(-1, *([1] * (u.dim() - 2))) * u.to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def _scan_within_chunks(log_decay: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """Inclusive scan of h_t = exp(log_decay_t) h_{t-1} + x_t along dim -2, from h = 0.

    Hillis-Steele doubling: after the step with offset k, position t holds the composite
    of steps (t - 2k, t] as (summed log-decay, state reached from zero). Every exp is of a
    non-positive number, so nothing overflows however strong the decay.
    Returns (cumulative log-decay, states), both shaped like the inputs.
    """
    q = x.shape[-2]
    k = 1
    while k < q:
        earlier_decay, earlier_x = log_decay[..., :-k, :], x[..., :-k, :]
        later_decay, later_x = log_decay[..., k:, :], x[..., k:, :]
        x = torch.cat((x[..., :k, :], later_x + later_decay.exp() * earlier_x), dim=-2)
        log_decay = torch.cat((log_decay[..., :k, :], later_decay + earlier_decay), dim=-2)
        k *= 2
    return log_decay, x


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: Tensor | None = None,
    return_last_state: bool = False,
    chunk_size: int = 64,
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan over the whole sequence, parallel within chunks of ``chunk_size``.

    Each chunk is scanned from a zero state in log2(chunk_size) parallel steps; a short
    loop over chunks then carries the true state across chunk boundaries, and each
    chunk's states get the carried-in state decayed by their cumulative decay.
    Returns y (batch, d_inner, seqlen) in u's dtype, and with ``return_last_state`` also
    the final state (batch, d_inner, d_state) in the compute dtype (fp32, or fp64).
    """
    batch, d_inner, seqlen = u.shape
    d_state = A.shape[-1]
    dtype = _compute_dtype(u)
    dt = _discretize(delta, delta_bias, delta_softplus, dtype)  # (b, d, L)

    # Pad after discretizing: dt = 0 there means no decay and no input, so the state
    # passes through the padding unchanged and the last state stays correct.
    n_chunks = max(1, math.ceil(seqlen / chunk_size))
    pad = n_chunks * chunk_size - seqlen
    dt_p, u_p = F.pad(dt, (0, pad)), F.pad(u.to(dtype), (0, pad))
    B_p, C_p = F.pad(B.to(dtype), (0, pad)), F.pad(C.to(dtype), (0, pad))

    # (b, d, chunks, chunk, n): per-step log-decay and input to the state.
    chunked = (batch, d_inner, n_chunks, chunk_size)
    log_decay = (dt_p[..., None] * A.to(dtype)[:, None, :]).view(*chunked, d_state)
    B_t = B_p.transpose(1, 2).view(batch, 1, n_chunks, chunk_size, d_state)
    x = (dt_p * u_p)[..., None].view(*chunked, 1) * B_t
    cum_decay, local_states = _scan_within_chunks(log_decay, x)

    # Carry states between chunks: state entering chunk c+1 = local end state of chunk c
    # plus the state entering chunk c decayed over the whole chunk.
    state = (
        torch.zeros(batch, d_inner, d_state, dtype=dtype, device=u.device)
        if initial_state is None
        else initial_state.to(dtype)
    )
    entering = []
    for c in range(n_chunks):
        entering.append(state)
        state = local_states[:, :, c, -1] + cum_decay[:, :, c, -1].exp() * state
    states = local_states + cum_decay.exp() * torch.stack(entering, dim=2)[:, :, :, None]

    C_t = C_p.transpose(1, 2).view(batch, 1, n_chunks, chunk_size, d_state)
    y = (states * C_t).sum(-1).reshape(batch, d_inner, -1)[..., :seqlen]
    y = _output(y, u, D, z).to(u.dtype)
    return (y, state) if return_last_state else y


def selective_step(
    state: Tensor,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """One recurrent step. u, delta, z (batch, d_inner); B, C (batch, d_state).

    Updates state (batch, d_inner, d_state) in place; returns y (batch, d_inner).
    """
    dtype = state.dtype
    dt = _discretize(delta, delta_bias, delta_softplus, dtype)
    decay = (dt[..., None] * A.to(dtype)).exp()
    state.mul_(decay).add_((dt * u.to(dtype))[..., None] * B.to(dtype)[:, None, :])
    y = (state * C.to(dtype)[:, None, :]).sum(-1)
    return _output(y, u, D, z).to(u.dtype)


class Mamba(nn.Module):
    """The Mamba-1 mixer, with mamba_ssm's parameter names, shapes and initialisation.

    forward(u, cache): cache None trains; an empty dict prefills it with the conv inputs
    ("conv", (batch, d_inner, d_conv)) and the scan state ("ssm", fp32); a filled dict
    decodes one token (u of seqlen 1) and updates it in place; a longer u is a new prompt.
    ``allocate_cache`` preallocates both (a static cache).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        chunk_size: int = 64,
    ) -> None:
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.chunk_size = chunk_size

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

        # dt starts log-uniform in [dt_min, dt_max]; the bias holds its inverse softplus.
        # The LM's generic init must leave this layer alone.
        nn.init.uniform_(self.dt_proj.weight, -(self.dt_rank**-0.5), self.dt_rank**-0.5)
        log_dt = torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min))
        dt = (log_dt + math.log(dt_min)).exp().clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj._no_reinit = True

        # S4D-real init: A = -(1, 2, ..., d_state) in every channel.
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True

    def _ssm_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (..., d_inner) -> dt before bias (..., d_inner), B and C (..., d_state)."""
        dt_low, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.linear(dt_low, self.dt_proj.weight), B, C

    def forward(self, u: Tensor, cache: dict | None = None) -> Tensor:
        """u (batch, seqlen, d_model) -> (batch, seqlen, d_model)."""
        if cache and u.shape[1] == 1:
            return self._step(u, cache)
        seqlen = u.shape[1]
        x, z = self.in_proj(u).transpose(1, 2).chunk(2, dim=1)  # (b, d_inner, L) each
        if cache is not None:
            keep_conv_inputs(cache, x, self.d_conv)
        x = F.silu(self.conv1d(x)[..., :seqlen])
        dt, B, C = self._ssm_inputs(x.transpose(1, 2))
        out = selective_scan(
            x,
            dt.transpose(1, 2),
            -self.A_log.float().exp(),
            B.transpose(1, 2),
            C.transpose(1, 2),
            D=self.D.float(),
            z=z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            return_last_state=cache is not None,
            chunk_size=self.chunk_size,
        )
        if cache is not None:
            y, state = out
            store(cache, "ssm", state)
        else:
            y = out
        return self.out_proj(y.transpose(1, 2))

    def _step(self, u: Tensor, cache: dict) -> Tensor:
        x, z = self.in_proj(u[:, 0]).chunk(2, dim=-1)  # (b, d_inner) each
        x = F.silu(conv_step(cache["conv"], x, self.conv1d))
        dt, B, C = self._ssm_inputs(x)
        y = selective_step(
            cache["ssm"],
            x,
            dt,
            -self.A_log.float().exp(),
            B,
            C,
            D=self.D.float(),
            z=z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
        )
        return self.out_proj(y)[:, None]

    def allocate_cache(
        self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> dict:
        return {
            "conv": torch.zeros(batch, self.d_inner, self.d_conv, device=device, dtype=dtype),
            "ssm": torch.zeros(batch, self.d_inner, self.d_state, device=device),
        }


def _scan_and_conv_flops(c: "ModelConfig", *_: int) -> int:
    """The selective scan, 9 E N (as mamba_ssm counts it), and the conv; the same per
    token in training and in decoding."""
    E = c.expand * c.d_model
    return 9 * E * c.mamba1_d_state + 2 * c.d_conv * E


def _matrix_params(c: "ModelConfig") -> int:
    d, E, N = c.d_model, c.expand * c.d_model, c.mamba1_d_state
    r = math.ceil(d / 16)  # dt_rank "auto"
    return 2 * d * E + E * (r + 2 * N) + r * E + E * d  # in_proj, x_proj, dt_proj, out_proj


def _other_params(c: "ModelConfig") -> int:
    E = c.expand * c.d_model
    return E * (c.d_conv + 1) + E + E * c.mamba1_d_state + E  # conv, dt bias, A_log, D


register(
    LayerType(
        symbol=MAMBA1,
        name="mamba1",
        label="Mamba",
        build=lambda c: Mamba(
            c.d_model, d_state=c.mamba1_d_state, d_conv=c.d_conv, expand=c.expand
        ),  # fmt: skip
        matrix_params=_matrix_params,
        other_params=_other_params,
        sequence_flops=_scan_and_conv_flops,
        decode_flops=_scan_and_conv_flops,
        state_values=lambda c: c.expand * c.d_model * c.mamba1_d_state,
        conv_values=lambda c: c.expand * c.d_model * c.d_conv,
        fused_launches=7,
        recurrent=True,
    )
)
