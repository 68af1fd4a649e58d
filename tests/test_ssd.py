import pytest
import torch
import torch.nn.functional as F

from arch.layers.mamba2 import Mamba2
from arch.ssd import prefix_sum, ssd_chunked, ssd_step


def naive_ssd(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, h0=None):
    """The recurrence, one time step at a time: the independent reference."""
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    state = torch.zeros(b, h, p, n, dtype=x.dtype) if h0 is None else h0
    ys = []
    for t in range(L):
        for_heads = torch.arange(h) // (h // g)
        Bt, Ct = B[:, t, for_heads], C[:, t, for_heads]  # (b, h, n)
        decay = torch.exp(dt[:, t] * A)  # (b, h)
        state = (
            decay[..., None, None] * state
            + (dt[:, t, :, None] * x[:, t])[..., None] * Bt[:, :, None]
        )
        y = (state * Ct[:, :, None]).sum(-1)
        if D is not None:
            y = y + x[:, t] * (D[:, None] if D.dim() == 1 else D)
        ys.append(y)
    y = torch.stack(ys, dim=1)
    if z is not None:
        y = y * F.silu(z)
    return y, state


def inputs(b, L, h, p, g, n, seed=0, **extra):
    gen = torch.Generator().manual_seed(seed)
    f64 = {"dtype": torch.float64, "generator": gen}
    t = {
        "x": torch.randn(b, L, h, p, **f64),
        "dt": torch.rand(b, L, h, **f64) * 0.5,
        "A": -torch.rand(h, **f64) * 2 - 0.1,
        "B": torch.randn(b, L, g, n, **f64),
        "C": torch.randn(b, L, g, n, **f64),
    }
    if "D" in extra:
        t["D"] = torch.randn(*extra["D"], **f64)
    if extra.get("z"):
        t["z"] = torch.randn(b, L, h, p, **f64)
    if extra.get("dt_bias"):
        t["dt_bias"] = torch.randn(h, **f64) * 0.5
    if extra.get("h0"):
        t["h0"] = torch.randn(b, h, p, n, **f64)
    return {k: v.requires_grad_() for k, v in t.items()}


CASES = [
    dict(shape=(2, 37, 4, 3, 1, 5), chunk=8),  # seqlen not a multiple of the chunk
    dict(shape=(1, 16, 4, 2, 2, 4), chunk=8, D=(4,), h0=True),  # ngroups > 1, initial state
    dict(shape=(2, 5, 2, 3, 1, 3), chunk=16, D=(2, 3), z=True),  # shorter than one chunk
    dict(shape=(1, 24, 6, 2, 3, 4), chunk=4, dt_bias=True, z=True, h0=True, D=(6,)),
]


@pytest.mark.parametrize("case", CASES)
def test_ssd_chunked_equals_naive_recurrence(case):
    b, L, h, p, g, n = case["shape"]
    extra = {k: v for k, v in case.items() if k not in ("shape", "chunk")}
    t = inputs(b, L, h, p, g, n, **extra)
    softplus = "dt_bias" in t
    y_ref, h_ref = naive_ssd(
        t["x"], t["dt"], t["A"], t["B"], t["C"], t.get("D"), t.get("z"), t.get("dt_bias"),
        softplus, t.get("h0"),
    )  # fmt: skip
    y, h_fin = ssd_chunked(
        t["x"], t["dt"], t["A"], t["B"], t["C"], case["chunk"], D=t.get("D"), z=t.get("z"),
        dt_bias=t.get("dt_bias"), dt_softplus=softplus, initial_states=t.get("h0"),
        return_final_states=True,
    )  # fmt: skip
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(h_fin, h_ref, atol=1e-10, rtol=0)
    weights = torch.randn_like(y_ref), torch.randn_like(h_ref)
    names = list(t)
    grads_ref = torch.autograd.grad((y_ref * weights[0]).sum() + (h_ref * weights[1]).sum(),
                                    [t[k] for k in names])  # fmt: skip
    grads = torch.autograd.grad((y * weights[0]).sum() + (h_fin * weights[1]).sum(),
                                [t[k] for k in names])  # fmt: skip
    for name, g_ref, g in zip(names, grads_ref, grads, strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=0, msg=f"grad of {name}")


def test_ssd_step_continues_the_chunked_scan():
    t = {k: v.detach() for k, v in inputs(2, 9, 4, 3, 2, 5, D=(4,)).items()}
    y, state = ssd_chunked(t["x"][:, :8], t["dt"][:, :8], t["A"], t["B"][:, :8], t["C"][:, :8],
                           4, D=t["D"], return_final_states=True)  # fmt: skip
    full = ssd_chunked(t["x"], t["dt"], t["A"], t["B"], t["C"], 4, D=t["D"])
    y_step = ssd_step(
        state, t["x"][:, 8], t["dt"][:, 8], t["A"], t["B"][:, 8], t["C"][:, 8], t["D"]
    )
    torch.testing.assert_close(y_step, full[:, 8], atol=1e-12, rtol=0)


def test_bf16_accumulates_in_fp32():
    t = {k: v.detach().float() for k, v in inputs(1, 64, 4, 8, 1, 8).items()}
    ref = ssd_chunked(**t, chunk_size=16)
    low = ssd_chunked(**{k: v.bfloat16() if k != "A" else v for k, v in t.items()}, chunk_size=16)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_mamba2_parameters_match_mamba_ssm():
    m = Mamba2(32, d_state=8, headdim=8, ngroups=2, expand=2)
    d_inner, nheads, conv_dim = 64, 8, 64 + 2 * 2 * 8
    shapes = {name: tuple(p.shape) for name, p in m.named_parameters()}
    assert shapes == {
        "in_proj.weight": (2 * d_inner + 2 * 2 * 8 + nheads, 32),
        "conv1d.weight": (conv_dim, 1, 4),
        "conv1d.bias": (conv_dim,),
        "dt_bias": (nheads,),
        "A_log": (nheads,),
        "D": (nheads,),
        "norm.weight": (d_inner,),
        "out_proj.weight": (32, d_inner),
    }
    dt = F.softplus(m.dt_bias)
    assert ((dt >= 1e-4 - 1e-9) & (dt <= 0.1 + 1e-6)).all()
    A = -m.A_log.exp()
    assert ((A >= -16) & (A <= -1)).all()


@pytest.mark.parametrize("prefill", [1, 5])
def test_mamba2_decode_matches_parallel(prefill):
    torch.manual_seed(0)
    layer = Mamba2(32, d_state=8, headdim=8, ngroups=2, chunk_size=4)
    x = torch.randn(2, 12, 32)
    with torch.no_grad():
        full = layer(x)
        cache: dict = {}
        outs = [layer(x[:, :prefill], cache=cache)]
        outs += [layer(x[:, t : t + 1], cache=cache) for t in range(prefill, 12)]
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-4, rtol=0)


def test_prefix_sum_equals_cumsum():
    x = torch.randn(3, 5, 37, 6, dtype=torch.float64)
    for dim in (-1, -2, 0):
        torch.testing.assert_close(prefix_sum(x, dim), x.cumsum(dim), rtol=0, atol=1e-12)
