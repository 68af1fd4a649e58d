"""Data-parallel trials on Ray Train: one trial spread over several workers (DDP or FSDP).

A trial of W workers is trained by W ranks in one process group (NCCL on GPUs, gloo on
CPUs). Every rank draws the same (seed, step) global batch and trains on its slice; the
ranks average their gradients, so the loss curve is the one-worker curve at the same
global batch. Each rank holds the whole model (DDP) or, with ``TrainOptions.shard``, 1/W
of its weights, gradients and Adam moments (FSDP). Rank 0 alone logs to MLflow and writes
the checkpoint every rank resumes from, so the trial folder must sit on storage every
node reaches.

The ranks are a ``WorkerGroup``: one ``TorchTrainer`` whose workers train the trials
handed to the group one after another, so a study's data-parallel trials after the first
skip Ray Train's start-up (its controller, placement group, worker processes and process
group: 13-17 s a trial on the GPU machine). The trainer's placement group reserves all W
workers at once (gang scheduling): a group never holds some of its GPUs while it waits
for the rest.
"""

import contextlib
import gc
import threading
import uuid
from dataclasses import replace

import ray
import torch

from data import open_data
from records.trial_run import NODE_TAG
from runners.config import TrialConfig
from runners.train import TrainOptions, TrialOutcome, train_trial

# NVLink multicast misbehaves on shared GPUs; keep NCCL off it in every worker.
WORKER_ENV = {"NCCL_NVLS_ENABLE": "0"}
BROKEN = ("oom", "failed", "crashed")  # outcomes after which a group is not trusted again


def _worker_loop(config: dict) -> None:
    """One rank: the ordinary trainer, on the device Ray Train gave this worker, for each
    trial the group hands out, until it is closed."""
    import ray.train.torch

    group = config["group"]
    rank = ray.train.get_context().get_world_rank()
    done = 0
    while (job := ray.get(group.next_trial.remote(done))) is not None:
        trial, options = job
        device = torch.device(options.device or ray.train.torch.get_device())
        if device.type == "cuda":
            torch.cuda.set_device(device)
        where = {NODE_TAG: ray.get_runtime_context().get_node_id()}
        options = replace(options, device=str(device), tags={**options.tags, **where})
        outcome = train_trial(trial, options)
        if rank == 0:
            ray.get(group.report.remote(done, outcome))
        if outcome.status in BROKEN:
            # Raised on one rank alone, while the others may wait for it in an all-reduce:
            # failing the worker makes Ray Train end them all.
            raise RuntimeError(f"rank {rank} {outcome.status}: {outcome.reason}")
        done += 1
        # The next trial starts with memory of its own (train_trial drops its graphs).
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


@ray.remote(num_cpus=0)  # holds nothing itself: its workers hold the trials' resources
class WorkerGroup:
    """``workers`` Ray Train workers (a GPU each when ``use_gpu``) that train the trials
    handed to ``train`` one at a time. A trial that fails, runs out of memory or loses a
    worker ends the group: start another for its retry."""

    def __init__(self, workers: int, use_gpu: bool, backend: str, storage: str) -> None:
        self.trials: list[tuple[TrialConfig, TrainOptions]] = []
        self.outcomes: dict[int, TrialOutcome] = {}
        self.closed, self.ended = False, None  # ended: why the workers stopped, once they have
        self.changed = threading.Condition()
        config = {"group": ray.get_runtime_context().current_actor}
        self.fit = threading.Thread(
            target=self._fit, args=(config, workers, use_gpu, backend, storage), daemon=True
        )
        self.fit.start()

    def _fit(self, config: dict, workers: int, use_gpu: bool, backend: str, storage: str):
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        trainer = TorchTrainer(
            _worker_loop,
            train_loop_config=config,
            torch_config=TorchConfig(backend=backend),
            scaling_config=ScalingConfig(
                num_workers=workers, use_gpu=use_gpu, placement_strategy="PACK"
            ),
            run_config=RunConfig(
                name=f"group-{uuid.uuid4().hex[:8]}",
                storage_path=storage,
                failure_config=FailureConfig(max_failures=0),  # the scheduler owns retries
                worker_runtime_env={"env_vars": WORKER_ENV},
            ),
        )
        ended = "rank 0 left no outcome"
        try:
            trainer.fit()
        except Exception as err:  # a rank died or failed; rank 0 may still have said why
            ended = (str(err).strip().splitlines() or [type(err).__name__])[-1][:300]
        with self.changed:
            self.ended = ended
            self.changed.notify_all()

    def train(self, trial: TrialConfig, options: TrainOptions) -> TrialOutcome:
        """Train ``trial`` on the group's workers: rank 0's outcome, or 'crashed' when the
        workers stopped first."""
        with self.changed:
            index = len(self.trials)
            self.trials.append((trial, options))
            self.changed.notify_all()
            self.changed.wait_for(lambda: index in self.outcomes or self.ended is not None)
        if index in self.outcomes:
            return self.outcomes[index]
        return TrialOutcome(trial.trial_id, "crashed", "", reason=self.ended)

    def next_trial(self, index: int) -> tuple[TrialConfig, TrainOptions] | None:
        """For each rank: the ``index``-th trial handed to the group, once it is; None once
        the group is closed."""
        with self.changed:
            self.changed.wait_for(lambda: len(self.trials) > index or self.closed)
            return self.trials[index] if len(self.trials) > index else None

    def report(self, index: int, outcome: TrialOutcome) -> None:
        with self.changed:
            self.outcomes[index] = outcome
            self.changed.notify_all()

    def close(self) -> None:
        """Let the workers finish and end; returns once they have (their resources free)."""
        with self.changed:
            self.closed = True
            self.changed.notify_all()
        self.fit.join()


def start_group(workers: int, use_gpu: bool, options: TrainOptions):
    """A ``WorkerGroup`` for trials run with ``options`` (its storage and device)."""
    backend = "nccl" if use_gpu and options.device != "cpu" else "gloo"
    storage = str((options.workdir / "ray_train").resolve())
    # Room for train, close and every rank's next_trial and report to wait at once.
    return WorkerGroup.options(max_concurrency=2 * workers + 4).remote(
        workers, use_gpu, backend, storage
    )


class GroupPool:
    """A study's worker groups: each running data-parallel trial's, and those whose trial
    ended well, kept for the next trial of as many workers until ``close_idle``.

    Groups end by closing, never by ``ray.kill`` while their workers run (but on Ctrl-C):
    Ray Train frees a placement group whose controller was killed only through the
    dashboard's state API, and a study's Ray runs without a dashboard."""

    def __init__(self, use_gpu: bool) -> None:
        self.use_gpu = use_gpu
        self.running: dict[str, tuple[int, object]] = {}  # trial id -> (workers, group)
        self.idle: list[tuple[int, object]] = []
        self.closing: list = []  # closed groups, maybe still freeing their resources

    def train(self, trial: TrialConfig, options: TrainOptions, workers: int):
        """``trial`` on an idle group of ``workers`` workers, or a new one: its outcome's ref."""
        group = next((g for n, g in self.idle if n == workers), None)
        if group is None:
            group = start_group(workers, self.use_gpu, options)
        else:
            self.idle.remove((workers, group))
        self.running[trial.trial_id] = (workers, group)
        return group.train.options(max_task_retries=0).remote(trial, options)

    def ended(self, trial_id: str, outcome: TrialOutcome) -> None:
        """The trial's group is idle or, after a broken trial, ended: never trusted again,
        and gone before the trial's retry asks for its resources."""
        workers, group = self.running.pop(trial_id)
        if outcome.status in BROKEN:
            end_group(group)
        else:
            self.idle.append((workers, group))

    def close_idle(self) -> None:
        """Idle groups end, freeing their GPUs (in the background)."""
        while self.idle:
            group = self.idle.pop()[1]
            self.closing.append((group, group.close.remote()))

    def close(self) -> None:
        """Every group ends once its trial has; returns when all have."""
        self.close_idle()
        for group, closed in self.closing:
            end_group(group, closed)
        self.closing = []

    def kill(self) -> None:
        """Every group ends now, its trials with it (they resume from their checkpoints);
        only Ray's shutdown frees their placement groups."""
        for _, group in [*self.running.values(), *self.idle]:
            ray.kill(group)
        for group, _ in self.closing:
            ray.kill(group)


def end_group(group, closed=None) -> None:
    """Close ``group`` (or wait for its ``closed`` ref) and end its process: its workers
    have ended and freed their resources, unless the group itself died first."""
    with contextlib.suppress(ray.exceptions.RayActorError):
        ray.get(closed or group.close.remote())
    ray.kill(group)


def run_data_parallel(
    trial: TrialConfig, options: TrainOptions, workers: int, use_gpu: bool
) -> TrialOutcome:
    """Train ``trial`` on a group of its own of ``workers`` workers, then end the group."""
    open_data(trial.data, options.data_dir)  # prepared once here: ranks never race to build it
    group = start_group(workers, use_gpu, options)
    try:
        return ray.get(group.train.remote(trial, options))
    finally:
        end_group(group)
