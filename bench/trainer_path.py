"""Throughput as a study gets it: a trial trained for a few steps by the study's own
trainer (runners.train), with the study's defaults unless told otherwise, its step
metrics read back from its MLflow run."""

import math
import shutil
import statistics
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

from arch.config import ModelConfig
from runners.config import TrialConfig
from runners.train import TrainOptions, TrialOutcome, train_trial

TRACED = 3  # steps a trace holds (train_steps' trace, and the baseline's in train_throughput)
WARMUP = 5  # first steps left out of the medians: compiling, autotuning, graph capture


def train_steps(model: ModelConfig, work: Path, seq_len: int, batch: int, steps: int,
                trace: Path | None = None, **training) -> tuple[TrialOutcome, str]:  # fmt: skip
    """Train ``model`` for ``steps`` steps of ``batch`` x ``seq_len`` tokens of the
    built-in corpus; ``training`` overrides the study defaults (compile, micro_batch_size,
    ...). Data, the compile and autotune cache and the MLflow store live in ``work``,
    shared by every call that names it, as a study's trials share its results folder.
    ``trace``: where to write the profiler's trace of the TRACED steps before the last (the
    last ends in the final evaluation and checkpoint). Returns the outcome and the store's
    URI."""
    trial = TrialConfig.model_validate({
        "model": model.model_dump(mode="json"), "data": {"seq_len": seq_len},
        "training": {"tokens": batch * seq_len * steps, "batch_size": batch, "lr": 1e-4,
                     **training},
    })  # fmt: skip
    work.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    # Its checkpoint (4.2 GB at 350M) goes with it: a trial trained again trains afresh.
    with tempfile.TemporaryDirectory(dir=work) as trials:
        traced = (steps - TRACED, steps - 1) if trace else None
        options = TrainOptions(workdir=Path(trials), tracking_uri=uri, data_dir=work / "data",
                               experiment="bench", cache_dir=work / "cache",
                               checkpoint_every_s=math.inf, profile_steps=traced)  # fmt: skip
        outcome = train_trial(trial, options)
        written = Path(trials) / trial.trial_id / "profile" / "rank0.json"
        if trace and written.exists():
            shutil.copy(written, trace)
        return outcome, uri


def medians(uri: str, run_id: str, untimed: int = 0) -> dict:
    """The run's median tokens/s and MFU over the steps after WARMUP but for its last
    ``untimed`` (traced ones), its peak memory, and what its first step paid (compiling and
    autotuning, see Trainer._first_step)."""
    client = MlflowClient(uri)

    def history(metric: str) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(run_id, metric),
                                        key=lambda m: m.step)]  # fmt: skip

    def timed(metric: str) -> list[float]:
        values = history(metric)
        return values[WARMUP : len(values) - untimed]

    row = {"tokens_per_s": statistics.median(timed("tokens_per_s"))}
    if mfu := timed("mfu"):
        row["mfu"] = statistics.median(mfu)
    if memory := history("peak_memory_gb"):
        row["peak_memory_gb"] = max(memory)
    for metric in ("first_step_s", "compile_cache_misses", "autotunes", "autotune_s"):
        row[metric] = history(metric)[0]
    return row
