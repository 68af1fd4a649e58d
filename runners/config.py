"""Typed configs of one trial: model, data and training, and the trial's stable id."""

import hashlib
import json
import re
from typing import Annotated, Literal

from pydantic import (
    BeforeValidator,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    model_validator,
)

from arch.accounting import param_counts
from arch.config import ModelConfig, Ratio, StrictModel

_SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


def _count(value: object) -> object:
    """Read token counts as people write them: 2000000, 2e6, 2M, 1.1T."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9.]+(?:[eE][+-]?[0-9]+)?)\s*([KMBT]?)\s*", value)
        if not match:
            raise ValueError(f"{value!r} is not a count (write e.g. 2000000, 2e6, 2M, 1.1T)")
        value = float(match[1]) * _SUFFIXES.get(match[2], 1)
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{value} is not a whole number")
        value = int(value)
    return value


Count = Annotated[PositiveInt, BeforeValidator(_count)]
ProbeName = Literal["mqar", "phonebook", "copy", "selective_copy"]  # data/probes.py


class DataConfig(StrictModel):
    """Where the training text comes from and how it becomes token sequences."""

    paths: list[str] = []  # files or globs; empty: the built-in corpus below
    # Without paths: "stdlib", the standard library's sources (about 30 MB), or "python",
    # those and the installed packages' sources and docs (data/corpus.py builtin_sources)
    corpus: Literal["stdlib", "python"] = "stdlib"
    text_field: str = "text"  # the JSONL field or table column holding the text
    tokenizer: str = "byte"  # "byte", "bpe", or a path to a tokenizer.json
    bpe_vocab_size: PositiveInt = 8192
    seq_len: PositiveInt = 128
    val_fraction: Ratio = 0.01
    # Probe tasks (mqar, phonebook, copy, selective_copy) -> the fraction of training rows
    # they fill; every probe named here is evaluated (probe_<name>_acc), 0.0 only that.
    probes: dict[ProbeName, Ratio] = {}
    eval_tokens: Count = 32768  # validation tokens per evaluation
    probe_examples: PositiveInt = 64  # held-out examples per probe per evaluation

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if sum(self.probes.values()) > 1:
            raise ValueError(f"probes: fractions {dict(self.probes)} add up to more than 1")
        return self


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
    compile: bool = False
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
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]
