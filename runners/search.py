"""An Optuna search over layer patterns, its trials run in parallel as Ray tasks.

The search asks Optuna for a candidate, builds its trial config (runners.search_space)
and hands it to the Ray driver (runners.driver), as a study does; the worker reports each
interval evaluation to the same Optuna storage and stops when the pruner says so; the
search tells Optuna the result. Each Optuna trial is an MLflow run, linked both ways: the
trial's user attr ``mlflow_run_id``, the run's tags ``optuna.study`` and ``optuna.trial``.

Resumption needs no state of its own. A restarted search runs again the trials the
storage still shows running (from their checkpoints, in their MLflow runs), takes the
result of a trial the MLflow store already holds as finished instead of training it
again, and asks for new trials only up to ``search.trials``.
"""

import csv
import json
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from arch.accounting import param_counts
from data import open_data
from records.trial_run import RunLog, end_study_run, finished_runs, open_study_run
from runners.config import TrialConfig
from runners.driver import Driver, StudyOptions
from runners.search_schema import COST_OBJECTIVES, Search, direction
from runners.search_space import Infeasible, candidate, decode_costs
from runners.spec import SpecError, StudySpec
from runners.train import TrialOutcome

DONE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@dataclass
class SearchOptions:
    storage: str | None = None  # an RDB URL or a journal file; default: see storage_url
    trials: int | None = None  # default: search.trials
    parallel: int | None = None  # default: search.parallel
    timeout_s: float | None = None  # ask for no new trial after this long


def storage_url(spec: StudySpec, study: StudyOptions, options: SearchOptions) -> str:
    """The storage URL, a journal file's path made absolute: workers may run elsewhere."""
    url = options.storage or str(study.results_dir / spec.name / "optuna.journal")
    return url if "://" in url else str(Path(url).resolve())


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An RDB URL (sqlite:///..., postgresql://...), or the path of a journal file, which
    parallel processes share safely through file locks (Optuna's advice for one host or
    a shared filesystem)."""
    if "://" in url:
        return RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}}
                          if url.startswith("sqlite") else {})  # fmt: skip
    Path(url).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(url))


def make_sampler(search: Search, seed: int) -> optuna.samplers.BaseSampler:
    if search.sampler_name == "tpe":  # the constant liar keeps parallel trials apart
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=search.startup_trials, constant_liar=True
        )
    if search.sampler_name == "nsga2":
        population = max(2, search.startup_trials)
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=population)
    return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(search: Search, eval_every_tokens: int | None) -> optuna.pruners.BasePruner:
    """Steps are tokens trained, so trials with different batches compare fairly."""
    if search.pruner_name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=search.startup_trials)
    if search.pruner_name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=eval_every_tokens)
    return optuna.pruners.NopPruner()


@dataclass
class Reporter:
    """A worker's on_eval hook: reports the objective at each interval evaluation to the
    shared storage, and asks the pruner whether to stop."""

    storage: str
    study: str
    number: int
    objective: str
    pruner: optuna.pruners.BasePruner
    trial: optuna.Trial | None = field(default=None, repr=False)

    def __call__(self, step: int, tokens: int, metrics: dict) -> bool:
        if self.trial is None:  # opened in the worker, on first use
            storage = open_storage(self.storage)
            study = optuna.load_study(study_name=self.study, storage=storage, pruner=self.pruner)
            study_id = storage.get_study_id_from_name(self.study)
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, self.number)
            self.trial = optuna.Trial(study, trial_id)
        self.trial.report(metrics[self.objective], tokens)
        return self.trial.should_prune()


def objective_values(search: Search, trial: TrialConfig, metrics: dict) -> list[float | None]:
    """The trial's objectives: decode costs from its config, the rest from its metrics."""
    known = {**metrics, **decode_costs(trial.model, search)}
    return [known.get(name) for name in search.objectives]


# ---- the search ----------------------------------------------------------------------------


@dataclass
class SearchReport:
    rows: list[dict]  # every trial
    best: list[dict]  # the best by the first objective (the Pareto front with several)
    front: list[dict]  # the Pareto front of the objectives and decode cost
    importances: dict[str, dict[str, float]]  # objective -> parameter -> importance
    folder: Path


def run_search(spec: StudySpec, options: StudyOptions, settings: SearchOptions) -> SearchReport:
    """Run the search until it holds ``trials`` trials; return its report."""
    uri = options.uri()
    client = MlflowClient(uri)
    url = storage_url(spec, options, settings)
    parent = open_study_run(client, uri, spec.name)
    RunLog(client, parent).tags({"optuna.study": spec.name, "optuna.storage": url})
    search = SearchRun(spec, options, settings, url, parent)
    print(f"search {spec.name}: {_counts(search.study)}; up to {search.n_trials} trials, "
          f"{search.parallel} at once\nOptuna storage: {url}\nMLflow store: {uri}")  # fmt: skip
    try:
        search.run()
    except KeyboardInterrupt:
        end_study_run(client, parent, failed=False, interrupted=True)
        raise
    log = RunLog(client, parent)
    report = write_report(
        search.study, spec.search, options.results_dir / spec.name / "search", log
    )
    failed = any(t.state == TrialState.FAIL for t in search.study.get_trials(deepcopy=False))
    end_study_run(client, parent, failed=failed, interrupted=False)
    return report


class SearchRun:
    """The search's policy over the driver: ask Optuna for candidates while a slot is free,
    hand them to the driver, and tell Optuna each outcome. Each Optuna trial answered by a
    config trained already (or training now) shares that config's result."""

    def __init__(self, spec: StudySpec, options: StudyOptions, settings: SearchOptions,
                 url: str, parent: str) -> None:  # fmt: skip
        self.spec, self.search, self.settings, self.url = spec, spec.search, settings, url
        base = TrialConfig.model_validate(
            {"model": spec.model, "data": spec.data, "training": spec.training}
        )
        self.n_trials = settings.trials or self.search.trials
        self.parallel = settings.parallel or self.search.parallel
        self.storage = open_storage(url)
        self.pruner = make_pruner(self.search, base.training.eval_every_tokens)
        self.study = open_study(spec, self.storage, self.pruner)
        self.study.set_user_attr("mlflow_parent_run_id", parent)
        self.study_id = self.storage.get_study_id_from_name(spec.name)
        self.client = MlflowClient(options.uri())
        self.finished = {t: r.run_id for t, r in finished_runs(self.client, spec.name).items()}
        self.running: dict[str, list[int]] = {}  # trial id -> Optuna trials it answers
        self.train = options.train_options(spec.name, parent)
        self.reports = len(self.search.objectives) == 1 and self.search.objectives[0] in (
            "val_loss", "val_bpb")  # fmt: skip
        open_data(base.data, options.results_dir / "data")  # once, before workers need it
        self.driver = Driver(options, spec.resources, report=lambda event: self.show(event))
        self.started = time.time()

    def run(self) -> None:
        self.resume_stale()
        try:
            self.fill()
            while self.driver:
                trial, outcome = self.driver.next()
                if outcome.status == "finished":
                    self.finished[trial.trial_id] = outcome.run_id
                for number in self.running.pop(trial.trial_id):
                    self.tell(number, trial, outcome)
                self.fill()
        except KeyboardInterrupt:
            self.driver.interrupt()
            raise
        self.driver.close()

    def resume_stale(self) -> None:
        """Trials a killed driver left running: train them again, from their checkpoints."""
        stale = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if stale:
            print(f"resuming {len(stale)} running trial(s): {[t.number for t in stale]}")
        for frozen in stale:
            if "config" in frozen.user_attrs:
                config = TrialConfig.model_validate_json(frozen.user_attrs["config"])
                self.launch(frozen.number, config)
            else:  # killed while building it: what was suggested stays, the rest is asked
                self.start(self.live(frozen.number))

    def fill(self) -> None:
        """Ask for trials while a slot is free, the study is short of trials and time is left
        (trials enqueued by hand wait in the storage: they are asked first, not counted)."""
        while len(self.driver) < self.parallel:
            states = (*DONE, TrialState.RUNNING)
            asked = self.study.get_trials(deepcopy=False, states=states)
            timeout = self.settings.timeout_s
            late = timeout is not None and time.time() - self.started > timeout
            if len(asked) >= self.n_trials or late:
                return
            self.start(self.study.ask())

    def start(self, trial: optuna.Trial) -> None:
        """Build the trial's candidate from its suggestions and run it."""
        try:
            config = candidate(self.spec, trial)
        except Infeasible as err:
            trial.set_user_attr("status", "infeasible")
            trial.set_user_attr("reason", str(err))
            self.study.tell(trial, state=TrialState.PRUNED)
            self.show(f"trial {trial.number} infeasible: {err}")
            return
        attrs = {
            "trial_id": config.trial_id, "pattern": config.model.pattern,
            "d_model": config.model.d_model, "params": param_counts(config.model)["total"],
            **decode_costs(config.model, self.search),
            # Last: a restarted search resumes a trial that has its config as it is, so a
            # driver killed while these were written must leave none or all of them.
            "config": config.model_dump_json(),
        }  # fmt: skip
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        model = config.model
        self.show(f"trial {trial.number} {model.pattern} d_model {model.d_model} started")
        self.launch(trial.number, config)

    def launch(self, number: int, trial: TrialConfig) -> None:
        if trial.trial_id in self.finished:  # trained already (by this trial or one like it)
            run = self.client.get_run(self.finished[trial.trial_id])
            outcome = TrialOutcome(trial.trial_id, "finished", run.info.run_id,
                                   dict(run.data.metrics))  # fmt: skip
            self.tell(number, trial, outcome)
            return
        if trial.trial_id in self.running:  # the same config is training: share its result
            self.running[trial.trial_id].append(number)
            return
        self.running[trial.trial_id] = [number]
        reporter = Reporter(self.url, self.spec.name, number, self.search.objectives[0],
                            self.pruner)  # fmt: skip
        tags = {**self.train.tags, "optuna.study": self.spec.name, "optuna.trial": number}
        train = replace(self.train, tags=tags, on_eval=reporter if self.reports else None)
        self.driver.add([(trial, train)])

    def tell(self, number: int, trial: TrialConfig, outcome: TrialOutcome) -> None:
        values = objective_values(self.search, trial, outcome.metrics)
        status, reason = outcome.status, outcome.reason
        if status == "finished" and None in values:
            missing = self.search.objectives[values.index(None)]
            status, reason = "failed", f"the trial reported no {missing}"
        handle = self.live(number)
        handle.set_user_attr("mlflow_run_id", outcome.run_id)
        handle.set_user_attr("status", status)
        if reason:
            handle.set_user_attr("reason", reason)
        if status == "finished":
            self.study.tell(number, values)
        else:
            state = TrialState.PRUNED if status == "pruned" else TrialState.FAIL
            self.study.tell(number, state=state)
        objectives = zip(self.search.objectives, values, strict=True)
        shown = ", ".join(f"{o} {v:.4g}" for o, v in objectives if v is not None)
        result = shown if status == "finished" else reason
        self.show(f"trial {number} {trial.model.pattern} {status}: {result}")

    def live(self, number: int) -> optuna.Trial:
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)
        return optuna.Trial(self.study, trial_id)

    def show(self, event: str) -> None:
        elapsed = time.time() - self.started
        print(f"[{elapsed:6.0f}s] {event} | {_counts(self.study)}", flush=True)


def open_study(spec: StudySpec, storage, pruner) -> optuna.Study:
    """The study of this name, created on first use; its objectives may not change."""
    directions = [direction(o) for o in spec.search.objectives]
    study = optuna.create_study(
        study_name=spec.name, storage=storage, pruner=pruner, directions=directions,
        load_if_exists=True,
    )  # fmt: skip
    # Seeded by the trials so far: a restarted search draws new points, not its first ones.
    study.sampler = make_sampler(spec.search, spec.search.seed + len(study.get_trials(False)))
    if [d.name.lower() for d in study.directions] != directions:
        raise SpecError(
            f"search.objectives: study {spec.name} in this storage was created for other "
            f"objectives than {spec.search.objectives}; give the search a new name"
        )
    with warnings.catch_warnings():  # experimental, but it names the dashboard's axes
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(spec.search.objectives)
    return study


def _counts(study: optuna.Study) -> str:
    trials = study.get_trials(deepcopy=False)
    count = {s: sum(t.state == s for t in trials) for s in (*DONE, TrialState.RUNNING)}
    return ", ".join(f"{n} {s.name.lower()}" for s, n in count.items())


# ---- the report ----------------------------------------------------------------------------


def trial_rows(study: optuna.Study, search: Search) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.WAITING:
            continue
        values = t.values if t.state == TrialState.COMPLETE else [None] * len(search.objectives)
        attrs = t.user_attrs
        rows.append({
            "trial": t.number, "state": t.state.name.lower(), "pattern": attrs.get("pattern"),
            "d_model": attrs.get("d_model"), "params": attrs.get("params"),
            **{cost: attrs.get(cost) for cost in COST_OBJECTIVES},
            **dict(zip(search.objectives, values, strict=True)),
            **{f"param.{k}": v for k, v in t.params.items()},
            "mlflow_run_id": attrs.get("mlflow_run_id", ""), "reason": attrs.get("reason", ""),
        })  # fmt: skip
    return rows


def front_axes(search: Search) -> list[str]:
    """The Pareto front's axes: the objectives, decode costs last; with no decode cost among
    them, decode_bytes is added, so the front still trades quality against decode cost."""
    costs = [o for o in search.objectives if o in COST_OBJECTIVES] or ["decode_bytes"]
    return [o for o in search.objectives if o not in COST_OBJECTIVES] + costs


def pareto_front(rows: list[dict], axes: list[str]) -> list[dict]:
    """The rows no other row beats on every axis (each in its objective's direction)."""
    points = [
        ([row[a] if direction(a) == "minimize" else -row[a] for a in axes], row)
        for row in rows
        if all(row.get(a) is not None for a in axes)
    ]

    def dominates(a: list, b: list) -> bool:
        return all(x <= y for x, y in zip(a, b, strict=True)) and a != b

    front = [row for key, row in points if not any(dominates(other, key) for other, _ in points)]
    return sorted(front, key=lambda row: row[axes[0]])


def _importances(study: optuna.Study, search: Search) -> dict[str, dict[str, float]]:
    """fANOVA-style importances (Optuna's default evaluator) per objective; needs at least
    two finished trials that differ in some parameter."""
    result = {}
    for i, name in enumerate(search.objectives):
        target = None if len(search.objectives) == 1 else (lambda t, i=i: t.values[i])
        try:
            with warnings.catch_warnings():  # "few trials in some regime": we know
                warnings.simplefilter("ignore", UserWarning)
                importances = optuna.importance.get_param_importances(study, target=target)
        except (ValueError, RuntimeError):  # too few trials to tell
            continue
        result[name] = {k: float(v) for k, v in importances.items()}
    return result


def write_report(study: optuna.Study, search: Search, folder: Path, log: RunLog) -> SearchReport:
    """trials.csv, best.csv, pareto.csv and .png, importances.json: in ``folder`` and on
    the MLflow parent run."""
    rows = trial_rows(study, search)
    done = [r for r in rows if r["state"] == "complete"]
    axes = front_axes(search)
    front = pareto_front(done, axes)
    first = search.objectives[0]
    sign = 1 if direction(first) == "minimize" else -1
    best = front if len(search.objectives) > 1 else sorted(done, key=lambda r: sign * r[first])[:5]
    importances = _importances(study, search)
    folder.mkdir(parents=True, exist_ok=True)
    for name, table in (("trials", rows), ("best", best), ("pareto", front)):
        _write_csv(folder / f"{name}.csv", table)
    (folder / "importances.json").write_text(json.dumps(importances, indent=2))
    _plot_front(done, front, axes, search, folder / "pareto.png")
    for path in sorted(folder.iterdir()):
        log.artifact(path, "search")
    return SearchReport(rows, best, front, importances, folder)


def _write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(c for row in rows for c in row)) or ["trial"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)


def _plot_front(
    done: list[dict], front: list[dict], axes: list[str], search: Search, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cost, quality = axes[-1], axes[0]  # a lone cost objective is plotted against itself
    scale, label = {
        "decode_bytes": (1e-6, f"MB read per decoded token at context {search.decode_context:,}"),
        "decode_ms": (1.0, f"modelled ms per generated token (H100, batch {search.decode_batch}, "
                           f"context {search.decode_context:,})"),
    }[cost]  # fmt: skip
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.scatter([r[cost] * scale for r in done], [r[quality] for r in done],
               color="0.7", label="trials")  # fmt: skip
    ax.plot([r[cost] * scale for r in front], [r[quality] for r in front], "o-",
            color="C3", label="Pareto front")  # fmt: skip
    for row in front:
        ax.annotate(row["pattern"][:20], (row[cost] * scale, row[quality]), fontsize=7)
    ax.set(xlabel=label, ylabel=quality, title="quality against decode cost")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def serve_dashboard(url: str, port: int) -> None:
    """optuna-dashboard over the search's storage, on this machine only."""
    try:
        import optuna_dashboard
    except ImportError:
        raise RuntimeError(
            "optuna-dashboard is not installed: .venv/bin/pip install optuna-dashboard"
        ) from None
    if "://" not in url and not Path(url).exists():
        raise RuntimeError(f"no search in {url} yet: run it first")
    print(f"Optuna dashboard over {url}: http://127.0.0.1:{port}")
    optuna_dashboard.run_server(open_storage(url), host="127.0.0.1", port=port)
