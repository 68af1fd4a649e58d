"""Mamba-1: the chunked selective scan against a step-by-step loop, and cached decoding."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from arch.layers.mamba1 import Mamba, selective_scan, selective_step


def naive_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    initial_state: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """The recurrence written out one time step at a time."""
    batch, d_inner, seqlen = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    h = u.new_zeros(batch, d_inner, A.shape[1]) if initial_state is None else initial_state
    ys = []
    for t in range(seqlen):
        dt = delta[:, :, t, None]
        h = torch.exp(dt * A) * h + dt * B[:, None, :, t] * u[:, :, t, None]
        y = (h * C[:, None, :, t]).sum(-1)
        if D is not None:
            y = y + D * u[:, :, t]
        if z is not None:
            y = y * F.silu(z[:, :, t])
        ys.append(y)
    return torch.stack(ys, dim=-1), h


def random_inputs(batch: int, d_inner: int, d_state: int, seqlen: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0) -> Tensor:
        x = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
        return x.requires_grad_()

    return dict(
        u=rand(batch, d_inner, seqlen),
        delta=(
            torch.rand(batch, d_inner, seqlen, generator=g, dtype=torch.float64) * 0.5
        ).requires_grad_(),
        A=(
            -torch.rand(d_inner, d_state, generator=g, dtype=torch.float64) * 3 - 0.1
        ).requires_grad_(),
        B=rand(batch, d_state, seqlen),
        C=rand(batch, d_state, seqlen),
        D=rand(d_inner),
        z=rand(batch, d_inner, seqlen),
        delta_bias=rand(d_inner, scale=0.5),
        initial_state=rand(batch, d_inner, d_state),
    )


@pytest.mark.parametrize(
    "seqlen, chunk, use_D, use_z, use_bias, use_init",
    [
        (37, 8, True, True, True, True),
        (37, 8, False, False, False, False),
        (16, 8, True, False, True, False),
        (5, 8, False, True, False, True),
        (33, 64, True, True, False, True),
        (24, 1, True, True, True, True),
    ],
)
def test_selective_scan_matches_naive_loop(
    seqlen: int, chunk: int, use_D: bool, use_z: bool, use_bias: bool, use_init: bool
) -> None:
    inp = random_inputs(2, 3, 4, seqlen, seed=seqlen + chunk)
    opts = dict(
        D=inp["D"] if use_D else None,
        z=inp["z"] if use_z else None,
        delta_bias=inp["delta_bias"] if use_bias else None,
        delta_softplus=use_bias,
        initial_state=inp["initial_state"] if use_init else None,
    )
    core = [inp[k] for k in ("u", "delta", "A", "B", "C")]
    y, last = selective_scan(*core, **opts, return_last_state=True, chunk_size=chunk)
    y_ref, last_ref = naive_scan(*core, **opts)
    assert y.dtype == torch.float64 and last.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(last, last_ref, rtol=0, atol=1e-10)

    # One backward through both outputs checks every gradient at once.
    weights = [torch.randn_like(y), torch.randn_like(last)]
    used = core + [v for v in opts.values() if isinstance(v, Tensor)]
    grads = torch.autograd.grad((y * weights[0]).sum() + (last * weights[1]).sum(), used)
    grads_ref = torch.autograd.grad(
        (y_ref * weights[0]).sum() + (last_ref * weights[1]).sum(), used
    )
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-10)


def test_selective_step_matches_scan() -> None:
    inp = {k: v.detach() for k, v in random_inputs(2, 3, 4, 6, seed=0).items()}
    opts = dict(D=inp["D"], delta_bias=inp["delta_bias"], delta_softplus=True)
    y_ref, last_ref = selective_scan(
        *(inp[k] for k in ("u", "delta", "A", "B", "C")),
        z=inp["z"],
        initial_state=inp["initial_state"],
        return_last_state=True,
        **opts,
    )
    state = inp["initial_state"].clone()
    for t in range(6):
        y = selective_step(
            state,
            inp["u"][..., t],
            inp["delta"][..., t],
            inp["A"],
            inp["B"][..., t],
            inp["C"][..., t],
            z=inp["z"][..., t],
            **opts,
        )
        torch.testing.assert_close(y, y_ref[..., t], rtol=0, atol=1e-12)
    torch.testing.assert_close(state, last_ref, rtol=0, atol=1e-12)


def test_scan_is_stable_under_strong_decay() -> None:
    # exp(-cumulative log-decay) over a chunk would overflow here; the scan must not.
    u = torch.randn(1, 2, 64)
    delta = torch.full((1, 2, 64), 5.0)
    A = -torch.arange(1, 5, dtype=torch.float32).repeat(2, 1) * 10
    B, C = torch.randn(1, 4, 64), torch.randn(1, 4, 64)
    y = selective_scan(u, delta, A, B, C, chunk_size=64)
    assert torch.isfinite(y).all()
    # With the decay this strong the state only remembers the current input.
    expected = (delta[:, :, None] * B[:, None] * C[:, None]).sum(2) * u
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_mamba_parameter_names_and_shapes() -> None:
    m = Mamba(d_model=32, d_state=8)
    d_inner, dt_rank = 64, math.ceil(32 / 16)
    shapes = {name: tuple(p.shape) for name, p in m.named_parameters()}
    assert shapes == {
        "in_proj.weight": (2 * d_inner, 32),
        "conv1d.weight": (d_inner, 1, 4),
        "conv1d.bias": (d_inner,),
        "x_proj.weight": (dt_rank + 16, d_inner),
        "dt_proj.weight": (d_inner, dt_rank),
        "dt_proj.bias": (d_inner,),
        "A_log": (d_inner, 8),
        "D": (d_inner,),
        "out_proj.weight": (32, d_inner),
    }
    assert m.A_log._no_weight_decay and m.D._no_weight_decay


def test_mamba_init() -> None:
    m = Mamba(d_model=32, d_state=8, dt_min=0.001, dt_max=0.1)
    expected = torch.log(torch.arange(1, 9, dtype=torch.float32)).expand(64, 8)
    torch.testing.assert_close(m.A_log.data, expected)
    torch.testing.assert_close(m.D.data, torch.ones(64))
    dt = F.softplus(m.dt_proj.bias.data)
    assert (dt >= 0.001 * (1 - 1e-4)).all() and (dt <= 0.1 * (1 + 1e-4)).all()
    assert m.dt_proj.weight.abs().max() <= 2**-0.5


@pytest.mark.parametrize("prefill", [1, 5])
def test_mamba_decode_matches_parallel_forward(prefill: int) -> None:
    torch.manual_seed(0)
    m = Mamba(d_model=32, d_state=8, chunk_size=4)
    u = torch.randn(2, 12, 32)
    with torch.no_grad():
        full = m(u)
        cache: dict = {}
        outs = [m(u[:, :prefill], cache)]
        assert cache["conv"].shape == (2, 64, 4)
        assert cache["ssm"].shape == (2, 64, 8) and cache["ssm"].dtype == torch.float32
        for t in range(prefill, 12):
            outs.append(m(u[:, t : t + 1], cache))
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=0, atol=1e-4)
