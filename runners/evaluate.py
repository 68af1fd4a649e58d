"""Downstream tasks for a trained trial: its checkpoint through lm-evaluation-harness, each
task's metrics logged to the trial's own MLflow run as ``task/<task>/<metric>``.

A trial is named by its study spec and id (its checkpoint sits in the study's trials
folder and records its run) or by its MLflow run (whose config.yaml artifact is the trial
and whose experiment is the study).
"""

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from arch.model import HybridLM
from data.corpus import resolve_sources
from data.tokenizer import tokenizer_for
from runners.checkpoint import trials_dir
from runners.config import TrialConfig
from runners.harness import HarnessModel
from runners.spec import SpecError, load_spec


@dataclass
class TrainedTrial:
    trial: TrialConfig
    checkpoint: Path
    run_id: str


def from_spec(spec_path: str | Path, trial_id: str, results_dir: Path) -> TrainedTrial:
    spec, trials = load_spec(spec_path)
    trial = next((t for t in trials if t.trial_id == trial_id), None)
    if trial is None:
        raise SpecError(f"{spec_path}: no trial {trial_id!r} (hybridscale plan lists them)")
    checkpoint = trials_dir(results_dir, spec.name) / trial_id / "checkpoint.pt"
    if not checkpoint.is_file():
        raise SpecError(f"trial {trial_id}: no checkpoint at {checkpoint}")
    run_id = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=True)["run_id"]
    return TrainedTrial(trial, checkpoint, run_id)


def from_run(client: MlflowClient, run_id: str, results_dir: Path) -> TrainedTrial:
    run = client.get_run(run_id)
    study = client.get_experiment(run.info.experiment_id).name
    with tempfile.TemporaryDirectory() as scratch:
        config = client.download_artifacts(run_id, "config.yaml", scratch)
        trial = TrialConfig.model_validate(yaml.safe_load(Path(config).read_text()))
    checkpoint = trials_dir(results_dir, study) / trial.trial_id / "checkpoint.pt"
    if not checkpoint.is_file():
        raise SpecError(f"run {run_id}: no checkpoint of trial {trial.trial_id} at {checkpoint}")
    return TrainedTrial(trial, checkpoint, run_id)


def load_model(trained: TrainedTrial) -> HybridLM:
    state = torch.load(trained.checkpoint, map_location="cpu", mmap=True, weights_only=True)
    model = HybridLM(trained.trial.model)
    model.load_state_dict(state["model"])
    return model


def harness_model(
    trained: TrainedTrial, data_dir: Path, device: str, batch_size: int = 16
) -> HarnessModel:
    """The trial's weights and tokenizer (a BPE from the data folder the trainer built it
    in), reading contexts up to the trial's training sequence length."""
    data = trained.trial.data
    sources = [] if data.tokenizer == "byte" else resolve_sources(data.paths, data.corpus)
    tokenizer = tokenizer_for(data, sources, data_dir)
    return HarnessModel(load_model(trained), tokenizer, data.seq_len, device, batch_size)


def run_tasks(
    model: HarnessModel,
    tasks: list[str],
    include_path: list[str] = (),
    limit: float | None = None,
    num_fewshot: int | None = None,
) -> dict[str, dict[str, float]]:
    """Each task's numeric metrics, named as MLflow allows: "acc" for the harness's
    "acc,none", "exact_match.strict-match" for "exact_match,strict-match". With
    ``num_fewshot`` (the paper's MMLU is 5-shot) each task is keyed "<task>_<k>shot", so
    that its metrics sit beside, not over, those of the task's own default."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    # Indexing the harness's thousands of task YAMLs takes ~15 s: skipped when the
    # include paths hold every task asked for.
    manager = TaskManager(include_path=list(include_path), include_defaults=False)
    if not include_path or not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=list(include_path) or None)
    out = simple_evaluate(model, tasks=tasks, task_manager=manager, limit=limit,
                          num_fewshot=num_fewshot, log_samples=False,
                          bootstrap_iters=1000)  # fmt: skip
    metrics: dict[str, dict[str, float]] = {}
    for task, values in out["results"].items():
        task = task if num_fewshot is None else f"{task}_{num_fewshot}shot"
        for key, value in values.items():
            name, _, pipeline = key.partition(",")
            if isinstance(value, int | float) and not isinstance(value, bool) and pipeline:
                if math.isfinite(value):
                    label = name if pipeline == "none" else f"{name}.{pipeline}"
                    metrics.setdefault(task, {})[label] = float(value)
    return metrics


def log_task_metrics(client: MlflowClient, run_id: str, metrics: dict[str, dict]) -> None:
    now = int(time.time() * 1000)
    flat = [
        Metric(f"task/{task}/{name}", value, now, 0)
        for task, values in metrics.items()
        for name, value in values.items()
    ]
    client.log_batch(run_id, metrics=flat)
