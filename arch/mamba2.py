"""The Mamba-2 mixer, with mamba_ssm's ``Mamba2`` parameter names, shapes and init."""

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from arch.layers import store
from arch.ssd import ssd_chunked, ssd_step


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
        if cache is not None:  # keep the last d_conv conv inputs, zero-padded on the left
            conv_in = F.pad(xBC.transpose(1, 2), (max(0, self.d_conv - u.shape[1]), 0))
            store(cache, "conv", conv_in[..., -self.d_conv :])
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
        conv = cache["conv"]
        conv.copy_(conv.roll(-1, dims=-1))
        conv[..., -1] = xBC
        xBC = F.silu((conv * self.conv1d.weight[:, 0]).sum(-1) + self.conv1d.bias)
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
