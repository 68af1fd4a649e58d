"""A trial's MLflow run and its study's parent run: the names they are tagged and logged
under, how they are written, and how they are read back. The one place that knows them.

Uses ``MlflowClient`` with explicit run ids rather than MLflow's global active run,
so several trials can log from one process or from Ray workers without crossing.
"""

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.tracking import MlflowClient

from records.store import experiment_id

# ---- the schema ------------------------------------------------------------------------------

KIND_TAG = "kind"  # "trial" on a trial's run, "study" on its study's parent run
STUDY_TAG = "hybridscale.study"
TRIAL_TAG = "hybridscale.trial_id"
STATUS_TAG = "hybridscale.status"  # see MLFLOW_STATUS
REASON_TAG = "hybridscale.reason"  # why a trial did not finish
PATTERN_TAG = "hybridscale.pattern"
PARAMS_TAG = "hybridscale.params"
FLOPS_PER_TOKEN_TAG = "hybridscale.flops_per_token"  # training FLOPs per token
TOKENS_REQUESTED_TAG = "hybridscale.tokens"  # the trial's budget; TOKENS_METRIC is what ran
WORKERS_TAG = "hybridscale.workers"  # data-parallel ranks (not part of the trial)
SHARDED_TAG = "hybridscale.sharded"  # FSDP rather than DDP (nor is this)
GPU_IDS_TAG = "hybridscale.gpu_ids"  # the GPUs a single-worker trial ran on
GPU_SHARE_TAG = "hybridscale.gpu_share"  # the share of a GPU it held
NODE_TAG = "hybridscale.node_id"  # the Ray node its (rank 0) worker ran on
PARENT_TAG = "mlflow.parentRunId"
# A budget branched from a longer one's run (runners/branching.py): that trial, and the step
# and tokens it took from it; its own run trained only the rest.
BRANCHED_FROM_TAG = "hybridscale.branched_from"
BRANCH_STEP_TAG = "hybridscale.branch_step"
BRANCH_TOKENS_TAG = "hybridscale.branch_tokens"

TOKENS_METRIC = "tokens"  # tokens trained so far (whole steps), logged with every step
VAL_LOSS_METRIC = "val_loss"

MLFLOW_STATUS = {
    "finished": "FINISHED", "diverged": "FAILED", "oom": "FAILED", "failed": "FAILED",
    "crashed": "FAILED", "pruned": "KILLED", "interrupted": "KILLED",
}  # fmt: skip
MAX_METRICS = 1000  # per log_batch call, MLflow's limit
MAX_PARAMS = 100  # likewise


# ---- writing ---------------------------------------------------------------------------------


class RunLog:
    """Writes to one MLflow run. Metrics are held, and written together once
    ``flush_every_s`` has passed since the last write (0: at once): a call to a sqlite
    store takes ~5 ms for one step's few metrics but only ~60 ms for 700, so a training
    loop writes many steps at a time. ``flush`` writes what is held; so does ``end``."""

    def __init__(self, client: MlflowClient, run_id: str, flush_every_s: float = 0.0) -> None:
        self.client, self.run_id, self.flush_every_s = client, run_id, flush_every_s
        self._held: list[Metric] = []
        self._flushed_at = time.monotonic()

    def params(self, params: dict[str, str]) -> None:
        items = [Param(k, v[:6000]) for k, v in params.items()]
        for start in range(0, len(items), MAX_PARAMS):
            self.client.log_batch(self.run_id, params=items[start : start + MAX_PARAMS])

    def tags(self, tags: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def metrics(self, values: dict[str, float], step: int, timestamp_ms: int) -> None:
        self._held += [Metric(k, float(v), timestamp_ms, step) for k, v in values.items()]
        if time.monotonic() - self._flushed_at >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        while self._held:  # a chunk leaves only once written: a failed write loses nothing
            self.client.log_batch(self.run_id, metrics=self._held[:MAX_METRICS])
            del self._held[:MAX_METRICS]
        self._flushed_at = time.monotonic()

    def artifact(self, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def reopen(self) -> None:
        """A resumed trial's run: live again until ``end``."""
        self.client.update_run(self.run_id, status="RUNNING")

    def end(self, status: str, reason: str = "") -> None:
        self.flush()
        self.tags({STATUS_TAG: status, **({REASON_TAG: reason} if reason else {})})
        self.client.set_terminated(self.run_id, MLFLOW_STATUS[status])


def start_trial_run(
    client: MlflowClient,
    tracking_uri: str,
    experiment: str,
    trial_id: str,
    name: str,
    tags: dict[str, Any],
    parent_run_id: str | None = None,
) -> str:
    """A new run for trial ``trial_id``, tagged ``tags`` besides the schema's own."""
    tags = {KIND_TAG: "trial", TRIAL_TAG: trial_id, **tags}
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    exp = experiment_id(client, experiment, tracking_uri)
    run = client.create_run(exp, run_name=name, tags={k: str(v) for k, v in tags.items()})
    return run.info.run_id


def copy_history(client: MlflowClient, source: str, dest: str, last_step: int) -> None:
    """Every metric run ``source`` logged up to ``last_step``, logged again on ``dest``: a
    branched trial's run holds its whole curve, the steps it shares with its trunk too."""
    metrics = [
        m
        for key in client.get_run(source).data.metrics
        for m in client.get_metric_history(source, key)
        if m.step <= last_step
    ]
    for start in range(0, len(metrics), MAX_METRICS):
        client.log_batch(dest, metrics=metrics[start : start + MAX_METRICS])


def end_live_runs(
    client: MlflowClient, experiment: str, trial_id: str, status: str, reason: str
) -> list[str]:
    """End as ``status`` every run of the trial still marked RUNNING, whose worker is gone
    and took the run's ending with it. A run its checkpoint holds is reopened by the retry
    that resumes it; one begun before any checkpoint is never resumed, and without this it
    would stay RUNNING forever beside the retry's new run. Returns the runs ended."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    query = f"tags.`{TRIAL_TAG}` = '{trial_id}' and attributes.status = 'RUNNING'"
    ended = [run.info.run_id for run in client.search_runs([found.experiment_id], query)]
    for run_id in ended:
        RunLog(client, run_id).end(status, reason)
    return ended


# ---- reading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialRun:
    """A trial's run as read back from the store."""

    run: Run

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def trial_id(self) -> str:
        return self.tags[TRIAL_TAG]

    @property
    def tags(self) -> dict[str, str]:
        return self.run.data.tags

    @property
    def params(self) -> dict[str, str]:
        return self.run.data.params

    @property
    def metrics(self) -> dict[str, float]:
        return self.run.data.metrics

    @property
    def status(self) -> str | None:
        return self.tags.get(STATUS_TAG)

    @property
    def reason(self) -> str:
        return self.tags.get(REASON_TAG, "")

    @property
    def tokens(self) -> float:
        """The tokens the trial trained (whole steps, so at least its budget). Runs written
        before the trainer logged them have only their budget."""
        return float(self.metrics.get(TOKENS_METRIC, self.tags[TOKENS_REQUESTED_TAG]))

    @property
    def flops(self) -> float:
        """The trial's whole training compute, over the tokens it trained."""
        return float(self.tags.get(FLOPS_PER_TOKEN_TAG, 0)) * self.tokens

    @property
    def spent_flops(self) -> float:
        """What its own run computed: ``flops`` less the steps it took from its trunk."""
        shared = float(self.tags.get(BRANCH_TOKENS_TAG, 0))
        return float(self.tags.get(FLOPS_PER_TOKEN_TAG, 0)) * (self.tokens - shared)


def trial_runs(client: MlflowClient, experiment: str) -> dict[str, TrialRun]:
    """trial id -> the trial's record: its latest finished run, or with none finished its
    latest run."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return {}
    runs = client.search_runs(
        [found.experiment_id], f"tags.{KIND_TAG} = 'trial'", max_results=50000
    )
    latest: dict[str, TrialRun] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time):
        record = TrialRun(run)
        if TRIAL_TAG not in record.tags:
            continue
        held = latest.get(record.trial_id)
        if held is None or record.status == "finished" or held.status != "finished":
            latest[record.trial_id] = record
    return latest


def finished_runs(client: MlflowClient, experiment: str) -> dict[str, TrialRun]:
    """trial id -> its latest finished run."""
    return {t: r for t, r in trial_runs(client, experiment).items() if r.status == "finished"}


# ---- the study's parent run ------------------------------------------------------------------


def find_study_run(client: MlflowClient, study: str) -> str | None:
    """The id of the study's parent run, if it has one."""
    found = client.get_experiment_by_name(study)
    if found is None:
        return None
    query = f"tags.`{STUDY_TAG}` = '{study}' and tags.{KIND_TAG} = 'study'"
    runs = client.search_runs([found.experiment_id], query)
    return runs[0].info.run_id if runs else None


def open_study_run(client: MlflowClient, tracking_uri: str, study: str) -> str:
    """The study's parent run, created on first use and live again while the study runs."""
    run_id = find_study_run(client, study)
    if run_id is None:
        exp = experiment_id(client, study, tracking_uri)
        tags = {STUDY_TAG: study, KIND_TAG: "study"}
        return client.create_run(exp, run_name=study, tags=tags).info.run_id
    client.update_run(run_id, status="RUNNING")
    return run_id


def end_study_run(client: MlflowClient, run_id: str, failed: bool, interrupted: bool) -> None:
    """KILLED when interrupted, FAILED when some trial failed, else FINISHED."""
    status = "KILLED" if interrupted else "FAILED" if failed else "FINISHED"
    client.set_terminated(run_id, status)
