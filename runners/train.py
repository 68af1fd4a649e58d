"""Train one trial: a thin loop over (seed, step)-determined batches, resumable from
atomic checkpoints, logging everything to one MLflow run.

The loop's state is (model, optimizer, step, RNG states, history); the data position
is the step itself, because batch ``step`` is drawn from (seed, step) alone. So a
resumed trial continues the exact loss curve an uninterrupted one would have drawn.
"""

import contextlib
import hashlib
import json
import math
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from mlflow.tracking import MlflowClient

from arch.accounting import flops_per_token, param_counts
from arch.allocation import layer_counts
from arch.model import HybridLM
from data import TrialData, open_data
from records.store import flatten
from records.trial_run import (
    BRANCH_STEP_TAG,
    BRANCH_TOKENS_TAG,
    BRANCHED_FROM_TAG,
    FLOPS_PER_TOKEN_TAG,
    PARAMS_TAG,
    PATTERN_TAG,
    SHARDED_TAG,
    TOKENS_METRIC,
    TOKENS_REQUESTED_TAG,
    WORKERS_TAG,
    RunLog,
    copy_history,
    start_trial_run,
)
from runners import checkpoint as ckpt
from runners import compiling
from runners.config import TrialConfig
from runners.optim import Schedule, make_optimizer
from runners.parallel import place, rank_and_world, sum_over_ranks, whole

# Dense bf16 peak of the GPUs MFU is reported against (FLOP/s).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}
METRICS_FLUSH_S = 10.0  # how long step metrics wait to be written to MLflow together


class TrialDiverged(Exception):
    pass


@dataclass
class TrialOutcome:
    trial_id: str
    status: str  # finished | diverged | oom | failed | interrupted | pruned
    run_id: str
    metrics: dict = field(default_factory=dict)
    reason: str = ""


@dataclass
class TrainOptions:
    """How to run a trial (not what it is: nothing here changes its result)."""

    workdir: Path  # checkpoints live in workdir / trial_id
    tracking_uri: str
    data_dir: Path
    experiment: str = "hybridscale"
    parent_run_id: str | None = None
    tags: dict = field(default_factory=dict)
    device: str | None = None
    # A checkpoint every checkpoint_every_s seconds of rank 0's clock, as every rank waits
    # for it (a 350M model's is 4.2 GB with Adam's moments: seconds, where a fixed 50 steps
    # could be 15 s of training). checkpoint_every (steps), when given, adds checkpoints at
    # fixed steps. Interrupted, pruned or finished, a trial always checkpoints.
    checkpoint_every_s: float = 600.0
    checkpoint_every: int | None = None
    log_every: int = 1
    stop_after_steps: int | None = None  # stop early as if interrupted (tests, time limits)
    # Data-parallel ranks shard the weights, gradients and Adam moments (FSDP) instead of
    # each holding them whole (DDP): the same loss curve in less memory. One rank ignores it.
    shard: bool = False
    # Called with (step, tokens, metrics) after each interval evaluation; returning True
    # stops the trial as "pruned" (an Optuna pruner says it is not worth finishing).
    on_eval: Callable[[int, int, dict], bool] | None = None
    # Steps (first, last), counted from 1 in this run of the process, traced by PyTorch's
    # profiler to profile/rank<R>.json in the trial's folder (Chrome's trace format, for
    # Perfetto); rank 0's is also an MLflow artifact. Where a step's time goes.
    profile_steps: tuple[int, int] | None = None
    # Compiled graphs and kernels and the kernels' autotune choices, shared by the trials
    # that name the same folder (a study's results/cache): each shape compiles and tunes
    # once. None: torch's and Triton's own folders, and no waiting on other trials.
    cache_dir: Path | None = None
    # Budgets branched from this trial (runners/branching.py): the steps at which it leaves
    # its state for them. And this trial's own branch: (trunk trial id, step), whose state
    # it starts from when it has no checkpoint of its own, with a run of its own.
    branch_points: tuple[int, ...] = ()
    branch_from: tuple[str, int] | None = None


def _device(options: TrainOptions) -> torch.device:
    return torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def _now_ms() -> int:
    return int(time.time() * 1000)


class _Quiet:
    """The MLflow log of ranks other than 0: rank 0 keeps the trial's one record."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


class Trainer:
    def __init__(self, trial: TrialConfig, options: TrainOptions) -> None:
        self.trial, self.options = trial, options
        self.device = _device(options)
        self.dir = options.workdir / trial.trial_id
        self.dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_path = ckpt.checkpoint_path(options.workdir, trial.trial_id)
        self.data: TrialData = open_data(trial.data, options.data_dir)
        if self.data.vocab_size > trial.model.vocab_size:
            raise ValueError(
                f"model.vocab_size {trial.model.vocab_size} is smaller than the tokenizer's "
                f"{self.data.vocab_size}"
            )
        t = trial.training
        self.seq_len = trial.data.seq_len
        self.tokens_per_step = trial.tokens_per_step
        self.total_steps = trial.total_steps
        self.schedule = Schedule.of(trial)
        # Data-parallel: each rank trains on its slice of the same global batch, and
        # rank 0 alone logs and checkpoints.
        self.rank, self.world = rank_and_world()
        self.chief = self.rank == 0
        self.local_batch = t.batch_size // self.world
        self.micro = t.micro_batch_size or self.local_batch
        torch.manual_seed(t.seed)
        self.model = HybridLM(trial.model)  # every rank draws the same initial weights
        self.shard = options.shard and self.world > 1
        self.ddp = place(self.model, self.device, self.world, self.shard)
        self.wrapped = self.ddp or self.model
        # "not due" and "due", for the step's flag to index without a host-to-device copy
        self._flags = torch.tensor([0.0, 1.0], dtype=torch.float64, device=self.device)
        # Model and loss compiled as one graph: the fp32 logits are never materialised
        # (on an H100 that took a 125M model from 362K to 480K tokens/s, bench/RESULTS.md).
        one_pass = self.world == 1 and self.micro == self.local_batch
        params = param_counts(trial.model)["total"]
        self.compile_mode = compiling.mode(t.compile, self.device.type, params, one_pass)
        self.loss = (
            torch.compile(self._loss, mode=self.compile_mode) if self.compile_mode else self._loss
        )
        self.optimizer = make_optimizer(self.model, t, fused=self.device.type == "cuda")
        bf16 = t.precision == "bf16" or (t.precision == "auto" and self.device.type == "cuda")
        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if bf16
            else contextlib.nullcontext()
        )
        self.step, self.history, self.run_id = 0, [], None
        self.trunk_run_id: str | None = None  # the run of the trial this one branched from
        self.flops_per_token = flops_per_token(trial.model, self.seq_len)["training"]
        self.client = MlflowClient(options.tracking_uri) if self.chief else None
        self.log: RunLog | _Quiet = _Quiet()  # the trial's MLflow run, once run() opens it
        self.profiler: torch.profiler.profile | None = None  # while profile_steps are traced

    # ---- state ------------------------------------------------------------------------

    def _state(self) -> dict | None:
        """The loop's state, on rank 0 (None elsewhere); every rank calls this, as
        gathering sharded state is collective."""
        whole_state = ckpt.gather(self.model, self.optimizer, self.shard, self.chief)
        if whole_state is None:
            return None
        model, optimizer = whole_state
        return {
            "model": model,
            "optimizer": optimizer,
            "step": self.step,
            "history": self.history,
            "run_id": self.run_id,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }

    def _restore(self) -> bool:
        """Resume from the trial's checkpoint, or else from the state it branches from."""
        path = self.checkpoint_path
        if not path.exists() and self.options.branch_from:
            path = ckpt.branch_point(self.options.workdir, *self.options.branch_from)
            if not path.exists():
                raise FileNotFoundError(f"trial {self.trial.trial_id}: no state at {path}")
        if not path.exists():
            return False
        state = ckpt.load(path)
        try:
            ckpt.scatter(self.model, self.optimizer, self.shard, state)
        except (RuntimeError, ValueError, KeyError) as err:  # e.g. written by older layer code
            detail = " ".join(str(err).split())[:300]
            raise ValueError(
                f"trial {self.trial.trial_id}: checkpoint {path} does not fit "
                f"this model ({detail}); delete it to train the trial afresh"
            ) from err
        self.step, self.history, self.run_id = state["step"], state["history"], state["run_id"]
        if path != self.checkpoint_path:  # the trunk's state: its steps, not its run
            self.trunk_run_id, self.run_id = self.run_id, None
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        return True

    def _save(self, path: Path) -> None:
        """The loop's state to ``path``; every step it holds is in MLflow before it exists."""
        self.log.flush()
        if self.chief or self.shard:
            state = self._state()
            if self.chief:
                ckpt.save_atomic(state, path)

    def checkpoint(self) -> None:
        start = time.perf_counter()
        self._save(self.checkpoint_path)
        self.saved_at = time.perf_counter()
        self.log.metrics({"checkpoint_s": self.saved_at - start}, self.step, _now_ms())
        self.log.flush()  # a rare write, and a trial that stops here may not write again

    # ---- MLflow -----------------------------------------------------------------------

    def _open_run(self) -> RunLog:
        if not self.chief:
            return _Quiet()
        if self.run_id is not None:
            log = RunLog(self.client, self.run_id, METRICS_FLUSH_S)
            log.reopen()
            return log
        trial, model = self.trial, self.trial.model
        tags = {
            PATTERN_TAG: model.pattern,
            PARAMS_TAG: param_counts(model)["total"],
            FLOPS_PER_TOKEN_TAG: self.flops_per_token,
            TOKENS_REQUESTED_TAG: trial.tokens,
            "hybridscale.d_model": model.d_model,
            "hybridscale.n_layers": model.n_layers,
            WORKERS_TAG: self.world,
            "hybridscale.compile_mode": self.compile_mode or "eager",
            SHARDED_TAG: self.shard,
            **{f"hybridscale.n_{k}": v for k, v in layer_counts(model.pattern).items()},
            **self.options.tags,
        }
        if self.trunk_run_id:
            trunk, step = self.options.branch_from
            tags.update({BRANCHED_FROM_TAG: trunk, BRANCH_STEP_TAG: step,
                         BRANCH_TOKENS_TAG: step * self.tokens_per_step})  # fmt: skip
        self.run_id = start_trial_run(
            self.client, self.options.tracking_uri, self.options.experiment, trial.trial_id,
            name=f"{trial.trial_id} {model.pattern[:24]}", tags=tags,
            parent_run_id=self.options.parent_run_id,
        )  # fmt: skip
        log = RunLog(self.client, self.run_id, METRICS_FLUSH_S)
        log.params(flatten(trial.model_dump(mode="json")))
        if self.trunk_run_id:  # the curve's first steps, as the trunk drew them
            copy_history(self.client, self.trunk_run_id, self.run_id, self.step)
        return log

    # ---- the loop ---------------------------------------------------------------------

    def _loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with self.autocast:
            logits = self.wrapped(inputs)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def _batch(self, step: int) -> tuple[torch.Tensor, ...]:
        """This rank's slice of batch ``step`` on the device; on CUDA copied from pinned
        memory without blocking, so the copy waits in the queue rather than the CPU."""
        t = self.trial.training
        inputs, targets = self.data.train_batch(t.seed, step, t.batch_size)
        mine = slice(self.rank * self.local_batch, (self.rank + 1) * self.local_batch)
        inputs, targets = inputs[mine], targets[mine]
        if self.device.type == "cuda":
            inputs, targets = inputs.pin_memory(), targets.pin_memory()
        return inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)

    def _train_step(self, checkpoint_due: bool) -> tuple[float, float, float, bool]:
        """One optimizer step, with one host sync: the GPU is kept fed until the loss and
        gradient norm are read back together at the end. Also whether to checkpoint after
        it: rank 0's ``checkpoint_due``, which every rank learns from the loss's all-reduce
        (sharded, saving is collective: the ranks must agree)."""
        t = self.trial.training
        lr = self.schedule.lr(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # TrialData drew it on its thread during the last step; the copy joins the queue.
        inputs, targets = self._batch(self.step)
        n_micro = self.local_batch // self.micro
        losses = []
        for i in range(n_micro):
            chunk = slice(i * self.micro, (i + 1) * self.micro)
            # DDP ranks average their gradients once a step, in the last micro-batch's
            # backward. FSDP ranks reduce-scatter them every micro-batch instead: deferring
            # would keep whole unsharded gradients on every rank, the memory sharding saves.
            defer = self.ddp and i < n_micro - 1
            with self.ddp.no_sync() if defer else contextlib.nullcontext():
                loss = self.loss(inputs[chunk], targets[chunk])
                (loss / n_micro).backward()
            losses.append(loss.detach())
        total = torch.stack(losses).double().mean()
        due = self._flags[int(checkpoint_due and self.chief)]  # a view: no copy, no sync
        # Every rank judges divergence on the same, global, loss.
        total, due = sum_over_ranks(torch.stack([total / self.world, due]), self.world)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip or math.inf)
        norm = whole(norm)  # sharded, each rank holds a part of it
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        total, grad_norm, due = torch.stack([total, norm.double(), due]).tolist()  # the one sync
        # Worse than twice a uniform guess, or not a number: the run has blown up. Judged
        # after this step's update was queued, which is harmless: the trial ends here, and
        # _fail never checkpoints, so the update is never kept.
        if not math.isfinite(total) or total > 2 * math.log(self.trial.model.vocab_size):
            raise TrialDiverged(f"loss {total:.4g} at step {self.step}")
        return total, grad_norm, lr, due > 0

    def _first_step(self, checkpoint_due: bool) -> tuple[float, float, float, bool]:
        """A run's first step, which compiles the step and autotunes the kernels: taken
        while holding the shape's lock, so that of trials of one shape started together
        one compiles and tunes and the others load its results; what it paid is logged
        (at step 1 of this run) and written to the trial's log."""
        before, start = compiling.paid(), time.perf_counter()
        # Data-parallel ranks compile in step, each waiting for the others' all-reduce: a
        # lock taken by one rank of each of two trials would stop both.
        folder = self.options.cache_dir if self.world == 1 else None
        with compiling.first_of_shape(folder, self._shape()):
            waited = time.perf_counter() - start
            result = self._train_step(checkpoint_due)
        paid = {k: v - before[k] for k, v in compiling.paid().items()}
        paid |= {"first_step_s": time.perf_counter() - start, "shape_lock_wait_s": waited}
        self.log.metrics(paid, self.step + 1, _now_ms())
        self._log_line(
            f"first step ({self.compile_mode or 'eager'}) in {paid['first_step_s']:.1f} s, "
            f"{waited:.1f} s of it waiting for the shape's lock: "
            f"{paid['compile_cache_misses']} graphs compiled, {paid['compile_cache_hits']} "
            f"loaded from the cache; {paid['autotunes']} kernels autotuned in "
            f"{paid['autotune_s']:.1f} s, {paid['autotune_cache_hits']} choices from the cache"
        )
        return result

    def _shape(self) -> str:
        """What the compiled step and the kernels' choices depend on: trials alike in it
        (differing in seed, lr or tokens) compile the same graphs."""
        t = self.trial.training
        what = [self.trial.model.model_dump(mode="json"), self.micro, self.seq_len,
                self.device.type, t.precision, self.compile_mode]  # fmt: skip
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]

    def evaluate(self) -> dict:
        self.model.eval()
        with torch.no_grad(), self.autocast:
            result = self.data.evaluate(self.model, self.device)
        self.model.train()
        return result

    def run(self) -> TrialOutcome:
        """Train to the end (or a stop), recording every ending on the run."""
        if self.chief:  # lets an operator find the worker
            (self.dir / "pid").write_text(str(os.getpid()))
        self._restore()
        self.log = self._open_run()
        self.model.train()
        try:
            with compiling.shared_caches(self.options.cache_dir):
                return self._loop()
        except KeyboardInterrupt:
            if not self.shard:  # gathering shards needs every rank, and they may be gone
                self.checkpoint()
            self.log.end("interrupted")  # with the metrics still held
            raise
        except TrialDiverged as err:
            return self._fail("diverged", str(err))
        except torch.cuda.OutOfMemoryError:
            return self._fail("oom", f"CUDA out of memory at micro-batch {self.micro}")
        except Exception as err:  # recorded on the run; the driver decides on retries
            if self.chief:
                self.client.log_text(self.run_id, traceback.format_exc(), "traceback.txt")
            return self._fail("failed", f"{type(err).__name__}: {err}")

    def _loop(self) -> TrialOutcome:
        t, options = self.trial.training, self.options
        eval_every = (
            max(1, t.eval_every_tokens // self.tokens_per_step) if t.eval_every_tokens else None
        )
        steps_run, last_end = 0, None
        self.saved_at = time.perf_counter()
        while self.step < self.total_steps:
            self._profile(steps_run)
            if options.stop_after_steps is not None and steps_run >= options.stop_after_steps:
                self.checkpoint()
                self.log.end("interrupted")  # as Ctrl-C ends it, not left RUNNING
                return TrialOutcome(self.trial.trial_id, "interrupted", self.run_id)
            # A step is timed from the last one's end, so the loop's own work between steps
            # counts; from its own start after a (re)start, evaluation or checkpoint.
            start = last_end or time.perf_counter()
            due = time.perf_counter() - self.saved_at >= options.checkpoint_every_s
            if steps_run == 0:
                loss, grad_norm, lr, save = self._first_step(due)
            else:
                loss, grad_norm, lr, save = self._train_step(due)
            last_end = time.perf_counter()
            self.step += 1
            steps_run += 1
            tokens = self.step * self.tokens_per_step
            self.history.append((self.step, tokens, loss))
            metrics = self._step_metrics(loss, grad_norm, lr, last_end - start)
            evaluated = eval_every and self.step % eval_every == 0 and self.step < self.total_steps
            if evaluated:
                metrics.update(self.evaluate())
            if evaluated or self.step % options.log_every == 0 or self.step == self.total_steps:
                self.log.metrics(metrics, self.step, _now_ms())
                self._log_line(", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            if evaluated:
                self.log.flush()  # evaluations are what a study watches: no waiting
                last_end = None
                if options.on_eval and options.on_eval(self.step, tokens, metrics):
                    self.checkpoint()
                    return self._fail("pruned", f"pruned at step {self.step}")
            if self.step in options.branch_points:  # a shorter budget's decay starts here
                self._save(ckpt.branch_point(options.workdir, self.trial.trial_id, self.step))
                last_end = None
            every = options.checkpoint_every
            if save or (every and self.step % every == 0):
                self.checkpoint()
                last_end = None
        return self._finish()

    def _step_metrics(self, loss: float, grad_norm: float, lr: float, seconds: float) -> dict:
        metrics = {
            "train_loss": loss, "lr": lr, "grad_norm": grad_norm,
            TOKENS_METRIC: self.step * self.tokens_per_step,
            "tokens_per_s": self.tokens_per_step / seconds,
        }  # fmt: skip
        peak = peak_flops(self.device)
        if peak:
            metrics["mfu"] = metrics["tokens_per_s"] * self.flops_per_token / (peak * self.world)
        if self.device.type == "cuda":
            metrics["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        return metrics

    def _finish(self) -> TrialOutcome:
        """The final evaluation, checkpoint and artifacts; the run ends finished."""
        # A trial shorter than profile_steps: the steps it had, not a profiler left on.
        self._write_profile()
        tokens = self.step * self.tokens_per_step
        # Times over the training split: batches draw windows uniformly, so each token was
        # seen this often on average; analysis warns where data repeats.
        evaluation = {**self.evaluate(), "epochs": tokens / self.data.train.tokens}
        self.log.metrics(evaluation, self.step, _now_ms())
        final = {**evaluation, "train_loss": self.history[-1][2], TOKENS_METRIC: tokens}
        self.checkpoint()
        if self.chief:
            self._artifacts(final)
        self._log_line(f"finished: {final}")
        self.log.end("finished")
        return TrialOutcome(self.trial.trial_id, "finished", self.run_id, final)

    def _profile(self, steps_run: int) -> None:
        """Before each step: start tracing before step ``profile_steps[0]``, stop and write
        the trace after step ``profile_steps[1]``."""
        if self.options.profile_steps is None:
            return
        first, last = self.options.profile_steps
        if steps_run == first - 1:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.start()
        elif steps_run == last:
            self._write_profile()

    def _write_profile(self) -> None:
        """Stop tracing, if tracing, and write the trace of the steps traced."""
        if self.profiler is not None:
            self.profiler.stop()
            path = self.dir / "profile" / f"rank{self.rank}.json"
            path.parent.mkdir(exist_ok=True)
            self.profiler.export_chrome_trace(str(path))
            self.profiler = None
            self.log.artifact(path, "profile")

    def _log_line(self, text: str) -> None:
        """The trial's own log file, beside its checkpoint: step lines and its ending."""
        if not self.chief:
            return
        with open(self.dir / "train.log", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} step {self.step}: {text}\n")

    def _fail(self, status: str, reason: str) -> TrialOutcome:
        """End the run as ``status``, writing its held metrics; it never checkpoints, so a
        diverged step's update is never kept."""
        self._log_line(f"{status}: {reason}")
        self.log.end(status, reason)
        return TrialOutcome(self.trial.trial_id, status, self.run_id, reason=reason)

    def _artifacts(self, final: dict) -> None:
        (self.dir / "config.yaml").write_text(yaml.safe_dump(self.trial.model_dump(mode="json")))
        (self.dir / "metrics.json").write_text(json.dumps(final, indent=2))
        _plot_loss(self.history, self.dir / "loss_curve.png", self.trial.trial_id)
        for name in ("config.yaml", "metrics.json", "loss_curve.png"):
            self.log.artifact(self.dir / name)


def _plot_loss(history: list, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([h[1] for h in history], [h[2] for h in history])
    ax.set(xlabel="tokens", ylabel="train loss", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train_trial(trial: TrialConfig, options: TrainOptions) -> TrialOutcome:
    try:
        return Trainer(trial, options).run()
    finally:
        # A worker process trains trial after trial: Dynamo would pile each one's graphs
        # onto the last's, and past its recompile limit run the step eagerly, unsaid. The
        # next trial compiles afresh, from the cache folder where its shape was seen.
        torch._dynamo.reset()
