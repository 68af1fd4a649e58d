"""Decode speed of Transformer, Mamba-2 and hybrid models of equal size, and the calibrated
cost model of arch/decode_cost.py checked against it.

For each size, model, context and batch: one greedy decode step (model, argmax, token
written back) captured in a CUDA graph over a static cache holding ``context`` tokens,
replayed ``--steps`` times; bf16 weights. Prefill (one prompt of each context) is timed
separately. A configuration that does not fit is a row saying so. The cost model is then
fitted to half the grid (a checkerboard over batch x context) and its predictions printed
beside the other half, with the error; last, its predictions for the paper's 8B models.

    python bench/decode.py --out decode.json          # the whole measurement, ~5 min on an H100
    python bench/decode.py --analyse decode.json      # the fit and tables again, no GPU
    python bench/decode.py --device cpu --sizes tiny --batches 1 2 --contexts 64 128  # smoke
"""

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch
import yaml

from arch.accounting import param_counts
from arch.config import ModelConfig
from arch.decode_cost import (
    Calibration,
    Hardware,
    calibrate,
    decode_step_seconds,
    decode_traffic,
    hardware_named,
)
from arch.model import HybridLM

# d_model, heads, layers (Megatron-LM's count: every M, *, - is one)
SHAPES = {"tiny": (64, 4, 4), "350m": (1024, 16, 48), "1.3b": (2048, 16, 48)}
PAPER_8B = ("transformer_8b", "mamba2_8b", "hybrid_8b")
# The cost model traces the PyTorch decode step, so the calibrated grid runs Mamba-2's state
# update in PyTorch; "+triton" rows run arch/kernels' fused step, measured only.
MODELS = ("transformer", "mamba2", "hybrid", "mamba2+triton", "hybrid+triton")


def configs(size: str) -> dict[str, ModelConfig]:
    """The paper's three architectures at one size: a Transformer (RoPE on half of each
    head, squared ReLU, full multi-head KV), pure Mamba-2, and the 8%-attention, 50%-MLP
    hybrid (4 query heads per KV head, GeLU, no position embedding)."""
    d, heads, n = SHAPES[size]
    common = dict(d_model=d, n_heads=heads, vocab_size=50304, tie_embeddings=False,
                  d_state=128 if d >= 512 else 16, ssm_headdim=64 if d >= 512 else 16)  # fmt: skip
    return {
        "transformer": ModelConfig(pattern="*-" * (n // 2), rotary_fraction=0.5, **common),
        "mamba2": ModelConfig(pattern="M" * n, **common),
        "hybrid": ModelConfig(n_layers=n, attention_ratio=0.08, mlp_ratio=0.5,
                              n_kv_heads=heads // 4, mlp_activation="gelu", **common),
    }  # fmt: skip


def build(config: ModelConfig, name: str, device: torch.device) -> HybridLM:
    with device:
        model = HybridLM(config).to(torch.bfloat16).eval()
    for module in model.modules():
        if hasattr(module, "ssd_impl"):
            module.ssd_impl = "auto" if name.endswith("+triton") else "torch"
    return model


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _cache_bytes(caches: list[dict]) -> int:
    return sum(t.numel() * t.element_size() for c in caches for t in c.values())


def _set_position(caches: list[dict], position: int) -> None:
    for cache in caches:
        if "pos" in cache:
            cache["pos"].fill_(position)


def time_decode(model: HybridLM, batch: int, context: int, steps: int) -> dict:
    """Step time with ``context`` tokens cached. The cache contents do not change the work
    (attention reads every slot, masked), so the cache is set to that position, not
    prefilled; it holds ``steps`` + 2 more slots for the steps themselves."""
    device = model.embedding.weight.device
    kv_len = context + steps + 2
    caches = model.allocate_caches(batch, kv_len)
    token = torch.zeros(batch, 1, dtype=torch.long, device=device)

    def step() -> None:
        logits = model(token, caches)
        token.copy_(logits[:, -1].argmax(-1, keepdim=True))

    with torch.no_grad():
        _set_position(caches, context)
        if device.type == "cuda":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm up off the capture stream, as capture asks
                step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            run = graph.replay
        else:
            graph, run = None, step
        _set_position(caches, context)
        run()  # one untimed replay
        sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            run()
        sync()
        seconds = (time.perf_counter() - start) / steps
    return {"kv_len": kv_len, "step_ms": 1e3 * seconds, "tokens_per_s": batch / seconds,
            "cache_gb": _cache_bytes(caches) / 1e9, "cuda_graph": graph is not None}  # fmt: skip


def time_prefill(model: HybridLM, context: int) -> dict:
    device = model.embedding.weight.device
    prompt = torch.randint(0, model.config.vocab_size, (1, context), device=device)
    caches = model.allocate_caches(1, context)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    with torch.no_grad():
        sync()
        start = time.perf_counter()
        model(prompt, caches)
        sync()
    seconds = time.perf_counter() - start
    return {"prefill_ms": 1e3 * seconds, "prefill_tokens_per_s": context / seconds}


def fits(model: HybridLM, batch: int, kv_len: int) -> tuple[bool, float]:
    """Whether the static cache and the step's scores fit in free GPU memory (and its GB)."""
    c = model.config
    traffic = decode_traffic(c, batch, kv_len)  # reads the KV cache, reads and writes states
    need = traffic["kv_cache"] + (traffic["ssm_state"] + traffic["conv_state"]) / 2
    if "*" in c.pattern:  # the scores, a few bf16 copies
        need += 4 * 2 * batch * c.n_heads * kv_len
    if model.embedding.weight.device.type != "cuda":
        return True, need / 1e9
    free, _ = torch.cuda.mem_get_info()
    return need + 2e9 < free, need / 1e9


def measure(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    print(f"# device: {name}, torch {torch.__version__}", flush=True)
    deadline = time.monotonic() + args.budget_s
    decode_rows, prefill_rows = [], []
    for arch in args.models:  # the fused-kernel variants last: a kernel fault ends the run
        for size in args.sizes:
            config = configs(size)[arch.removesuffix("+triton")]
            model = build(config, arch, device)
            base = {"size": size, "model": arch, "pattern": config.pattern,
                    "params": param_counts(config)["total"]}  # fmt: skip
            for i, context in enumerate(args.contexts):
                row = {**base, "context": context}
                try:
                    if i == 0:
                        time_prefill(model, min(context, 512))  # warm-up
                    row |= time_prefill(model, context)
                except Exception as err:  # out of memory, or anything else: a row saying so
                    row["status"] = _error(err)
                _free()
                prefill_rows.append(row)
            for context in args.contexts:
                for batch in args.batches:
                    row = {**base, "config": config.model_dump(), "batch": batch,
                           "context": context}  # fmt: skip
                    ok, need_gb = fits(model, batch, context + args.steps + 2)
                    if time.monotonic() > deadline:
                        row["status"] = "skipped: time budget"
                    elif not ok:
                        row["status"] = f"out of memory (cache needs {need_gb:.0f} GB)"
                    else:
                        try:
                            if on_gpu:
                                torch.cuda.reset_peak_memory_stats()
                            row |= time_decode(model, batch, context, args.steps)
                            row["status"] = "ok"
                            if on_gpu:
                                row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
                        except Exception as err:
                            row["status"] = _error(err)
                        _free()
                    decode_rows.append(row)
                    print(json.dumps({k: v for k, v in row.items() if k != "config"}), flush=True)
            del model
            _free()
    return {"device": name, "torch": torch.__version__, "steps": args.steps,
            "decode": decode_rows, "prefill": prefill_rows}  # fmt: skip


def _error(err: Exception) -> str:
    if isinstance(err, torch.OutOfMemoryError):
        return "out of memory"
    lines = str(err).strip().splitlines()
    return f"error: {type(err).__name__}: {lines[0] if lines else ''}"


def _measurement(row: dict) -> dict:
    return {"config": row["config"], "batch": row["batch"], "context": row["kv_len"],
            "seconds": row["step_ms"] / 1e3}  # fmt: skip


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(v) for v in r) + " |" for r in rows])


def _split(results: dict) -> tuple[list[dict], list[dict]]:
    """Checkerboard over each model's (batch, context) grid: fit on one colour, hold out
    the other, so every model and size is on both sides."""
    batches = sorted({r["batch"] for r in results["decode"]})
    contexts = sorted({r["context"] for r in results["decode"]})
    fit, held_out = [], []
    for row in results["decode"]:
        if row.get("status") == "ok" and row["model"] in ("transformer", "mamba2", "hybrid"):
            colour = batches.index(row["batch"]) + contexts.index(row["context"])
            row["split"] = "held out" if colour % 2 else "fit"
            (held_out if colour % 2 else fit).append(row)
    return fit, held_out


def _paper_8b() -> dict[str, ModelConfig]:
    root = Path(__file__).resolve().parent.parent / "configs" / "model"
    return {n: ModelConfig(**yaml.safe_load((root / f"{n}.yaml").read_text())) for n in PAPER_8B}


def predict_8b(cal: Calibration, hw: Hardware, memory_gb: float = 80.0) -> list[dict]:
    """Step times of the paper's 8B models (fused kernels, and this repository's step) and
    the speed-up over the Transformer, on a grid and at the largest batch at which the
    Transformer's weights and KV cache fit one GPU at each context."""
    models = _paper_8b()

    def footprint_gb(c: ModelConfig, batch: int, context: int) -> float:
        t = decode_traffic(c, batch, context)  # states are read and written: halve them
        return (t["weights"] + t["kv_cache"] + (t["ssm_state"] + t["conv_state"]) / 2) / 1e9

    def memory_limit(context: int) -> int:
        batch = 1
        while footprint_gb(models["transformer_8b"], batch + 1, context) < memory_gb:
            batch += 1
        return batch

    points = [(b, t, "grid") for t in (4096, 32768, 131072) for b in (1, 8, 64)]
    points += [(memory_limit(t), t, "memory limit") for t in (2048, 8192, 32768, 65536)]
    rows = []
    for batch, context, kind in points:
        row = {"batch": batch, "context": context, "point": kind}
        for name, c in models.items():
            for impl in ("fused", "reference"):
                row[f"{name}_{impl}_ms"] = 1e3 * decode_step_seconds(
                    c, batch, context, cal, hw, impl
                )
            row[f"{name}_gb"] = footprint_gb(c, batch, context)
        for impl in ("fused", "reference"):
            t = row[f"transformer_8b_{impl}_ms"]
            row[f"hybrid_speedup_{impl}"] = t / row[f"hybrid_8b_{impl}_ms"]
            row[f"mamba2_speedup_{impl}"] = t / row[f"mamba2_8b_{impl}_ms"]
        rows.append(row)
    return rows


def context_growth(results: dict, cal: Calibration, hw: Hardware) -> list[list]:
    """The "+triton" rows, never fitted, check the attention term: their SSM step is a
    fused kernel the model does not trace, but it costs the same at every context, so
    the step's growth from the shortest to the longest context is attention's alone."""
    ok = {(r["model"], r["batch"], r["context"]): r for r in results["decode"]
          if r.get("status") == "ok"}  # fmt: skip
    contexts = sorted({context for *_, context in ok})
    rows = []
    for (model, batch, context), short in ok.items():
        long = ok.get((model, batch, contexts[-1]))
        if not model.endswith("+triton") or context != contexts[0] or long is None:
            continue
        config = ModelConfig(**short["config"])
        modelled = [decode_step_seconds(config, batch, r["kv_len"], cal, hw, "reference")
                    for r in (short, long)]  # fmt: skip
        measured = long["step_ms"] - short["step_ms"]
        rows.append([short["size"], model, batch, f"{contexts[0]} -> {contexts[-1]}",
                     f"{measured:.2f}", f"{1e3 * (modelled[1] - modelled[0]):.2f}"])  # fmt: skip
    return rows


def analyse(results: dict) -> dict:
    hw = hardware_named(results["device"])
    fit, held_out = _split(results)
    if not fit:
        print("no successful decode measurements: nothing to calibrate")
        return results
    cal = calibrate([_measurement(r) for r in fit], hw)
    results["calibration"], results["hardware"] = cal.__dict__, hw.__dict__  # Calibration(**...)
    print(f"\n## Calibration on {len(fit)} configurations ({hw.name})\n\n{cal}\n")

    rows, errors = [], []
    for r in results["decode"]:
        status = r.get("status", "")
        if status != "ok":
            rows.append([r["size"], r["model"], r["batch"], r["context"], status, "", "", "", ""])
            continue
        measured = [r["size"], r["model"], r["batch"], r["context"], f"{r['step_ms']:.2f}",
                    f"{r['tokens_per_s']:.0f}", f"{r.get('peak_gb', 0):.1f}"]  # fmt: skip
        if "split" not in r:  # the fused Triton step: measured, not modelled
            rows.append(measured + ["", ""])
            continue
        predicted = 1e3 * decode_step_seconds(
            ModelConfig(**r["config"]), r["batch"], r["kv_len"], cal, hw, "reference"
        )
        error = 100 * (predicted / r["step_ms"] - 1)
        r["predicted_ms"], r["error_pct"] = predicted, error
        if r["split"] == "held out":
            errors.append(abs(error))
        rows.append(measured + [f"{predicted:.2f}", f"{error:+.0f}% ({r['split']})"])
    print("## Decode step (CUDA graph, bf16)\n")
    print(_table(["size", "model", "batch", "context", "ms/step", "tokens/s", "peak GB",
                  "model ms", "error"], rows))  # fmt: skip
    if errors:
        results["held_out_error_pct"] = {"mean": statistics.mean(errors), "max": max(errors),
                                         "n": len(errors)}  # fmt: skip
        print(f"\nheld-out |error|: mean {statistics.mean(errors):.1f}%, "
              f"max {max(errors):.1f}% over {len(errors)} configurations")  # fmt: skip
    growth = context_growth(results, cal, hw)
    if growth:
        print("\n## Step growth with context, fused-SSM rows (attention only; not fitted)\n")
        print(_table(["size", "model", "batch", "context", "measured ms", "model ms"], growth))

    print("\n## Measured decode speed-up over the Transformer (step time ratio)\n")
    step = {(r["model"], r["size"], r["batch"], r["context"]): r for r in results["decode"]}
    others = sorted({r["model"] for r in results["decode"]} - {"transformer"})
    speedups = []
    for (arch, size, batch, context), r in step.items():
        if arch != "transformer":
            continue
        cells = []
        for other in others:
            o = step.get((other, size, batch, context), {})
            if r.get("status") == "ok" and o.get("status") == "ok":
                cells.append(f"{r['step_ms'] / o['step_ms']:.2f}x")
            else:
                cells.append(o.get("status", "") if r.get("status") == "ok" else "")
        ms = f"{r['step_ms']:.2f}" if r.get("status") == "ok" else r.get("status", "")
        speedups.append([size, batch, context, ms, *cells])
    print(_table(["size", "batch", "context", "Transformer ms", *others], speedups))

    print("\n## Prefill (batch 1)\n")
    print(_table(["size", "model", "context", "ms", "tokens/s"], [
        [r["size"], r["model"], r["context"], f"{r['prefill_ms']:.1f}",
         f"{r['prefill_tokens_per_s']:.0f}"] if "prefill_ms" in r
        else [r["size"], r["model"], r["context"], r.get("status", ""), ""]
        for r in results["prefill"]
    ]))  # fmt: skip

    predictions = predict_8b(cal, hw)
    results["predictions_8b"] = predictions
    print(f"\n## Predicted 8B decode step ({hw.name}, calibrated): fused kernels / ours\n")
    print(_table(
        ["batch", "context", "point", "Transformer ms", "hybrid ms", "Mamba-2 ms",
         "hybrid speed-up", "Mamba-2 speed-up", "Transformer GB"],
        [[p["batch"], p["context"], p["point"],
          f"{p['transformer_8b_fused_ms']:.1f} / {p['transformer_8b_reference_ms']:.1f}",
          f"{p['hybrid_8b_fused_ms']:.1f} / {p['hybrid_8b_reference_ms']:.1f}",
          f"{p['mamba2_8b_fused_ms']:.1f} / {p['mamba2_8b_reference_ms']:.1f}",
          f"{p['hybrid_speedup_fused']:.1f}x / {p['hybrid_speedup_reference']:.1f}x",
          f"{p['mamba2_speedup_fused']:.1f}x / {p['mamba2_speedup_reference']:.1f}x",
          f"{p['transformer_8b_gb']:.0f}"] for p in predictions],
    ))  # fmt: skip
    at_limit = [p["hybrid_speedup_fused"] for p in predictions if p["point"] == "memory limit"]
    print(f"\nhybrid speed-up (fused) with the Transformer at its 80 GB memory limit: "
          f"{min(at_limit):.1f}x to {max(at_limit):.1f}x; the paper: 'up to 8x'")  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["350m", "1.3b"], choices=list(SHAPES))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--contexts", nargs="+", type=int,
                        default=[1024, 4096, 16384, 32768, 65536])  # fmt: skip
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps")
    parser.add_argument("--budget-s", type=float, default=300,
                        help="no decode measurement starts after this many seconds")  # fmt: skip
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--analyse", help="re-analyse a JSON written by --out; no measuring")
    parser.add_argument(
        "--measure-only",
        action="store_true",
        help="skip the cost model's fit and tables (then --analyse the JSON)",
    )
    args = parser.parse_args()
    if args.analyse:
        results = json.loads(Path(args.analyse).read_text())
    else:
        results = measure(args)
    if not args.measure_only:
        results = analyse(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
