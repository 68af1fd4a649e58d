"""The Triton kernels of arch/kernels against the PyTorch reference (arch.ssd, arch.layers.mamba2).

Without CUDA they run under Triton's interpreter (TRITON_INTERPRET=1, which must be set
before the kernels are defined, hence before arch.kernels is imported) at tiny shapes.
Tolerances, as the largest error relative to the largest entry of each tensor:
- fp32 scan, against the fp64 reference: outputs, final states and every input gradient
  within 1e-4 (observed: 3e-6); conv and gated norm against fp32 PyTorch: 1e-5.
- bf16 activations (fp32 A, D, dt_bias, states), against the fp64 reference on the same
  bf16-rounded inputs: per tensor, 1.5x the error of mamba_ssm's Triton kernels (the
  state of the art) on the same inputs; see BF16_TOL. The interpreter computes bf16 dots
  as tensor cores do (arch/kernels/ssd_triton.py, _dot) and, patched here, rounds fp32 to
  bf16 to nearest even as the GPU does (it truncates), so these errors are the GPU's.
With CUDA, the GPU tests run the compiled kernels at realistic shapes (bf16: against
mamba_ssm's kernels run alongside, when .vendor/ has them), and the whole Mamba2 layer
under bf16 autocast against its PyTorch path.
"""

import copy
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from arch.config import ModelConfig  # noqa: E402
from arch.kernels.conv import causal_conv1d_silu, conv_silu_backward  # noqa: E402
from arch.kernels.norm import rmsnorm_gated  # noqa: E402
from arch.kernels.ssd_triton import ssd_chunked_triton  # noqa: E402
from arch.kernels.state_update import ssd_step_triton  # noqa: E402
from arch.layers.mamba2 import Mamba2, RMSNormGated  # noqa: E402
from arch.ssd import ssd_chunked, ssd_step  # noqa: E402

# Kept in fp32 when the activations are bf16, as Mamba2's parameters and cache are.
PARAMS = ("A", "D", "dt_bias", "initial_states")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs on CPU")


@pytest.fixture(autouse=True, scope="module")
def bf16_rounds_to_nearest():
    """Triton's interpreter casts fp32 to bf16 (stores to bf16 tensors included) by
    truncation, the GPU to nearest even: truncation's bias would double the error of every
    bf16 result. Here it rounds as the GPU does."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    import triton.language as tl
    import triton.runtime.interpreter as interpreter

    convert = interpreter._convert_float

    def rounded(data, src, dst, rounding_mode):
        if src == tl.float32 and dst == tl.bfloat16:
            bf16 = torch.from_numpy(np.ascontiguousarray(data, np.float32)).bfloat16()
            return bf16.view(torch.int16).numpy().view(np.uint16)
        return convert(data, src, dst, rounding_mode)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(interpreter, "_convert_float", rounded)
        yield


def inputs(b, L, h, p, g, n, D=None, z=False, dt_bias=False, h0=False, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    f64 = {"dtype": torch.float64, "generator": gen}
    t = {
        "x": torch.randn(b, L, h, p, **f64),
        "dt": torch.rand(b, L, h, **f64) * 0.5,
        "A": -torch.rand(h, **f64) * 2 - 0.1,
        "B": torch.randn(b, L, g, n, **f64),
        "C": torch.randn(b, L, g, n, **f64),
        "D": torch.randn(*D, **f64) if D else None,
        "z": torch.randn(b, L, h, p, **f64) if z else None,
        "dt_bias": torch.randn(h, **f64) * 0.5 if dt_bias else None,
        "initial_states": torch.randn(b, h, p, n, **f64) if h0 else None,
    }
    return {k: v.to(device) for k, v in t.items() if v is not None}


def run(scan, t, dtype, chunk, softplus, with_final, weights=None):
    """Outputs (y, final) and the gradients of a random projection of them."""
    low = dtype == torch.bfloat16
    leaves = {k: v.to(torch.float32 if low and k in PARAMS else dtype).requires_grad_()
              for k, v in t.items()}  # fmt: skip
    y, final = scan(**leaves, chunk_size=chunk, dt_softplus=softplus, return_final_states=True)
    if weights is None:
        gen = torch.Generator().manual_seed(1)
        weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)
                   for o in (y, final)]  # fmt: skip
    loss = (y.double() * weights[0]).sum()
    if with_final:
        loss = loss + (final.double() * weights[1]).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return {"y": y, "final": final, **dict(zip(leaves, grads, strict=True))}, weights


def errors(ours: dict, ref: dict) -> dict:
    """Per tensor: the largest error relative to the reference's largest entry."""
    return {name: ((ours[name].double() - r.double()).abs().max() / r.double().abs().max()).item()
            for name, r in ref.items()}  # fmt: skip


def assert_matches(ours: dict, ref: dict, tol: float | dict) -> None:
    for name, err in errors(ours, ref).items():
        limit = tol[name] if isinstance(tol, dict) else tol
        assert err <= limit, f"{name}: error {err:.2e} relative to the largest entry > {limit:.1e}"


# The interpreter runs blocks of 16 positions and sums 2 heads per program (the `small`
# configs of arch/kernels/ssd_triton.py), so chunks of 24 or 32 span several blocks.
CASES = {
    # seqlen not a multiple of the chunk, ngroups > 1, everything on
    "tail_groups_all": dict(
        shape=(2, 70, 4, 8, 2, 8), chunk=32, D=(4, 8), z=True, dt_bias=True, softplus=True, h0=True
    ),  # fmt: skip
    # whole chunks, 4 heads in one group, D per head, no gate, no bias, loss on y only
    "whole_chunks": dict(shape=(1, 64, 4, 8, 1, 8), chunk=32, D=(4,), final=False),
    # shorter than one chunk, initial state, gate
    "one_short_chunk": dict(shape=(2, 7, 2, 8, 1, 16), chunk=16, z=True, h0=True),
    # chunk, headdim and d_state not powers of two, 3 heads in a group, bias, no softplus
    "odd_sizes": dict(shape=(1, 50, 3, 6, 1, 5), chunk=24, dt_bias=True, D=(3,)),
}


@cpu_only
@pytest.mark.parametrize("name", CASES)
def test_ssd_chunked_triton_matches_reference_interpreted(name):
    case = CASES[name]
    t = inputs(*case["shape"], **{k: case[k] for k in ("D", "z", "dt_bias", "h0") if k in case})
    softplus, with_final = case.get("softplus", False), case.get("final", True)
    ref, w = run(ssd_chunked, t, torch.float64, case["chunk"], softplus, with_final)
    ours, _ = run(ssd_chunked_triton, t, torch.float32, case["chunk"], softplus, with_final, w)
    assert ours["y"].dtype == torch.float32 and ours["final"].dtype == torch.float32
    assert set(ours) == set(ref) == {"y", "final", *t}
    assert_matches(ours, ref, tol=1e-4)


@cpu_only
def test_ssd_step_triton_matches_reference_interpreted():
    t = inputs(3, 1, 4, 6, 2, 5, D=(4, 6), z=True, dt_bias=True, h0=True)
    step = {k: v[:, 0].float() if v.dim() > 2 and k != "initial_states" else v.float()
            for k, v in t.items()}  # fmt: skip
    state = step.pop("initial_states")
    ref_state, ours_state = state.clone(), state.clone()
    ref = ssd_step(ref_state, **step, dt_softplus=True)
    ours = ssd_step_triton(ours_state, **step, dt_softplus=True)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_state, ref_state, atol=1e-5, rtol=1e-5)
    assert (ours_state - state).abs().max() > 0.1  # it did update in place


def test_model_config_selects_the_mixer_kernels():
    assert ModelConfig(pattern="M").ssd_impl == "auto"
    assert ModelConfig(pattern="M", ssd_impl="torch").ssd_impl == "torch"
    with pytest.raises(ValidationError, match="ssd_impl"):
        ModelConfig(pattern="M", ssd_impl="cuda")


@cpu_only
def test_mamba2_with_triton_kernels_matches_torch_path():
    torch.manual_seed(0)
    layer = Mamba2(32, d_state=8, headdim=8, ngroups=2, chunk_size=8, ssd_impl="torch")
    u = torch.randn(2, 13, 32, requires_grad=True)
    outs = {}
    for impl in ("torch", "triton"):
        layer.ssd_impl = impl
        y = layer(u)
        grads = torch.autograd.grad((y * torch.linspace(-1, 1, 32)).sum(),
                                    [u, *layer.parameters()])  # fmt: skip
        cache: dict = {}
        with torch.no_grad():
            layer(u[:, :9], cache=cache)
            steps = [layer(u[:, t : t + 1], cache=cache) for t in range(9, 13)]
        outs[impl] = (y, *grads, torch.cat(steps, 1))
    for ref, ours in zip(outs["torch"], outs["triton"], strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs["triton"][-1], outs["torch"][0][:, 9:], atol=1e-4, rtol=0)


@cpu_only
def test_mamba2_on_the_kernels_compiles_into_one_graph():
    """The kernels are custom ops: torch.compile keeps the layer one graph (a graph break
    per kernel call before), and the compiled layer equals the eager one."""
    torch.manual_seed(0)
    layer = Mamba2(32, d_state=8, headdim=8, ngroups=2, chunk_size=8, ssd_impl="triton")
    u = torch.randn(2, 13, 32, requires_grad=True)

    def loss(u):
        return (layer(u) * torch.linspace(-1, 1, 32)).sum()

    explained = torch._dynamo.explain(loss)(u)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    results = []
    for fn in (loss, torch.compile(loss)):
        value = fn(u)
        results.append((value, *torch.autograd.grad(value, [u, *layer.parameters()])))
    for ours, ref in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def conv_reference(x, weight, bias):
    """Mamba2's conv: channels-first depthwise conv1d, cut to causal, then SiLU."""
    width, length = weight.shape[1], x.shape[1]
    conv = F.conv1d(x.transpose(1, 2), weight[:, None], bias, padding=width - 1,
                    groups=x.shape[2])  # fmt: skip
    return F.silu(conv[..., :length]).transpose(1, 2)


def conv_and_norm_grads(device, dtype, length, channels, width, groups, seed=0):
    """(ours, reference) outputs and input gradients of the conv and of the gated norm;
    x is a slice of a wider tensor, as Mamba2's in_proj output is."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, dtype=dtype):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device, dtype)

    wide = randn(2, length, channels + 7)
    conv_in = (wide[..., 3 : 3 + channels], randn(channels, width, dtype=torch.float32),
               randn(channels, dtype=torch.float32))  # fmt: skip
    norm = RMSNormGated(channels, group_size=channels // groups).to(device)
    with torch.no_grad():
        norm.weight.copy_(randn(channels, dtype=torch.float32))
    norm_in = (wide[..., :channels], randn(2, length, channels))
    weights = [randn(2, length, channels, dtype=torch.float64) for _ in range(2)]
    names = ("conv_x", "conv_weight", "conv_bias", "norm_x", "norm_z", "norm_weight")
    results = []
    ours = (
        causal_conv1d_silu,
        lambda x, z: rmsnorm_gated(x, z, norm.weight, norm.eps, norm.group_size),
    )
    for (conv, gated_norm), upcast in ((ours, False), ((conv_reference, norm), True)):
        leaves = [t.detach().clone().requires_grad_() for t in (*conv_in, *norm_in)]
        args = [t.float() for t in leaves] if upcast else leaves  # the reference in fp32
        outs = conv(*args[:3]), gated_norm(*args[3:])
        loss = sum((o.double() * w).sum() for o, w in zip(outs, weights, strict=True))
        grads = torch.autograd.grad(loss, [*leaves, norm.weight])
        results.append({"conv": outs[0], "norm": outs[1], **dict(zip(names, grads, strict=True))})
    return results


@cpu_only
def test_conv_and_gated_norm_match_reference_interpreted():
    ours, ref = conv_and_norm_grads("cpu", torch.float32, length=37, channels=40, width=4,
                                    groups=2)  # fmt: skip
    assert_matches(ours, ref, tol=1e-5)


# The interpreter's forward and backward walk spans of 8 times over blocks of 16 channels
# (the `small` config of arch/kernels/conv.py): 37 times end mid-span, 2 are fewer than the
# width, 16 are whole spans; 40 channels end mid-block.
@cpu_only
@pytest.mark.parametrize("length, width", [(37, 4), (2, 4), (16, 2), (13, 3)])
def test_causal_conv1d_silu_reads_through_strides_interpreted(length, width):
    """y from x time-major, a slice of a wider buffer, against the reference in fp64."""
    gen = torch.Generator().manual_seed(length)
    batch, channels = 2, 40

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x = randn(length, batch, channels + 5).float().transpose(0, 1)[..., 5:]
    weight, bias = randn(channels, width), randn(channels)
    y = causal_conv1d_silu(x, weight.float(), bias.float())
    assert y.is_contiguous() and y.dtype == torch.float32
    assert_matches({"y": y}, {"y": conv_reference(x.double(), weight, bias)}, {"y": 1e-5})


@cpu_only
@pytest.mark.parametrize(
    "length, width, dx_dtype",
    [(37, 4, torch.float32), (2, 4, torch.float32), (16, 2, torch.float32),
     (13, 3, torch.bfloat16)],
)  # fmt: skip
def test_conv_silu_backward_writes_through_strides_interpreted(length, width, dx_dtype):
    """dx written into a slice of a wider buffer, from x and dy of other strides (x
    time-major), against autograd through the reference; the other columns untouched."""
    gen = torch.Generator().manual_seed(length)
    batch, channels, sentinel = 2, 40, 7.25

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x = randn(length, batch, channels + 5).float().transpose(0, 1)[..., 5:]
    dy = randn(batch, length, channels + 9).float()[..., 2 : 2 + channels]
    weight, bias = randn(channels, width), randn(channels)
    buffer = torch.full((batch, length, channels + 24), sentinel, dtype=dx_dtype)
    dw, dbias = conv_silu_backward(x, weight.float(), bias.float(), dy,
                                   buffer[..., 8 : 8 + channels])  # fmt: skip

    leaves = [t.double().requires_grad_() for t in (x, weight, bias)]
    grads = torch.autograd.grad(conv_reference(*leaves), leaves, dy.double())
    ref = dict(zip(("dx", "dw", "dbias"), grads, strict=True))
    assert dw.dtype == dbias.dtype == torch.float32
    # fp32 as the other conv test; a bf16 dx rounds each entry by up to 2^-8 of itself
    tol = {"dx": 1e-5 if dx_dtype == torch.float32 else 4e-3, "dw": 1e-5, "dbias": 1e-5}
    assert_matches({"dx": buffer[..., 8 : 8 + channels], "dw": dw, "dbias": dbias}, ref, tol)
    others = torch.cat([buffer[..., :8], buffer[..., 8 + channels :]], dim=-1)
    assert (others == sentinel).all()


def bf16_case(shape, chunk, device):
    """The fp64 reference's outputs and gradients on bf16-rounded values, and a function
    that runs a scan on the bf16 activations (fp32 A, D, dt_bias, state)."""
    t = inputs(*shape, D=(shape[2],), z=True, dt_bias=True, h0=True, device=device)
    t["dt"] = t["dt"] - 2.0  # softplus(dt + bias) around 0.15, as Mamba2's init
    rounded = {k: v if k in PARAMS else v.bfloat16().double() for k, v in t.items()}
    ref, w = run(ssd_chunked, rounded, torch.float64, chunk, True, True)
    return ref, lambda scan: run(scan, t, torch.bfloat16, chunk, True, True, w)[0]


# 1.5x mamba_ssm's errors (its Triton kernels under the interpreter, same emulation, same
# inputs; max of the two cases below). Ours, measured the same way: within 0.54-1.02x of
# them; likewise at (1, 512, 4, 32, 1, 64) in chunks of 128, with A as here or scaled to
# [-16, -1]. Before arch/kernels took the decays' gradient pair by pair, dA was 6.8x
# mamba_ssm's here (1.1e-2) and 61x at strong decay, dt_bias 2.3x and 12x: what failed on
# the GPU.
BF16_TOL = {"y": 3.8e-3, "final": 4.0e-3, "x": 8.2e-3, "dt": 4.7e-3, "A": 7.8e-3, "B": 5.0e-3,
            "C": 8.9e-3, "D": 2.7e-3, "z": 6.3e-3, "dt_bias": 5.6e-3,
            "initial_states": 1.0e-2}  # fmt: skip


@cpu_only
@pytest.mark.parametrize(
    "shape, chunk",
    [((2, 70, 4, 16, 2, 16), 32),  # groups, a tail; mamba_ssm's errors 1.8e-3 to 5.5e-3
     ((1, 256, 2, 32, 1, 32), 64)],  # longer chunks, wider heads: 9e-4 to 6.9e-3
)  # fmt: skip
def test_ssd_chunked_triton_bf16_interpreted(shape, chunk):
    ref, results = bf16_case(shape, chunk, "cpu")
    ours = results(ssd_chunked_triton)
    assert ours["y"].dtype == torch.bfloat16
    assert_matches(ours, ref, BF16_TOL)


def accumulated_args(kernel) -> set[str]:
    """The pointer arguments an autotuned kernel adds into: atomics, or a load and a store
    of the same argument (read from its source)."""
    src = inspect.getsource(kernel.fn.fn)
    return {a for a in kernel.fn.arg_names if a.endswith("_ptr") and (
        re.search(rf"tl\.atomic_\w+\(\s*{a}\b", src)
        or (re.search(rf"tl\.load\(\s*{a}\b", src) and re.search(rf"tl\.store\(\s*{a}\b", src))
    )}  # fmt: skip


def test_autotuned_kernels_reset_or_restore_what_they_add_into():
    """The search runs every config on the call's own tensors, so a kernel that adds into
    an argument must name it in reset_to_zero or restore_value: _chunk_cb_bwd did not, and
    on a GPU the first call of each new shape returned dB and dC summed over every config
    tried. No search runs here (one config under the interpreter): this reads the source."""
    from triton.runtime.autotuner import Autotuner

    import arch.kernels.conv
    import arch.kernels.norm
    import arch.kernels.ssd_triton
    import arch.kernels.state_update

    found = {}
    for module in (arch.kernels.ssd_triton, arch.kernels.conv, arch.kernels.norm,
                   arch.kernels.state_update):  # fmt: skip
        for name, kernel in vars(module).items():
            if isinstance(kernel, Autotuner):
                found[name] = accumulated_args(kernel)
                kept = set(kernel.reset_to_zero) | set(kernel.restore_value)
                assert found[name] <= kept, f"{name} adds into {found[name] - kept} unrestored"
    # What reading the kernels gives by hand: the rule sees every one that accumulates.
    assert {name: args for name, args in found.items() if args} == {
        "_chunk_cb_bwd": {"out_ptr"},
        "_state_passing_bwd": {"dstates_ptr", "da_end_ptr"},
        "_chunk_scan_bwd_dx": {"dD_ptr"},
        "_chunk_scan_bwd_dcb": {"dcb_ptr", "da_ptr"},
        "_state_grad": {"out_ptr"},
        "_conv_bwd": {"dw_ptr", "dbias_ptr"},
        "_norm_bwd": {"dw_ptr"},
    }


# --- GPU, realistic shapes, bf16 ------------------------------------------------------


def mamba_ssm_scan():
    """mamba_ssm's Triton scan from .vendor/ (see bench/ssd_kernels.py), or None."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / ".vendor"))
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError:
        return None
    finally:
        sys.path.pop(0)

    def scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, initial_states,
             return_final_states):  # fmt: skip
        return mamba_chunk_scan_combined(
            x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
            initial_states=initial_states, return_final_states=return_final_states,
        )  # fmt: skip

    return scan


@cuda
@pytest.mark.parametrize("seqlen", [2048, 1000])
def test_ssd_chunked_triton_bf16_on_gpu(seqlen):
    ref, results = bf16_case((2, seqlen, 8, 64, 1, 128), chunk=256, device="cuda")
    ours = results(ssd_chunked_triton)
    assert ours["y"].dtype == torch.bfloat16
    baseline = mamba_ssm_scan()
    if baseline is None:  # no baseline at hand: bounds well above bf16's rounding
        tol = {k: 2e-2 if k in ("y", "final") else 5e-2 for k in ref}
    else:  # 1.5x mamba_ssm's error; under 4e-3 (a bf16 ulp), rounding noise
        tol = {k: max(1.5 * err, 4e-3) for k, err in errors(results(baseline), ref).items()}
    assert_matches(ours, ref, tol)


@cuda
def test_autotune_search_leaves_results_intact_on_gpu(tmp_path):
    """The search runs every config on the call's own tensors, so a kernel that adds to an
    output needs it reset or restored between runs: one did not, and the first call of
    each new shape returned dB and dC summed over every config tried. The search runs only
    on a shape's first call (its choice is cached on disk) and not at all under
    HYBRIDSCALE_AUTOTUNE=0, so this test searches afresh, in a process with an empty cache."""
    env = {**os.environ, "HYBRIDSCALE_AUTOTUNE": "1", "TRITON_CACHE_DIR": str(tmp_path)}
    test = f"{__file__}::test_ssd_chunked_triton_bf16_on_gpu[1000]"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                          env=env, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:]


@cuda
def test_a_second_process_reads_the_autotune_choice_the_first_stored(tmp_path):
    """Trials of a study share a cache folder: the first process to meet a kernel's key
    searches and stores its choice there, the next reads it and searches nothing; each
    counts what it paid (arch.kernels.PAID, which the trainer logs)."""
    script = (
        "import json, torch\n"
        "from arch.kernels import PAID\n"
        "from arch.kernels.norm import rmsnorm_gated\n"
        "x, z = torch.randn(2, 4096, 1024, device='cuda', dtype=torch.bfloat16).unbind(0)\n"
        "rmsnorm_gated(x, z, torch.ones(1024, device='cuda'), 1e-5, 256)\n"
        "print(json.dumps(PAID))\n"
    )
    env = {**os.environ, "HYBRIDSCALE_AUTOTUNE": "1", "TRITON_CACHE_DIR": str(tmp_path)}
    paid = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                              text=True, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        paid.append(json.loads(done.stdout.splitlines()[-1]))
    first, second = paid
    assert first["autotunes"] == 1 and first["autotune_cache_hits"] == 0
    assert second["autotunes"] == 0 and second["autotune_cache_hits"] == 1


@cuda
def test_ssd_chunked_triton_fp32_on_gpu_is_exact():
    t = inputs(2, 600, 4, 64, 2, 64, D=(4, 64), z=True, dt_bias=True, h0=True, device="cuda")
    ref, w = run(ssd_chunked, t, torch.float64, 128, True, True)
    ours, _ = run(ssd_chunked_triton, t, torch.float32, 128, True, True, w)
    assert_matches(ours, ref, tol=1e-4)


@cuda
def test_ssd_step_triton_on_gpu():
    t = inputs(4, 1, 32, 64, 1, 128, D=(32,), z=True, dt_bias=True, h0=True, device="cuda")
    step = {k: v[:, 0].bfloat16() for k, v in t.items() if v.dim() > 2 and k != "initial_states"}
    step |= {"dt": t["dt"][:, 0].bfloat16(), "A": t["A"].float(), "D": t["D"].float(),
             "dt_bias": t["dt_bias"].float()}  # fmt: skip
    state = t["initial_states"].float()
    ref_state, ours_state = state.clone(), state.clone()
    ref = ssd_step(ref_state, **step, dt_softplus=True)
    ours = ssd_step_triton(ours_state, **step, dt_softplus=True)
    torch.testing.assert_close(ours.float(), ref.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ours_state, ref_state, atol=1e-4, rtol=1e-4)


@cuda
def test_conv_and_gated_norm_bf16_on_gpu():
    ours, ref = conv_and_norm_grads("cuda", torch.bfloat16, length=2000, channels=4352, width=4,
                                    groups=1)  # fmt: skip
    assert ours["conv"].dtype == ours["norm"].dtype == torch.bfloat16
    assert_matches(ours, ref, tol=2e-2)


@cuda
def test_mamba2_triton_path_under_autocast_on_gpu():
    """Both paths under bf16 autocast against the layer in float64: the kernels' errors at
    most 1.5x the PyTorch path's (against each other they differ by both errors: dt_bias's
    gradient, a sum over every token, was 5.4% off in PyTorch and 1.3% in the kernels)."""
    torch.manual_seed(0)
    layer = Mamba2(256, d_state=128, headdim=64, chunk_size=256, ssd_impl="torch").cuda()
    u = torch.randn(2, 1000, 256, device="cuda")
    weights = torch.linspace(-1, 1, 256, device="cuda")

    def outputs(layer, u, autocast):
        u = u.detach().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y = layer(u)
        grads = torch.autograd.grad((y * weights.to(y.dtype)).sum(), [u, *layer.parameters()])
        names = ["y", "u", *(name for name, _ in layer.named_parameters())]
        return dict(zip(names, (y, *grads), strict=True))

    exact = copy.deepcopy(layer).double()
    ref = outputs(exact, u.double(), autocast=False)
    results = {}
    for impl in ("torch", "triton"):
        layer.ssd_impl = impl
        results[impl] = outputs(layer, u, autocast=True)
    tol = {k: max(1.5 * err, 4e-3) for k, err in errors(results["torch"], ref).items()}
    assert_matches(results["triton"], ref, tol)
