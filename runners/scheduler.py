"""Run a whole study on Ray: skip finished trials, pack the rest onto workers, retry
crashes from their checkpoints, and keep the MLflow store the single record.

Resumption needs no state of its own: a trial is finished when the store holds a
finished run with its id; a trial with a checkpoint continues it (and its MLflow run).
"""

import math
import os
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path

import ray
from mlflow.tracking import MlflowClient

from arch.accounting import param_counts
from runners.config import TrialConfig
from runners.distributed import BROKEN, GroupPool
from runners.spec import StudySpec
from runners.tracking import STATUS_TAG, RunLog, default_tracking_uri, experiment_id
from runners.train import TrainOptions, TrialOutcome, train_trial

TRIAL_TAG = "hybridscale.trial_id"
STUDY_TAG = "hybridscale.study"
GPU_IDS_TAG = "hybridscale.gpu_ids"  # the GPUs a single-worker trial ran on
GPU_SHARE_TAG = "hybridscale.gpu_share"  # the share of a GPU it held


@dataclass
class StudyOptions:
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


def finished_trials(client: MlflowClient, experiment: str) -> dict[str, str]:
    """trial id -> run id of its finished run, from the store."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return {}
    runs = client.search_runs(
        [found.experiment_id], f"tags.`{STATUS_TAG}` = 'finished'", max_results=50000
    )
    return {r.data.tags[TRIAL_TAG]: r.info.run_id for r in runs if TRIAL_TAG in r.data.tags}


def parent_run(client: MlflowClient, uri: str, study: str) -> str:
    exp = experiment_id(client, study, uri)
    runs = client.search_runs([exp], f"tags.`{STUDY_TAG}` = '{study}' and tags.kind = 'study'")
    if runs:
        return runs[0].info.run_id
    return client.create_run(
        exp, run_name=study, tags={STUDY_TAG: study, "kind": "study"}
    ).info.run_id


def spread_share(share: float, trials: int, whole_gpus: float) -> float:
    """The GPU share of each of ``trials`` single-GPU trials about to start on
    ``whole_gpus`` idle GPUs. Ray places shares first-fit, so trials of an eighth of a GPU
    would all land on GPU 0 while the others idle; shares of 1/n put n on each GPU, over
    as many GPUs as it takes. Never below the trial's own ``share``."""
    per_gpu = max(1, math.ceil(trials / math.floor(whole_gpus)))
    return max(share, 1 / per_gpu)


@ray.remote
def run_remote(trial: TrialConfig, options: TrainOptions) -> TrialOutcome:
    # NVLink multicast misbehaves on shared GPUs; keep NCCL off it in every worker.
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    gpus = ",".join(str(i) for i in ray.get_gpu_ids())  # where Ray put it: on its run
    if gpus:
        options = replace(options, tags={**options.tags, GPU_IDS_TAG: gpus})
    return train_trial(trial, options)


class Progress:
    """One line per event: counts, aggregate tokens/s, ETA from the pace so far."""

    def __init__(self, total: int, done: int) -> None:
        self.total, self.done, self.failed, self.running = total, done, 0, 0
        self.tokens, self.start, self.ran = 0, time.time(), 0

    def show(self, event: str) -> None:
        elapsed = time.time() - self.start
        queued = self.total - self.done - self.failed - self.running
        rate = self.tokens / elapsed if elapsed else 0.0
        left = self.total - self.done - self.failed
        eta = f"{elapsed / self.ran * left / max(1, self.running):.0f}s" if self.ran else "?"
        print(
            f"[{elapsed:6.0f}s] queued {queued} running {self.running} finished {self.done} "
            f"failed {self.failed} | {rate:,.0f} tok/s | ETA {eta} | {event}",
            flush=True,
        )


def run_study(spec: StudySpec, trials: list[TrialConfig], options: StudyOptions) -> list[dict]:
    """Run every unfinished trial; return one summary row per trial."""
    uri = options.uri()
    client = MlflowClient(uri)
    study_dir = options.results_dir / spec.name
    workdir = options.checkpoint_dir or study_dir / "trials"
    parent = parent_run(client, uri, spec.name)
    ids = {t.trial_id for t in trials}  # the store may hold other trials of the study
    done = {i: run for i, run in finished_trials(client, spec.name).items() if i in ids}
    todo = [t for t in trials if t.trial_id not in done]
    print(
        f"study {spec.name}: {len(trials)} trials, {len(done)} already finished, {len(todo)} to run"
    )
    print(f"MLflow store: {uri}")

    start_ray(options)
    gpus = ray.cluster_resources().get("GPU", 0)
    gpu_memory = gpu_size_gb() if gpus else 0.0
    outcomes: dict[str, TrialOutcome] = {}
    if todo:
        # Prepare shared data once in the driver, so workers never race to build it.
        from data import open_data

        for data_config in {t.data.model_dump_json(): t.data for t in todo}.values():
            open_data(data_config, options.results_dir / "data")

        progress = Progress(len(trials), len(done))
        attempts = {t.trial_id: 0 for t in todo}
        pending: dict = {}
        workers = {t.trial_id: spec.resources.workers_for(t) for t in todo}
        demand = {
            t.trial_id: trial_demand(t, workers[t.trial_id], gpus, gpu_memory, options)
            for t in todo
        }
        total = ray.cluster_resources()
        free = {key: total.get(key, 0.0) for key in ("CPU", "GPU")}
        # Largest first (GPUs, then CPUs, then parameters), so big trials never wait
        # behind a GPU's scraps; smaller ones backfill what is left.
        queue = sorted(todo, key=lambda t: (-demand[t.trial_id].get("GPU", 0),
                                            -demand[t.trial_id]["CPU"],
                                            -param_counts(t.model)["total"]))  # fmt: skip
        for trial in list(queue):
            short = [f"{v:g} {k}" for k, v in demand[trial.trial_id].items() if v > free[k]]
            if short:  # could never start here: say so instead of waiting forever
                queue.remove(trial)
                reason = f"needs {', '.join(short)}; the cluster has {free}"
                outcomes[trial.trial_id] = TrialOutcome(trial.trial_id, "failed", "", reason=reason)
                progress.failed += 1
                progress.show(f"{trial.trial_id} failed: {reason}")

        held: dict[str, dict[str, float]] = {}  # what each running trial holds
        groups = GroupPool(use_gpu=bool(gpus))  # data-parallel trials' workers

        def submit(trial: TrialConfig) -> None:
            attempts[trial.trial_id] += 1
            need = held[trial.trial_id]
            tags = {STUDY_TAG: spec.name, "kind": "trial"}
            if workers[trial.trial_id] == 1 and need.get("GPU"):
                tags[GPU_SHARE_TAG] = round(need["GPU"], 4)
            train = TrainOptions(
                workdir=workdir, tracking_uri=uri, data_dir=options.results_dir / "data",
                experiment=spec.name, parent_run_id=parent, device=options.device, tags=tags,
                log_every=10,  # many trials share one store: don't write it every step
                shard=spec.resources.shards(trial), checkpoint_every_s=options.checkpoint_every_s,
                profile_steps=options.profile_steps,
            )  # fmt: skip
            if workers[trial.trial_id] > 1:  # Ray Train places the workers, all at once
                ref = groups.train(trial, train, workers[trial.trial_id])
            else:
                resources = {"num_cpus": 1, "num_gpus": need.get("GPU", 0)}
                ref = run_remote.options(**resources, max_retries=0).remote(trial, train)
            pending[ref] = trial
            progress.running += 1

        def start_fitting() -> None:
            """Start every queued trial that fits what no running trial holds. Each trial
            takes all it needs at once, so none waits holding part of it: no deadlock."""
            # Only single-GPU trials left and every free GPU idle (none shared by a running
            # trial): they spread over the GPUs rather than pile onto the first. Never while
            # a larger trial waits, which needs whole GPUs freed, not shares of every GPU.
            sharing = any(workers[t] == 1 and held[t].get("GPU") for t in held)
            spread = (free.get("GPU", 0) >= 1 and not sharing
                      and all(workers[t.trial_id] == 1 for t in queue))  # fmt: skip
            starting = min(len(queue), int(free["CPU"]))  # a CPU each
            idle_gpus = free.get("GPU", 0)
            for trial in list(queue):
                need = dict(demand[trial.trial_id])
                if spread and need.get("GPU"):
                    need["GPU"] = spread_share(need["GPU"], starting, idle_gpus)
                if all(need[key] <= free[key] + 1e-9 for key in need):
                    queue.remove(trial)
                    for key in need:
                        free[key] -= need[key]
                    held[trial.trial_id] = need
                    submit(trial)

        start_fitting()
        progress.show("started")
        interrupted = False
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                ref = ready[0]
                trial = pending.pop(ref)
                progress.running -= 1
                outcome = collect(ref, trial)
                retry = outcome.status in BROKEN
                if trial.trial_id in groups.running:
                    groups.ended(trial.trial_id, outcome)
                if retry and attempts[trial.trial_id] <= options.max_retries:
                    progress.show(f"{trial.trial_id} {outcome.status} ({outcome.reason}); retrying")
                    submit(trial)  # on the resources it still holds
                    continue
                for key, value in held.pop(trial.trial_id).items():
                    free[key] += value
                start_fitting()
                groups.close_idle()  # no queued trial wanted them: their GPUs go back
                outcomes[trial.trial_id] = outcome
                progress.ran += 1
                if outcome.status == "finished":
                    progress.done += 1
                    progress.tokens += outcome.metrics.get("tokens", 0)
                else:
                    progress.failed += 1
                progress.show(f"{trial.trial_id} {outcome.status} {outcome.reason}".rstrip())
        except KeyboardInterrupt:
            interrupted = True
            # Single-worker trials get SIGINT: each checkpoints and ends its run as KILLED.
            # Data-parallel trials end with their groups, to resume from their last checkpoint.
            for ref in pending:
                if pending[ref].trial_id not in groups.running:
                    ray.cancel(ref, force=False)
            groups.kill()
            ray.wait(list(pending), num_returns=len(pending), timeout=60)
            print("interrupted: running trials checkpointed; run the same command to resume")
        else:
            groups.close()  # no group outlives the study
        if interrupted:
            raise KeyboardInterrupt

    rows = summary_rows(client, spec.name, trials, outcomes)
    _log_summary(client, parent, rows, study_dir)
    return rows


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
    root = str(Path(__file__).resolve().parent.parent)
    env = {"working_dir": root, "excludes": ["results", ".venv", ".git"]} if address else {}
    cpus = None if address else options.cpus
    ray.init(address=address, num_cpus=cpus, runtime_env=env or None, log_to_driver=False,
             include_dashboard=False, configure_logging=False)  # fmt: skip
    signal.signal(signal.SIGINT, signal.default_int_handler)


def gpu_size_gb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 2**30
    return 80.0  # the driver has no GPU but the cluster has: assume an 80 GB part


def summary_rows(
    client: MlflowClient, experiment: str, trials: list[TrialConfig], outcomes: dict
) -> list[dict]:
    """One row per trial of the spec, read back from the store (the record of truth)."""
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], "tags.kind = 'trial'", max_results=50000)
    latest: dict[str, object] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time):
        trial_id = run.data.tags.get(TRIAL_TAG)
        if latest.get(trial_id) is None or run.data.tags.get(STATUS_TAG) == "finished":
            latest[trial_id] = run
        elif latest[trial_id].data.tags.get(STATUS_TAG) != "finished":
            latest[trial_id] = run
    rows = []
    for trial in trials:
        run = latest.get(trial.trial_id)
        tags, metrics = (run.data.tags, run.data.metrics) if run else ({}, {})
        outcome = outcomes.get(trial.trial_id)
        status = tags.get(STATUS_TAG) or (outcome.status if outcome else "not run")
        rows.append({
            "trial": trial.trial_id,
            "pattern": trial.model.pattern,
            "params": param_counts(trial.model)["total"],
            "tokens": trial.tokens,
            "flops": float(tags.get("hybridscale.flops_per_token", 0)) * trial.tokens,
            "val_loss": metrics.get("val_loss"),
            "val_bpb": metrics.get("val_bpb"),
            **{k: v for k, v in metrics.items() if k.startswith("probe_")},
            "status": status,
            "reason": tags.get("hybridscale.reason", outcome.reason if outcome else ""),
            "run_id": run.info.run_id if run else "",
        })  # fmt: skip
    return rows


def _log_summary(client: MlflowClient, parent: str, rows: list[dict], study_dir: Path) -> None:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    study_dir.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, study_dir / "results.parquet")
    pacsv.write_csv(table, study_dir / "results.csv")
    log = RunLog(client, parent)
    log.artifact(study_dir / "results.parquet")
    log.artifact(study_dir / "results.csv")
