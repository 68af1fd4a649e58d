"""MLflow bookkeeping for trials: one run per trial, resumable by run id.

Uses ``MlflowClient`` with explicit run ids rather than MLflow's global active run,
so several trials can log from one process or from Ray workers without crossing.
"""

import json
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

MAX_METRICS = 1000  # per log_batch call, MLflow's limit
STATUS_TAG = "hybridscale.status"  # finished | diverged | oom | failed | pruned | interrupted
MLFLOW_STATUS = {
    "finished": "FINISHED", "diverged": "FAILED", "oom": "FAILED", "failed": "FAILED",
    "pruned": "KILLED", "interrupted": "KILLED",
}  # fmt: skip


def default_tracking_uri(results_dir: Path) -> str:
    results_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{results_dir.resolve() / 'mlflow.db'}"


def experiment_id(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """The experiment's id, created on first use. With a local sqlite store, artifacts go
    to an ``artifacts`` folder beside it (MLflow's default would be ./mlruns of whatever
    folder the process happens to run in)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        location = (
            Path(tracking_uri.removeprefix("sqlite:///")).parent / "artifacts" / name
        ).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # another worker created it first
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"model": {"d_model": 64}} -> {"model.d_model": "64"}, MLflow's flat params."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) else str(value)
    return flat


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
        for start in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=items[start : start + 100])

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

    def end(self, status: str) -> None:
        self.flush()
        self.tags({STATUS_TAG: status})
        self.client.set_terminated(self.run_id, MLFLOW_STATUS[status])
