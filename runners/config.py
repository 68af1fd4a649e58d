"""Typed configs of one trial: model, data and training, and the trial's stable id."""

import hashlib
import json
import math
from typing import Literal

from pydantic import NonNegativeFloat, PositiveFloat, PositiveInt, model_validator

from arch.accounting import param_counts
from arch.config import Count, ModelConfig, Ratio, StrictModel, omitted_at_default
from data.config import DataConfig


class TrainingConfig(StrictModel):
    """The optimisation of one trial. The budget is absolute or per parameter."""

    tokens: Count | None = None
    tokens_per_param: PositiveFloat | None = None
    batch_size: PositiveInt = 16  # sequences per optimizer step
    micro_batch_size: PositiveInt | None = None  # None: the whole batch at once
    lr: PositiveFloat = 3e-3
    min_lr_ratio: Ratio = 0.1
    schedule: Literal["cosine", "wsd"] = "cosine"
    warmup_fraction: Ratio = 0.1
    # A warmup of this many tokens instead of warmup_fraction of the budget: the same
    # warmup at every budget, which lets budgets share their first steps (see branching).
    warmup_tokens: Count | None = omitted_at_default(None)
    decay_fraction: Ratio = 0.2  # the WSD schedule's final decay
    weight_decay: NonNegativeFloat = 0.1
    grad_clip: PositiveFloat | None = 1.0
    eval_every_tokens: Count | None = None  # None: only at the end
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU
    # auto: compiled on CUDA, eager on a CPU; graphs: compiled, the step captured in CUDA
    # graphs (runners.compiling). Each computes the same step, only faster or slower.
    compile: Literal["auto", "graphs"] | bool = "auto"
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "TrainingConfig":
        if (self.tokens is None) == (self.tokens_per_param is None):
            raise ValueError("give exactly one of tokens and tokens_per_param")
        if self.micro_batch_size and self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of micro_batch_size "
                f"{self.micro_batch_size}"
            )
        micro = self.micro_batch_size or self.batch_size
        if self.compile == "graphs" and micro < self.batch_size:
            raise ValueError("compile: graphs needs the whole batch at once (no micro_batch_size)")
        if self.warmup_tokens is not None and "warmup_fraction" in self.model_fields_set:
            raise ValueError("give warmup_tokens or warmup_fraction, not both")
        return self


class TrialConfig(StrictModel):
    """Everything that decides one trial's result, and nothing else."""

    model: ModelConfig
    data: DataConfig = DataConfig()
    training: TrainingConfig

    @property
    def tokens(self) -> int:
        """The token budget: absolute, or tokens_per_param times all parameters."""
        if self.training.tokens is not None:
            return self.training.tokens
        return round(self.training.tokens_per_param * param_counts(self.model)["total"])

    @model_validator(mode="after")
    def _warmup_within_budget(self) -> "TrialConfig":
        warmup = self.training.warmup_tokens
        if warmup is not None and warmup >= self.tokens:
            raise ValueError(
                f"training.warmup_tokens: {warmup} is not below the budget of {self.tokens} tokens"
            )
        return self

    @property
    def tokens_per_step(self) -> int:
        return self.training.batch_size * self.data.seq_len

    @property
    def total_steps(self) -> int:
        """Optimizer steps to cover the budget, in whole steps."""
        return max(1, math.ceil(self.tokens / self.tokens_per_step))

    @property
    def warmup_steps(self) -> int:
        """Steps of linear warmup: warmup_tokens in whole steps, else warmup_fraction of
        the trial's steps."""
        t = self.training
        if t.warmup_tokens is not None:
            return round(t.warmup_tokens / self.tokens_per_step)
        return round(t.warmup_fraction * self.total_steps)

    @property
    def decay_start(self) -> int:
        """The step where the WSD schedule's final decay begins."""
        return self.total_steps - round(self.training.decay_fraction * self.total_steps)

    @property
    def trial_id(self) -> str:
        """Stable across machines and runs: a hash of the canonical resolved config."""
        config = self.model_dump(mode="json")
        # "auto" hashes as the false it replaced as the default: how a step is compiled
        # does not change what it computes, and the trials from before auto keep their ids.
        if config["training"]["compile"] == "auto":
            config["training"]["compile"] = False
        canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]
