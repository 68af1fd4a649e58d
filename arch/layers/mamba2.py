"""The Mamba-2 mixer, with mamba_ssm's ``Mamba2`` parameter names, shapes and init."""

import math
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from arch.allocation import MAMBA2
from arch.layers.common import conv_step, keep_conv_inputs, store
from arch.registry import LayerType, register
from arch.ssd import ssd_chunked, ssd_step

if TYPE_CHECKING:
    from arch.config import ModelConfig


class RMSNormGated(nn.Module):
    """RMSNorm of x * silu(z), per group of ``group_size`` channels (mamba_ssm's
    RMSNormGated with norm_before_gate=False)."""

    def __init__(self, d: int, eps: float = 1e-5, group_size: int | None = None) -> None:
        super().__init__()
        self.eps, self.group_size = eps, group_size or d
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        gated = x.float() * F.silu(z.float())
        groups = gated.unflatten(-1, (-1, self.group_size))
        normed = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed.flatten(-2) * self.weight.float()).to(x.dtype)


class Mamba2(nn.Module):
    """in_proj -> causal depthwise conv over (x, B, C) -> SiLU -> SSD -> gated norm -> out_proj.

    forward(u, cache): cache None trains; an empty dict prefills it with the conv inputs
    ("conv", (batch, conv_dim, d_conv)) and the SSD state ("ssm", (batch, heads, headdim,
    d_state), fp32); a filled dict decodes one token (u of seqlen 1), updating it in place;
    a longer u is a new prompt. ``allocate_cache`` preallocates both (a static cache).

    ssd_impl picks the scan, conv and gated norm: the fused Triton kernels of
    ``arch.kernels`` ("triton"; "auto" on CUDA) or the PyTorch reference ("torch"; "auto"
    elsewhere). On the kernels, training (no cache) runs them as one op from in_proj's
    output to out_proj's input (``arch.kernels.mamba2_inner``).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        chunk_size: int = 256,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        A_init_range: tuple[float, float] = (1, 16),
        ssd_impl: Literal["auto", "triton", "torch"] = "auto",
    ) -> None:
        super().__init__()
        self.ssd_impl = ssd_impl
        self.d_state, self.d_conv, self.headdim, self.ngroups = d_state, d_conv, headdim, ngroups
        self.chunk_size = chunk_size
        self.d_inner = expand * d_model
        self.nheads = self.d_inner // headdim
        self.conv_dim = self.d_inner + 2 * ngroups * d_state
        # in_proj's output is [z, xBC, dt], as in mamba_ssm, so weights interoperate.
        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.nheads, bias=False)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1
        )
        # dt starts log-uniform in [dt_min, dt_max]; dt_bias holds its inverse softplus.
        log_dt = torch.rand(self.nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        dt = log_dt.exp().clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        A = torch.empty(self.nheads).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.nheads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.norm = RMSNormGated(self.d_inner, group_size=self.d_inner // ngroups)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def _split(self, zxbcdt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return zxbcdt.split([self.d_inner, self.conv_dim, self.nheads], dim=-1)

    def _conv_silu(self, xBC: Tensor) -> Tensor:
        """Causal depthwise conv + SiLU over (b, L, conv_dim)."""
        return F.silu(self.conv1d(xBC.transpose(1, 2))[..., : xBC.shape[1]]).transpose(1, 2)

    def _on_kernels(self, u: Tensor) -> bool:
        return self.ssd_impl == "triton" or (self.ssd_impl == "auto" and u.is_cuda)

    def _ops(self, u: Tensor) -> tuple:
        """(chunked scan, decode step, conv + SiLU, gated norm) for this input's device."""
        if not self._on_kernels(u):
            return ssd_chunked, ssd_step, self._conv_silu, self.norm
        # Imported here: Triton reads TRITON_INTERPRET when the kernels are defined, and
        # CPU-only installs may not have it.
        from arch.kernels.conv import causal_conv1d_silu
        from arch.kernels.norm import rmsnorm_gated
        from arch.kernels.ssd_triton import ssd_chunked_triton
        from arch.kernels.state_update import ssd_step_triton

        conv, norm = self.conv1d, self.norm
        return (
            ssd_chunked_triton,
            ssd_step_triton,
            lambda xBC: causal_conv1d_silu(xBC, conv.weight[:, 0], conv.bias),
            lambda y, z: rmsnorm_gated(y, z, norm.weight, norm.eps, norm.group_size),
        )

    def _ssm_args(self) -> dict:
        return {"A": -self.A_log.exp(), "D": self.D, "dt_bias": self.dt_bias, "dt_softplus": True}

    def forward(self, u: Tensor, cache: dict | None = None) -> Tensor:
        if cache and u.shape[1] == 1:
            return self._step(u, cache)
        if cache is None and self._on_kernels(u):  # training: one op from in_proj to out_proj
            from arch.kernels.mamba2_inner import mamba2_inner

            y = mamba2_inner(
                self.in_proj(u), self.conv1d.weight[:, 0], self.conv1d.bias, self.dt_bias,
                -self.A_log.exp(), self.D, self.norm.weight, self.ngroups, self.headdim,
                self.chunk_size, self.norm.eps,
            )  # fmt: skip
            return self.out_proj(y)
        scan, _, conv_silu, norm = self._ops(u)
        z, xBC, dt = self._split(self.in_proj(u))
        if cache is not None:
            keep_conv_inputs(cache, xBC.transpose(1, 2), self.d_conv)
        xBC = conv_silu(xBC)
        x, B, C = xBC.split(
            [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1
        )
        y, final = scan(
            x.unflatten(-1, (self.nheads, self.headdim)), dt, B=B.unflatten(-1, (self.ngroups, -1)),
            C=C.unflatten(-1, (self.ngroups, -1)), chunk_size=self.chunk_size,
            return_final_states=True, **self._ssm_args(),
        )  # fmt: skip
        if cache is not None:
            store(cache, "ssm", final.float())
        return self.out_proj(norm(y.flatten(-2), z))

    def _step(self, u: Tensor, cache: dict) -> Tensor:
        _, step, _, norm = self._ops(u)
        z, xBC, dt = self._split(self.in_proj(u[:, 0]))
        xBC = F.silu(conv_step(cache["conv"], xBC, self.conv1d))
        x, B, C = xBC.split(
            [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1
        )
        y = step(
            cache["ssm"], x.unflatten(-1, (self.nheads, self.headdim)), dt,
            B=B.unflatten(-1, (self.ngroups, -1)), C=C.unflatten(-1, (self.ngroups, -1)),
            **self._ssm_args(),
        )  # fmt: skip
        return self.out_proj(norm(y.flatten(-2), z))[:, None]

    def allocate_cache(
        self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> dict:
        return {
            "conv": torch.zeros(batch, self.conv_dim, self.d_conv, device=device, dtype=dtype),
            "ssm": torch.zeros(batch, self.nheads, self.headdim, self.d_state, device=device),
        }


def _widths(c: "ModelConfig") -> tuple[int, int, int]:
    """(inner width E, heads H, conv channels E + 2 g N)."""
    E = c.expand * c.d_model
    return E, E // c.ssm_headdim, E + 2 * c.ssm_ngroups * c.d_state


def _matrix_params(c: "ModelConfig") -> int:
    E, H, conv = _widths(c)
    return c.d_model * (E + conv + H) + E * c.d_model  # in_proj [z, xBC, dt], out_proj


def _other_params(c: "ModelConfig") -> int:
    E, H, conv = _widths(c)
    return conv * (c.d_conv + 1) + 3 * H + E  # conv1d with bias, dt_bias / A_log / D, norm


def _sequence_flops(c: "ModelConfig", seq_len: int) -> int:
    """The SSD scan at chunk Q: the chunk's C B^T and scores x X products, 2 Q (E + gN),
    plus the chunk states and their outputs, 4 N E; and the conv."""
    E, _, conv = _widths(c)
    chunk = min(c.chunk_size, seq_len)
    return 2 * chunk * (E + c.ssm_ngroups * c.d_state) + 4 * c.d_state * E + 2 * c.d_conv * conv


def _check(c: "ModelConfig") -> None:
    E = c.expand * c.d_model
    if E % c.ssm_headdim:
        raise ValueError(f"expand * d_model = {E} is not divisible by ssm_headdim {c.ssm_headdim}")
    if (E // c.ssm_headdim) % c.ssm_ngroups:
        raise ValueError(
            f"the {E // c.ssm_headdim} Mamba-2 heads do not split into ssm_ngroups {c.ssm_ngroups}"
        )


def _width_multiple(get) -> int:
    """E = expand * d_model splits into whole heads and groups."""
    heads_and_groups = get("ssm_headdim") * get("ssm_ngroups")
    return heads_and_groups // math.gcd(heads_and_groups, get("expand"))


register(
    LayerType(
        symbol=MAMBA2,
        name="mamba2",
        label="Mamba-2",
        build=lambda c: Mamba2(
            c.d_model,
            d_state=c.d_state,
            d_conv=c.d_conv,
            expand=c.expand,
            headdim=c.ssm_headdim,
            ngroups=c.ssm_ngroups,
            chunk_size=c.chunk_size,
            ssd_impl=c.ssd_impl,
        ),  # fmt: skip
        matrix_params=_matrix_params,
        other_params=_other_params,
        sequence_flops=_sequence_flops,
        # the state's decay, input and output, 6 E N, and the conv
        decode_flops=lambda c, context: (
            6 * c.expand * c.d_model * c.d_state + 2 * c.d_conv * _widths(c)[2]
        ),
        state_values=lambda c: c.expand * c.d_model * c.d_state,
        conv_values=lambda c: _widths(c)[2] * c.d_conv,
        fused_launches=6,
        check=_check,
        width_multiple=_width_multiple,
        recurrent=True,
    )
)
