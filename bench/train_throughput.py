"""Training throughput of Transformer, Mamba-2 and hybrid models at equal-ish size, each
trained by the study's own trainer (runners.train, through bench/trainer_path.py) with the
study's defaults, beside a plain nanoGPT-style Transformer of the same shape in its own
compiled loop (bench/baseline_gpt.py): the figures a study gets, in one run.

Prints one JSON line per measurement, then a table: tokens/s (median over the steps after
the first five), MFU (training FLOPs per token against the GPU's dense bf16 peak: 6N + 12
layers d L for attention models, arch.accounting's count for Mamba layers), the first
step's seconds (compiling, autotuning) and ratios to the baseline, to our Transformer at
the same compile setting and to the same model eager.

    python bench/train_throughput.py [--sizes 125m 350m d224x16] [--batch 16]
        [--seq-len 2048] [--steps 20] [--compile auto true false graphs] [--models ...]
        [--work DIR] [--out FILE] [--gaps DIR]

--compile: training.compile of our models, several to compare (auto: what a study does).
--work: data, compile and autotune caches, shared by the runs that name it (default: a
fresh temporary folder).
--gaps: also trace 3 steps of each model (after its timed steps, so the trace's cost is not
in the tokens/s) into DIR, and report the share of a step the GPU sat idle between
kernels (bench/trace_summary.py): where a loop loses time to its host.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from baseline_gpt import GPT  # bench/, beside this script
from torch.profiler import ProfilerActivity, profile
from trace_summary import summarize
from trainer_path import TRACED, WARMUP, medians, train_steps

from arch.accounting import param_counts
from arch.config import ModelConfig
from runners.train import peak_flops

DEFAULT_MODELS = ["nanogpt", "transformer", "mamba2", "hybrid"]
# d_model, heads, Transformer layers, and the rest of the shape: the paper's at 125M and
# 350M; scaling_1gpu's (byte vocabulary, small SSM heads) at its sizes s3 and s5, where a
# step is bound by launching kernels.
_PAPER = {"vocab_size": 50304, "d_state": 128, "ssm_headdim": 64}
_SCALING_1GPU = {"vocab_size": 264, "d_state": 64, "ssm_headdim": 32, "chunk_size": 64}
SHAPES = {
    "125m": (768, 12, 24, _PAPER),
    "350m": (1024, 16, 48, _PAPER),
    "d128x12": (128, 4, 12, _SCALING_1GPU),
    "d224x16": (224, 7, 16, _SCALING_1GPU),
    # Between the scaling studies' shapes and 125M: where CUDA graphs stop paying.
    "d384x16": (384, 6, 16, _SCALING_1GPU),
    "d512x16": (512, 8, 16, _SCALING_1GPU),
    "d768x16": (768, 12, 16, _SCALING_1GPU),
}


def matched(make, target: int) -> ModelConfig:
    """make(n_layers) for the layer count whose parameter count is nearest ``target``: the
    models are compared at equal parameters."""
    candidates = [make(n) for n in range(2, 80)]
    return min(candidates, key=lambda c: abs(param_counts(c)["total"] - target))


def configs(size: str) -> dict[str, ModelConfig]:
    d, heads, n, rest = SHAPES[size]
    common = dict(d_model=d, n_heads=heads, **rest)
    transformer = ModelConfig(
        pattern="*-" * (n // 2), mlp_activation="squared_relu", rotary_fraction=0.5, **common
    )  # fmt: skip
    target = param_counts(transformer)["total"]
    hybrid = dict(attention_ratio=0.08, mlp_ratio=0.5, mlp_activation="gelu")
    hybrid["n_kv_heads"] = 4 if heads % 4 == 0 else heads
    return {
        "transformer": transformer,
        "mamba2": matched(lambda k: ModelConfig(pattern="M" * k, **common), target),
        "hybrid": matched(lambda k: ModelConfig(n_layers=k, **hybrid, **common), target),
    }


def baseline(size: str) -> GPT:
    d, heads, n, rest = SHAPES[size]
    return GPT(vocab=rest["vocab_size"], d=d, n_layer=n // 2, heads=heads)


def ours(size: str) -> dict[str, ModelConfig]:
    """Our models by name (``configs``), and, asked for by --models only: ours with Mamba
    layers on the PyTorch reference path instead of the Triton kernels ("<name>_torch",
    slow), and our Transformer without RoPE, as the baseline has no position embedding
    ("transformer_nope": what RoPE costs)."""
    models = dict(configs(size))
    for name, c in configs(size).items():
        if "M" in c.pattern:
            models[f"{name}_torch"] = c.model_copy(update={"ssd_impl": "torch"})
    models["transformer_nope"] = models["transformer"].model_copy(update={"rotary_fraction": 0.0})
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
        # As nanoGPT's train.py and our trainer (grad_clip 1.0, the paper's): a pass over
        # every gradient, part of a step's cost since 2026-12-07 (earlier rows left it out).
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure(model: GPT, batch: int, seq_len: int, steps: int, compile: bool,
            trace: Path | None = None) -> dict:  # fmt: skip
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
    if trace:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(TRACED):
                step()
            torch.cuda.synchronize()
        prof.export_chrome_trace(str(trace))
    tok_s = batch * seq_len / seconds
    peak = peak_flops(torch.device("cuda"))
    return {
        "params": sum(p.numel() for p in model.parameters()), "pattern": "gpt",
        "batch": batch, "seq_len": seq_len, "tokens_per_s": tok_s,
        "mfu": tok_s * model.flops_per_token(seq_len) / peak if peak else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30,
    }  # fmt: skip


def measure_baseline(size: str, batch: int, seq_len: int, steps: int,
                     trace: Path | None = None) -> dict:  # fmt: skip
    """The baseline, compiled as nanoGPT trains; the batch halved until it fits, eager
    (and saying so) if compiling fails."""
    compile = True
    while batch >= 1:
        try:
            row = measure(baseline(size), batch, seq_len, steps, compile, trace)
            return {**row, "compile": compile}
        except torch.cuda.OutOfMemoryError:
            print(f"# nanogpt: out of memory at batch {batch}")
            batch //= 2
        except Exception as err:  # a compiler failure: retry eager at the same batch
            if not compile:
                raise
            message = str(err).strip().splitlines()
            print(f"# nanogpt: compile failed: {message[-1] if message else err!r}")
            compile = False
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    return {"error": "out of memory at batch 1"}


def measure_ours(config: ModelConfig, work: Path, batch: int, seq_len: int, steps: int,
                 compile: str | bool, trace: Path | None = None) -> dict:  # fmt: skip
    """One trial through the trainer, the batch halved until it fits. With ``trace``,
    TRACED + 1 steps more, out of the medians: the traced ones, then the last."""
    untimed = TRACED + 1 if trace else 0
    while batch >= 1:
        total = steps + WARMUP + untimed
        outcome, uri = train_steps(config, work, seq_len, batch, total, trace, compile=compile)
        if outcome.status == "finished":
            return {"params": param_counts(config)["total"], "pattern": config.pattern,
                    "batch": batch, "seq_len": seq_len, "compile": compile,
                    **medians(uri, outcome.run_id, untimed)}  # fmt: skip
        if outcome.status != "oom":
            return {"compile": compile, "error": f"{outcome.status}: {outcome.reason[:200]}"}
        print(f"# {config.pattern[:16]}: out of memory at batch {batch}")
        batch //= 2
        torch.cuda.empty_cache()
    return {"compile": compile, "error": "out of memory at batch 1"}


def idle_share(trace: Path) -> dict:
    """A traced step's milliseconds and the share of them no kernel ran."""
    try:
        gaps = summarize(trace)
    except SystemExit as err:  # nothing on a GPU traced: say so, keep the row
        return {"gaps_error": str(err)}
    return {"step_ms": gaps["span_ms"], "gpu_idle": gaps["idle_ms"] / gaps["span_ms"]}


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each row's tokens/s against the baseline and our Transformer of its size (the latter
    at its compile setting), and against the same model eager."""
    rate = {(r["size"], r["model"], r.get("compile")): r.get("tokens_per_s") for r in rows}
    out = []
    for r in rows:
        refs = {"nanogpt": (r["size"], "nanogpt", True),
                "transformer": (r["size"], "transformer", r.get("compile")),
                "eager": (r["size"], r["model"], False)}  # fmt: skip
        ratios = {
            f"vs_{name}": r["tokens_per_s"] / rate[key]
            for name, key in refs.items()
            if r.get("tokens_per_s")
            and rate.get(key)
            and key != (r["size"], r["model"], r.get("compile"))
        }
        out.append({**r, **ratios})
    return out


COLUMNS = ["size", "model", "compile", "params", "batch", "tokens_per_s", "mfu", "first_step_s",
           "vs_nanogpt", "vs_transformer", "vs_eager", "peak_memory_gb", "gpu_idle",
           "error"]  # fmt: skip


def table(rows: list[dict]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}" if v < 100 else f"{v:,.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def setting(text: str) -> str | bool:
    return {"true": True, "false": False}.get(text, text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=["125m"], choices=list(SHAPES))
    parser.add_argument(
        "--models",
        nargs="+",
        default=DEFAULT_MODELS,
        help="any of nanogpt transformer mamba2 hybrid mamba2_torch hybrid_torch transformer_nope",
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compile", nargs="+", type=setting, default=["auto"],
                        choices=["auto", True, False, "graphs"])  # fmt: skip
    parser.add_argument("--work", type=Path)
    parser.add_argument("--out")
    parser.add_argument("--gaps", type=Path, help="trace 3 steps of each model into this folder")
    args = parser.parse_args()
    if args.gaps:
        args.gaps.mkdir(parents=True, exist_ok=True)
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="train_throughput-"))
    rows = []
    for size in args.sizes:
        todo = [("nanogpt", None)] if "nanogpt" in args.models else []
        todo += [(name, c) for name, c in ours(size).items() if name in args.models]
        for name, config in todo:
            for compile in [True] if config is None else args.compile:
                trace = args.gaps / f"{size}_{name}_{compile}.json" if args.gaps else None
                if config is None:
                    r = measure_baseline(size, args.batch, args.seq_len, args.steps, trace)
                else:
                    r = measure_ours(config, work, args.batch, args.seq_len, args.steps, compile,
                                     trace)  # fmt: skip
                if trace and trace.exists():
                    r |= idle_share(trace)
                rows.append({"size": size, "model": name, **r})
                print(json.dumps(rows[-1]), flush=True)
                torch.cuda.empty_cache()
                if args.out:  # after every model, so a later crash loses nothing measured
                    Path(args.out).write_text(json.dumps(with_ratios(rows), indent=1))
    print(table(with_ratios(rows)))


if __name__ == "__main__":
    main()
