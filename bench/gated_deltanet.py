"""The gated delta rule (``G``) on the GPU: fla-core's ``chunk_gated_delta_rule`` (gdn_impl
"fla") against our PyTorch chunked form (gdn_impl "torch"), and both beside our SSD scan
at the same state size, so a spec author knows what a ``G`` layer costs next to an ``M``.

For each sequence length: forward and forward+backward median ms (triton's do_bench), and
the largest deviation of fla's output and gradients from our chunked form's, relative to
the largest entry. q, k, v bf16 (as under autocast), k and q L2-normalised as the layer
feeds them, g = -softplus (log decay), beta = sigmoid. SSD: one group, d_state = d_k,
headdim = d_v, chunk 64 (fla's). Needs CUDA and fla-core (`pip install -e .[fla]`).

    python bench/gated_deltanet.py [--batch 8] [--heads 16] [--seqlens 512 2048 4096]
"""

import argparse
import json

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from arch.kernels.ssd_triton import ssd_chunked_triton
from arch.layers.gated_deltanet import _fla_chunked, gated_delta_rule_chunked


def rule_inputs(batch: int, seqlen: int, heads: int, dim: int) -> dict:
    bf16 = {"device": "cuda", "dtype": torch.bfloat16}
    q = F.normalize(torch.randn(batch, seqlen, heads, dim, device="cuda"), dim=-1) / dim**0.5
    k = F.normalize(torch.randn(batch, seqlen, heads, dim, device="cuda"), dim=-1)
    return {
        "q": q.to(torch.bfloat16), "k": k.to(torch.bfloat16),
        "v": torch.randn(batch, seqlen, heads, dim, **bf16),
        "g": -F.softplus(torch.randn(batch, seqlen, heads, device="cuda") - 2),
        "beta": torch.rand(batch, seqlen, heads, device="cuda").sigmoid(),
    }  # fmt: skip


def ssd_inputs(batch: int, seqlen: int, heads: int, dim: int) -> dict:
    bf16 = {"device": "cuda", "dtype": torch.bfloat16}
    return {
        "x": torch.randn(batch, seqlen, heads, dim, **bf16),
        "dt": torch.randn(batch, seqlen, heads, **bf16) * 0.5 - 2,
        "A": -torch.empty(heads, device="cuda").uniform_(1, 16),
        "B": torch.randn(batch, seqlen, 1, dim, **bf16),
        "C": torch.randn(batch, seqlen, 1, dim, **bf16),
    }


def run(fn, inputs: dict) -> tuple[dict, list[torch.Tensor]]:
    """Times of fn's output (the first, if a tuple) forward and forward+backward, and the
    output and the inputs' gradients."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}

    def forward():
        result = fn(**leaves)
        return result[0] if isinstance(result, tuple) else result

    out = forward()
    dout = torch.randn(out.shape, generator=torch.Generator("cuda").manual_seed(1),
                       device="cuda", dtype=out.dtype)  # fmt: skip
    out.backward(dout)
    values = [out.detach().float()] + [leaf.grad.float() for leaf in leaves.values()]
    with torch.no_grad():
        fwd = do_bench(forward, return_mode="median")
    both = do_bench(lambda: forward().backward(dout), grad_to_none=list(leaves.values()),
                    return_mode="median")  # fmt: skip
    return {"fwd_ms": fwd, "fwd_bwd_ms": both}, values


def deviation(values: list, reference: list) -> float:
    return max(((v - r).abs().max() / r.abs().max()).item()
               for v, r in zip(values, reference, strict=True))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--seqlens", type=int, nargs="+", default=[512, 2048, 4096])
    args = parser.parse_args()
    print(f"# {torch.cuda.get_device_name()}, batch {args.batch}, {args.heads} heads of {args.dim}")
    print("| seqlen | impl | fwd ms | fwd+bwd ms | vs fla fwd+bwd | max rel dev from torch |")
    print("|---|---|---|---|---|---|")
    for seqlen in args.seqlens:
        torch.manual_seed(0)
        shape = (args.batch, seqlen, args.heads, args.dim)
        inputs = rule_inputs(*shape)
        reference, ref_values = run(gated_delta_rule_chunked, inputs)
        fla, fla_values = run(_fla_chunked, inputs)
        ssd, _ = run(lambda **kw: ssd_chunked_triton(**kw, chunk_size=64, dt_softplus=True),
                     ssd_inputs(*shape))  # fmt: skip
        rows = {
            "G fla": (fla, deviation(fla_values, ref_values)),
            "G torch chunked": (reference, 0.0),
            "M ours triton (SSD)": (ssd, None),
        }
        for name, (times, dev) in rows.items():
            ratio = times["fwd_bwd_ms"] / fla["fwd_bwd_ms"]
            dev_text = "" if dev is None else f"{dev:.2e}"
            print(f"| {seqlen} | {name} | {times['fwd_ms']:.3f} | {times['fwd_bwd_ms']:.3f} "
                  f"| {ratio:.2f} | {dev_text} |")  # fmt: skip
            print(json.dumps({"seqlen": seqlen, "impl": name, **times, "dev": dev}))


if __name__ == "__main__":
    main()
