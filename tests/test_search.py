"""The Optuna search: its space (patterns, width matching, decode costs) against hand counts
and arch/decode_cost.py, its validation, and whole searches on a real local Ray with real
Optuna storage (journal file and sqlite) and a real sqlite MLflow store."""

import contextlib
import csv
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import psutil
import pytest
import ray
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from arch.accounting import flops_per_token, param_counts
from arch.config import ModelConfig
from arch.decode_cost import decode_seconds_per_token
from records.store import experiment_id
from records.trial_run import RunLog
from runners.config import TrialConfig
from runners.driver import StudyOptions
from runners.search import SearchOptions, open_storage, open_study, run_search, write_report
from runners.search_schema import Budget
from runners.search_space import (
    Infeasible,
    build_pattern,
    decode_bytes,
    load_search,
    match_width,
    place_free,
    spread,
)
from runners.spec import SpecError

ROOT = Path(__file__).resolve().parent.parent
TOKENS_PER_STEP = 4 * 64  # batch_size x seq_len below

SPACE = """
  budget: {params: 30K, tolerance: 0.15, multiple_of: 4}
  space:
    mamba2: {low: 1, high: 2}
    attention: {low: 0, high: 1}
    mlp: [0, 1]
    lr: {low: 2.0e-3, high: 6.0e-3, log: true}
"""


def write_spec(tmp_path: Path, corpus: Path, name: str, search: str, steps: int = 24) -> Path:
    text = f"""\
    name: {name}
    model: {{d_model: 32, n_layers: 2, n_heads: 4, d_state: 8, ssm_headdim: 8,
             chunk_size: 16, vocab_size: 264}}
    data: {{paths: ["{corpus}/*.py"], seq_len: 64}}
    training: {{tokens: {TOKENS_PER_STEP * steps}, batch_size: 4, lr: 3.0e-3,
                eval_every_tokens: {TOKENS_PER_STEP * 8}}}
    search:
    """
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(text) + textwrap.indent(textwrap.dedent(search), "  "))
    return path


# ---- the space ---------------------------------------------------------------------------


def test_patterns_by_hand():
    assert (
        build_pattern({"mamba2": 2, "attention": 1, "mlp": 1}) == "M*M-"
    )  # the smoke study's hybrid
    assert (
        build_pattern({"attention": 2, "mlp": 2}) == "*-*-"
    )  # a Transformer: an MLP after each mixer
    assert build_pattern({"mamba2": 4, "attention": 2, "mlp": 2}) == "M*M-M*M-"
    assert build_pattern({"mamba2": 3, "mlp": 4}) == "M-M-M--"  # more MLPs than mixers lean right
    assert (
        build_pattern({"mamba2": 3, "mamba1": 1}) == "MMmM"
    )  # Mamba-1 spread among the Mamba slots
    assert (
        build_pattern({"mamba2": 2, "attention": 2}, skip=2) == "MM**"
    )  # no attention in the first two
    assert (
        build_pattern({"mamba2": 3, "attention": 1}, skip=2) == "MMM*"
    )  # two slots left, one layer: ties go right
    # The 8B hybrid's mixers: runs of Mamba-2 of 5, 5, 4, 5, 5 around its 4 attention layers.
    assert spread(28, 4) == [5, 11, 16, 22]
    assert place_free(4, [0.1, 0.1, 0.99]) == [0, 1, 3]  # a taken slot passes to the next
    assert place_free(3, [0.9, 0.9]) == [0, 2]  # ... wrapping around
    with pytest.raises(Infeasible, match="do not fit"):
        build_pattern({"mamba2": 1, "attention": 2}, skip=2)


TINY = {"n_heads": 4, "d_state": 8, "ssm_headdim": 8, "chunk_size": 16, "vocab_size": 264}


@pytest.mark.parametrize("pattern", ["M", "M*M-", "*-*-", "MmM-"])
@pytest.mark.parametrize("kind", ["params", "flops_per_token"])
def test_width_is_the_nearest_to_the_budget(pattern, kind):
    """Against a brute-force scan of every valid d_model up to 1024."""
    target = {"params": 200_000, "flops_per_token": 3_000_000}[kind]
    budget = Budget(**{kind: target}, tolerance=0.9, multiple_of=4)
    raw = {"model": {**TINY, "pattern": pattern}, "data": {"seq_len": 64},
           "training": {"tokens": 1000}}  # fmt: skip

    def measure(model: ModelConfig) -> int:
        if kind == "params":
            return param_counts(model)["total"]
        return flops_per_token(model, 64)["training"]

    scan = []
    for d in range(4, 1025, 4):
        with contextlib.suppress(ValueError):
            scan.append(ModelConfig.model_validate({**raw["model"], "d_model": d}))
    nearest = min(scan, key=lambda m: abs(measure(m) - target))
    trial = match_width(raw, budget, ffn_ratio=None)
    assert trial.model.d_model == nearest.d_model
    assert abs(measure(trial.model) / target - 1) < 0.05  # near, at this size


def test_width_outside_tolerance_is_infeasible():
    raw = {"model": {**TINY, "pattern": "M"}, "data": {}, "training": {"tokens": 1000}}
    with pytest.raises(Infeasible, match="misses the budget"):
        match_width(raw, Budget(params=1000, tolerance=0.05), ffn_ratio=None)


def test_decode_bytes_by_hand():
    model = ModelConfig(d_model=32, pattern="M*-", n_heads=4, n_kv_heads=2, d_state=8,
                        ssm_headdim=8)  # fmt: skip
    context = 100
    kv = 2 * (2 * 8) * context  # K and V, 2 KV heads of 8 channels, 100 positions
    ssm = 64 * 8 + (64 + 2 * 8) * 4  # recurrent state E x N, conv state (E + 2gN) x d_conv
    expected = 2 * (param_counts(model)["total"] + kv + ssm)  # bf16
    assert decode_bytes(model, context) == expected


# ---- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "search, field",
    [
        ("space: {mlp: {low: 0, high: 2}}", "search.space: a candidate could have no Mamba"),
        ("space: {mamba2: {low: 3, high: 1}}", "search.space.mamba2: low 3 is above high 1"),
        ("space: {mamba2: 2, atention: 1}", "search.space.atention: unknown key (did you mean"),
        ("space: {mamba2: 2, lr: {low: 0.001}}", "search.space.lr: give a list of choices, or"),
        ("space: {mamba2: 2, d_state: [16, -1]}", "search.space.d_state.choices[1]: -1"),
        ("objectives: [val_loss, latency]\nspace: {mamba2: 2}", "search.objectives[1]: 'latency'"),
        ("objectives: [val_loss, decode_bytes]\npruner: median\nspace: {mamba2: 2}",
         "search: pruner: Optuna prunes single-objective searches only"),
        ("budget: {params: 10}\nspace: {mamba2: 2}", "search.budget: even the smallest"),
        ("decode_batch: 0\nspace: {mamba2: 2}",
         "search.decode_batch: 0: Input should be greater than 0"),
        ("space: {mamba2: 2, ssm_headdim: 48}", "search.space: even the smallest candidate"),
    ],
)  # fmt: skip
def test_invalid_search_space_is_one_clear_line(tmp_path, corpus_dir, search, field):
    path = write_spec(tmp_path, corpus_dir, "bad", search)
    with pytest.raises(SpecError) as err:
        load_search(path)
    message = str(err.value)
    assert message.startswith(f"{path}: {field}"), message
    assert "\n" not in message


def test_cli_rejects_a_bad_space_before_writing_anything(tmp_path, corpus_dir):
    path = write_spec(tmp_path, corpus_dir, "bad", "space: {mamba2: {low: 3, high: 1}}")
    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "runners.cli", "search", str(path), "--results", str(results)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr == f"error: {path}: search.space.mamba2: low 3 is above high 1\n"
    assert not results.exists()


def test_pruning_needs_interval_evaluations(tmp_path, corpus_dir):
    path = write_spec(tmp_path, corpus_dir, "noeval", "space: {mamba2: 2}")
    path.write_text(path.read_text().replace(f"eval_every_tokens: {TOKENS_PER_STEP * 8}", ""))
    with pytest.raises(SpecError, match="training.eval_every_tokens: the median pruner needs"):
        load_search(path)


def test_two_objectives_report_the_pareto_front(tmp_path, corpus_dir):
    """NSGA-II over loss (minimised) and a probe accuracy (maximised): the report's best
    is the Pareto front, checked against a brute-force one."""
    search = "objectives: [val_loss, probe_mqar_acc]\nspace: {mamba2: [1, 2], lr: [0.001, 0.01]}"
    spec = load_search(write_spec(tmp_path, corpus_dir, "two", search))
    storage = open_storage(str(tmp_path / "two.journal"))
    study = open_study(spec, storage, optuna.pruners.NopPruner())
    assert isinstance(study.sampler, optuna.samplers.NSGAIISampler)
    points = [(3.0, 0.2), (2.5, 0.1), (2.5, 0.3), (3.5, 0.9), (4.0, 0.5), (2.0, 0.05)]
    for i, (loss, acc) in enumerate(points):
        trial = study.ask()
        trial.suggest_categorical("mamba2", [1, 2])
        trial.set_user_attr("pattern", "M" * (1 + i % 2))
        trial.set_user_attr("decode_bytes", 1000)  # equal: the front is loss against accuracy
        study.tell(trial, [loss, acc])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(experiment_id(client, "two", uri)).info.run_id  # artifacts in tmp
    report = write_report(study, spec.search, tmp_path / "report", RunLog(client, run))
    # Brute force: (2.5, 0.3) beats (3.0, 0.2) and (2.5, 0.1); (3.5, 0.9) beats (4.0, 0.5).
    assert [(r["val_loss"], r["probe_mqar_acc"]) for r in report.best] == [
        (2.0, 0.05), (2.5, 0.3), (3.5, 0.9)
    ]  # fmt: skip
    assert report.best == report.front
    assert set(report.importances) == {"val_loss", "probe_mqar_acc"}


def test_a_decode_cost_objective_replaces_decode_bytes_on_the_front(tmp_path, corpus_dir):
    """With decode_ms among the objectives, the front is quality against decode_ms alone:
    decode_bytes, which here would make every trial optimal, is not added as an axis."""
    search = "objectives: [val_loss, decode_ms]\nspace: {mamba2: [1, 2]}"
    spec = load_search(write_spec(tmp_path, corpus_dir, "ms", search))
    study = open_study(spec, open_storage(str(tmp_path / "ms.journal")), optuna.pruners.NopPruner())
    points = [(3.0, 0.5), (2.5, 0.6), (2.6, 0.7), (2.0, 0.9), (3.1, 0.4), (3.2, 0.45)]
    for i, (loss, ms) in enumerate(points):
        trial = study.ask()
        trial.suggest_categorical("mamba2", [1, 2])
        trial.set_user_attr("pattern", "M" * (1 + i % 2))
        trial.set_user_attr("decode_bytes", 1000 - i)  # each trial the least by some axis
        study.tell(trial, [loss, ms])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(experiment_id(client, "ms", uri)).info.run_id
    report = write_report(study, spec.search, tmp_path / "report", RunLog(client, run))
    # By hand: (2.5, 0.6) beats (2.6, 0.7) and (3.1, 0.4) beats (3.2, 0.45); with decode_bytes
    # as a third axis, nothing would be beaten.
    assert [(r["val_loss"], r["decode_ms"]) for r in report.front] == [
        (2.0, 0.9), (2.5, 0.6), (3.0, 0.5), (3.1, 0.4)
    ]  # fmt: skip
    assert (tmp_path / "report" / "pareto.png").stat().st_size > 0


# ---- whole searches ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def dominated(a: dict, b: dict, axes: list[str]) -> bool:
    """b is at least as good as a on every axis and better on one (all minimised)."""
    return all(b[x] <= a[x] for x in axes) and any(b[x] < a[x] for x in axes)


def test_search_runs_in_parallel_links_mlflow_and_prunes_a_bad_trial(
    tmp_path, corpus_dir, local_ray
):
    # The pruner waits for six finished trials: these six all finish.
    search = "trials: 6\nparallel: 2\nstartup_trials: 6\n" + textwrap.dedent(SPACE)
    spec = load_search(write_spec(tmp_path, corpus_dir, "tiny", search))
    options = StudyOptions(results_dir=tmp_path / "results")
    report = run_search(spec, options, SearchOptions())

    storage = open_storage(str(tmp_path / "results" / "tiny" / "optuna.journal"))
    study = optuna.load_study(study_name="tiny", storage=storage)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6
    client = MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    runs = []
    for t in trials:
        assert abs(t.user_attrs["params"] / 30_000 - 1) <= 0.15  # matched to the budget
        # The worker reported each interval evaluation to the storage, at tokens trained.
        assert sorted(t.intermediate_values) == [TOKENS_PER_STEP * 8, TOKENS_PER_STEP * 16]
        run = client.get_run(t.user_attrs["mlflow_run_id"])  # linked both ways
        assert run.data.tags["optuna.study"] == "tiny"
        assert run.data.tags["optuna.trial"] == str(t.number)
        assert run.data.tags["mlflow.parentRunId"] == study.user_attrs["mlflow_parent_run_id"]
        assert run.data.tags["hybridscale.pattern"] == t.user_attrs["pattern"]
        assert run.data.metrics["val_loss"] == pytest.approx(t.value)
        runs.append(run.info)
    # Two trials trained at the same time: some pair of MLflow runs overlaps.
    assert any(a.start_time < b.end_time and b.start_time < a.end_time
               for a in runs for b in runs if a is not b)  # fmt: skip

    # The report: the best trial, a Pareto front no trial dominates, on disk and on MLflow.
    assert report.best[0]["trial"] == study.best_trial.number
    rows = [{"val_loss": t.value, "decode_bytes": t.user_attrs["decode_bytes"],
             "trial": t.number} for t in trials]  # fmt: skip
    axes = ["val_loss", "decode_bytes"]
    front = {r["trial"] for r in rows if not any(dominated(r, o, axes) for o in rows)}
    assert {r["trial"] for r in report.front} == front
    folder = tmp_path / "results" / "tiny" / "search"
    with open(folder / "pareto.csv") as f:
        assert {int(r["trial"]) for r in csv.DictReader(f)} == front
    assert (folder / "pareto.png").stat().st_size > 0
    assert set(report.importances["val_loss"]) <= {"mamba2", "attention", "mlp", "lr"}
    parent = study.user_attrs["mlflow_parent_run_id"]
    logged = {a.path for a in client.list_artifacts(parent, "search")}
    assert {"search/best.csv", "search/pareto.csv", "search/pareto.png",
            "search/importances.json", "search/trials.csv"} <= logged  # fmt: skip

    # A bad trial (a learning rate that learns nothing), enqueued, is pruned at its first
    # evaluation: the median of the finished trials there is far below it. The search
    # resumes by name and keeps the six it has.
    study.enqueue_trial({"mamba2": 2, "attention": 1, "mlp": 1, "lr": 1e-7})
    run_search(spec, options, SearchOptions(trials=7))
    after = optuna.load_study(study_name="tiny", storage=storage).get_trials()
    assert [(t.number, t.value) for t in after[:6]] == [(t.number, t.value) for t in trials]
    bad = after[6]
    assert bad.state == TrialState.PRUNED and bad.params["lr"] == 1e-7
    assert list(bad.intermediate_values) == [TOKENS_PER_STEP * 8]
    run = client.get_run(bad.user_attrs["mlflow_run_id"])
    assert run.data.tags["hybridscale.status"] == "pruned"


def finished_runs(results: Path, study: str) -> dict[str, int]:
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name(study)
    counts: dict[str, int] = {}
    for run in client.search_runs([exp.experiment_id], "tags.kind = 'trial'"):
        if run.data.tags.get("hybridscale.status") == "finished":
            trial = run.data.tags["hybridscale.trial_id"]
            counts[trial] = counts.get(trial, 0) + 1
    return counts


def test_killed_search_resumes_without_losing_or_repeating_trials(
    tmp_path, corpus_dir, local_ray, capsys
):
    search = "trials: 4\nparallel: 2\npruner: none\n" + textwrap.dedent(SPACE)
    path = write_spec(tmp_path, corpus_dir, "resume", search, steps=24)
    results = tmp_path / "results"
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    cmd = [sys.executable, "-m", "runners.cli", "search", str(path), "--results", str(results),
           "--storage", url, "--cpus", "2"]  # fmt: skip

    driver = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)  # fmt: skip
    deadline = time.time() + 300

    def wait_for(ready) -> None:
        while not ready():
            assert time.time() < deadline and driver.poll() is None, driver.stdout.read()
            time.sleep(0.5)

    # Trial folders appear once the driver has made the storage: only then open it.
    wait_for(lambda: (results / "resume" / "trials").exists())
    storage = open_storage(url)  # waits out the driver's and workers' write locks

    def trials() -> list:
        return optuna.load_study(study_name="resume", storage=storage).get_trials()

    wait_for(lambda: any(t.state == TrialState.COMPLETE for t in trials()))
    # Kill the driver and its whole local Ray (raylet, workers: its descendants), mid-search.
    family = [driver.pid] + [p.pid for p in psutil.Process(driver.pid).children(recursive=True)]
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    driver.wait()
    before = {t.number: t.value for t in trials() if t.state == TrialState.COMPLETE}
    cut_off = [t.number for t in trials() if t.state == TrialState.RUNNING]
    assert 1 <= len(before) < 4 and cut_off

    # Restarted (here, in this process's Ray: the driver is the same code either way).
    options = StudyOptions(results_dir=results)
    run_search(load_search(path), options, SearchOptions(storage=url))
    assert f"resuming {len(cut_off)} running trial(s)" in capsys.readouterr().out
    after = trials()
    assert [t.number for t in after] == list(range(4))  # none lost, none asked twice
    assert all(t.state == TrialState.COMPLETE for t in after)
    assert {n: v for n, v in ((t.number, t.value) for t in after) if n in before} == before
    # New trials are new points (a restarted sampler does not replay its first draws), and
    # every config trained to the end exactly once in the MLflow store.
    assert len({t.user_attrs["trial_id"] for t in after}) == 4
    assert finished_runs(results, "resume") == {t.user_attrs["trial_id"]: 1 for t in after}


def test_search_against_modelled_decode_time(tmp_path, corpus_dir, local_ray):
    """Loss against decode_ms, the cost model's milliseconds per generated token at the
    search's decode_batch and decode_context: each trial's value is recomputed here from
    its recorded config, and the front is the brute-force one."""
    search = ("trials: 3\nparallel: 2\nobjectives: [val_loss, decode_ms]\ndecode_batch: 4\n"
              "decode_context: 2048\n" + textwrap.dedent(SPACE))  # fmt: skip
    spec = load_search(write_spec(tmp_path, corpus_dir, "ms", search, steps=8))
    report = run_search(spec, StudyOptions(results_dir=tmp_path / "results"), SearchOptions())

    storage = open_storage(str(tmp_path / "results" / "ms" / "optuna.journal"))
    trials = optuna.load_study(study_name="ms", storage=storage).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    client = MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    for t in trials:
        model = TrialConfig.model_validate_json(t.user_attrs["config"]).model
        expected = decode_seconds_per_token(model, 4, 2048) * 1e3
        assert expected != pytest.approx(decode_seconds_per_token(model, 1, 2048) * 1e3)
        assert t.values[1] == pytest.approx(expected, rel=1e-12)
        assert t.user_attrs["decode_ms"] == pytest.approx(expected, rel=1e-12)
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert t.values[0] == pytest.approx(run.data.metrics["val_loss"])

    rows = [{"val_loss": t.values[0], "decode_ms": t.values[1], "trial": t.number}
            for t in trials]  # fmt: skip
    axes = ["val_loss", "decode_ms"]
    front = {r["trial"] for r in rows if not any(dominated(r, o, axes) for o in rows)}
    assert {r["trial"] for r in report.front} == front == {r["trial"] for r in report.best}
    with open(tmp_path / "results" / "ms" / "search" / "pareto.csv") as f:
        written = {int(r["trial"]): float(r["decode_ms"]) for r in csv.DictReader(f)}
    assert written == {r["trial"]: pytest.approx(r["decode_ms"]) for r in rows
                       if r["trial"] in front}  # fmt: skip


def test_search_trials_honour_the_specs_resources(tmp_path, corpus_dir, local_ray):
    """A search's trials run as a study's do: here on two data-parallel workers, sharded."""
    search = "trials: 1\nparallel: 1\npruner: none\n" + textwrap.dedent(SPACE)
    path = write_spec(tmp_path, corpus_dir, "dp", search, steps=4)
    path.write_text(path.read_text() + "resources: {workers: 2, shard_from: 1}\n")
    options = StudyOptions(results_dir=tmp_path / "results", device="cpu")
    run_search(load_search(path), options, SearchOptions())
    storage = open_storage(str(tmp_path / "results" / "dp" / "optuna.journal"))
    (trial,) = optuna.load_study(study_name="dp", storage=storage).get_trials()
    assert trial.state == TrialState.COMPLETE, trial.user_attrs
    tags = MlflowClient(options.uri()).get_run(trial.user_attrs["mlflow_run_id"]).data.tags
    assert (tags["hybridscale.workers"], tags["hybridscale.sharded"]) == ("2", "True")
