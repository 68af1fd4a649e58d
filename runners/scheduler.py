"""Run a whole study on Ray: skip finished trials, hand the rest to the driver, and keep
the MLflow store the single record.

Resumption needs no state of its own: a trial is finished when the store holds a
finished run with its id; a trial with a checkpoint continues it (and its MLflow run).
"""

import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from arch.accounting import param_counts
from records.trial_run import (
    BRANCHED_FROM_TAG,
    TOKENS_METRIC,
    VAL_LOSS_METRIC,
    RunLog,
    end_study_run,
    finished_runs,
    open_study_run,
    trial_runs,
)
from runners.branch_queue import BranchQueue
from runners.branching import Branch, study_branches
from runners.config import TrialConfig
from runners.driver import Driver, StudyOptions
from runners.spec import StudySpec
from runners.train import TrialOutcome

BRANCH_POLL_S = 1.0


class Progress:
    """One line per event: counts, aggregate tokens/s, ETA from the pace so far."""

    def __init__(self, total: int, done: int, driver: Driver) -> None:
        self.total, self.done, self.failed, self.driver = total, done, 0, driver
        self.tokens, self.start, self.ran = 0, time.time(), 0

    def ended(self, outcome: TrialOutcome) -> None:
        self.ran += 1
        if outcome.status == "finished":
            self.done += 1
            self.tokens += outcome.metrics.get(TOKENS_METRIC, 0)
        else:
            self.failed += 1
        self.show(f"{outcome.trial_id} {outcome.status} {outcome.reason}".rstrip())

    def show(self, event: str) -> None:
        elapsed = time.time() - self.start
        running = self.driver.running
        queued = self.total - self.done - self.failed - running
        rate = self.tokens / elapsed if elapsed else 0.0
        left = self.total - self.done - self.failed
        eta = f"{elapsed / self.ran * left / max(1, running):.0f}s" if self.ran else "?"
        print(
            f"[{elapsed:6.0f}s] queued {queued} running {running} finished {self.done} "
            f"failed {self.failed} | {rate:,.0f} tok/s | ETA {eta} | {event}",
            flush=True,
        )


def run_study(spec: StudySpec, trials: list[TrialConfig], options: StudyOptions) -> list[dict]:
    """Run every unfinished trial; return one summary row per trial."""
    uri = options.uri()
    client = MlflowClient(uri)
    parent = open_study_run(client, uri, spec.name)
    ids = {t.trial_id for t in trials}  # the store may hold other trials of the study
    done = [i for i in finished_runs(client, spec.name) if i in ids]
    todo = [t for t in trials if t.trial_id not in done]
    branches = study_branches(spec, trials)
    shared = f"; {len(branches)} branch from a longer budget's run" if branches else ""
    print(
        f"study {spec.name}: {len(trials)} trials, {len(done)} already finished, "
        f"{len(todo)} to run{shared}"
    )
    print(f"MLflow store: {uri}")
    outcomes: dict[str, TrialOutcome] = {}
    try:
        if todo:
            outcomes = run_trials(spec, todo, branches, options, parent, len(done))
    except KeyboardInterrupt:
        end_study_run(client, parent, failed=False, interrupted=True)
        raise
    rows = summary_rows(client, spec.name, trials, outcomes)
    _log_summary(client, parent, rows, options.results_dir / spec.name)
    failed = any(row["status"] != "finished" for row in rows)
    end_study_run(client, parent, failed=failed, interrupted=False)
    return rows


def run_trials(
    spec: StudySpec,
    todo: list[TrialConfig],
    branches: dict[str, Branch],
    options: StudyOptions,
    parent: str,
    done: int,
) -> dict[str, TrialOutcome]:
    """Train ``todo`` on the driver, each of ``branches`` from its trunk's state once that
    exists, showing progress; their outcomes by trial id."""
    # Prepare shared data once in the driver, so workers never race to build it.
    from data import open_data

    for data_config in {t.data.model_dump_json(): t.data for t in todo}.values():
        open_data(data_config, options.results_dir / "data")
    train = options.train_options(spec.name, parent)
    queue = BranchQueue(todo, branches, train, say=lambda event: progress.show(event))
    driver = Driver(options, spec.resources, report=lambda event: progress.show(event),
                    retrying=queue.retrying)  # fmt: skip
    progress = Progress(len(todo) + done, done, driver)
    driver.add(queue.ready())
    progress.show("started")
    outcomes = {}
    try:
        while driver:
            # While branches wait for their trunks' states, look for them every second.
            ended = driver.next(timeout=BRANCH_POLL_S if queue else None)
            driver.add(queue.ready())
            if ended:
                trial, outcome = ended
                outcomes[trial.trial_id] = outcome
                progress.ended(outcome)
                driver.add(queue.trunk_ended(trial, outcome))
    except KeyboardInterrupt:
        driver.interrupt()
        raise
    driver.close()
    return outcomes


def summary_rows(
    client: MlflowClient, experiment: str, trials: list[TrialConfig], outcomes: dict
) -> list[dict]:
    """One row per trial of the spec, read back from the store (the record of truth):
    tokens and FLOPs are those trained, the budget where the trial never ran; FLOPs are
    what its curve cost, spent FLOPs what its own run computed (less for a branch)."""
    records = trial_runs(client, experiment)
    rows = []
    for trial in trials:
        record, outcome = records.get(trial.trial_id), outcomes.get(trial.trial_id)
        metrics = record.metrics if record else {}
        status = (record and record.status) or (outcome.status if outcome else "not run")
        tokens = record.tokens if record else trial.tokens
        rows.append({
            "trial": trial.trial_id,
            "pattern": trial.model.pattern,
            "params": param_counts(trial.model)["total"],
            "tokens": tokens,
            "flops": record.flops if record else 0.0,
            "spent_flops": record.spent_flops if record else 0.0,
            "branched_from": record.tags.get(BRANCHED_FROM_TAG, "") if record else "",
            "val_loss": metrics.get(VAL_LOSS_METRIC),
            "val_bpb": metrics.get("val_bpb"),
            **{k: v for k, v in metrics.items() if k.startswith(("probe_", "task_"))},
            "status": status,
            "reason": (record and record.reason) or (outcome.reason if outcome else ""),
            "run_id": record.run_id if record else "",
        })  # fmt: skip
    return rows


def flops_line(rows: list[dict]) -> str:
    """The study's training compute: its trials' curves, and what was actually computed."""
    flops, spent = sum(r["flops"] for r in rows), sum(r["spent_flops"] for r in rows)
    saved = f" ({1 - spent / flops:.0%} fewer: budgets branched)" if spent < flops else ""
    return f"training FLOPs: {flops:.3g} in the trials' curves, {spent:.3g} spent{saved}"


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
