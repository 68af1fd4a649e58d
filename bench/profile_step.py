"""Where a training step's GPU time goes: the kernels of one compiled step of the
throughput benchmark's models, grouped (matmuls, attention, our Triton kernels, Inductor's
fused elementwise kernels, ...), the top kernels by time, and the graph breaks.

    python bench/profile_step.py [--size 350m] [--models nanogpt transformer hybrid] [--top 20]
"""

import argparse
from collections import defaultdict

import torch
from gpu_util import kernel_times  # bench/, beside these scripts
from train_throughput import baseline, ours, train_step

from arch.model import HybridLM

# Kernel-name fragments to group by, first match wins.
GROUPS = {
    "attention": ("flash", "fmha", "sdpa", "attention"),
    "matmul": ("gemm", "nvjet", "cutlass", "xmma", "sm90_"),
    "ssd (ours)": ("_chunk_", "_state_", "_dt_cumsum", "_gate_bwd"),
    "conv/norm (ours)": ("_conv_", "_norm_fwd", "_norm_bwd"),
    "inductor fused": ("triton_",),
    "optimizer": ("adam",),
}


def group_of(name: str) -> str:
    low = name.lower()
    return next((g for g, keys in GROUPS.items() if any(k in low for k in keys)), "other")


def report(title: str, kernels: dict[str, float], top: int = 20) -> None:
    """Kernel time by group, then the ``top`` kernels."""
    total = sum(kernels.values())
    groups = defaultdict(float)
    for name, ms in kernels.items():
        groups[group_of(name)] += ms
    print(f"\n## {title}: {total:.2f} ms of kernels")
    for group, ms in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {group:18s} {ms:8.3f} ms  {100 * ms / total:5.1f}%")
    for name, ms in sorted(kernels.items(), key=lambda kv: -kv[1])[:top]:
        print(f"    {ms:8.3f} ms {100 * ms / total:5.1f}%  {name[:110]}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="350m")
    parser.add_argument("--models", nargs="+", default=["nanogpt", "transformer", "hybrid"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--top", type=int, default=20, help="how many kernels to list")
    args = parser.parse_args()
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    models = {"nanogpt": lambda: baseline(args.size)}
    models |= {name: lambda c=c: HybridLM(c) for name, c in ours(args.size).items()}
    for name in args.models:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        step = train_step(models[name](), args.batch, args.seq_len, compile=True)
        for _ in range(3):  # compile and warm up
            step()
        breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
        report(f"{name} {args.size}, one step, {breaks} graph breaks", kernel_times(step), args.top)
        del step
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
