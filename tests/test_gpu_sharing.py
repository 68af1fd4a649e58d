"""How the scheduler shares GPUs among single-GPU trials, on a local Ray with two logical
GPUs: Ray hands out GPU ids with no GPU behind them, and the trials train on the CPU."""

import textwrap

import pytest
import ray
from mlflow.tracking import MlflowClient

from records.trial_run import GPU_IDS_TAG, GPU_SHARE_TAG
from runners.driver import StudyOptions, spread_share
from runners.scheduler import run_study
from runners.spec import load_spec


def test_spread_share_puts_n_trials_on_each_gpu():
    assert spread_share(0.125, trials=3, whole_gpus=2) == 0.5  # two on one GPU, one on the other
    assert spread_share(0.125, trials=6, whole_gpus=2) == pytest.approx(1 / 3)
    assert spread_share(0.125, trials=1, whole_gpus=2) == 1.0
    assert spread_share(0.125, trials=40, whole_gpus=2) == 0.125  # they fill both anyway
    assert spread_share(0.75, trials=3, whole_gpus=2) == 0.75  # never below the trial's need
    # One GPU: no spreading. Six trunks at 1/6 each once held it all, and the budgets
    # branched from them waited for a whole trunk to end (H100, 2026-12-07).
    assert spread_share(0.125, trials=6, whole_gpus=1) == 0.125


@pytest.fixture
def ray_with_two_gpus():
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)  # fmt: skip
    yield
    ray.shutdown()


def test_small_trials_spread_over_idle_gpus(tmp_path, corpus_dir, ray_with_two_gpus):
    """Three trials needing an eighth of a GPU each: Ray's first fit would put all three
    on GPU 0 and leave GPU 1 idle; with halves they take both."""
    path = tmp_path / "small.yaml"
    path.write_text(textwrap.dedent(f"""
        name: small
        model: {{d_model: 32, n_heads: 4, d_state: 8, ssm_headdim: 16, chunk_size: 16,
                 vocab_size: 264}}
        data: {{paths: ["{corpus_dir}/*.py"], seq_len: 64}}
        training: {{tokens: {64 * 4 * 3}, batch_size: 4, lr: 3.0e-3}}
        sweep: {{pattern: ["M*-", "*-", "MM"]}}
    """))  # fmt: skip
    spec, trials = load_spec(path)
    options = StudyOptions(results_dir=tmp_path / "results", device="cpu")
    rows = run_study(spec, trials, options)
    assert [r["status"] for r in rows] == ["finished"] * 3, rows
    client = MlflowClient(options.uri())
    tags = [client.get_run(row["run_id"]).data.tags for row in rows]
    assert sorted(t[GPU_IDS_TAG] for t in tags) == ["0", "0", "1"]
    assert [t[GPU_SHARE_TAG] for t in tags] == ["0.5"] * 3


def test_mixed_study_runs_large_trials_first_on_shared_workers(
    tmp_path, corpus_dir, ray_with_two_gpus
):
    """Two trials on both GPUs and two single-GPU ones: the large ones run first, one after
    the other on the same two workers (rank 0's one process); the small ones then take a
    GPU each, never waiting on a GPU a running trial left idle."""
    path = tmp_path / "mixed.yaml"
    path.write_text(textwrap.dedent(f"""
        name: mixed
        model: {{d_model: 32, n_heads: 4, d_state: 8, ssm_headdim: 16, chunk_size: 16,
                 vocab_size: 264, pattern: "M*-"}}
        data: {{paths: ["{corpus_dir}/*.py"], seq_len: 64}}
        training: {{tokens: {64 * 4 * 4}, batch_size: 4, lr: 3.0e-3}}
        sweep: {{size: [{{d_model: 64}}, {{d_model: 32}}], seed: [0, 1]}}
        resources: {{workers: {{50K: 2}}}}
    """))  # fmt: skip
    spec, trials = load_spec(path)
    large = [t for t in trials if spec.resources.workers_for(t) == 2]
    small = [t for t in trials if spec.resources.workers_for(t) == 1]
    assert len(large) == len(small) == 2
    options = StudyOptions(results_dir=tmp_path / "results", device="cpu")
    rows = {r["trial"]: r for r in run_study(spec, trials, options)}
    assert [r["status"] for r in rows.values()] == ["finished"] * 4, rows
    folder = tmp_path / "results" / "mixed" / "trials"
    assert len({(folder / t.trial_id / "pid").read_text() for t in large}) == 1
    client = MlflowClient(options.uri())
    run = {trial_id: client.get_run(row["run_id"]) for trial_id, row in rows.items()}
    assert sorted(run[t.trial_id].data.tags[GPU_IDS_TAG] for t in small) == ["0", "1"]
    large_end = max(run[t.trial_id].info.end_time for t in large)
    assert all(run[t.trial_id].info.start_time >= large_end for t in small)
