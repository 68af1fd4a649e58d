"""Where the MLflow record lives: the store's URI and a study's experiment."""

import json
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient


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
