"""Training throughput of Transformer, Mamba-2 and hybrid models at equal-ish size,
beside a plain nanoGPT-style Transformer of the same shape (bench/baseline_gpt.py).

Forward + backward + fused AdamW step, bf16 autocast, torch.compile, on the GPU. Prints
one JSON line per model with tokens/s, MFU (training FLOPs per token against the GPU's
dense bf16 peak: 6N + 12 layers d L for attention models, arch.accounting's count for
Mamba layers) and the ratios to the baseline and to our Transformer, all from this run.

    python bench/train_throughput.py [--sizes 125m 350m] [--batch 16] [--steps 20] [--out FILE]
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F
from baseline_gpt import GPT  # bench/, beside this script

from arch.accounting import flops_per_token, param_counts
from arch.config import ModelConfig
from arch.model import HybridLM
from runners.train import peak_flops

DEFAULT_MODELS = ["nanogpt", "transformer", "mamba2", "hybrid"]
SHAPES = {"125m": (768, 12, 24), "350m": (1024, 16, 48)}  # d_model, heads, Transformer layers


def matched(make, target: int) -> ModelConfig:
    """make(n_layers) for the layer count whose parameter count is nearest ``target``: the
    models are compared at equal parameters."""
    candidates = [make(n) for n in range(2, 80)]
    return min(candidates, key=lambda c: abs(param_counts(c)["total"] - target))


def configs(size: str) -> dict[str, ModelConfig]:
    d, heads, n = SHAPES[size]
    common = dict(d_model=d, n_heads=heads, vocab_size=50304, d_state=128, ssm_headdim=64)
    transformer = ModelConfig(
        pattern="*-" * (n // 2), mlp_activation="squared_relu", rotary_fraction=0.5, **common
    )  # fmt: skip
    target = param_counts(transformer)["total"]
    hybrid = dict(attention_ratio=0.08, mlp_ratio=0.5, n_kv_heads=4, mlp_activation="gelu")
    return {
        "transformer": transformer,
        "mamba2": matched(lambda k: ModelConfig(pattern="M" * k, **common), target),
        "hybrid": matched(lambda k: ModelConfig(n_layers=k, **hybrid, **common), target),
    }


def baseline(size: str) -> GPT:
    d, heads, n = SHAPES[size]
    return GPT(vocab=50304, d=d, n_layer=n // 2, heads=heads)


def builds(size: str) -> dict:
    """Model constructors by name: the nanoGPT-style baseline, ours (``configs``), and, asked
    for by --models only: ours with Mamba layers on the PyTorch reference path instead of
    the Triton kernels ("<name>_torch", slow), and our Transformer without RoPE, as the
    baseline has no position embedding ("transformer_nope": what RoPE costs)."""
    models = {"nanogpt": lambda: baseline(size)}
    for name, c in configs(size).items():
        models[name] = lambda c=c: HybridLM(c)
        if "M" in c.pattern:
            torch_path = c.model_copy(update={"ssd_impl": "torch"})
            models[f"{name}_torch"] = lambda c=torch_path: HybridLM(c)
    nope = configs(size)["transformer"].model_copy(update={"rotary_fraction": 0.0})
    models["transformer_nope"] = lambda: HybridLM(nope)
    return models


def train_step(model: torch.nn.Module, batch: int, seq_len: int, compile: bool):
    """One training step of ``model`` (on the GPU) on random tokens, as a closure."""
    torch.manual_seed(0)
    model = model.cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    vocab = model.embedding.num_embeddings
    tokens = torch.randint(0, vocab, (batch, seq_len + 1), device="cuda")
    x, y = tokens[:, :-1], tokens[:, 1:]

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    # Model and loss compiled together, so the fp32 logits are never materialised.
    loss_step = torch.compile(loss_fn) if compile else loss_fn

    def step() -> None:
        loss_step(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure(model: torch.nn.Module, batch: int, seq_len: int, steps: int, compile: bool) -> dict:
    step = train_step(model, batch, seq_len, compile)
    for _ in range(3):  # compile and warm up
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    tok_s = batch * seq_len / seconds
    if isinstance(model, GPT):
        flops, params, pattern = model.flops_per_token(seq_len), model_params(model), "gpt"
    else:
        config = model.config
        flops = flops_per_token(config, seq_len)["training"]
        params, pattern = param_counts(config)["total"], config.pattern
    peak = peak_flops(torch.device("cuda"))
    return {
        "params": params, "pattern": pattern,
        "batch": batch, "seq_len": seq_len, "ms_per_step": 1000 * seconds,
        "tokens_per_s": tok_s, "mfu": tok_s * flops / peak if peak else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30,
    }  # fmt: skip


def measure_robustly(name, build, batch: int, seq_len: int, steps: int, compile: bool) -> dict:
    """Halve the batch until it fits; measure eager (and say so) if compiling fails."""
    while batch >= 1:
        try:
            return {**measure(build(), batch, seq_len, steps, compile), "compiled": compile}
        except torch.cuda.OutOfMemoryError:
            print(f"# {name}: out of memory at batch {batch}")
            batch //= 2
        except Exception as err:  # a compiler failure: retry eager at the same batch
            if not compile:
                raise
            message = str(err).strip().splitlines()
            print(f"# {name}: compile failed: {message[-1] if message else err!r}")
            compile = False
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    return {"error": "out of memory at batch 1"}


def model_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=["125m"])
    parser.add_argument(
        "--models",
        nargs="+",
        default=DEFAULT_MODELS,
        help="any of nanogpt transformer mamba2 hybrid mamba2_torch hybrid_torch transformer_nope",
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    results = []
    compile = not args.no_compile
    for size in args.sizes:
        rates = {}
        for name, build in builds(size).items():
            if name not in args.models:
                continue
            r = measure_robustly(name, build, args.batch, args.seq_len, args.steps, compile)
            rates[name] = r.get("tokens_per_s")
            r = {"size": size, "model": name, **r}
            for ref in ("nanogpt", "transformer", name.removesuffix("_torch")):
                if r.get("tokens_per_s") and rates.get(ref) and ref != name:
                    r[f"vs_{ref}"] = r["tokens_per_s"] / rates[ref]
            print(json.dumps(r), flush=True)
            results.append(r)
            torch.cuda.empty_cache()
            if args.out:  # after every model, so a later crash loses nothing measured
                with open(args.out, "w") as f:
                    json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
