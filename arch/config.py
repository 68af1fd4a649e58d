"""The model's typed config (the layer mix and the shape of every layer type), and the base
and value types every config shares: the data's (data/config.py) and a trial's
(runners/config.py) build on these, so no package below runners imports it."""

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveInt,
    model_validator,
)

from arch.allocation import ATTENTION, MAMBA2, MLP, allocate_layers, validate_pattern
from arch.registry import layer_type, recurrent_symbols


class StrictModel(BaseModel):
    """Base of every config: unknown keys and silent type coercions are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _unit_interval(value: float) -> float:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{value} is not in [0, 1)")
    return value


def _closed_unit_interval(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{value} is not in [0, 1]")
    return value


def omitted_at_default(default: object) -> Any:
    """A field left out of the dump, and so of the trial id, at its default: a field added
    for a new layer type keeps the ids of every trial from before it."""
    return Field(default, exclude_if=lambda value: value == default)


Ratio = Annotated[float, AfterValidator(_unit_interval)]

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
Pattern = Annotated[str, AfterValidator(validate_pattern)]


PAPER_TRANSFORMER_ROTARY = 0.5  # Waleffe et al. 2024: RoPE on half of each head's channels


def paper_rotary_fraction(pattern: str) -> float:
    """The paper's position encoding for a mix: RoPE only where no recurrent layer is."""
    recurrent = any(symbol in pattern for symbol in recurrent_symbols())
    return 0.0 if recurrent else PAPER_TRANSFORMER_ROTARY


def position_encoding(rotary_fraction: float) -> str:
    """How a plan table or report names a model's position encoding."""
    return f"RoPE {rotary_fraction:.0%}" if rotary_fraction else "none"


class ModelConfig(StrictModel):
    """One hybrid LM. The layer mix is given by ratios or by an explicit pattern.

    With ratios, ``n_layers`` is required and the pattern is allocated as
    Megatron-LM does. With a pattern, ``n_layers`` is its length. Given both,
    the pattern's layer counts must equal the ratios' (Megatron-LM's rule for an
    override pattern), so a resolved config always validates again.
    """

    d_model: PositiveInt = 64
    n_layers: PositiveInt | None = None
    attention_ratio: Ratio = 0.0
    mlp_ratio: Ratio = 0.0
    pattern: Pattern | None = None
    vocab_size: PositiveInt = 264  # the byte tokenizer (256 + end-of-text), padded to 8
    tie_embeddings: bool = True
    # attention
    n_heads: PositiveInt = 4
    n_kv_heads: PositiveInt | None = None  # None: as many as n_heads (no grouping)
    # share of each head's channels rotated by RoPE. None: as the paper trained each mix,
    # 0.5 in a pure-attention mix (its Transformer), 0 wherever there is an SSM layer (its
    # hybrid has no position embedding at all; the SSM layers carry position)
    rotary_fraction: Annotated[float, AfterValidator(_closed_unit_interval)] | None = None
    # MLP
    d_ffn: PositiveInt | None = None  # None: 4 * d_model
    mlp_activation: Literal["squared_relu", "swiglu", "gelu"] = "squared_relu"
    # Mamba-2 and Mamba-1
    d_state: PositiveInt = 128
    mamba1_d_state: PositiveInt = 16
    d_conv: PositiveInt = 4
    expand: PositiveInt = 2
    ssm_headdim: PositiveInt = 64
    ssm_ngroups: PositiveInt = 1
    chunk_size: PositiveInt = 256
    # Mamba-2's scan, conv and gated norm: "auto" runs the Triton kernels (arch/kernels) on
    # CUDA and the PyTorch reference elsewhere
    ssd_impl: Literal["auto", "triton", "torch"] = "auto"
    # Gated DeltaNet: d_model // gdn_head_dim heads, each of gdn_head_dim query and key
    # channels and expand * gdn_head_dim value channels. gdn_impl "fla" runs fla-core's
    # chunked kernels (the optional extra "fla"; CUDA only), "torch" the reference
    gdn_head_dim: PositiveInt = omitted_at_default(64)
    gdn_impl: Literal["torch", "fla"] = omitted_at_default("torch")

    @model_validator(mode="after")
    def _resolve_pattern(self) -> "ModelConfig":
        ratios = self.attention_ratio + self.mlp_ratio
        if ratios > 1.0:
            raise ValueError(f"attention_ratio + mlp_ratio = {ratios:g} exceeds 1")
        if self.pattern is None:
            if self.n_layers is None:
                raise ValueError("n_layers is required when no pattern is given")
            pattern = allocate_layers(self.n_layers, self.attention_ratio, self.mlp_ratio)
        else:
            pattern = self.pattern
            if self.n_layers not in (None, len(pattern)):
                raise ValueError(
                    f"pattern {pattern!r} has {len(pattern)} layers but n_layers is {self.n_layers}"
                )
            if ratios > 0:
                allocated = allocate_layers(len(pattern), self.attention_ratio, self.mlp_ratio)
                # the ratios allocate Mamba-2 slots; any recurrent layer may fill them
                as_allocated = [s if s in (ATTENTION, MLP) else MAMBA2 for s in pattern]
                if sorted(allocated) != sorted(as_allocated):
                    raise ValueError(
                        f"pattern {pattern!r} does not have the layer counts of "
                        f"attention_ratio={self.attention_ratio:g}, "
                        f"mlp_ratio={self.mlp_ratio:g} ({allocated!r}); give one or the other"
                    )
        self._check_shape(pattern)
        # Frozen model: fill the derived fields once, here, so they are part of the id.
        object.__setattr__(self, "pattern", pattern)
        object.__setattr__(self, "n_layers", len(pattern))
        if self.rotary_fraction is None:
            object.__setattr__(self, "rotary_fraction", paper_rotary_fraction(pattern))
        return self

    def _check_shape(self, pattern: str) -> None:
        for symbol in sorted(set(pattern)):
            layer_type(symbol).check(self)
