"""Data-parallel trials on a real local Ray (Ray Train, gloo on CPU), real sqlite MLflow.

The reference is the same trial on one worker, trained in this process: at the same
global batch, two ranks that each take half of every (seed, step) batch and average
their gradients must draw the same loss curve, whether each holds the whole model (DDP)
or half of it (FSDP). fp32 on CPU; the only difference is the order of floating-point
sums (half-batch means averaged vs one full-batch mean), which stays below 1e-5 relative
over these few steps.
"""

import os
import signal
import textwrap
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient

from data import open_data
from runners.config import TrialConfig
from runners.distributed import end_group, start_group
from runners.driver import StudyOptions
from runners.scheduler import run_study
from runners.spec import SpecError, load_spec
from runners.train import Trainer, TrainOptions

MODEL = {"pattern": "M*-", "d_model": 32, "n_heads": 4, "d_state": 8, "ssm_headdim": 16,
         "chunk_size": 16, "vocab_size": 264}  # fmt: skip


@pytest.fixture(scope="module")
def local_ray():
    # More logical CPUs than this 2-core box has: room for a 2-worker and two 1-worker trials.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def train_loss_curve(uri: str, run_id: str) -> list[float]:
    history = MlflowClient(uri).get_metric_history(run_id, "train_loss")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def options(folder: Path, data_cache: Path, **kw) -> TrainOptions:
    return TrainOptions(workdir=folder, data_dir=data_cache, device="cpu",
                        tracking_uri=f"sqlite:///{folder / 'mlflow.db'}", checkpoint_every=2,
                        **kw)  # fmt: skip


@pytest.fixture(scope="module")
def trial(corpus_dir) -> TrialConfig:
    return TrialConfig.model_validate({
        "model": MODEL,
        "data": {"paths": [str(corpus_dir / "*.py")], "seq_len": 64},
        "training": {"tokens": 64 * 8 * 8, "batch_size": 8, "micro_batch_size": 2, "lr": 3e-3,
                     "precision": "fp32"},
    })  # fmt: skip


@pytest.fixture(scope="module")
def one_worker(trial, tmp_path_factory, data_cache) -> Trainer:
    """The reference: the whole trial on one worker, in this process."""
    single = Trainer(trial, options(tmp_path_factory.mktemp("one"), data_cache))
    assert single.run().status == "finished"
    return single


class TestTwoWorkers:
    """The two-worker legs, on one group of two Ray Train workers, DDP and FSDP alike, as
    a study's groups take trial after trial: a group takes ~40 s to start here. The group
    ends with this class, giving its CPUs back to the tests below."""

    @pytest.fixture(scope="class")
    def two_workers(self, trial, tmp_path_factory, data_cache, local_ray):
        open_data(trial.data, data_cache)  # prepared once here: ranks never race to build it
        group = start_group(2, False, options(tmp_path_factory.mktemp("group"), data_cache))
        yield group
        end_group(group)

    @pytest.mark.parametrize("shard", [False, True], ids=["ddp", "fsdp"])
    def test_two_workers_match_one_worker_and_resume(
        self, shard, trial, one_worker, tmp_path, data_cache, two_workers
    ):
        reference = [loss for _, _, loss in one_worker.history]
        # Two workers of two micro-batches each, stopped after 3 steps; one worker, in this
        # process, for steps 4-5; two workers again to the end. Every leg resumes from the
        # last one's checkpoint: the same file whatever wrote it, replicated, sharded or alone.
        parallel = options(tmp_path, data_cache, stop_after_steps=3, shard=shard)
        assert ray.get(two_workers.train.remote(trial, parallel)).status == "interrupted"
        assert Trainer(trial, replace(parallel, stop_after_steps=2)).run().status == "interrupted"
        # The last leg checkpoints by rank 0's clock, after every step (0 s): sharded, the ranks
        # gather the state together, so all must learn from rank 0 when (or they would hang).
        parallel.stop_after_steps, parallel.checkpoint_every, parallel.checkpoint_every_s = (
            None, None, 0.0
        )  # fmt: skip
        outcome = ray.get(two_workers.train.remote(trial, parallel))
        assert outcome.status == "finished", outcome.reason

        curve = train_loss_curve(parallel.tracking_uri, outcome.run_id)
        assert len(curve) == len(reference) == 8
        for step, (a, b) in enumerate(zip(curve, reference, strict=True), 1):
            assert abs(a - b) <= 1e-5 * abs(b), (step, a, b)
        expected = one_worker.evaluate()["val_loss"]
        assert outcome.metrics["val_loss"] == pytest.approx(expected, rel=1e-5)
        # Rank 0 alone keeps the record: one run, continued across the resumes, two workers.
        client = MlflowClient(parallel.tracking_uri)
        runs = client.search_runs([client.get_experiment_by_name("hybridscale").experiment_id])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        assert runs[0].data.tags["hybridscale.workers"] == "2"
        assert runs[0].data.tags["hybridscale.sharded"] == str(shard)
        saved = client.get_metric_history(outcome.run_id, "checkpoint_s")
        assert sorted({m.step for m in saved}) == [2, 3, 4, 5, 6, 7, 8]
        log = (tmp_path / trial.trial_id / "train.log").read_text().splitlines()
        firsts = [line for line in log if ": first step (" in line]  # what each leg's first paid
        assert len(firsts) == 3  # the three legs: two workers, one, two
        assert len(log) - len(firsts) == 8 + 1  # each leg resumed after the last's checkpoint


SPEC = """
name: mixed
model: {{d_model: 32, n_heads: 4, d_state: 8, ssm_headdim: 16, chunk_size: 16,
         vocab_size: 264, pattern: "M*-"}}
data: {{paths: ["{corpus}/*.py"], seq_len: 64}}
training: {{tokens: {tokens}, batch_size: {batch}, lr: {lr}, warmup_fraction: 0.0}}
sweep: {{size: [{{d_model: 32}}, {{d_model: 48}}, {{d_model: 64}}]}}
resources: {resources}
"""


def write_spec(tmp_path, corpus_dir, resources: str, batch=4, steps=8, lr=3e-3):
    path = tmp_path / "mixed.yaml"
    path.write_text(textwrap.dedent(SPEC.format(corpus=corpus_dir, resources=resources,
                                                batch=batch, tokens=64 * batch * steps,
                                                lr=lr)))  # fmt: skip
    return path


def test_study_mixes_data_parallel_and_single_trials(tmp_path, corpus_dir, local_ray, capsys):
    # d_model 32 and 48 have 28K and 56K parameters: one worker each; d_model 64 has 93K
    # and takes two, sharded. The 48 would be sharded too, but it runs on one worker.
    path = write_spec(tmp_path, corpus_dir, "{workers: {80K: 2, 1M: 8}, shard_from: 50K}")
    spec, trials = load_spec(path)
    assert [spec.resources.workers_for(t) for t in trials] == [1, 1, 2]
    options = StudyOptions(results_dir=tmp_path / "results", device="cpu")
    rows = run_study(spec, trials, options)
    assert [r["status"] for r in rows] == ["finished"] * 3, rows
    # 2 + 1 + 1 workers fill the 4 CPUs: all three started together.
    assert "running 3 finished 0 failed 0" in capsys.readouterr().out
    client = MlflowClient(options.uri())
    runs = [client.get_run(row["run_id"]) for row in rows]
    assert [run.data.tags["hybridscale.workers"] for run in runs] == ["1", "1", "2"]
    assert [run.data.tags["hybridscale.sharded"] for run in runs] == ["False", "False", "True"]
    assert all(run.data.metrics["tokens"] == 64 * 4 * 8 for run in runs)  # whole budgets

    # A huge learning rate: both ranks of the 2-worker trial see the same global loss blow
    # up and end together, as one worker does. More workers than the cluster's 4 CPUs: a
    # clear failure at once, not a wait.
    path = write_spec(tmp_path, corpus_dir, "{workers: {50K: 2, 80K: 8}}", batch=8, steps=6,
                      lr=50.0)  # fmt: skip
    spec, trials = load_spec(path)
    rows = run_study(spec, trials, options)
    assert [r["status"] for r in rows] == ["diverged", "diverged", "failed"], rows
    diverged = client.get_run(rows[1]["run_id"]).data.tags
    assert diverged["hybridscale.workers"] == "2" and "loss" in diverged["hybridscale.reason"]
    assert rows[2]["reason"].startswith("needs 8 CPU")


def test_data_parallel_trials_share_one_worker_group(tmp_path, corpus_dir, data_cache, local_ray):
    """Two 4-worker trials on 4 CPUs run one after the other on the same Ray Train workers
    (rank 0's process wrote both trials' pid files), and the second, on workers that
    trained another model first, still ends where one worker does."""
    path = write_spec(tmp_path, corpus_dir, "{workers: 4}", steps=6)
    spec, trials = load_spec(path)
    trials = trials[:2]  # d_model 32 and 48
    study = StudyOptions(results_dir=tmp_path / "results", device="cpu")
    rows = run_study(spec, trials, study)
    assert [r["status"] for r in rows] == ["finished"] * 2, rows
    folder = tmp_path / "results" / "mixed" / "trials"
    pids = {(folder / t.trial_id / "pid").read_text() for t in trials}
    assert len(pids) == 1, pids
    second = trials[1]
    alone = Trainer(second, options(tmp_path / "alone", data_cache))
    assert alone.run().status == "finished"
    # A study logs every 10th step and the last: the 6th loss, which all before it shaped.
    assert train_loss_curve(study.uri(), rows[1]["run_id"]) == [
        pytest.approx(alone.history[-1][2], rel=1e-5)
    ]
    assert rows[1]["val_loss"] == pytest.approx(alone.evaluate()["val_loss"], rel=1e-5)


def test_a_killed_rank_is_retried_on_new_workers(tmp_path, corpus_dir, local_ray):
    """Rank 0 of a 2-worker trial killed mid-training: its group is broken, so the retry
    starts new workers, which resume from the checkpoint and finish the same MLflow run."""
    spec, trials = load_spec(write_spec(tmp_path, corpus_dir, "{workers: 2}", steps=400))
    trials = trials[:1]
    study = StudyOptions(results_dir=tmp_path / "results", device="cpu", checkpoint_every_s=1)
    trial_dir = tmp_path / "results" / "mixed" / "trials" / trials[0].trial_id
    rows: list = []
    thread = threading.Thread(target=lambda: rows.extend(run_study(spec, trials, study)))
    thread.start()
    deadline = time.time() + 180
    while not (trial_dir / "checkpoint.pt").exists():  # a second into training
        assert time.time() < deadline, "the trial never checkpointed"
        time.sleep(0.2)
    killed = (trial_dir / "pid").read_text()
    os.kill(int(killed), signal.SIGKILL)
    thread.join(timeout=600)
    assert rows and rows[0]["status"] == "finished", rows
    assert (trial_dir / "pid").read_text() != killed  # another rank 0 finished it
    client = MlflowClient(study.uri())
    runs = client.search_runs([client.get_experiment_by_name("mixed").experiment_id],
                              "tags.kind = 'trial'")  # fmt: skip
    assert [r.info.status for r in runs] == ["FINISHED"]  # the one run, resumed


def test_bad_workers_are_spec_errors(tmp_path, corpus_dir):
    with pytest.raises(SpecError, match=r"resources\.workers: trial \w+ has batch_size 4, "
                                        r"not a multiple of its 3 workers"):  # fmt: skip
        load_spec(write_spec(tmp_path, corpus_dir, "{workers: 3}"))
    with pytest.raises(SpecError, match=r"resources\.workers: 0: give a number of workers >= 1"):
        load_spec(write_spec(tmp_path, corpus_dir, "{workers: 0}"))
    with pytest.raises(SpecError, match=r"resources\.workers\.lots\.\[key\]: 'lots' is not a"):
        load_spec(write_spec(tmp_path, corpus_dir, "{workers: {lots: 2}}"))
