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
from mlflow.tracking import MlflowClient

from runners.scheduler import StudyOptions, run_study
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
