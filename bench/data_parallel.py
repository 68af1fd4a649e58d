"""Data-parallel trials on several GPUs: scaling of one ~350M trial, and a mixed study.

Needs a machine with at least 2 GPUs. Three measurements, side by side in one run:

1. Scaling: the same 350M-parameter hybrid trial (d_model 1024, 48 layers, the paper's
   8% attention / 50% MLP mix, byte vocabulary; by default seqlen 2048, global batch 64
   in micro-batches of 16: --seq-len, --batch, --micro) at the same global batch, through
   the study's own data-parallel path (Ray Train, DDP over NCCL), on 1 and 2 GPUs; tokens/s
   is the median over the steps after warm-up, read back from each run's MLflow metrics.
   Target: 2 GPUs >= 1.8x one.
2. The gradient all-reduce alone (``--measure allreduce``): the scaling trial's fp32
   gradients (and the same count in bf16) all-reduced between 2 Ray Train workers set up
   as a trial's are; milliseconds each and the bus bandwidth nccl-tests would report.
3. A mixed study through the real scheduler: --seeds (3) 350M trials on 2 GPUs each and as
   many small trials on shares of a GPU (--tokens each), sampling nvidia-smi every second.
   Reports each GPU's mean utilisation and the share of samples it sat idle (< 5%).

    python bench/data_parallel.py [--steps 30] [--shard] [--compile]
                                  [--measure scaling allreduce mixed]
                                  [--seq-len 2048] [--batch 64] [--micro 16]
                                  [--tokens 8M] [--seeds 3] [--budget-s 420]
                                  [--traces DIR] [--out FILE]

``--shard``: the data-parallel trials shard weights, gradients and Adam moments (FSDP)
instead of replicating them (DDP), in both measurements; the one-GPU run is the same.
``--compile``: every trial trains compiled (``training.compile: true``), in both.
``--measure``: which of scaling, allreduce and mixed to run (all three by default).
``--traces``: the scaling runs trace each rank's last 3 steps (kept in DIR) and report
the GPU's busy, communicating and idle milliseconds a step.
Prints one JSON line per measurement (with each scaling run's median peak GPU memory)
and a markdown table.
"""

import _thread
import argparse
import json
import shutil
import statistics
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import ray
import torch
from gpu_util import GpuSampler  # bench/, beside this script
from mlflow.tracking import MlflowClient
from trace_summary import summarize

from arch.accounting import param_counts
from arch.config import ModelConfig
from records.trial_run import GPU_IDS_TAG
from runners.config import TrialConfig
from runners.distributed import WORKER_ENV, run_data_parallel
from runners.driver import StudyOptions
from runners.scheduler import run_study, summary_rows
from runners.spec import load_spec
from runners.train import TrainOptions

MODEL_350M = {"d_model": 1024, "n_layers": 48, "n_heads": 16, "attention_ratio": 0.08,
              "mlp_ratio": 0.5, "d_state": 128, "ssm_headdim": 64, "vocab_size": 264}  # fmt: skip
# A 350M trial as one would run it: 128K tokens a step, micro-batches that fill a GPU.
# (At micro-batches of 8 x 1024 a compiled step is bound by launching kernels.)
SEQ_LEN, BATCH, MICRO = 2048, 64, 16  # the defaults of --seq-len, --batch, --micro


def scaling(folder: Path, workers: int, args: argparse.Namespace) -> dict:
    steps, shard, compile, traces = args.steps, args.shard, args.compile, args.traces
    trial = TrialConfig.model_validate({
        "model": MODEL_350M,
        "data": {"seq_len": args.seq_len},
        "training": {"tokens": args.batch * args.seq_len * 1000, "batch_size": args.batch,
                     "micro_batch_size": args.micro, "lr": 1e-3, "compile": compile},
    })  # fmt: skip
    uri = f"sqlite:///{folder / f'scaling{workers}.db'}"
    options = TrainOptions(workdir=folder / f"scaling{workers}", tracking_uri=uri,
                           data_dir=folder / "data", stop_after_steps=steps,
                           checkpoint_every_s=float("inf"), shard=shard,
                           profile_steps=(steps - 2, steps) if traces else None)  # fmt: skip
    start = time.time()
    outcome = run_data_parallel(trial, options, workers=workers, use_gpu=True)
    wall = time.time() - start
    assert outcome.status == "interrupted", outcome
    profiles = []
    if traces:  # each rank's trace of the last 3 steps, kept, and where its time went
        traces.mkdir(parents=True, exist_ok=True)
        for rank in range(workers):
            trace = options.workdir / trial.trial_id / "profile" / f"rank{rank}.json"
            kept = traces / f"{'compiled' if compile else 'eager'}-gpus{workers}-rank{rank}.json"
            shutil.copy(trace, kept)
            profiles.append(summarize(kept))
    client = MlflowClient(uri)

    def after_warmup(metric: str) -> list[float]:
        history = client.get_metric_history(outcome.run_id, metric)
        return [m.value for m in sorted(history, key=lambda m: m.step)][5:]

    rates, mfu = after_warmup("tokens_per_s"), after_warmup("mfu")
    return {"measure": "scaling", "gpus": workers, "sharded": shard and workers > 1,
            "compiled": compile, "seq_len": args.seq_len, "batch": args.batch,
            "micro_batch": args.micro, "wall_s": wall,
            "steps": len(rates), "tokens_per_s": statistics.median(rates),
            "mfu": statistics.median(mfu) if mfu else None,
            "peak_memory_gb": statistics.median(after_warmup("peak_memory_gb")),
            "profile": profiles}  # fmt: skip


def _allreduce_loop(config: dict) -> None:
    """One worker: all-reduce a gradient-sized tensor in each dtype, timed; rank 0 writes
    milliseconds and bus bandwidth (2 (n - 1) / n of the bytes, over the time) to a file."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    device, ranks = ray.train.torch.get_device(), dist.get_world_size()
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None  # CPU: gloo, a check
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        grads = torch.ones(config["elements"], dtype=dtype, device=device)
        for _ in range(3):  # NCCL's channels and buffers set up
            dist.all_reduce(grads)
        sync()
        start = time.perf_counter()
        for _ in range(config["repeats"]):
            dist.all_reduce(grads)
        sync()
        seconds = (time.perf_counter() - start) / config["repeats"]
        size = grads.numel() * grads.element_size()
        rows.append({"measure": "allreduce", "dtype": str(dtype), "gpus": ranks,
                     "gb": size / 1e9, "ms": 1000 * seconds,
                     "bus_gb_s": 2 * (ranks - 1) / ranks * size / seconds / 1e9})  # fmt: skip
    if ray.train.get_context().get_world_rank() == 0:
        Path(config["out"]).write_text(json.dumps(rows))


def allreduce(folder: Path, repeats: int = 20) -> list[dict]:
    """The scaling trial's gradient all-reduce alone, on 2 workers placed and configured
    as a data-parallel trial's (Ray Train, NCCL, WORKER_ENV)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    elements = param_counts(ModelConfig.model_validate(MODEL_350M))["total"]
    out = folder / "allreduce.json"
    TorchTrainer(
        _allreduce_loop,
        train_loop_config={"elements": elements, "repeats": repeats, "out": str(out)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=True, placement_strategy="PACK"),
        run_config=RunConfig(name="allreduce", storage_path=str(folder / "ray_train"),
                             worker_runtime_env={"env_vars": WORKER_ENV}),
    ).fit()  # fmt: skip
    return json.loads(out.read_text())


MIXED = """
name: mixed
model: {{d_model: 256, n_layers: 8, n_heads: 8, attention_ratio: 0.125, mlp_ratio: 0.5,
         d_state: 64, ssm_headdim: 64, vocab_size: 264}}
data: {{seq_len: {seq_len}}}
training: {{tokens: {tokens}, batch_size: {batch}, micro_batch_size: {micro}, lr: 1.0e-3,
           compile: {compile}}}
sweep:
  size: [{{d_model: 1024, n_layers: 48, n_heads: 16, d_state: 128}}, {{d_model: 256}}]
  seed: {seeds}
resources: {{workers: {{100M: 2}}, shard_from: {shard_from}}}  # 350M trials: 2 GPUs each
"""


def phases(client: MlflowClient, run_id: str) -> dict:
    """From a trial's MLflow run: the GPUs it ran on (a single-worker trial's), and the
    seconds it spent before its first logged step (model, data, compiling, the first
    steps), between its first and last logged steps, and after (evaluation, artifacts);
    ``run`` and ``training`` are the whole run's and the middle span's (start, end) in
    epoch seconds; ``checkpoint_s``, what its checkpoints took, the last (in wind-down)
    among them. Worker start-up before the run opens is not in it; a run that logged no
    step (it failed first) has none."""
    run = client.get_run(run_id)
    steps = sorted(m.timestamp for m in client.get_metric_history(run_id, "grad_norm"))
    if not steps or run.info.end_time is None:
        return {}
    return {"gpus": run.data.tags.get(GPU_IDS_TAG, "all its workers'"),
            "setup_s": (steps[0] - run.info.start_time) / 1000,
            "train_s": (steps[-1] - steps[0]) / 1000,
            "wind_down_s": (run.info.end_time - steps[-1]) / 1000,
            "checkpoint_s": sum(m.value for m in client.get_metric_history(run_id, "checkpoint_s")),
            "run": (run.info.start_time / 1000, run.info.end_time / 1000),
            "training": (steps[0] / 1000, steps[-1] / 1000)}  # fmt: skip


def util_while_training(sampler: GpuSampler, trial_phases: list[dict]) -> list[float | None]:
    """Each GPU's mean utilisation over the seconds some trial on it was between its first
    and last step: what is left of the idle time once trials' start-up and wind-down (Ray
    Train workers, NCCL, model build, evaluation, checkpoints) are set aside."""
    means = []
    for gpu, samples in enumerate(zip(*sampler.samples, strict=True)):
        spans = [p["training"] for p in trial_phases
                 if p and p["gpus"] in (str(gpu), "all its workers'")]  # fmt: skip
        inside = [u for t, u in zip(sampler.times, samples, strict=True)
                  if any(start <= t <= end for start, end in spans)]  # fmt: skip
        means.append(statistics.mean(inside) if inside else None)
    return means


def util_between_trials(sampler: GpuSampler, trial_phases: list[dict]) -> list[float | None]:
    """Each GPU's mean utilisation from the first step any trial took to the last: the
    study's start-up (Ray, the first worker group, the first model built) set aside, every
    gap between trials (worker groups, models built, evaluation, checkpoints) counted."""
    spans = [p["training"] for p in trial_phases if p]
    if not spans:
        return [None] * len(sampler.samples[0])
    start, end = min(s for s, _ in spans), max(e for _, e in spans)
    inside = [u for t, u in zip(sampler.times, sampler.samples, strict=True) if start <= t <= end]
    return [statistics.mean(gpu) for gpu in zip(*inside, strict=True)]


def mixed_study(folder: Path, args: argparse.Namespace) -> dict:
    path = folder / "mixed.yaml"
    shard_from = "100M" if args.shard else "null"
    text = MIXED.format(seq_len=args.seq_len, batch=args.batch, micro=args.micro,
                        shard_from=shard_from, tokens=args.tokens, seeds=list(range(args.seeds)),
                        compile=str(args.compile).lower())  # fmt: skip
    path.write_text(textwrap.dedent(text))
    spec, trials = load_spec(path)
    options = StudyOptions(results_dir=folder / "results")
    # Past the budget, the study is interrupted as Ctrl-C would (running trials checkpoint)
    # and what ran is still reported: a device call has a time limit, and a run killed at
    # it reported nothing.
    timer = threading.Timer(args.budget_s, _thread.interrupt_main)
    start, interrupted = time.time(), False
    with GpuSampler() as sampler:
        timer.start()
        try:
            run_study(spec, trials, options)
        except KeyboardInterrupt:
            interrupted = True
        timer.cancel()
    client = MlflowClient(options.uri())
    rows = summary_rows(client, spec.name, trials, {})
    per_gpu = list(zip(*sampler.samples, strict=True))
    trial_phases = {r["trial"]: phases(client, r["run_id"]) for r in rows if r["run_id"]}
    return {
        "measure": "mixed_study", "trials": len(rows), "tokens_per_trial": args.tokens,
        "compiled": args.compile,
        "finished": sum(r["status"] == "finished" for r in rows),
        "interrupted_at_budget": interrupted,
        "data_parallel_trials": sum(spec.resources.workers_for(t) > 1 for t in trials),
        "started": start,
        "wall_s": time.time() - start,
        "gpu_util_mean": [statistics.mean(g) for g in per_gpu],
        "gpu_idle_share": [sum(u < 5 for u in g) / len(g) for g in per_gpu],
        "gpu_util_while_training": util_while_training(sampler, list(trial_phases.values())),
        "gpu_util_first_to_last_step": util_between_trials(sampler, list(trial_phases.values())),
        "trial_phases": trial_phases,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30, help="steps per scaling measurement")
    parser.add_argument("--shard", action="store_true", help="FSDP instead of DDP")
    parser.add_argument("--compile", action="store_true", help="trials train compiled")
    parser.add_argument(
        "--measure",
        nargs="+",
        choices=["scaling", "allreduce", "mixed"],
        default=["scaling", "allreduce", "mixed"],
        help="run one part alone (time limits)",
    )
    parser.add_argument(
        "--tokens",
        default="8M",
        help="tokens per trial of the mixed study: enough that training, not "
        "start-up, fills the GPUs (1M trials train ~12 s after ~50 s of it)",
    )
    parser.add_argument("--seeds", type=int, default=3, help="trials of each size, mixed study")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=420,
        help="interrupt the mixed study after this many seconds and report what ran",
    )
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN, help="the 350M trials' seq_len")
    parser.add_argument("--batch", type=int, default=BATCH, help="their global batch (sequences)")
    parser.add_argument("--micro", type=int, default=MICRO, help="their micro-batch (sequences)")
    parser.add_argument("--out")
    parser.add_argument(
        "--traces",
        type=Path,
        help="scaling: trace each rank's last 3 steps into this folder, and say where "
        "their GPU time went (bench/trace_summary.py)",
    )
    args = parser.parse_args()
    gpus = torch.cuda.device_count()
    if gpus < 2:
        raise SystemExit(f"needs at least 2 GPUs; this machine has {gpus}")
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        # Each row printed once measured: a device call's time limit loses only the rest.
        if "scaling" in args.measure:  # 2 GPUs first: the run under test, and the slower start
            two = scaling(folder, 2, args)
            print(json.dumps(two), flush=True)
            one = scaling(folder, 1, args)
            two["speedup"] = two["tokens_per_s"] / one["tokens_per_s"]
            print(json.dumps(one), flush=True)
            results += [one, two]
        if "allreduce" in args.measure:
            results += allreduce(folder)
            print("\n".join(json.dumps(row) for row in results[-2:]), flush=True)
        if "mixed" in args.measure:
            results.append(mixed_study(folder, args))
            print(json.dumps(results[-1]), flush=True)
    if "scaling" in args.measure:
        print(f"\n| GPUs | tokens/s | MFU | peak GB | speedup |\n|---|---|---|---|---|\n"
              f"| 1 | {one['tokens_per_s']:,.0f} | {one['mfu'] or 0:.3f} "
              f"| {one['peak_memory_gb']:.1f} | 1.00 |\n"
              f"| 2 ({'FSDP' if args.shard else 'DDP'}) | {two['tokens_per_s']:,.0f} "
              f"| {two['mfu'] or 0:.3f} | {two['peak_memory_gb']:.1f} | {two['speedup']:.2f} "
              f"(target >= 1.8) |")  # fmt: skip
    if "mixed" in args.measure:
        mixed = results[-1]
        cut = " (interrupted at --budget-s)" if mixed["interrupted_at_budget"] else ""
        print(f"\nmixed study{cut}: {mixed['finished']}/{mixed['trials']} finished in "
              f"{mixed['wall_s']:.0f}s; GPU utilisation {mixed['gpu_util_mean']}, "
              f"idle share {mixed['gpu_idle_share']}, while trials trained "
              f"{mixed['gpu_util_while_training']}, from the first step to the last "
              f"{mixed['gpu_util_first_to_last_step']}")  # fmt: skip
        for trial, p in mixed["trial_phases"].items():
            if p:  # run times from the study's start: the gaps between runs are start-up
                opened, ended = (t - mixed["started"] for t in p["run"])
                print(f"  {trial}: GPUs {p['gpus']}, run {opened:.0f}-{ended:.0f}s: setup "
                      f"{p['setup_s']:.1f}s, training {p['train_s']:.1f}s, wind-down "
                      f"{p['wind_down_s']:.1f}s, checkpoints {p['checkpoint_s']:.1f}s")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
