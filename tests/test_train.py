import math
from dataclasses import replace

import pytest
import torch
from mlflow.tracking import MlflowClient

from runners.config import TrialConfig
from runners.train import Trainer, TrainOptions, train_trial


def tiny_trial(corpus_dir, **training) -> TrialConfig:
    return TrialConfig.model_validate({
        "model": {"pattern": "M*-", "d_model": 32, "n_heads": 4, "d_state": 8,
                  "ssm_headdim": 16, "chunk_size": 16, "vocab_size": 264},
        "data": {"paths": [str(corpus_dir / "*.py")], "seq_len": 64},
        "training": {"tokens": 64 * 8 * 12, "batch_size": 8, "lr": 3e-3,
                     "warmup_fraction": 0.1, **training},
    })  # fmt: skip


def options(tmp_path, data_cache, **kw) -> TrainOptions:
    return TrainOptions(
        workdir=tmp_path / "trials", data_dir=data_cache,
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", **kw,
    )  # fmt: skip


def test_loss_falls(tmp_path, corpus_dir, data_cache):
    trial = tiny_trial(corpus_dir, tokens=64 * 8 * 60, lr=5e-3)
    trainer = Trainer(trial, options(tmp_path, data_cache, checkpoint_every=1000))
    outcome = trainer.run()
    assert outcome.status == "finished", outcome.reason
    losses = [h[2] for h in trainer.history]
    assert len(losses) == 60
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0
    assert math.isfinite(outcome.metrics["val_loss"])


def test_resume_reproduces_uninterrupted_curve(tmp_path, corpus_dir, data_cache):
    trial = tiny_trial(corpus_dir)
    straight = Trainer(trial, options(tmp_path / "a", data_cache, checkpoint_every=4))
    assert straight.run().status == "finished"

    opts = options(tmp_path / "b", data_cache, checkpoint_every=4, stop_after_steps=5)
    assert train_trial(trial, opts).status == "interrupted"
    opts.stop_after_steps = None
    resumed = Trainer(trial, opts)
    outcome = resumed.run()
    assert outcome.status == "finished"
    assert len(resumed.history) == len(straight.history) == 12
    for (s1, t1, a), (s2, t2, b) in zip(straight.history, resumed.history, strict=True):
        assert (s1, t1) == (s2, t2)
        assert abs(a - b) <= 1e-6
    # One MLflow run, continued, not two.
    client = MlflowClient(opts.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("hybridscale").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


def test_a_checkpoint_of_other_layer_code_is_a_clear_error(tmp_path, corpus_dir, data_cache):
    trial = tiny_trial(corpus_dir)
    opts = options(tmp_path, data_cache, checkpoint_every=4, stop_after_steps=4)
    assert train_trial(trial, opts).status == "interrupted"
    path = opts.workdir / trial.trial_id / "checkpoint.pt"
    state = torch.load(path, weights_only=False)
    # as written before q, k and v came from one projection
    state["model"]["blocks.1.mixer.q_proj.weight"] = state["model"].pop(
        "blocks.1.mixer.qkv_proj.weight"
    )
    torch.save(state, path)
    with pytest.raises(ValueError, match=rf"trial {trial.trial_id}: checkpoint .* does not fit"):
        Trainer(trial, opts).run()
    assert path.exists()  # kept for whoever wants it


def test_huge_learning_rate_diverges(tmp_path, corpus_dir, data_cache):
    outcome = train_trial(tiny_trial(corpus_dir, lr=50.0, warmup_fraction=0.0),
                          options(tmp_path, data_cache))  # fmt: skip
    assert outcome.status == "diverged"
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(outcome.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["hybridscale.status"] == "diverged"
    assert "loss" in run.data.tags["hybridscale.reason"]


def test_mlflow_run_holds_params_metrics_artifacts(tmp_path, corpus_dir, data_cache):
    trial = tiny_trial(corpus_dir, eval_every_tokens=64 * 8 * 4)
    outcome = train_trial(trial, options(tmp_path, data_cache, tags={"hybridscale.study": "t"}))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(outcome.run_id)
    assert run.data.params["model.pattern"] == "M*-"
    assert run.data.params["training.batch_size"] == "8"
    assert run.data.tags["hybridscale.trial_id"] == trial.trial_id
    assert run.data.tags["hybridscale.n_attention"] == "1"
    assert run.data.tags["hybridscale.study"] == "t"
    for metric in ("train_loss", "val_loss", "val_bpb", "lr", "grad_norm", "tokens_per_s"):
        assert metric in run.data.metrics, metric
    val_history = client.get_metric_history(outcome.run_id, "val_loss")
    assert [m.step for m in val_history] == [4, 8, 12]
    assert len(client.get_metric_history(outcome.run_id, "train_loss")) == 12
    log = (tmp_path / "trials" / trial.trial_id / "train.log").read_text().splitlines()
    assert len(log) == 13 and log[-1].split(": ", 1)[1].startswith("finished")
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id)}
    assert {"config.yaml", "metrics.json", "loss_curve.png"} <= artifacts


def test_on_eval_hook_prunes(tmp_path, corpus_dir, data_cache):
    seen = []

    def prune_at_second_eval(step, tokens, metrics):
        seen.append((step, tokens, metrics["val_loss"]))
        return len(seen) == 2

    trial = tiny_trial(corpus_dir, eval_every_tokens=64 * 8 * 3)
    opts = options(tmp_path, data_cache, on_eval=prune_at_second_eval)
    outcome = train_trial(trial, opts)
    assert outcome.status == "pruned"
    assert [(s, t) for s, t, _ in seen] == [(3, 64 * 8 * 3), (6, 64 * 8 * 6)]
    run = MlflowClient(opts.tracking_uri).get_run(outcome.run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["hybridscale.status"] == "pruned"
    assert run.data.metrics["val_loss"] == seen[-1][2]


def test_ctrl_c_checkpoints_and_marks_the_run_interrupted(tmp_path, corpus_dir, data_cache):
    """Ctrl-C (the scheduler's interruption, a time budget's too) ends the run as KILLED,
    tagged interrupted rather than left without a status, with a checkpoint to resume."""

    def interrupt(step, tokens, metrics):
        raise KeyboardInterrupt

    trial = tiny_trial(corpus_dir, eval_every_tokens=64 * 8 * 3)
    opts = options(tmp_path, data_cache, on_eval=interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_trial(trial, opts)
    client = MlflowClient(opts.tracking_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "KILLED"
    assert run.data.tags["hybridscale.status"] == "interrupted"
    assert train_trial(trial, replace(opts, on_eval=None)).status == "finished"


def test_compiled_step_matches_eager(tmp_path, corpus_dir, data_cache):
    """torch.compile of model + loss (one graph, every layer type) changes no result."""
    import torch

    curves = []
    for compile in (False, True):
        torch._dynamo.reset()
        trial = tiny_trial(corpus_dir, tokens=64 * 8 * 3, compile=compile)
        trainer = Trainer(trial, options(tmp_path / str(compile), data_cache))
        assert trainer.run().status == "finished"
        curves.append([h[2] for h in trainer.history])
    assert curves[0] == pytest.approx(curves[1], rel=1e-4)
