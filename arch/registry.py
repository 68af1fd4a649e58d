"""The layer types a pattern may name: each declared once, in its own module of arch/layers/.

A ``LayerType`` is everything the rest of the repository needs of a layer: its pattern
symbol, how to build it from a ``ModelConfig``, its parameters and FLOPs in closed form
(arch/accounting.py sums them), its decode state and work (arch/decode_cost.py), the
constraint it puts on d_model (the search's width matching) and its role in a mix (the
analysis's labels). Adding a layer type is adding one module to arch/layers/ (and its
config fields); the modules are found, and so registered, on the first lookup.
"""

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from arch.config import ModelConfig


def _zero(*_: Any) -> int:
    return 0


def _any_width(*_: Any) -> int:
    return 1


def _no_constraint(_: "ModelConfig") -> None:
    return None


@dataclass(frozen=True)
class LayerType:
    symbol: str  # its character in a layer pattern
    name: str  # its key in layer counts, parameter counts, search spaces and run tags
    label: str  # how reports name it, and a mix it leads ("Mamba-2", "Mamba-2-Hybrid")
    build: Callable[["ModelConfig"], "nn.Module"]
    # parameters of its weight matrices (what matmul FLOPs are counted on) ...
    matrix_params: Callable[["ModelConfig"], int]
    # ... and of everything else: biases, conv kernels, SSM vectors, norms inside it
    other_params: Callable[["ModelConfig"], int] = _zero
    # forward FLOPs per token beyond its matmuls, at a training sequence length
    sequence_flops: Callable[["ModelConfig", int], int] = _zero
    # decoding one token after ``context`` others, per sequence: FLOPs beyond its matmuls,
    # KV-cache values read (in the activation dtype), recurrent state values (fp32) and
    # convolution state values (activation dtype), each read and written once
    decode_flops: Callable[["ModelConfig", int], int] = _zero
    kv_cache_values: Callable[["ModelConfig", int], int] = _zero
    state_values: Callable[["ModelConfig"], int] = _zero
    conv_values: Callable[["ModelConfig"], int] = _zero
    fused_launches: int = 1  # kernels of one decode step with fused kernels
    # raises ValueError for a config this layer cannot be built from
    check: Callable[["ModelConfig"], None] = _no_constraint
    # d_model must be a multiple of this; reads config fields through ``get(name)``, as the
    # search asks before a config exists
    width_multiple: Callable[[Callable[[str], Any]], int] = _any_width
    mixes_sequence: bool = True  # False: acts on each position alone (the MLP)
    # a recurrent mixer, which carries position itself: the paper uses no RoPE beside one,
    # and a mix is named after it
    recurrent: bool = False


_REGISTRY: dict[str, LayerType] = {}


def register(layer_type: LayerType) -> LayerType:
    """Add a layer type; its symbol and name must be new."""
    for other in _REGISTRY.values():
        if layer_type.symbol == other.symbol or layer_type.name == other.name:
            raise ValueError(f"layer type {layer_type.name!r} clashes with {other.name!r}")
    _REGISTRY[layer_type.symbol] = layer_type
    return layer_type


def layer_types() -> tuple[LayerType, ...]:
    """Every layer type, the paper's four first (arch/layers/__init__.py)."""
    importlib.import_module("arch.layers")  # registers them all, once
    return tuple(_REGISTRY.values())


def layer_type(symbol: str) -> LayerType:
    """The layer type a pattern symbol stands for."""
    types = {t.symbol: t for t in layer_types()}
    if symbol not in types:
        raise ValueError(f"unknown layer symbol {symbol!r}")
    return types[symbol]


def recurrent_symbols() -> tuple[str, ...]:
    return tuple(t.symbol for t in layer_types() if t.recurrent)
