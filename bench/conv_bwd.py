"""The backward of Mamba-2's causal conv + SiLU on the GPU: our one-pass Triton kernel
against PyTorch autograd through the reference conv, side by side; and the forward.

Times (median ms, triton's do_bench) the backward alone at the 350M hybrid's shape (batch
16, 2048 times, 2304 channels, width 4, bf16 activations, fp32 weight and bias as under
autocast) of: the reference (autograd through F.conv1d + SiLU, bf16), our custom op
``hybridscale::causal_conv1d_silu_backward``, and ``conv_silu_backward`` reading x from
and writing dx into slices of a wider buffer, as a fused Mamba op does. GB/s counts the
bytes the backward must move: x and dy read, dx written, once each. Then times the
forward, ``causal_conv1d_silu`` on the same x (a slice of a wider buffer), GB/s against x
read and y written once each. ``--baseline FILE`` adds an older arch/kernels/conv.py to
both, loaded under another op namespace, e.g. the two-pass backward: ``git show
47a9397:arch/kernels/conv.py > /tmp/conv_two_pass.py``, or the forward that loads x at
each of the width's shifts: ``git show HEAD:arch/kernels/conv.py``. Prints one JSON line
per implementation and pass with its largest errors against the fp32 reference, absolute
and relative to its largest entry; fails if ours exceed 2e-2 relative.

    python bench/conv_bwd.py [--batch 16] [--seqlen 2048] [--channels 2304] [--width 4]
                             [--baseline FILE]
"""

import argparse
import functools
import importlib.util
import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from arch.kernels.conv import _conv_bwd, _conv_fwd, causal_conv1d_silu, conv_silu_backward

DEVICE = "cuda"
TOL = 2e-2  # largest error relative to the largest entry, as tests/test_kernels.py on GPU


def reference(x, weight, bias):
    """Mamba2's conv: channels-first depthwise conv1d, cut to causal, then SiLU."""
    width, length = weight.shape[1], x.shape[1]
    conv = F.conv1d(x.transpose(1, 2), weight[:, None], bias, padding=width - 1,
                    groups=x.shape[2])  # fmt: skip
    return F.silu(conv[..., :length]).transpose(1, 2)


def reference_backward(x, weight, bias, dy):
    """The reference's backward alone: its forward graph built once, kept between calls."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    y = reference(*leaves)
    return lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True)


def errors(grads, truth) -> tuple[dict, dict]:
    """The largest absolute error of each gradient, and that over the truth's largest entry."""
    abs_err, rel_err = {}, {}
    for key, g, t in zip(("dx", "dw", "dbias"), grads, truth, strict=True):
        abs_err[key] = (g.float() - t).abs().max().item()
        rel_err[key] = abs_err[key] / t.abs().max().item()
    return abs_err, rel_err


def load_baseline(path: str):
    """An older conv.py as a module whose custom ops live in another namespace."""
    source = Path(path).read_text().replace("hybridscale::", "hybridscale_baseline::")
    file = Path(tempfile.mkdtemp()) / "conv_baseline.py"  # Triton reads kernels' source
    file.write_text(source)
    spec = importlib.util.spec_from_file_location("conv_baseline", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--channels", type=int, default=2304)
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--baseline", help="an older arch/kernels/conv.py to time as well")
    args = parser.parse_args()
    b, L, Dm, K = args.batch, args.seqlen, args.channels, args.width

    gen = torch.Generator(DEVICE).manual_seed(0)

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=gen, device=DEVICE, dtype=dtype)

    # x as the scan's fused op holds it: columns 2048 .. 2048 + Dm of in_proj's output
    wide = 2048 + Dm + 64
    x = randn(b, L, wide)[..., 2048 : 2048 + Dm]
    dy = randn(b, L, Dm)
    weight, bias = randn(Dm, K, dtype=torch.float32) * 0.5, randn(Dm, dtype=torch.float32)
    dx_buffer = torch.empty(b, L, wide, device=DEVICE, dtype=torch.bfloat16)
    truth = reference_backward(x.float(), weight, bias, dy.float())()

    impls = {
        "reference (torch autograd, bf16)": reference_backward(
            x, weight.bfloat16(), bias.bfloat16(), dy
        ),
        "ours: custom op": lambda: torch.ops.hybridscale.causal_conv1d_silu_backward(
            x, weight, bias, dy
        ),
        "ours: conv_silu_backward into a slice": lambda: (
            dx_buffer[..., 2048 : 2048 + Dm],
            *conv_silu_backward(x, weight, bias, dy, dx_buffer[..., 2048 : 2048 + Dm]),
        ),
    }
    old = load_baseline(args.baseline) if args.baseline else None
    if old:
        impls[f"baseline: {args.baseline}"] = lambda: old._backward(x, weight, bias, dy)

    minimum_bytes = 3 * b * L * Dm * x.element_size()  # x and dy read, dx written
    reference_ms, failed = None, False
    for name, fn in impls.items():
        grads = fn()  # compiles, autotunes
        ms = do_bench(fn, return_mode="median")
        reference_ms = reference_ms or ms
        abs_err, rel_err = errors(grads, truth)
        row = {"impl": name, "ms": round(ms, 4), "GB/s": round(minimum_bytes / ms / 1e6, 1),
               "vs_reference": round(ms / reference_ms, 3), "max_abs_err": abs_err,
               "max_rel_err": rel_err}  # fmt: skip
        if name.startswith("ours"):
            row["config"] = str(getattr(_conv_bwd, "best_config", None))
            failed |= max(rel_err.values()) > TOL
        print(json.dumps(row), flush=True)

    forwards = {"ours": causal_conv1d_silu}
    if old:
        forwards[f"baseline: {args.baseline}"] = old.causal_conv1d_silu
    y_truth = reference(x.float(), weight, bias)
    forward_bytes = 2 * b * L * Dm * x.element_size()  # x read, y written
    ours_ms = None
    for name, conv in forwards.items():
        fn = functools.partial(conv, x, weight, bias)
        abs_err = (fn().float() - y_truth).abs().max().item()  # compiles, autotunes
        rel_err = abs_err / y_truth.abs().max().item()
        ms = do_bench(fn, return_mode="median")
        ours_ms = ours_ms or ms
        row = {"impl": f"forward, {name}", "ms": round(ms, 4),
               "GB/s": round(forward_bytes / ms / 1e6, 1), "vs_ours": round(ms / ours_ms, 3),
               "max_abs_err": abs_err, "max_rel_err": rel_err}  # fmt: skip
        if name == "ours":
            row["config"] = str(getattr(_conv_fwd, "best_config", None))
            failed |= rel_err > TOL
        print(json.dumps(row), flush=True)
    print(json.dumps({"shape": [b, L, Dm, K], "minimum_MB": minimum_bytes / 1e6,
                      "forward_minimum_MB": forward_bytes / 1e6,
                      "device": torch.cuda.get_device_name()}))  # fmt: skip
    if failed:
        raise SystemExit(f"ours deviate from the fp32 reference by more than {TOL}")


if __name__ == "__main__":
    main()
