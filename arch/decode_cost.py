"""What one decode step costs: bytes moved, FLOPs and kernel launches, and a calibrated
roofline time, for any layer mix, batch and context. bench/decode.py measures; this models.

A decode step advances ``batch`` sequences by one token, with ``context`` tokens already
in each sequence's cache. Two counts of its work:

* ``decode_traffic`` / ``decode_flops``, in closed form, the work the architecture itself
  needs, as fused decode kernels do it (flash-decoding, mamba_ssm's state update): every
  weight matrix read once (the LM head included, of the embedding only the batch's rows);
  and what each layer type declares (arch/layers/): an attention layer's K and V cache,
  2 B kv_heads head_dim T values, read; a recurrent layer's state (fp32) and conv state
  read and written once. FLOPs: 2 B per matrix parameter, plus each layer's own (4 B heads
  head_dim T per attention layer, 6 B E N per Mamba-2 layer, 2 B K per conv channel, ...).
* ``trace_decode_step``: the work this repository's PyTorch decode step does, op by op,
  from running it on the meta device (no memory, any size): each op's tensor inputs and
  outputs, less what the L2 cache holds, and a matmul's 2mnk FLOPs. Unfused, it moves
  more than the closed form (the fp32 SSM state several times a step once it outgrows L2,
  attention scores several times).

Time is a roofline with launch overhead: every kernel costs
``max(bytes / bandwidth, flops / (flops_frac * peak_flops)) + launch_s``. The bandwidth is
``bw_frac * peak_bw``, with one fraction for matmuls, which stream a large operand (the
weights, or attention's KV cache), and one for everything else (elementwise ops, recurrent
states); but never more than ``blocks * block_bandwidth`` where a kernel has few thread
blocks to spread its traffic over, each streaming its share serially: a batched matmul
that cannot split its reduction, as the reference step's product of the scores with V,
when grouped-query heads fold several query rows into one product
(``_batched_matmul_blocks``).
``calibrate`` fits these five constants to measured steps of the reference implementation;
``decode_step_seconds`` then predicts either implementation, the fused one with the
launches each layer type declares and without a block limit (flash-decoding splits the
keys over blocks).
"""

import functools
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import least_squares
from torch.utils._python_dispatch import TorchDispatchMode

from arch.accounting import matrix_params, param_counts
from arch.config import ModelConfig
from arch.model import HybridLM
from arch.registry import LayerType, layer_type

SSM_STATE_BYTES = 4  # the recurrent states are kept in fp32

# Kernels of a fused decode step beyond its layers' own (each layer type declares its
# norm, projections, one kernel per fused sequence op and activation): the embedding, the
# final norm, the LM head and sampling.
MODEL_LAUNCHES = 4


@dataclass(frozen=True)
class Hardware:
    name: str
    bandwidth: float  # bytes/s
    flops: float  # dense bf16 FLOP/s


H100 = Hardware("H100 SXM", 3.35e12, 989e12)
HARDWARE = {"H100 PCIe": Hardware("H100 PCIe", 2.0e12, 756e12), "H100": H100,
            "H200": Hardware("H200", 4.8e12, 989e12)}  # fmt: skip


def hardware_named(device_name: str) -> Hardware:
    """The spec sheet of a GPU from its CUDA name (an H100 SXM if it is not known)."""
    return next((hw for key, hw in HARDWARE.items() if key in device_name), H100)


@dataclass(frozen=True)
class Calibration:
    """What a decode step's kernels achieve. The defaults are typical of an H100, until
    bench/decode.py fits them."""

    matmul_bandwidth: float = 0.7  # fraction of peak bandwidth a matmul streams its operand at
    other_bandwidth: float = 0.6  # the same for every other kernel
    flops_fraction: float = 0.6  # fraction of peak FLOP/s, where compute is the bound
    launch_s: float = 3e-6  # one kernel's fixed cost in a CUDA graph: launch, ramp, tail
    # bytes/s one thread block streams on its own: an H100's peak over its 132 SMs
    block_bandwidth: float = 25e9

    def bandwidths(self) -> np.ndarray:
        """The achieved bandwidth fractions in the order of ``KINDS``."""
        return np.array([self.matmul_bandwidth, self.other_bandwidth])


def _per_layer(c: ModelConfig, declared: Callable[[LayerType], int]) -> int:
    """What each layer's type declares, summed over the layers."""
    return sum(declared(layer_type(symbol)) for symbol in c.pattern)


def decode_traffic(
    c: ModelConfig, batch: int, context: int, dtype_bytes: int = 2
) -> dict[str, float]:
    """Bytes one fused decode step must move, by what they hold (see the module doc)."""
    counts = param_counts(c)
    embedding_table = counts["embedding"] + counts["lm_head"] - c.vocab_size * c.d_model
    return {
        # the embedding lookup reads the batch's rows; the LM head matrix is read whole
        "weights": dtype_bytes * (counts["total"] - embedding_table + batch * c.d_model),
        "kv_cache": dtype_bytes * batch * _per_layer(c, lambda t: t.kv_cache_values(c, context)),
        "ssm_state": 2 * SSM_STATE_BYTES * batch * _per_layer(c, lambda t: t.state_values(c)),
        "conv_state": 2 * dtype_bytes * batch * _per_layer(c, lambda t: t.conv_values(c)),
    }


def decode_flops(c: ModelConfig, batch: int, context: int) -> float:
    """FLOPs of one decode step (see the module doc)."""
    return batch * (2 * matrix_params(c) + _per_layer(c, lambda t: t.decode_flops(c, context)))


def kv_cache_flops(c: ModelConfig, batch: int, context: int) -> float:
    """The part of ``decode_flops`` that streams a KV cache, as attention's does."""
    return batch * _per_layer(
        c, lambda t: t.decode_flops(c, context) if t.kv_cache_values(c, context) else 0
    )


@dataclass(frozen=True)
class Op:
    name: str
    bytes: float
    flops: float
    blocks: float = math.inf  # thread blocks its traffic spreads over, where few

    @property
    def kind(self) -> str:
        """Matmuls (a layer's weights, attention's KV cache) or anything else."""
        return "matmul" if self.name in _MATMULS else "other"


KINDS = ("matmul", "other")  # what a kernel streams from memory
_MATMULS = {"mm", "addmm", "bmm", "baddbmm"}
_BATCHED = {"bmm", "baddbmm"}
TILE = 128  # output rows and columns one thread block of a batched matmul computes
_GATHERS = {"embedding", "index_select"}  # read only the rows they return
_FREE = {"detach", "lift_fresh", "empty", "_unsafe_view"}  # no kernel


PRIOR_WEIGHT = 0.05  # of calibrate's pull to the default constants, per log-unit
L2_BYTES = 50e6  # an H100's or H200's L2 cache


def _tensors(values) -> list[torch.Tensor]:
    flat = values if isinstance(values, list | tuple) else [values]
    inner = [v for x in flat for v in (x if isinstance(x, list | tuple) else [x])]
    return [v for v in inner if isinstance(v, torch.Tensor)]


def _nbytes(values) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(values))


class _OpRecorder(TorchDispatchMode):
    """Records every kernel of a step: the DRAM bytes it moves (tensor inputs read, outputs
    written) less what the L2 cache still holds, modelled as the least recently used
    tensors up to ``L2_BYTES`` (a dirty tensor is written back once), and matmul FLOPs."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[Op] = []
        self._l2: OrderedDict[int, tuple[torch.UntypedStorage, int]] = OrderedDict()
        self._l2_bytes = 0
        self._dirty: set[int] = set()

    def _touch(self, t: torch.Tensor, write: bool, nbytes: int | None = None) -> int:
        """DRAM bytes of reading or writing t (or nbytes of it), and mark it recently used."""
        storage = t.untyped_storage()
        key, nbytes = storage._cdata, _nbytes(t) if nbytes is None else nbytes
        _, held = self._l2.pop(key, (None, 0))
        self._l2_bytes -= held
        cached = held if (not write or key in self._dirty) else 0
        if write:
            self._dirty.add(key)
        self._l2[key] = (storage, max(held, nbytes))
        self._l2_bytes += max(held, nbytes)
        while self._l2_bytes > L2_BYTES:
            evicted, (_, size) = self._l2.popitem(last=False)
            self._l2_bytes -= size
            self._dirty.discard(evicted)
        return max(0, nbytes - cached)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func.is_view or name in _FREE:
            return out
        if name in _GATHERS:  # the rows it returns, from a table not worth tracking
            moved = _nbytes(out) + sum(self._touch(t, write=True) for t in _tensors(out))
        else:  # copy_ and index_copy_ overwrite self without reading it
            reads = _tensors(args[1:] if name in ("copy_", "index_copy_") else args)
            moved = sum(self._touch(t, write=False) for t in reads)
            if name == "index_copy_":  # only the source's rows of self
                moved += self._touch(args[0], write=True, nbytes=_nbytes(args[3]))
            else:
                moved += sum(self._touch(t, write=True) for t in _tensors(out))
        flops = 2.0 * args[-2].numel() * args[-1].shape[-1] if name in _MATMULS else 0.0
        blocks = _batched_matmul_blocks(args[-2], args[-1]) if name in _BATCHED else math.inf
        self.ops.append(Op(name, moved, flops, blocks))
        return out


def _batched_matmul_blocks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Thread blocks of the batched product a @ b, (batch, m, k) @ (batch, k, n): one per
    output tile, the reduction over k not split (the batched GEMMs cuBLAS picks for these
    shapes do not split it, by the measured steps of the hybrid), so each block streams
    its slice of both operands alone. A matrix-vector product (m or n is 1: one query
    against its own head's cache) is split along k instead: no limit.

    In the reference step's attention this bites where grouped-query heads fold several
    query rows into one product with the cache: the scores times V then have one output
    tile per (sequence, KV head), a few blocks each reading a whole head of V.
    """
    m, n = a.shape[-2], b.shape[-1]
    if min(m, n) == 1:
        return math.inf
    return a.shape[0] * math.ceil(m / TILE) * math.ceil(n / TILE)


def _decode_step(model, token: torch.Tensor, caches: list[dict]) -> None:
    """One greedy decode step: what bench/decode.py captures in a CUDA graph."""
    logits = model(token, caches)
    token.copy_(logits[:, -1].argmax(-1, keepdim=True))


@functools.lru_cache(maxsize=16)
def _meta_model(config_json: str) -> HybridLM:
    with torch.device("meta"):
        return HybridLM(ModelConfig.model_validate_json(config_json)).to(torch.bfloat16)


@functools.lru_cache(maxsize=256)
def _trace(config_json: str, batch: int, context: int) -> tuple[Op, ...]:
    model = _meta_model(config_json)
    with torch.device("meta"), torch.no_grad():
        caches = model.allocate_caches(batch, context)
        token = torch.zeros(batch, 1, dtype=torch.long)
        with _OpRecorder() as recorder:
            _decode_step(model, token, caches)
    return tuple(recorder.ops)


def trace_decode_step(c: ModelConfig, batch: int, context: int) -> tuple[Op, ...]:
    """The ops of this repository's bf16 decode step with a ``context``-long static cache."""
    return _trace(c.model_dump_json(), batch, context)


def _roofline(kinds, bytes_, flops, blocks, launches, cal: Calibration, hw: Hardware) -> float:
    """Sum over kernels (kinds: indices into ``KINDS``; blocks: their thread blocks) of
    max(memory time, compute time), plus the launches."""
    bandwidth = np.minimum(cal.bandwidths()[kinds] * hw.bandwidth,
                           np.asarray(blocks) * cal.block_bandwidth)  # fmt: skip
    compute = np.maximum(np.asarray(bytes_) / bandwidth,
                         np.asarray(flops) / (cal.flops_fraction * hw.flops))  # fmt: skip
    return float(np.sum(compute) + launches * cal.launch_s)


def _columns(ops: tuple[Op, ...]) -> tuple[np.ndarray, ...]:
    kinds = np.array([KINDS.index(o.kind) for o in ops], dtype=int)
    return kinds, *(np.array([getattr(o, f) for o in ops]) for f in ("bytes", "flops", "blocks"))


def decode_step_seconds(
    c: ModelConfig, batch: int, context: int, calibration: Calibration = Calibration(),
    hardware: Hardware = H100, implementation: str = "fused",
) -> float:  # fmt: skip
    """Predicted seconds of one decode step (``batch`` new tokens) after ``context`` tokens.

    implementation "fused": the closed-form traffic and each layer's declared launches (an
    optimised serving stack); "reference": this repository's PyTorch step, op by op.
    """
    if implementation == "reference":
        ops = trace_decode_step(c, batch, context)
        return _roofline(*_columns(ops), len(ops), calibration, hardware)
    if implementation != "fused":
        raise ValueError(f"implementation {implementation!r} is not 'fused' or 'reference'")
    launches = MODEL_LAUNCHES + sum(layer_type(s).fused_launches for s in c.pattern)
    t = decode_traffic(c, batch, context)
    attention_flops = kv_cache_flops(c, batch, context)
    return _roofline(
        np.array([KINDS.index("matmul")] * 2 + [KINDS.index("other")]),
        [t["weights"], t["kv_cache"], t["ssm_state"] + t["conv_state"]],
        [decode_flops(c, batch, context) - attention_flops, attention_flops, 0.0],
        [math.inf] * 3, launches, calibration, hardware,
    )  # fmt: skip


def decode_seconds_per_token(
    c: ModelConfig, batch: int, context: int, calibration: Calibration = Calibration(),
    hardware: Hardware = H100, implementation: str = "fused",
) -> float:  # fmt: skip
    """Seconds per generated token at this batch and context: the search's speed objective
    (lower is better); one decode step serves ``batch`` tokens."""
    return decode_step_seconds(c, batch, context, calibration, hardware, implementation) / batch


def calibrate(measurements: list[dict], hardware: Hardware = H100) -> Calibration:
    """Fit the constants to measured reference decode steps, minimising relative error.

    Each measurement: {"config": ModelConfig or its dict, "batch", "context" (the cache
    length the step reads), "seconds" (one step)}.
    """
    if not measurements:
        raise ValueError("calibrate needs at least one measurement")
    rows = []
    for m in measurements:
        config = m["config"]
        config = config if isinstance(config, ModelConfig) else ModelConfig(**config)
        ops = trace_decode_step(config, m["batch"], m["context"])
        rows.append((_columns(ops), len(ops), m["seconds"]))

    prior = np.log(list(Calibration().__dict__.values()))

    def residuals(log_params: np.ndarray) -> np.ndarray:
        cal = Calibration(*np.exp(log_params))
        errors = [np.log(_roofline(*cols, n, cal, hardware) / s) for cols, n, s in rows]
        # A weak pull to the defaults keeps a constant the grid barely tests (the FLOP rate,
        # rarely the bound) physical instead of wandering to a bound.
        return np.concatenate([errors, PRIOR_WEIGHT * (log_params - prior)])

    low, high = [0.01] * 3 + [1e-8, 1e8], [1.0] * 3 + [1e-3, 1e12]  # fractions, s, bytes/s
    fit = least_squares(residuals, prior, bounds=(np.log(low), np.log(high)))
    return Calibration(*(float(v) for v in np.exp(fit.x)))
