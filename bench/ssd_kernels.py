"""Mamba-2's SSD scan on the GPU: our Triton kernels against mamba_ssm's, side by side.

For each shape, forward and forward+backward time (median ms, triton's do_bench) of: our
Triton kernels (arch/kernels), our PyTorch reference arch.ssd (eager), mamba_ssm's Triton
``mamba_chunk_scan_combined``, the baseline, and, where fla-core is installed,
flash-linear-attention's ``chunk_simple_gla`` (the same scalar-decay recurrence: q = C,
k = B, v = dt x, log decay dt A; its chunk is its own, 64); each with its ratio to the
baseline (below 1: faster) and its largest deviation from it. Then one decode step (ours,
mamba_ssm's ``selective_state_update``, the reference). Prints a markdown table; --out
writes the rows as JSON.

    python bench/ssd_kernels.py [--batch 8] [--seqlens 2048 4096 8192] [--groups 1 8]
                                [--small] [--profile] [--no-extras] [--no-reference]
                                [--fla-unchecked] [--out FILE]

--fla-unchecked: fla-core refuses chunk_simple_gla's backward on Hopper under Triton 3.4 up
to 3.7.1, whose code for one of its kernels it says is wrong (fla #640); this lets it run,
so its time is measured, and its max_rel_dev shows whether its gradients are right.

--small: instead of that grid, the scaling studies' shapes (scaling_1gpu's Mamba heads:
headdim 32, d_state 64, chunk 64, batch 32) at d_model --d-models x --seqlens.

mamba_ssm's Triton files (state-spaces/mamba, mamba_ssm/ops/triton + the two small utils
they import, and einops) live in the git-ignored .vendor/, put there by hand; they need no
CUDA extension. Shapes default to d_model 4096, expand 2, headdim 64 (64 heads), d_state
128, one and eight groups, chunk 256, bf16 activations with fp32 A, D, dt_bias (as under
autocast). Achieved TFLOP/s and GB/s count the work of scan_work.
"""

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from gpu_util import kernel_times  # bench/, beside this script
from triton.testing import do_bench, do_bench_cudagraph

from arch.kernels.conv import causal_conv1d_silu
from arch.kernels.norm import rmsnorm_gated
from arch.kernels.ssd_triton import ssd_chunked_triton
from arch.kernels.state_update import ssd_step_triton
from arch.ssd import ssd_chunked, ssd_step

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / ".vendor"))
try:
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
except ImportError as err:
    sys.exit(f"mamba_ssm's Triton files are not importable from .vendor/: {err}")
try:  # fla-core, an optional extra (pip install -e '.[fla]')
    from fla.ops.simple_gla import chunk_simple_gla
except ImportError:
    chunk_simple_gla = None


BASELINE = "mamba_ssm (baseline)"
GLA = "fla chunk_simple_gla"
EPS = 1e-5
DEVICE = "cuda"


def mamba_scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus):
    return mamba_chunk_scan_combined(
        x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus
    )


def gla_inputs(x, dt, A, B, C, dt_bias, dt_softplus, **_) -> dict:
    """The scan's inputs as chunk_simple_gla's: q = C and k = B per head, v = dt x, and
    the log decay dt A (fp32)."""
    dt = dt.float() + dt_bias
    dt = F.softplus(dt) if dt_softplus else dt
    per_group = x.shape[2] // B.shape[2]
    return {"q": C.repeat_interleave(per_group, 2), "k": B.repeat_interleave(per_group, 2),
            "v": (x * dt[..., None]).to(x.dtype), "g": dt * A}  # fmt: skip


def gla_core(q, k, v, g):
    return chunk_simple_gla(q, k, v, g=g, scale=1.0)[0]


def gla_scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus):
    """mamba_chunk_scan_combined's output through chunk_simple_gla: its kernels for the
    recurrence, eager PyTorch for dt's softplus, the D skip and the z gate around it (the
    row's kernel_* columns time the kernels alone)."""
    inputs = gla_inputs(x, dt, A, B, C, dt_bias, dt_softplus)
    y = gla_core(**inputs) + x * D[:, None].to(x.dtype)
    return y * F.silu(z)


def scan_inputs(batch, seqlen, heads, headdim, groups, dstate) -> dict:
    bf16 = {"device": DEVICE, "dtype": torch.bfloat16}
    f32 = {"device": DEVICE, "dtype": torch.float32}
    return {
        "x": torch.randn(batch, seqlen, heads, headdim, **bf16),
        "dt": torch.randn(batch, seqlen, heads, **bf16) * 0.5 - 2,  # softplus ~ 0.1
        "A": -torch.empty(heads, **f32).uniform_(1, 16),
        "B": torch.randn(batch, seqlen, groups, dstate, **bf16),
        "C": torch.randn(batch, seqlen, groups, dstate, **bf16),
        "D": torch.randn(heads, **f32),
        "z": torch.randn(batch, seqlen, heads, headdim, **bf16),
        "dt_bias": torch.randn(heads, **f32) * 0.1,
    }


def time_op(fn, inputs: dict) -> dict:
    """Forward and forward+backward ms of fn(**inputs), and its output and gradients."""
    with torch.no_grad():
        fwd = do_bench(lambda: fn(**inputs), return_mode="median")
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    out = fn(**leaves)
    gen = torch.Generator(out.device).manual_seed(1)  # the same for every implementation
    dout = torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype)
    out.backward(dout)
    values = {"out": out.detach(), **{k: v.grad for k, v in leaves.items()}}
    both = do_bench(lambda: fn(**leaves).backward(dout), grad_to_none=list(leaves.values()),
                    return_mode="median")  # fmt: skip
    return {"fwd_ms": fwd, "fwd_bwd_ms": both, "values": values}


def deviation(values: dict, baseline: dict) -> float:
    """Largest |ours - baseline| over all outputs, relative to the baseline's largest entry."""
    return max(
        ((values[k].float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        for k, ref in baseline.items()
    )


def compare(op: str, seqlen: int, impls: dict, inputs: dict) -> list[dict]:
    """One row per implementation; the first is the baseline."""
    rows, base = [], None
    for name, fn in impls.items():
        row = {"op": op, "seqlen": seqlen, "impl": name}
        try:
            r = time_op(fn, inputs)
        except Exception as err:  # out of memory, or a compiler failure: say so, go on
            rows.append({**row, "error": f"{type(err).__name__}: {str(err)[:80]}"})
            print(json.dumps(rows[-1]), flush=True)
            torch.cuda.empty_cache()
            continue
        values = r.pop("values")
        if not rows:
            base = {**r, "values": values}
        row |= r
        if base is not None:
            row["fwd_vs_baseline"] = r["fwd_ms"] / base["fwd_ms"]
            row["fwd_bwd_vs_baseline"] = r["fwd_bwd_ms"] / base["fwd_bwd_ms"]
            row["max_rel_dev"] = deviation(values, base["values"])
        rows.append(row)
        print(json.dumps(row), flush=True)
        del values
        torch.cuda.empty_cache()
    return rows


def scan_work(batch, seqlen, heads, headdim, groups, dstate, chunk) -> tuple[float, float]:
    """(FLOPs, bytes) of one forward scan. FLOPs: per chunk and group C.B (2 Q^2 N), per
    chunk and head the in-chunk outputs (2 Q^2 P), its own state and the entering state's
    outputs (2 Q P N each): per token 2QNg + h(2QP + 4PN). Bytes: every input and output
    read or written once (bf16; A, D, dt_bias negligible)."""
    q, n, p = chunk, dstate, headdim
    flops = batch * seqlen * (2 * q * n * groups + heads * (2 * q * p + 4 * p * n))
    elements = batch * seqlen * (3 * heads * p + heads + 2 * groups * n)  # x, z, y, dt, B, C
    return flops, 2 * elements


def shapes(args) -> list[tuple[str, tuple, int]]:
    """(label, (batch, seqlen, heads, headdim, groups, dstate), chunk) of each scan timed:
    --groups x --seqlens at --heads, or with --small the scaling studies' shapes."""
    if args.small:
        return [(f"ssd scan, d_model {d}", (32, seqlen, 2 * d // 32, 32, 1, 64), 64)
                for d in args.d_models for seqlen in args.seqlens]  # fmt: skip
    return [(f"ssd scan, {groups} group(s)",
             (args.batch, seqlen, args.heads, args.headdim, groups, args.dstate), args.chunk)
            for groups in args.groups for seqlen in args.seqlens]  # fmt: skip


def bench_scan(args) -> list[dict]:
    rows = []
    for op, shape, chunk in shapes(args):

        def scan(fn, chunk=chunk):
            return partial(fn, chunk_size=chunk, dt_softplus=True)

        impls = {BASELINE: scan(mamba_scan), "ours triton": scan(ssd_chunked_triton)}
        if chunk_simple_gla is not None:
            impls[GLA] = scan(gla_scan)
        if not args.no_reference:
            impls["ref torch eager"] = scan(ssd_chunked)
        seqlen = shape[1]
        torch.manual_seed(0)
        inputs = scan_inputs(*shape)
        flops, nbytes = scan_work(*shape, chunk)
        for row in compare(op, seqlen, impls, inputs):
            if "fwd_ms" in row:  # backward: ~2x the forward's FLOPs, ~2x its bytes
                row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
                row["fwd_bwd_tflops"] = 3 * flops / row["fwd_bwd_ms"] / 1e9
                row["fwd_gbs"] = nbytes / row["fwd_ms"] / 1e6
                row["fwd_bwd_gbs"] = 3 * nbytes / row["fwd_bwd_ms"] / 1e6
            rows.append(row)
        shape_rows = {row["impl"]: row for row in rows[-len(impls) :]}
        ours, ref = shape_rows["ours triton"], shape_rows.get("ref torch eager", {})
        if "fwd_ms" in ours and "fwd_ms" in ref:
            ours["ref_over_ours"] = ref["fwd_ms"] / ours["fwd_ms"]
            ours["ref_over_ours_bwd"] = ref["fwd_bwd_ms"] / ours["fwd_bwd_ms"]
        if "fwd_ms" in shape_rows.get(GLA, {}):
            kernels = time_op(gla_core, gla_inputs(**inputs, dt_softplus=True))
            shape_rows[GLA]["kernel_fwd_ms"] = kernels["fwd_ms"]
            shape_rows[GLA]["kernel_fwd_bwd_ms"] = kernels["fwd_bwd_ms"]
            if "fwd_ms" in ours:
                ours["vs_gla_kernels"] = ours["fwd_bwd_ms"] / kernels["fwd_bwd_ms"]
        if args.profile:
            for name in ("ours triton", BASELINE):
                profile(impls[name], inputs, f"{op}, seqlen {seqlen}, {name}")
    return rows


def profile(fn, inputs: dict, title: str) -> None:
    """The kernels' share of one forward + backward."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}

    def fwd_bwd():
        fn(**leaves).backward(torch.ones_like(leaves["x"]))

    fwd_bwd()
    times = kernel_times(fwd_bwd, repeats=5)
    print(f"# {title}: forward + backward, {sum(times.values()):.3f} ms of kernels")
    for name, ms in sorted(times.items(), key=lambda kv: -kv[1])[:14]:
        print(f"#   {ms:7.3f} ms  {name[:90]}")


def conv_reference(x, weight, bias):
    weight, bias = weight.to(x.dtype), bias.to(x.dtype)  # as under autocast
    conv = F.conv1d(x.transpose(1, 2), weight[:, None], bias, padding=weight.shape[1] - 1,
                    groups=x.shape[2])  # fmt: skip
    return F.silu(conv[..., : x.shape[1]]).transpose(1, 2)


def norm_reference(x, z, weight, group_size):
    gated = x.float() * F.silu(z.float())
    groups = gated.unflatten(-1, (-1, group_size))
    normed = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + EPS)
    return (normed.flatten(-2) * weight.float()).to(x.dtype)


def bench_conv_norm(args) -> list[dict]:
    """Mamba2's conv + SiLU (on a slice of in_proj's output) and gated RMSNorm. mamba_ssm's
    conv is a CUDA extension (causal_conv1d), so there the baseline is PyTorch eager."""
    d_inner = args.heads * args.headdim
    channels = d_inner + 2 * args.groups[0] * args.dstate
    gs = d_inner // args.groups[0]
    convs = {
        "ref torch eager": conv_reference,
        "ours triton": causal_conv1d_silu,
        "ref torch.compile": torch.compile(conv_reference),
    }
    norms = {
        BASELINE: lambda x, z, weight: rmsnorm_fn(
            x, weight, None, z=z, eps=EPS, group_size=gs, norm_before_gate=False
        ),
        "ours triton": partial(rmsnorm_gated, eps=EPS, group_size=gs),
        "ref torch eager": partial(norm_reference, group_size=gs),
        "ref torch.compile": partial(torch.compile(norm_reference), group_size=gs),
    }
    rows = []
    for seqlen in args.seqlens:
        torch.manual_seed(0)
        bf16 = {"device": DEVICE, "dtype": torch.bfloat16}
        zxbcdt = torch.randn(args.batch, seqlen, d_inner + channels + args.heads, **bf16)
        conv_in = {"x": zxbcdt[..., d_inner : d_inner + channels],
                   "weight": torch.randn(channels, 4, device=DEVICE) * 0.5,
                   "bias": torch.randn(channels, device=DEVICE)}  # fmt: skip
        rows += compare("conv1d + silu", seqlen, convs, conv_in)
        norm_in = {"x": torch.randn(args.batch, seqlen, d_inner, **bf16),
                   "z": zxbcdt[..., :d_inner],
                   "weight": torch.randn(d_inner, device=DEVICE)}  # fmt: skip
        rows += compare("gated rmsnorm", seqlen, norms, norm_in)
    return rows


def step_impls(batch: int, args) -> dict:
    """Decode-step closures over one state argument, on the same inputs."""
    h, p, n = args.heads, args.headdim, args.dstate
    t = {k: v[:, 0] if v.dim() > 2 else v
         for k, v in scan_inputs(batch, 1, h, p, args.groups[0], n).items()}  # fmt: skip
    # mamba_ssm's Mamba2 ties the per-channel arguments to heads with stride-0 views.
    tied = {
        "dt": t["dt"][..., None].expand(batch, h, p),
        "A": t["A"][:, None, None].expand(h, p, n),
        "D": t["D"][:, None].expand(h, p),
        "dt_bias": t["dt_bias"][:, None].expand(h, p),
    }
    return {
        BASELINE: lambda s: selective_state_update(
            s, t["x"], B=t["B"], C=t["C"], z=t["z"], dt_softplus=True, **tied
        ),
        "ours triton": lambda s: ssd_step_triton(s, **t, dt_softplus=True),
        "ref torch eager": lambda s: ssd_step(s, **t, dt_softplus=True),
    }


def bench_step(args) -> list[dict]:
    rows = []
    for batch in (args.batch, 16 * args.batch):
        torch.manual_seed(0)
        impls = step_impls(batch, args)
        state = torch.randn(batch, args.heads, args.headdim, args.dstate, device=DEVICE)
        outputs = {name: step(state.clone()) for name, step in impls.items()}
        base = None
        for name, step in impls.items():
            s = state.clone()
            ms = do_bench_cudagraph(lambda step=step, s=s: step(s), return_mode="median")
            base = base or ms  # the baseline runs first
            dev = deviation({"y": outputs[name]}, {"y": outputs[BASELINE]})
            row = {"op": "decode step (cuda graph)", "seqlen": batch, "impl": name,
                   "fwd_ms": ms, "fwd_vs_baseline": ms / base, "max_rel_dev": dev}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    def fmt(v):
        return "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    cols = ["op", "seqlen", "impl", "fwd_ms", "fwd_vs_baseline", "fwd_bwd_ms",
            "fwd_bwd_vs_baseline", "kernel_fwd_ms", "kernel_fwd_bwd_ms", "vs_gla_kernels",
            "fwd_tflops", "fwd_bwd_tflops", "fwd_gbs", "fwd_bwd_gbs",
            "ref_over_ours", "ref_over_ours_bwd", "max_rel_dev", "error"]  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seqlens", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--heads", type=int, default=64)
    parser.add_argument("--headdim", type=int, default=64)
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dstate", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--small", action="store_true", help="the scaling studies' shapes")
    parser.add_argument("--d-models", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--profile", action="store_true", help="kernel times, ours and baseline")
    parser.add_argument("--no-extras", action="store_true", help="the scan only")
    parser.add_argument("--no-reference", action="store_true", help="skip the slow reference")
    parser.add_argument("--fla-unchecked", action="store_true", help="run fla's refused backward")
    parser.add_argument("--out")
    args = parser.parse_args()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; batch {args.batch}, "
          f"{args.heads} heads x {args.headdim}, d_state {args.dstate}, groups {args.groups} "
          f"(decode, conv, norm: the first), chunk {args.chunk}, bf16 (seqlen column: batch "
          f"for decode)", flush=True)  # fmt: skip
    if args.fla_unchecked and chunk_simple_gla is not None:
        import fla.ops.common.chunk_o as fla_chunk_o

        fla_chunk_o.TRITON_ABOVE_3_7_1 = True  # the version its Hopper check reads
    rows = bench_scan(args)
    if not args.no_extras:
        rows += bench_step(args) + bench_conv_norm(args)
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
