"""Typed configs of one trial: model, data and training, and the trial's stable id."""

import hashlib
import json
from typing import Literal

from pydantic import NonNegativeFloat, PositiveFloat, PositiveInt, model_validator

from arch.accounting import param_counts
from arch.config import Count, ModelConfig, Ratio, StrictModel
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
