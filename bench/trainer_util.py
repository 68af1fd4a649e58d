"""Is one GPU kept busy by the study's own trainer? The 350M hybrid of
bench/data_parallel.py trained through ``runners.train`` on one GPU, eagerly (studies' default
before compile: auto) and compiled, one after the other: tokens/s (median over the steps after the
first five, from the run's MLflow metrics) and nvidia-smi utilisation while it trained
(between its first and last step). A data-parallel trial's GPUs were ~44% idle while it
trained, eager; this says whether that is the eager loop on one GPU already.

    python bench/trainer_util.py [--steps 40] [--out FILE]
"""

import argparse
import json
import tempfile
from pathlib import Path

from data_parallel import BATCH, MICRO, MODEL_350M, SEQ_LEN, phases, util_while_training
from gpu_util import GpuSampler  # bench/, beside this script
from mlflow.tracking import MlflowClient
from trainer_path import medians, train_steps

from arch.config import ModelConfig


def measure(folder: Path, steps: int, compile: bool) -> dict:
    model = ModelConfig.model_validate(MODEL_350M)
    with GpuSampler() as sampler:
        outcome, uri = train_steps(model, folder, SEQ_LEN, BATCH, steps, lr=1e-3,
                                   micro_batch_size=MICRO, compile=compile)  # fmt: skip
    assert outcome.status == "finished", outcome
    phase = phases(MlflowClient(uri), outcome.run_id)
    return {"compiled": compile, "steps": steps,
            "tokens_per_s": medians(uri, outcome.run_id)["tokens_per_s"],
            "gpu_util_while_training": (util_while_training(sampler, [phase]) or [None])[0],
            "setup_s": phase["setup_s"], "train_s": phase["train_s"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(Path(tmp), args.steps, compile) for compile in (False, True)]
    for row in rows:
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
