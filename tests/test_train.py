import json
import math
import warnings
from dataclasses import replace

import pytest
import torch
from mlflow.tracking import MlflowClient

from data import open_data
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
    trainer = Trainer(trial, options(tmp_path, data_cache, checkpoint_every_s=math.inf))
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
    stopped = train_trial(trial, opts)
    assert stopped.status == "interrupted"
    run = MlflowClient(opts.tracking_uri).get_run(stopped.run_id)
    assert (run.info.status, run.data.tags["hybridscale.status"]) == ("KILLED", "interrupted")
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


def test_checkpoints_follow_the_clock(tmp_path, corpus_dir, data_cache):
    """With no step interval, a trial checkpoints once checkpoint_every_s has passed since
    its last checkpoint (0 s: after every step), and always at its end."""
    trial = tiny_trial(corpus_dir)  # 12 steps
    for name, every_s, expected in (("hourly", 3600.0, [12]), ("always", 0.0, range(1, 13))):
        opts = options(tmp_path / name, data_cache, checkpoint_every_s=every_s)
        outcome = train_trial(trial, opts)
        assert outcome.status == "finished", outcome.reason
        saved = MlflowClient(opts.tracking_uri).get_metric_history(outcome.run_id, "checkpoint_s")
        assert sorted({m.step for m in saved}) == list(expected), name


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
    assert len(log) == 14 and log[-1].split(": ", 1)[1].startswith("finished")
    # What the first step paid: an eager trial on a CPU compiles nothing.
    assert log[0].split(": ", 1)[1].startswith("first step (eager)")
    assert "0 graphs compiled" in log[0]
    assert run.data.tags["hybridscale.compile_mode"] == "eager"
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id)}
    assert {"config.yaml", "metrics.json", "loss_curve.png"} <= artifacts
    # Epochs: the tokens trained over the training split's, as the shard manifest counts it.
    manifest = open_data(trial.data, data_cache).folder / "manifest.json"
    train_tokens = json.loads(manifest.read_text())["splits"]["train"]["tokens"]
    assert run.data.metrics["epochs"] == pytest.approx(64 * 8 * 12 / train_tokens)


def traced_steps(tmp_path, corpus_dir, data_cache, profile_steps):
    """A 12-step trial trained with ``profile_steps``: its outcome, and how many optimizer
    steps rank 0's trace holds."""
    trial = tiny_trial(corpus_dir)
    outcome = train_trial(trial, options(tmp_path, data_cache, profile_steps=profile_steps))
    assert outcome.status == "finished", outcome.reason
    trace = tmp_path / "trials" / trial.trial_id / "profile" / "rank0.json"
    events = json.loads(trace.read_text())["traceEvents"]
    return outcome, sum(e.get("name", "").startswith("Optimizer.step#AdamW") for e in events)


def test_profile_traces_the_steps_asked_for(tmp_path, corpus_dir, data_cache):
    """Steps 3-4 of 12 traced: the trace holds two optimizer steps, and rank 0's is an
    artifact of the trial's MLflow run."""
    outcome, steps = traced_steps(tmp_path, corpus_dir, data_cache, (3, 4))
    assert steps == 2
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [a.path for a in client.list_artifacts(outcome.run_id, "profile")] == [
        "profile/rank0.json"
    ]


def test_profile_past_the_trials_end_traces_its_last_steps(tmp_path, corpus_dir, data_cache):
    """Steps 11-20 asked of a 12-step trial: the trace is written when it finishes, with
    the two steps it had."""
    assert traced_steps(tmp_path, corpus_dir, data_cache, (11, 20))[1] == 2


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


def test_a_second_trial_of_a_shape_loads_what_the_first_compiled(tmp_path, corpus_dir, data_cache):
    """Two trials of one shape (their seeds, and so their ids, differ) sharing a cache
    folder as a study's do: the first compiles its step's graphs into the folder, the
    second, in a fresh Dynamo as a new worker would be, loads every one and adds none.
    Each logs what it paid; the reference is the folder's own entries. An MLP alone keeps
    the first compile on a CPU short (a C++ kernel costs seconds)."""
    cache = tmp_path / "cache"
    graphs = cache / "inductor" / "fxgraph"
    paid, entries = [], []
    for seed in (0, 1):
        torch._dynamo.reset()
        trial = TrialConfig.model_validate({
            "model": {"pattern": "-", "d_model": 16, "vocab_size": 264},
            "data": {"paths": [str(corpus_dir / "*.py")], "seq_len": 32},
            "training": {"tokens": 32 * 4 * 2, "batch_size": 4, "compile": True, "seed": seed},
        })  # fmt: skip
        opts = options(tmp_path, data_cache, cache_dir=cache, checkpoint_every_s=math.inf)
        outcome = train_trial(trial, opts)
        assert outcome.status == "finished", outcome.reason
        paid.append({m: logged(opts.tracking_uri, outcome.run_id, m) for m in
                     ("compile_cache_misses", "compile_cache_hits", "first_step_s")})  # fmt: skip
        entries.append(sorted(p.relative_to(graphs) for p in graphs.rglob("*") if p.is_file()))
    first, second = paid
    assert entries[0] and entries[1] == entries[0]  # the second trial stored nothing new
    assert first["compile_cache_misses"] == [(1, len(entries[0]))]  # forward and backward
    assert first["compile_cache_hits"] == second["compile_cache_misses"] == [(1, 0)]
    assert second["compile_cache_hits"] == [(1, len(entries[0]))]
    assert second["first_step_s"][0][1] < first["first_step_s"][0][1] / 2
    log = (opts.workdir / trial.trial_id / "train.log").read_text()
    assert f"0 graphs compiled, {len(entries[0])} loaded from the cache" in log


def logged(uri: str, run_id: str, metric: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, metric))


def test_held_metrics_reach_mlflow_however_a_trial_ends(tmp_path, corpus_dir, data_cache):
    """Step metrics are held and written in batches: every step's must be in MLflow,
    once, when a trial finishes, is interrupted (up to the interruption) or diverges (the
    steps before it). No checkpoint comes between (checkpoint_every_s inf), so nothing is
    written before the trial ends; the reference is the trainer's own loss history."""
    runs = {}
    for name, training, kw in [
        ("finished", {}, {}),
        ("interrupted", {}, {"stop_after_steps": 5}),
        ("diverged", {"lr": 3.0, "warmup_fraction": 0.95}, {}),  # blows up a few steps in
    ]:
        opts = options(tmp_path / name, data_cache, checkpoint_every_s=math.inf, **kw)
        trainer = Trainer(tiny_trial(corpus_dir, **training), opts)
        runs[name] = trainer, trainer.run()

    def check(name: str, steps: int) -> None:
        trainer, outcome = runs[name]
        assert outcome.status == name, outcome.reason
        uri = trainer.options.tracking_uri
        expected = [(step, loss) for step, _, loss in trainer.history]
        assert [s for s, _ in expected] == list(range(1, steps + 1))
        assert logged(uri, outcome.run_id, "train_loss") == expected
        for metric in ("grad_norm", "lr", "tokens", "tokens_per_s"):
            assert [s for s, _ in logged(uri, outcome.run_id, metric)] == list(range(1, steps + 1))

    check("finished", 12)
    check("interrupted", 5)
    diverged_at = int(runs["diverged"][1].reason.rsplit(" ", 1)[1])  # "loss X at step S"
    assert diverged_at >= 2  # else there is nothing before it to lose
    check("diverged", diverged_at)  # steps 0..S-1 ran, logged as 1..S


def test_run_log_holds_metrics_until_flushed_in_batches_mlflow_accepts(tmp_path):
    """Held rows are written on flush, more than MLflow's 1000 metrics a call included;
    with no interval (the default) each row is written at once."""
    from records.store import experiment_id
    from records.trial_run import RunLog

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = experiment_id(client, "t", uri)
    held = RunLog(client, client.create_run(exp).info.run_id, flush_every_s=3600)
    for step in range(1, 401):
        held.metrics({"a": step, "b": -step, "c": step / 2}, step, 1000 + step)
    assert logged(uri, held.run_id, "a") == []
    held.flush()
    for metric, sign in (("a", 1), ("b", -1), ("c", 0.5)):
        assert logged(uri, held.run_id, metric) == [(s, sign * s) for s in range(1, 401)]
    at_once = RunLog(client, client.create_run(exp).info.run_id)
    at_once.metrics({"a": 1.5}, 7, 1000)
    assert logged(uri, at_once.run_id, "a") == [(7, 1.5)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are a GPU matter")
def test_a_training_step_waits_for_the_gpu_once(tmp_path, corpus_dir, data_cache):
    """PyTorch's own sync debug mode warns at every operation that makes the host wait
    for the GPU: a step of two micro-batches (its batch drawn on the data thread) has one,
    where it reads the loss and gradient norm back."""
    trial = tiny_trial(corpus_dir, micro_batch_size=4)
    trainer = Trainer(trial, options(tmp_path, data_cache, device="cuda"))
    trainer._train_step()  # first use: allocations, kernel builds
    trainer.step += 1
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                trainer._train_step()
                trainer.step += 1
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchronizing CUDA operation" in str(w.message)]
    assert len(syncs) == 3, [str(w.message) for w in caught]
