"""Data-parallel trials on Ray Train: one trial spread over several workers (DDP or FSDP).

A trial of W workers is a ``TorchTrainer`` of W ranks in one process group (NCCL on
GPUs, gloo on CPUs). Every rank draws the same (seed, step) global batch and trains on
its slice; the ranks average their gradients, so the loss curve is the one-worker curve
at the same global batch. Each rank holds the whole model (DDP) or, with
``TrainOptions.shard``, 1/W of its weights, gradients and Adam moments (FSDP). Rank 0
alone logs to MLflow and writes the checkpoint every rank resumes from, so the trial
folder must sit on storage every node reaches.

The trainer's own placement group reserves all W workers at once (gang scheduling): a
data-parallel trial never holds some of its GPUs while it waits for the rest.
"""

import json
import os
import uuid
from dataclasses import asdict, replace

import ray
import torch

from data import open_data
from runners.config import TrialConfig
from runners.train import TrainOptions, TrialOutcome, train_trial

# NVLink multicast misbehaves on shared GPUs; keep NCCL off it in every worker.
WORKER_ENV = {"NCCL_NVLS_ENABLE": "0"}
OUTCOME_FILE = "outcome.json"  # rank 0's outcome, read back by the launching task


def _worker_loop(config: dict) -> None:
    """One rank: the ordinary trainer, on the device Ray Train gave this worker."""
    import ray.train.torch

    trial: TrialConfig = config["trial"]
    options: TrainOptions = config["options"]
    device = torch.device(options.device or ray.train.torch.get_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    outcome = train_trial(trial, replace(options, device=str(device)))
    rank = ray.train.get_context().get_world_rank()
    if rank == 0:
        path = options.workdir / trial.trial_id / OUTCOME_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(outcome)))
        os.replace(tmp, path)
    if outcome.status in ("oom", "failed"):
        # Raised on one rank alone, while the others may wait for it in an all-reduce:
        # failing the worker makes Ray Train end them all.
        raise RuntimeError(f"rank {rank} {outcome.status}: {outcome.reason}")


def run_data_parallel(
    trial: TrialConfig, options: TrainOptions, workers: int, use_gpu: bool
) -> TrialOutcome:
    """Train ``trial`` on ``workers`` Ray Train workers (a GPU each when ``use_gpu``):
    rank 0's outcome, or 'crashed' when a worker died first. The scheduler retries a
    crashed, failed or out-of-memory trial from its checkpoint, as it does any other."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    open_data(trial.data, options.data_dir)  # prepared once here: ranks never race to build it
    outcome_path = options.workdir / trial.trial_id / OUTCOME_FILE
    outcome_path.parent.mkdir(parents=True, exist_ok=True)
    outcome_path.unlink(missing_ok=True)  # never mistake an earlier attempt's ending
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"trial": trial, "options": options},
        torch_config=TorchConfig(backend="nccl" if use_gpu and options.device != "cpu" else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, placement_strategy="PACK"
        ),
        run_config=RunConfig(
            name=f"{trial.trial_id}-{uuid.uuid4().hex[:8]}",  # each attempt a fresh run
            storage_path=str((options.workdir / "ray_train").resolve()),
            failure_config=FailureConfig(max_failures=0),  # the scheduler owns retries
            worker_runtime_env={"env_vars": WORKER_ENV},
        ),
    )
    crash = "rank 0 left no outcome"
    try:
        trainer.fit()
    except Exception as err:  # a rank died or failed; rank 0 may still have said why
        crash = (str(err).strip().splitlines() or [type(err).__name__])[-1][:300]
    if outcome_path.exists():
        return TrialOutcome(**json.loads(outcome_path.read_text()))
    return TrialOutcome(trial.trial_id, "crashed", "", reason=crash)


@ray.remote(num_cpus=0)  # holds nothing itself: its workers hold the trial's resources
def data_parallel_task(
    trial: TrialConfig, options: TrainOptions, workers: int, use_gpu: bool
) -> TrialOutcome:
    return run_data_parallel(trial, options, workers, use_gpu)
