"""The scheduler with a real local Ray and a real sqlite MLflow store."""

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient

from runners.driver import StudyOptions
from runners.scheduler import run_study
from runners.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent


def write_spec(tmp_path: Path, corpus_dir: Path, name: str, patterns: list[str], steps: int):
    text = f"""
    name: {name}
    model: {{d_model: 32, n_heads: 4, d_state: 8, ssm_headdim: 16, chunk_size: 16,
             mamba1_d_state: 4, vocab_size: 264}}
    data: {{paths: ["{corpus_dir}/*.py"], seq_len: 64}}
    training: {{tokens: {64 * 4 * steps}, batch_size: 4, lr: 3.0e-3}}
    sweep: {{pattern: {patterns}}}
    """
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def finished_runs(tmp_path: Path, study: str) -> dict[str, int]:
    client = MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(study)
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'trial'")
    counts: dict[str, int] = {}
    for run in runs:
        if run.data.tags.get("hybridscale.status") == "finished":
            trial = run.data.tags["hybridscale.trial_id"]
            counts[trial] = counts.get(trial, 0) + 1
    return counts


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_four_trial_study_completes(tmp_path, corpus_dir, local_ray):
    path = write_spec(tmp_path, corpus_dir, "four", ["M*-", "*-", "MM", "m-"], steps=6)
    spec, trials = load_spec(path)
    rows = run_study(spec, trials, StudyOptions(results_dir=tmp_path / "results"))
    assert [r["status"] for r in rows] == ["finished"] * 4
    assert all(r["val_loss"] > 0 for r in rows)
    assert finished_runs(tmp_path, "four") == {t.trial_id: 1 for t in trials}
    assert (tmp_path / "results" / "four" / "results.parquet").exists()
    # Again: nothing left to run, nothing duplicated.
    run_study(spec, trials, StudyOptions(results_dir=tmp_path / "results"))
    assert finished_runs(tmp_path, "four") == {t.trial_id: 1 for t in trials}


def test_cli_options_reach_every_trial(tmp_path, corpus_dir, local_ray):
    """`--checkpoint-every-s 0` checkpoints after every step (0 is not 'the default'), and
    `--profile-steps 2 3` leaves each trial a trace of those steps."""
    from runners.cli import main

    path = write_spec(tmp_path, corpus_dir, "flags", ["M*-", "*-"], steps=4)
    results = tmp_path / "results"
    assert main(["study", str(path), "--results", str(results), "--device", "cpu",
                 "--checkpoint-every-s", "0", "--profile-steps", "2", "3"]) == 0  # fmt: skip
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    for trial in load_spec(path)[1]:
        (run,) = client.search_runs(
            [client.get_experiment_by_name("flags").experiment_id],
            f"tags.`hybridscale.trial_id` = '{trial.trial_id}'",
        )
        saved = client.get_metric_history(run.info.run_id, "checkpoint_s")
        assert sorted({m.step for m in saved}) == [1, 2, 3, 4]
        assert (results / "flags" / "trials" / trial.trial_id / "profile" / "rank0.json").exists()


def test_killed_worker_is_retried_from_its_checkpoint(tmp_path, corpus_dir, local_ray):
    path = write_spec(tmp_path, corpus_dir, "kill", ["M*-"], steps=400)
    spec, trials = load_spec(path)
    trial_dir = tmp_path / "results" / "kill" / "trials" / trials[0].trial_id
    rows: list = []
    thread = threading.Thread(
        target=lambda: rows.extend(
            run_study(
                spec, trials, StudyOptions(results_dir=tmp_path / "results", checkpoint_every_s=1)
            )
        )
    )
    thread.start()
    deadline = time.time() + 120
    while not (trial_dir / "checkpoint.pt").exists():  # a second into training
        assert time.time() < deadline, "the trial never checkpointed"
        time.sleep(0.2)
    os.kill(int((trial_dir / "pid").read_text()), signal.SIGKILL)
    thread.join(timeout=600)
    assert rows and rows[0]["status"] == "finished"
    assert finished_runs(tmp_path, "kill") == {trials[0].trial_id: 1}


def test_driver_killed_and_rerun_skips_finished(tmp_path, corpus_dir):
    # Four trials on two CPUs: when the first finishes, at least one has not started.
    path = write_spec(tmp_path, corpus_dir, "rerun", ["M*-", "*-", "MM", "m-"], steps=40)
    cmd = [sys.executable, "-m", "runners.cli", "study", str(path),
           "--results", str(tmp_path / "results"), "--cpus", "2"]  # fmt: skip
    driver = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)  # fmt: skip
    deadline = time.time() + 300
    # Trial folders appear once the driver has set up the store: only then read it.
    while not (tmp_path / "results" / "rerun" / "trials").exists() or not finished_runs(
        tmp_path, "rerun"
    ):
        assert time.time() < deadline and driver.poll() is None, driver.stdout.read()
        time.sleep(0.5)
    # Kill the driver and its whole local Ray (raylet, workers: its descendants), mid-study.
    family = [driver.pid] + [p.pid for p in psutil.Process(driver.pid).children(recursive=True)]
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    driver.wait()
    first = finished_runs(tmp_path, "rerun")
    assert 1 <= len(first) < 4

    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{len(first)} already finished" in rerun.stdout
    _, trials = load_spec(path)
    assert finished_runs(tmp_path, "rerun") == {t.trial_id: 1 for t in trials}


def study_run(tmp_path: Path, study: str):
    client = MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(study)
    (run,) = client.search_runs([exp.experiment_id], "tags.kind = 'study'")
    return run


def trial_runs_of(tmp_path: Path, study: str) -> list:
    client = MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(study)
    return client.search_runs([exp.experiment_id], "tags.kind = 'trial'")


def test_parent_run_ends_finished_or_failed(tmp_path, corpus_dir, local_ray):
    path = write_spec(tmp_path, corpus_dir, "ends", ["M*-"], steps=3)
    spec, trials = load_spec(path)
    run_study(spec, trials, StudyOptions(results_dir=tmp_path / "results"))
    assert study_run(tmp_path, "ends").info.status == "FINISHED"
    # A learning rate that blows up: the trial diverges, and the study ends FAILED.
    path.write_text(path.read_text().replace("lr: 3.0e-3", "lr: 50.0"))
    spec, trials = load_spec(path)
    rows = run_study(spec, trials, StudyOptions(results_dir=tmp_path / "results"))
    assert [r["status"] for r in rows] == ["diverged"]
    assert study_run(tmp_path, "ends").info.status == "FAILED"


def start_cli_study(path: Path, tmp_path: Path, preexec_fn=None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "runners.cli", "study", str(path),
           "--results", str(tmp_path / "results"), "--cpus", "2"]  # fmt: skip
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, preexec_fn=preexec_fn)  # fmt: skip


def wait_for_running_run(driver: subprocess.Popen, tmp_path: Path, study: str):
    """The first trial run the store shows RUNNING (the trial is training)."""
    deadline = time.time() + 120
    while True:
        assert time.time() < deadline and driver.poll() is None, driver.stdout.read()
        # Trial folders appear once the driver has set up the store: only then read it.
        if (tmp_path / "results" / study / "trials").exists():
            running = [r for r in trial_runs_of(tmp_path, study) if r.info.status == "RUNNING"]
            if running:
                return running[0]
        time.sleep(0.2)


def ignoring_sigint():
    """As a shell script's background job starts: with SIGINT ignored, which Ray's
    processes inherit. Trials must still hear Ctrl-C (they once ran on to the end)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_interrupted_study_ends_killed_and_reopens_on_resume(tmp_path, corpus_dir):
    # Long enough (seconds of training on a CPU) that Ctrl-C lands mid-training, not in
    # the moment between the store showing a trial RUNNING and its end.
    path = write_spec(tmp_path, corpus_dir, "ctrlc", ["M*-", "*-"], steps=500)
    driver = start_cli_study(path, tmp_path, preexec_fn=ignoring_sigint)
    wait_for_running_run(driver, tmp_path, "ctrlc")
    driver.send_signal(signal.SIGINT)
    out, _ = driver.communicate(timeout=120)
    assert "interrupted" in out, out
    assert study_run(tmp_path, "ctrlc").info.status == "KILLED"
    assert {r.info.status for r in trial_runs_of(tmp_path, "ctrlc")} == {"KILLED"}

    # Run again: the study's run is live again, then FINISHED with its trials, each of
    # which resumed its own run from its checkpoint.
    rerun = start_cli_study(path, tmp_path)
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out
    assert study_run(tmp_path, "ctrlc").info.status == "FINISHED"
    _, trials = load_spec(path)
    assert finished_runs(tmp_path, "ctrlc") == {t.trial_id: 1 for t in trials}


@pytest.fixture(scope="module")
def killed_before_checkpoint(tmp_path_factory, corpus_dir):
    """A one-trial study through the CLI whose worker is SIGKILLed once its run exists but
    long before its first checkpoint (the default interval is 10 minutes): the retry
    trains it afresh. Returns the study's folder and the driver's output."""
    tmp_path = tmp_path_factory.mktemp("orphan")
    path = write_spec(tmp_path, corpus_dir, "orphan", ["M*-"], steps=150)
    driver = start_cli_study(path, tmp_path)
    first = wait_for_running_run(driver, tmp_path, "orphan")
    trial_dir = tmp_path / "results" / "orphan" / "trials" / first.data.tags["hybridscale.trial_id"]
    assert not (trial_dir / "checkpoint.pt").exists()
    os.kill(int((trial_dir / "pid").read_text()), signal.SIGKILL)
    out, _ = driver.communicate(timeout=300)
    assert driver.returncode == 0, out
    return tmp_path, first.info.run_id, out


def test_a_worker_killed_before_its_first_checkpoint_leaves_no_live_orphan(
    killed_before_checkpoint,
):
    tmp_path, orphan, _ = killed_before_checkpoint
    runs = {r.info.run_id: r for r in trial_runs_of(tmp_path, "orphan")}
    assert sorted(r.info.status for r in runs.values()) == ["FAILED", "FINISHED"]
    assert runs[orphan].info.status == "FAILED"
    assert runs[orphan].data.tags["hybridscale.status"] == "crashed"
    assert "WorkerCrashedError" in runs[orphan].data.tags["hybridscale.reason"]


def test_the_raylets_worker_died_message_stays_out_of_the_progress(killed_before_checkpoint):
    _, _, out = killed_before_checkpoint
    assert "crashed (WorkerCrashedError); retrying" in out, out
    assert "worker died" not in out.lower(), out


# ---- budgets branched from a longer run (runners/branching.py) -------------------------------

STEP = 4 * 64  # tokens a step: batch_size x seq_len


def write_budgets_spec(
    tmp_path: Path,
    corpus_dir: Path,
    name: str,
    sizes: list[int],
    steps: list[int],
    eval_every: int | None = None,
    **extra,
) -> Path:
    """One hybrid at several sizes and budgets (in steps), WSD with a 2-step warmup and a
    decay over the last quarter, evaluated every ``eval_every`` steps (None: at the end)."""
    shapes = ", ".join(f"{{d_model: {d}}}" for d in sizes)
    evals = f", eval_every_tokens: {eval_every * STEP}" if eval_every else ""
    text = f"""
    name: {name}
    model: {{pattern: "M*-", n_heads: 4, d_state: 8, ssm_headdim: 16, chunk_size: 16,
             vocab_size: 264}}
    data: {{paths: ["{corpus_dir}/*.py"], seq_len: 64, eval_tokens: 4096}}
    training: {{batch_size: 4, lr: 3.0e-3, schedule: wsd, warmup_tokens: {2 * STEP},
               decay_fraction: 0.25{evals}}}
    sweep: {{size: [{shapes}], tokens: {[s * STEP for s in steps]}}}
    """
    text += "".join(f"{key}: {value}\n" for key, value in extra.items())
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def histories(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


@pytest.fixture(scope="module")
def branched_and_alone(tmp_path_factory, corpus_dir, local_ray):
    """One hybrid at 3 sizes x budgets of 8, 16 and 32 steps, trained twice into one store:
    study "branched" (the 8 and 16 steps branch from the 32 at steps 6 and 12) and study
    "alone" (branch_budgets: false), the same trials each from step 0."""
    tmp_path = tmp_path_factory.mktemp("budgets")
    results = tmp_path / "results"
    out = {}
    for name, branch in (("branched", "true"), ("alone", "false")):
        path = write_budgets_spec(tmp_path, corpus_dir, name, [16, 24, 32], [8, 16, 32],
                                  eval_every=4, branch_budgets=branch)  # fmt: skip
        spec, trials = load_spec(path)
        out[name] = run_study(spec, trials, StudyOptions(results_dir=results))
    return tmp_path, spec, trials, out


def test_a_branched_budget_trains_the_curve_it_would_alone(branched_and_alone):
    tmp_path, _, trials, rows = branched_and_alone
    results = tmp_path / "results"
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    for study in ("branched", "alone"):
        assert [r["status"] for r in rows[study]] == ["finished"] * 9
    alone = {r["trial"]: r for r in rows["alone"]}
    trunks = {t.model.d_model: t.trial_id for t in trials if t.tokens == 32 * STEP}
    for trial, row in zip(trials, rows["branched"], strict=True):
        steps = trial.tokens // STEP
        run = client.get_run(row["run_id"])
        if steps < 32:  # its own run, tagged with its trunk and the step it began at
            assert run.data.tags["hybridscale.branched_from"] == trunks[trial.model.d_model]
            assert run.data.tags["hybridscale.branch_step"] == str(steps * 3 // 4)
        else:
            assert "hybridscale.branched_from" not in run.data.tags
        # Every step's loss, as the trial's checkpoint holds it, and the MLflow curves.
        curves = [
            torch.load(results / study / "trials" / trial.trial_id / "checkpoint.pt",
                       weights_only=False)["history"]
            for study in ("branched", "alone")
        ]  # fmt: skip
        assert [h[:2] for h in curves[0]] == [h[:2] for h in curves[1]]
        assert len(curves[0]) == steps
        assert max(abs(a[2] - b[2]) for a, b in zip(*curves, strict=True)) <= 1e-5
        for key in ("train_loss", "val_loss", "lr"):
            mine = histories(client, row["run_id"], key)
            theirs = histories(client, alone[row["trial"]]["run_id"], key)
            assert mine.keys() == theirs.keys(), key
            assert all(abs(mine[s] - theirs[s]) <= 1e-5 for s in mine), key
        assert row["flops"] == alone[row["trial"]]["flops"]
        shared = 0.75 if steps < 32 else 0.0  # of a branch's steps, its trunk trained
        assert row["spent_flops"] == pytest.approx(row["flops"] * (1 - shared), rel=1e-9)


def test_rerunning_a_branched_study_trains_nothing(branched_and_alone):
    tmp_path, spec, trials, _ = branched_and_alone
    before = {r.info.run_id for r in trial_runs_of(tmp_path, "alone")}
    run_study(spec, trials, StudyOptions(results_dir=tmp_path / "results"))
    assert {r.info.run_id for r in trial_runs_of(tmp_path, "alone")} == before
    assert finished_runs(tmp_path, "branched") == {t.trial_id: 1 for t in trials}


def test_fits_of_a_branched_study_equal_fits_of_its_trials_alone(branched_and_alone):
    from analysis.fit import fit_law, fit_nd, interval
    from analysis.table import columns, load_runs

    tmp_path = branched_and_alone[0]
    client = MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    studies = ("branched", "alone")
    points = {s: sorted(load_runs(client, s), key=lambda r: r["trial"]) for s in studies}
    for mine, theirs in zip(points["branched"], points["alone"], strict=True):
        assert (mine["trial"], mine["params"], mine["tokens"], mine["flops"]) == (
            theirs["trial"], theirs["params"], theirs["tokens"], theirs["flops"])  # fmt: skip
        assert mine["val_loss"] == pytest.approx(theirs["val_loss"], abs=1e-5)
    # L(N, D) of the branched trials differs from that of the same trials alone by well
    # under the alone fit's bootstrap uncertainty. (Not "inside its percentile interval":
    # a point estimate can sit just outside its own, as B once did at 10 resamples.)
    n, d, loss = columns(points["alone"], "params", "tokens", "val_loss")
    alone = fit_nd(n, d, loss, resamples=20)
    samples = alone.sample_params()
    n, d, loss = columns(points["branched"], "params", "tokens", "val_loss")
    for name, value in fit_law([n, d], loss).params().items():
        lo, hi = interval(samples[name])
        assert abs(value - alone.params()[name]) <= (hi - lo) / 2, (name, value, lo, hi)


def test_a_killed_trunk_is_retried_while_its_branches_wait(tmp_path, corpus_dir, local_ray, capsys):
    """The trunk (120 steps) is SIGKILLed once the 16-step budget has branched (step 12)
    and it has a checkpoint, long before the 100-step budget's decay (step 75): that one
    waits for the trunk's retry, which resumes from its checkpoint, then branches; a rerun
    trains nothing. One finished run per trial."""
    path = write_budgets_spec(tmp_path, corpus_dir, "killed", [32], [16, 100, 120])
    spec, trials = load_spec(path)
    trunk, middle = trials[2], trials[1]
    trials_dir = tmp_path / "results" / "killed" / "trials"
    options = StudyOptions(results_dir=tmp_path / "results", checkpoint_every_s=0.2)
    rows: list = []
    thread = threading.Thread(target=lambda: rows.extend(run_study(spec, trials, options)))
    thread.start()
    deadline = time.time() + 120
    while not ((trials_dir / trunk.trial_id / "branch_12.pt").exists()
               and (trials_dir / trunk.trial_id / "checkpoint.pt").exists()):  # fmt: skip
        assert time.time() < deadline, "the trunk never reached step 12 and a checkpoint"
        time.sleep(0.02)  # the trunk is killed within a step or two
    assert not (trials_dir / trunk.trial_id / "branch_75.pt").exists()
    os.kill(int((trials_dir / trunk.trial_id / "pid").read_text()), signal.SIGKILL)
    thread.join(timeout=300)
    assert [r["status"] for r in rows] == ["finished"] * 3
    out = capsys.readouterr().out
    assert f"{middle.trial_id} wait for trunk {trunk.trial_id}'s retry" in out, out
    assert f"{middle.trial_id} branches from {trunk.trial_id} at step 75" in out, out
    run_study(spec, trials, options)
    assert "3 already finished, 0 to run" in capsys.readouterr().out
    assert finished_runs(tmp_path, "killed") == {t.trial_id: 1 for t in trials}
    (trunk_run,) = [r for r in trial_runs_of(tmp_path, "killed")
                    if r.data.tags["hybridscale.trial_id"] == trunk.trial_id]  # fmt: skip
    assert trunk_run.info.status == "FINISHED"  # the one run, resumed
