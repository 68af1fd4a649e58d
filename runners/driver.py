"""The one Ray driver under studies and searches: it starts or joins Ray, packs trials onto
the cluster by what each holds (CPUs, GPUs or a GPU's share, data-parallel workers),
submits them, collects their outcomes, retries crashed ones from their checkpoints, and
on Ctrl-C has the running ones checkpoint. Which trials to run, and what to do with their
outcomes, is the policy's: runners.scheduler (a study) or runners.search (a search).
"""

import logging
import math
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import ray
from mlflow.tracking import MlflowClient

from arch.accounting import param_counts
from records.store import default_tracking_uri
from records.trial_run import GPU_IDS_TAG, GPU_SHARE_TAG, NODE_TAG, STUDY_TAG, end_live_runs
from runners.checkpoint import trials_dir
from runners.config import TrialConfig
from runners.distributed import BROKEN, GroupPool
from runners.spec import Resources
from runners.train import TrainOptions, TrialOutcome, train_trial

ROOT = Path(__file__).resolve().parent.parent  # the project, shipped to a cluster's workers
log = logging.getLogger(__name__)


@dataclass
class StudyOptions:
    """How a study's or search's trials run (not what they are)."""

    results_dir: Path = Path("results")
    tracking_uri: str | None = None  # default: sqlite store in results_dir
    checkpoint_dir: Path | None = None  # default: results_dir / study / trials
    address: str | None = None  # an existing Ray cluster; default: RAY_ADDRESS or local
    max_retries: int = 2
    device: str | None = None
    cpus: int | None = None  # CPUs of the local Ray (default: all); ignored on a cluster
    gpus_per_trial: float | None = None  # default: a share estimated from each trial's memory
    checkpoint_every_s: float = 600.0  # a running trial's checkpoints (see TrainOptions)
    profile_steps: tuple[int, int] | None = None  # steps every trial traces (see TrainOptions)

    def uri(self) -> str:
        return self.tracking_uri or default_tracking_uri(self.results_dir)

    def train_options(self, study: str, parent_run_id: str) -> TrainOptions:
        """Options for a trial of ``study``; paths absolute, as workers run elsewhere."""
        results = self.results_dir.resolve()
        return TrainOptions(
            workdir=(self.checkpoint_dir or trials_dir(results, study)).resolve(),
            tracking_uri=self.uri(), data_dir=results / "data", experiment=study,
            device=self.device, checkpoint_every_s=self.checkpoint_every_s,
            profile_steps=self.profile_steps, cache_dir=results / "cache",
            parent_run_id=parent_run_id, tags={STUDY_TAG: study},
            log_every=10,  # many trials share one store: don't write it every step
        )  # fmt: skip


def gpu_fraction(trial: TrialConfig, gpu_memory_gb: float) -> float:
    """A GPU share from the trial's estimated memory: weights, grads and Adam moments
    (16 bytes a parameter) plus activations (about 34 bytes per token per d_model per
    layer in bf16), doubled for headroom, rounded up to an eighth of a GPU."""
    params = param_counts(trial.model)["total"]
    micro = trial.training.micro_batch_size or trial.training.batch_size
    activations = 34 * micro * trial.data.seq_len * trial.model.d_model * trial.model.n_layers
    need_gb = 2 * (16 * params + activations) / 2**30
    return min(1.0, max(1, -(-need_gb * 8 // gpu_memory_gb)) / 8)


def trial_demand(
    trial: TrialConfig, workers: int, gpus: float, gpu_memory_gb: float, options: StudyOptions
) -> dict[str, float]:
    """What a trial holds while it runs: a CPU per worker and, on a GPU cluster, a whole
    GPU per data-parallel worker or a share of one GPU for a single-worker trial."""
    if not gpus:
        return {"CPU": workers}
    if workers > 1:
        return {"CPU": workers, "GPU": workers}
    return {"CPU": 1, "GPU": options.gpus_per_trial or gpu_fraction(trial, gpu_memory_gb)}


def spread_share(share: float, trials: int, whole_gpus: float) -> float:
    """The GPU share of each of ``trials`` single-GPU trials about to start on
    ``whole_gpus`` idle GPUs. Ray places shares first-fit, so trials of an eighth of a GPU
    would all land on GPU 0 while the others idle; shares of 1/n put n on each GPU, over
    as many GPUs as it takes. Never below the trial's own ``share``; on one GPU, just that:
    there is nothing to spread over, and a larger share would leave no room for trials
    that come later (a budget branched from a running trunk waited out its trunk so)."""
    if whole_gpus < 2:
        return share
    per_gpu = max(1, math.ceil(trials / math.floor(whole_gpus)))
    return max(share, 1 / per_gpu)


@ray.remote
def run_remote(trial: TrialConfig, options: TrainOptions) -> TrialOutcome:
    # NVLink multicast misbehaves on shared GPUs; keep NCCL off it in every worker.
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    # Ctrl-C reaches a trial as Ray's cancel, a simulated SIGINT that Python drops where
    # SIGINT is ignored, as in a worker of a Ray started in the background by a script.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    where = {NODE_TAG: ray.get_runtime_context().get_node_id()}
    gpus = ",".join(str(i) for i in ray.get_gpu_ids())  # where Ray put it: on its run
    if gpus:
        where[GPU_IDS_TAG] = gpus
    return train_trial(trial, replace(options, tags={**options.tags, **where}))


def collect(ref, trial: TrialConfig) -> TrialOutcome:
    """The trial's outcome, with a dead worker (killed process or node) as 'crashed'."""
    try:
        return ray.get(ref)
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as err:
        return TrialOutcome(trial.trial_id, "crashed", "", reason=type(err).__name__)
    except ray.exceptions.RayError as err:
        reason = str(err).strip().splitlines()[-1][:300]
        return TrialOutcome(trial.trial_id, "crashed", "", reason=reason)


def start_ray(options: StudyOptions) -> None:
    if ray.is_initialized():
        return
    address = options.address or os.environ.get("RAY_ADDRESS")
    # Workers must import this project: ship its folder when the cluster is remote.
    env = {"working_dir": str(ROOT), "excludes": ["results", ".venv", ".git"]} if address else {}
    cpus = None if address else options.cpus
    # "local": a Ray of our own. Given None, Ray would silently join whatever Ray another
    # process last started on this machine, with that process's workers and signals.
    ray.init(address=address or "local", num_cpus=cpus, runtime_env=env or None,
             log_to_driver=False, include_dashboard=False, configure_logging=False)  # fmt: skip
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _keep_raylet_errors_off_stdout()


def _keep_raylet_errors_off_stdout() -> None:
    """Ray prints the raylet's errors, such as its many lines on a worker that died, to the
    driver's stdout, amid the progress lines that already say a trial crashed and is
    retried; they go to this module's log instead. Ray offers no switch for it."""
    import ray._private.worker as ray_worker

    shown = ray_worker.print_to_stdstream

    def print_unless_raylet(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") == "raylet":
            log.info("raylet: %s", " ".join(data.get("lines", [])))
        else:
            shown(data, ignore_prefix)

    ray_worker.print_to_stdstream = print_unless_raylet


def _end_live_runs(job: "Job", status: str, reason: str) -> None:
    client = MlflowClient(job.train.tracking_uri)
    end_live_runs(client, job.train.experiment, job.trial.trial_id, status, reason)


def gpu_size_gb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 2**30
    return 80.0  # the driver has no GPU but the cluster has: assume an 80 GB part


@dataclass
class Job:
    """A trial in the driver's hands: queued, running, or retried."""

    trial: TrialConfig
    train: TrainOptions
    workers: int
    demand: dict[str, float]
    attempts: int = 0
    held: dict[str, float] = field(default_factory=dict)  # what it holds while running


class Driver:
    """Runs the trials handed to ``add`` on Ray; ``next`` gives their outcomes as they end.
    ``report`` hears what the policy does not see: retries, which ``retrying`` hears too,
    with the trial retried."""

    def __init__(
        self,
        options: StudyOptions,
        resources: Resources,
        report: Callable[[str], None] = print,
        retrying: Callable[[TrialConfig], None] = lambda trial: None,
    ) -> None:
        start_ray(options)
        self.options, self.resources, self.report = options, resources, report
        self.retrying = retrying
        cluster = ray.cluster_resources()
        self.gpus = cluster.get("GPU", 0)
        self.gpu_memory = gpu_size_gb() if self.gpus else 0.0
        self.free = {key: cluster.get(key, 0.0) for key in ("CPU", "GPU")}
        self.queue: list[Job] = []
        self.pending: dict = {}  # Ray ref -> running Job
        self.ended: list[tuple[TrialConfig, TrialOutcome]] = []  # ended without running
        self.groups = GroupPool(use_gpu=bool(self.gpus))  # data-parallel trials' workers

    @property
    def running(self) -> int:
        return len(self.pending)

    def __len__(self) -> int:
        """Trials not yet given back by ``next``."""
        return len(self.queue) + len(self.pending) + len(self.ended)

    def add(self, trials: list[tuple[TrialConfig, TrainOptions]]) -> None:
        """Queue trials and start what fits. A trial that could never fit this cluster ends
        at once as failed, saying what it lacks, rather than waiting forever."""
        for trial, train in trials:
            workers = self.resources.workers_for(trial)
            demand = trial_demand(trial, workers, self.gpus, self.gpu_memory, self.options)
            total = ray.cluster_resources()
            short = [f"{v:g} {k}" for k, v in demand.items() if v > total.get(k, 0.0)]
            if short:
                have = {key: total.get(key, 0.0) for key in ("CPU", "GPU")}
                reason = f"needs {', '.join(short)}; the cluster has {have}"
                self.ended.append(
                    (trial, TrialOutcome(trial.trial_id, "failed", "", reason=reason))
                )
                continue
            train = replace(train, shard=self.resources.shards(trial))
            self.queue.append(Job(trial, train, workers, demand))
        # Largest first (GPUs, then CPUs, then parameters), so big trials never wait
        # behind a GPU's scraps; smaller ones backfill what is left.
        self.queue.sort(key=lambda j: (-j.demand.get("GPU", 0), -j.demand["CPU"],
                                       -param_counts(j.trial.model)["total"]))  # fmt: skip
        self._start_fitting()

    def next(self, timeout: float | None = None) -> tuple[TrialConfig, TrialOutcome] | None:
        """The next trial to end for good (retries are the driver's), and its outcome; None
        when none has ended after ``timeout`` seconds."""
        while not self.ended:
            ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=timeout)
            if not ready:
                return None
            job = self.pending.pop(ready[0])
            outcome = collect(ready[0], job.trial)
            if job.trial.trial_id in self.groups.running:
                self.groups.ended(job.trial.trial_id, outcome)
            if outcome.status == "crashed":
                _end_live_runs(job, "crashed", outcome.reason)
            if outcome.status in BROKEN and job.attempts <= self.options.max_retries:
                self.report(f"{job.trial.trial_id} {outcome.status} ({outcome.reason}); "
                            "retrying from its checkpoint")  # fmt: skip
                self.retrying(job.trial)
                self._submit(job)  # on the resources it still holds
                continue
            for key, value in job.held.items():
                self.free[key] += value
            self._start_fitting()
            self.groups.close_idle()  # no queued trial wanted them: their GPUs go back
            self.ended.append((job.trial, outcome))
        return self.ended.pop(0)

    def interrupt(self) -> None:
        """Ctrl-C: single-worker trials get SIGINT, and each checkpoints and ends its run
        as KILLED; data-parallel trials end with their groups, to resume from their last
        checkpoint."""
        for ref, job in self.pending.items():
            if job.trial.trial_id not in self.groups.running:
                ray.cancel(ref, force=False)
        self.groups.kill()
        ray.wait(list(self.pending), num_returns=len(self.pending), timeout=60)
        for job in self.pending.values():  # those whose workers ended without a word
            _end_live_runs(job, "interrupted", "the study was interrupted")
        print("interrupted: running trials checkpointed; run the same command to resume")

    def close(self) -> None:
        """No worker group outlives the driver."""
        self.groups.close()

    def _submit(self, job: Job) -> None:
        job.attempts += 1
        train = job.train
        if job.workers == 1 and job.held.get("GPU"):
            train = replace(train, tags={**train.tags, GPU_SHARE_TAG: round(job.held["GPU"], 4)})
        if job.workers > 1:  # Ray Train places the workers, all at once
            ref = self.groups.train(job.trial, train, job.workers)
        else:
            resources = {"num_cpus": 1, "num_gpus": job.held.get("GPU", 0)}
            ref = run_remote.options(**resources, max_retries=0).remote(job.trial, train)
        self.pending[ref] = job

    def _start_fitting(self) -> None:
        """Start every queued trial that fits what no running trial holds. Each trial takes
        all it needs at once, so none waits holding part of it: no deadlock."""
        # Only single-GPU trials left and every free GPU idle (none shared by a running
        # trial): they spread over the GPUs rather than pile onto the first. Never while a
        # larger trial waits, which needs whole GPUs freed, not shares of every GPU.
        running = self.pending.values()
        sharing = any(j.workers == 1 and j.held.get("GPU") for j in running)
        spread = (self.free.get("GPU", 0) >= 1 and not sharing
                  and all(j.workers == 1 for j in self.queue))  # fmt: skip
        starting = min(len(self.queue), int(self.free["CPU"]))  # a CPU each
        idle_gpus = self.free.get("GPU", 0)
        for job in list(self.queue):
            need = dict(job.demand)
            if spread and need.get("GPU"):
                need["GPU"] = spread_share(need["GPU"], starting, idle_gpus)
            if all(need[key] <= self.free[key] + 1e-9 for key in need):
                self.queue.remove(job)
                for key in need:
                    self.free[key] -= need[key]
                job.held = need
                self._submit(job)
