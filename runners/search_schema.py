"""The search section of a study spec: the space an Optuna search samples (turned into
trial configs by runners/search_space.py, run by runners/search.py), what it optimises, and
the budget candidates are matched on."""

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    create_model,
    model_validator,
)

from arch.config import Count, Pattern, Ratio, StrictModel
from arch.registry import layer_types


def _as_choices(value: Any) -> Any:
    """A dimension written as one value or a list of values is a list of choices."""
    if isinstance(value, dict):
        return value
    return {"choices": value if isinstance(value, list) else [value]}


def _check_dim(dim: Any) -> Any:
    if dim.choices is not None:
        if dim.low is not None or dim.high is not None:
            raise ValueError("give a list of choices or low/high, not both")
    elif dim.low is None or dim.high is None:
        raise ValueError("give a list of choices, or low and high")
    elif dim.low > dim.high:
        raise ValueError(f"low {dim.low} is above high {dim.high}")
    return dim


class IntDim(StrictModel):
    """Whole numbers to search: a value, a list of choices, or every value low..high."""

    choices: Annotated[list[NonNegativeInt], Field(min_length=1)] | None = None
    low: NonNegativeInt | None = None
    high: NonNegativeInt | None = None
    _check = model_validator(mode="after")(_check_dim)

    @property
    def lowest(self) -> int:
        return min(self.choices) if self.choices else self.low


class FloatDim(StrictModel):
    """Real numbers to search: a value, a list of choices, or the range low..high."""

    choices: Annotated[list[PositiveFloat], Field(min_length=1)] | None = None
    low: PositiveFloat | None = None
    high: PositiveFloat | None = None
    log: bool = False  # sample the range on a log scale (learning rates)
    _check = model_validator(mode="after")(_check_dim)


Ints = Annotated[IntDim, BeforeValidator(_as_choices)]
Floats = Annotated[FloatDim, BeforeValidator(_as_choices)]
Placement = Literal["even", "free"]  # attention spread evenly, or each layer's depth searched

# What a search can optimise, and which way. probe_* metrics are accuracies.
OBJECTIVES = {"val_loss": "minimize", "val_bpb": "minimize", "decode_bytes": "minimize",
              "decode_ms": "minimize"}  # fmt: skip
# Decode costs, known from a candidate's config before it trains (runners/search_space.py).
COST_OBJECTIVES = ("decode_bytes", "decode_ms")


def direction(objective: str) -> str:
    return OBJECTIVES.get(objective, "maximize")


def _objective(name: str) -> str:
    if name not in OBJECTIVES and not name.startswith("probe_"):
        raise ValueError(f"{name!r} is not an objective: use {', '.join(OBJECTIVES)} or probe_*")
    return name


Objective = Annotated[str, AfterValidator(_objective)]


class Budget(StrictModel):
    """What candidates are matched on: d_model is chosen to meet it, so they compare fairly."""

    params: Count | None = None
    flops_per_token: Count | None = None  # training FLOPs per token at data.seq_len
    tolerance: Ratio = 0.05  # the largest relative miss a candidate may have
    multiple_of: PositiveInt = 8  # d_model is a multiple of this (and of what heads need)

    @model_validator(mode="after")
    def _check(self) -> "Budget":
        if (self.params is None) == (self.flops_per_token is None):
            raise ValueError("give exactly one of params and flops_per_token")
        return self


# One count per registered layer type, named as the type (mamba2, attention, ...).
_LayerCounts = create_model(
    "_LayerCounts", __base__=StrictModel, **{t.name: (Ints | None, None) for t in layer_types()}
)


class SearchSpace(_LayerCounts):
    """The dimensions searched. Layer counts make a pattern: the sequence mixers (Mamba-2,
    attention, other recurrent layers) in order, attention placed among them, MLPs spread
    after them."""

    pattern: Annotated[list[Pattern], Field(min_length=1)] | None = None  # or whole patterns
    attention_placement: Annotated[
        list[Placement], BeforeValidator(lambda v: v if isinstance(v, list) else [v]),
        Field(min_length=1),
    ] = ["even"]  # fmt: skip
    no_attention_in_first: NonNegativeInt = 0  # mixer layers kept free of attention
    ffn_ratio: Floats | None = None  # d_ffn / d_model
    d_state: Ints | None = None
    ssm_headdim: Ints | None = None
    lr: Floats | None = None

    @model_validator(mode="after")
    def _check(self) -> "SearchSpace":
        counts = {t.name: getattr(self, t.name) for t in layer_types()}
        if self.pattern:
            given = [k for k, v in counts.items() if v is not None]
            if given:
                raise ValueError(f"give pattern choices or layer counts ({given[0]}), not both")
            return self
        mixers = [t.name for t in layer_types() if t.mixes_sequence]
        if sum(counts[k].lowest for k in mixers if counts[k]) < 1:
            raise ValueError(
                "a candidate could have no Mamba or attention layer: give "
                f"{', '.join(mixers[:-1])} or {mixers[-1]} a lowest count of at least 1"
            )
        return self


class Search(StrictModel):
    """An Optuna search over layer patterns and shapes, trials run in parallel on Ray."""

    trials: PositiveInt = 20  # trials in the study, across restarts
    parallel: PositiveInt = 2  # trials running at once
    objectives: Annotated[list[Objective], Field(min_length=1)] = ["val_loss"]
    sampler: Literal["tpe", "nsga2", "random"] | None = None  # TPE; NSGA-II for several
    pruner: Literal["median", "hyperband", "none"] | None = None  # median; none for several
    startup_trials: PositiveInt = 4  # random trials before TPE; trials the pruner waits for
    seed: int = 0
    decode_context: Count = 4096  # the context at which decode cost counts the KV cache
    decode_batch: PositiveInt = 1  # sequences decoded together, for decode_ms
    budget: Budget | None = None  # None: every candidate keeps the base model's d_model
    space: SearchSpace

    @model_validator(mode="after")
    def _check(self) -> "Search":
        if len(set(self.objectives)) != len(self.objectives):
            raise ValueError(f"objectives names one twice: {self.objectives}")
        if self.pruner not in (None, "none"):
            if len(self.objectives) > 1:
                raise ValueError("pruner: Optuna prunes single-objective searches only")
            if self.objectives[0] not in ("val_loss", "val_bpb"):
                raise ValueError(
                    f"pruner: {self.objectives[0]} is not evaluated during training; "
                    "prune on val_loss or val_bpb"
                )
        return self

    @property
    def sampler_name(self) -> str:
        return self.sampler or ("tpe" if len(self.objectives) == 1 else "nsga2")

    @property
    def pruner_name(self) -> str:
        prunable = len(self.objectives) == 1 and self.objectives[0] in ("val_loss", "val_bpb")
        return self.pruner or ("median" if prunable else "none")
