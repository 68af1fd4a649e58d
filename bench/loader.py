"""Loader throughput beside the trainer's consumption, for the preset sizes.

For each size in configs/size/ (the tiny model preset with that shape): the tokens/s the
trainer consumes (forward + backward + AdamW on one batch, bf16 autocast on GPU) and the
tokens/s the loader's one thread draws and delivers to the device (``TrialData.draw``),
corpus windows alone and with probe rows mixed in, measured in this one run. The trainer
draws the next batch on that thread while it trains on this one, so a ratio above 1 means
the loader never keeps the device waiting.

    python bench/loader.py [--sizes tiny small] [--batch 16] [--seq-len 128] [--steps 10]
                           [--tokenizer byte] [--paths 'corpus/*.parquet'] [--out FILE]
"""

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from arch.config import ModelConfig
from arch.model import HybridLM
from data import open_data
from data.config import DataConfig

ROOT = Path(__file__).resolve().parent.parent
PROBES = {"mqar": 0.05, "phonebook": 0.05, "copy": 0.025, "selective_copy": 0.025}


def model_config(size: str, vocab_size: int) -> ModelConfig:
    fields = yaml.safe_load((ROOT / "configs/model/tiny.yaml").read_text())
    fields.update(yaml.safe_load((ROOT / f"configs/size/{size}.yaml").read_text()))
    fields["vocab_size"] = max(fields["vocab_size"], -(-vocab_size // 64) * 64)
    return ModelConfig(**fields)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def trainer_rate(config: ModelConfig, batch: int, seq_len: int, steps: int, device) -> float:
    """Tokens/s of training steps on random tokens."""
    torch.manual_seed(0)
    model = HybridLM(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, config.vocab_size, (batch, seq_len + 1), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            logits = model(tokens[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm up
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return batch * seq_len * steps / (time.perf_counter() - start)


def loader_rate(data, batch: int, steps: int, device) -> float:
    """Tokens/s of batches drawn and moved to the device."""
    data.draw(0, 0, batch)  # warm up (page cache, probe sizes)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        inputs, targets = data.draw(0, step, batch)
        inputs.to(device), targets.to(device)
    sync(device)
    return batch * data.config.seq_len * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tokenizer", default="byte")
    parser.add_argument("--paths", nargs="*", default=[])
    parser.add_argument("--data-dir", default=str(ROOT / "results" / "data"))
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    sizes = args.sizes or (
        ["tiny", "small", "125m", "350m", "760m", "1.3b"] if on_gpu else ["tiny", "small"]
    )
    seq_len = args.seq_len or (2048 if on_gpu else 128)
    name = torch.cuda.get_device_name() if on_gpu else "CPU"
    print(f"device: {name}  batch {args.batch} x seq_len {seq_len}  tokenizer {args.tokenizer}")
    common = dict(paths=args.paths, tokenizer=args.tokenizer, seq_len=seq_len)
    plain = open_data(DataConfig(**common), Path(args.data_dir))
    mixed = open_data(DataConfig(**common, probes=PROBES), Path(args.data_dir))
    loader = {
        "loader_tokens_per_s": loader_rate(plain, args.batch, args.steps * 10, device),
        "loader_probes_tokens_per_s": loader_rate(mixed, args.batch, args.steps * 10, device),
    }
    rows = []
    for size in sizes:
        config = model_config(size, plain.vocab_size)
        try:
            rate = trainer_rate(config, args.batch, seq_len, args.steps, device)
        except torch.cuda.OutOfMemoryError:
            print(json.dumps({"size": size, "error": "out of memory"}))
            torch.cuda.empty_cache()
            continue
        row = {"size": size, "pattern": config.pattern, "trainer_tokens_per_s": rate, **loader}
        row["ratio"] = loader["loader_tokens_per_s"] / rate
        row["ratio_with_probes"] = loader["loader_probes_tokens_per_s"] / rate
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("\n| size | trainer tok/s | loader tok/s | ratio | with probes tok/s | ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['size']} | {r['trainer_tokens_per_s']:,.0f} | "
            f"{r['loader_tokens_per_s']:,.0f} | {r['ratio']:.1f} | "
            f"{r['loader_probes_tokens_per_s']:,.0f} | {r['ratio_with_probes']:.1f} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
