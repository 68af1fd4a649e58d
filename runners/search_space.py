"""From an Optuna trial's suggestions to a trial config: the layer pattern, the width that
meets the budget, and the decode costs a search may trade quality against.

``candidate`` asks only through ``suggest_int``/``suggest_float``/``suggest_categorical``,
so anything with those methods can stand in for an Optuna trial (``Corner`` does, to check
a space's extremes before a search starts).
"""

import math
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from arch.accounting import flops_per_token, param_counts
from arch.allocation import ATTENTION, MAMBA2, MLP
from arch.config import ModelConfig
from arch.decode_cost import decode_seconds_per_token
from arch.registry import layer_type, layer_types
from runners.config import TrialConfig
from runners.search_schema import Budget, FloatDim, IntDim, Search
from runners.spec import SpecError, StudySpec, load_spec, trial_dict

MAX_D_MODEL = 1 << 16  # no candidate is wider: a budget beyond it is a typo


class Infeasible(Exception):
    """This candidate cannot be built within the spec's rules (a budget missed, attention
    that does not fit); the trial is pruned without training."""


# ---- layer patterns --------------------------------------------------------------------------


def spread(slots: int, count: int) -> list[int]:
    """Evenly spaced positions of ``count`` items among ``slots``: equal runs of other
    slots before, between and after them, ties going right (Megatron-LM's layout)."""
    gap = (slots - count) / (count + 1)
    return [math.floor((i + 1) * gap + i + 0.5) for i in range(count)]


def place_free(slots: int, depths: list[float]) -> list[int]:
    """Positions for items at relative depths in [0, 1]; a taken slot passes its item to
    the next free one (wrapping), so every item gets its own slot."""
    taken: list[int] = []
    for depth in depths:
        slot = min(slots - 1, math.floor(depth * slots))
        while slot in taken:
            slot = (slot + 1) % slots
        taken.append(slot)
    return sorted(taken)


def build_pattern(
    counts: dict[str, int], attention_slots: list[int] | None = None, skip: int = 0
) -> str:
    """The layer pattern of ``counts`` layers of each type (by name; a type left out has
    none): the sequence mixers in order, attention at ``attention_slots`` among them
    (default: spread evenly past the first ``skip``), every other recurrent type spread in
    turn among the slots Mamba-2 still holds, then MLPs after the mixers, spread evenly and
    leaning right (one MLP per mixer when the counts match: ``*-*-``)."""
    count = {t.symbol: counts.get(t.name, 0) for t in layer_types()}
    mixers = sum(n for symbol, n in count.items() if layer_type(symbol).mixes_sequence)
    if mixers < 1:
        raise Infeasible("no sequence-mixing layer (Mamba or attention)")
    attention = count[ATTENTION]
    if attention > mixers - skip:
        raise Infeasible(
            f"{attention} attention layers do not fit in {mixers - skip} mixer slots "
            f"after the first {skip}"
        )
    if attention_slots is None:
        attention_slots = [skip + s for s in spread(mixers - skip, attention)]
    layers = [MAMBA2] * mixers
    for slot in attention_slots:
        layers[slot] = ATTENTION
    for t in layer_types():
        if t.recurrent and t.symbol != MAMBA2:
            mamba2_slots = [i for i, symbol in enumerate(layers) if symbol == MAMBA2]
            for i in spread(len(mamba2_slots), count[t.symbol]):
                layers[mamba2_slots[i]] = t.symbol
    mlp = count[MLP]
    after = [0] * mixers  # MLPs after each mixer
    for j in range(mlp):  # MLP j follows mixer ceil((j + 1) * mixers / mlp) - 1
        after[-(-(j + 1) * mixers // mlp) - 1] += 1
    return "".join(symbol + MLP * n for symbol, n in zip(layers, after, strict=True))


# ---- width matching ----------------------------------------------------------------------


def budget_measure(trial: TrialConfig, budget: Budget) -> int:
    """What the budget counts: parameters, or training FLOPs per token."""
    if budget.params is not None:
        return param_counts(trial.model)["total"]
    return flops_per_token(trial.model, trial.data.seq_len)["training"]


def _width_step(raw_model: dict, budget: Budget) -> int:
    """The finest d_model step every layer of the pattern accepts (attention heads divide
    it, the Mamba-2 inner width splits into whole heads and groups, ...)."""
    defaults = ModelConfig.model_fields
    get = lambda key: raw_model.get(key) or defaults[key].default  # noqa: E731
    step = budget.multiple_of
    for symbol in sorted(set(raw_model["pattern"])):
        step = math.lcm(step, layer_type(symbol).width_multiple(get))
    return step


def match_width(raw: dict, budget: Budget, ffn_ratio: float | None) -> TrialConfig:
    """The trial at the d_model whose budget measure is nearest the budget (it grows with
    d_model, so a bisection finds it); Infeasible if even that misses the tolerance."""
    target = budget.params or budget.flops_per_token
    step = _width_step(raw["model"], budget)

    def at(k: int) -> TrialConfig:
        model = {**raw["model"], "d_model": k * step}
        if ffn_ratio is not None:
            model["d_ffn"] = max(1, round(ffn_ratio * k * step))
        return TrialConfig.model_validate({**raw, "model": model})

    low, high = 1, 1
    while budget_measure(at(high), budget) < target:
        if high * step > MAX_D_MODEL:
            raise Infeasible(f"the budget {target:,} needs d_model above {MAX_D_MODEL}")
        low, high = high, 2 * high
    while low < high:  # the smallest k whose measure reaches the target
        mid = (low + high) // 2
        low, high = (mid + 1, high) if budget_measure(at(mid), budget) < target else (low, mid)
    nearest = min(
        (at(k) for k in {max(1, low - 1), low}),
        key=lambda t: abs(budget_measure(t, budget) - target),
    )
    miss = budget_measure(nearest, budget) / target - 1
    if abs(miss) > budget.tolerance:
        raise Infeasible(
            f"pattern {nearest.model.pattern} misses the budget {target:,} by {miss:+.1%} at its "
            f"nearest d_model {nearest.model.d_model} (tolerance {budget.tolerance:.0%})"
        )
    return nearest


# ---- decode cost -----------------------------------------------------------------------------


def decode_bytes(model: ModelConfig, context: int, bytes_per_value: int = 2) -> int:
    """Bytes read from memory to decode one token at ``context`` tokens of history: every
    weight once, each attention layer's KV cache, each recurrent layer's state and
    convolution state, all at ``bytes_per_value``. At small batch, decoding is
    memory-bound, so this proxies its latency; ``decode_ms`` models the latency itself."""
    state = 0
    for symbol in model.pattern:
        t = layer_type(symbol)
        state += t.kv_cache_values(model, context) + t.state_values(model) + t.conv_values(model)
    return bytes_per_value * (param_counts(model)["total"] + state)


def decode_ms(model: ModelConfig, batch: int, context: int) -> float:
    """Modelled milliseconds per generated token, ``batch`` sequences decoded together
    after ``context`` tokens: arch/decode_cost.py's roofline of fused decode kernels on an
    H100, with its default (uncalibrated) constants."""
    return 1e3 * decode_seconds_per_token(model, batch, context)


def decode_costs(model: ModelConfig, search: Search) -> dict[str, float]:
    """Every cost objective (``COST_OBJECTIVES``) of a candidate, at the search's context."""
    return {
        "decode_bytes": decode_bytes(model, search.decode_context),
        "decode_ms": decode_ms(model, search.decode_batch, search.decode_context),
    }


# ---- sampling ---------------------------------------------------------------------------------


def _suggest(trial: Any, name: str, dim: IntDim | FloatDim | None) -> Any:
    """A dimension's value: fixed ones are not asked, so they stay out of the study."""
    if dim is None:
        return None
    if dim.choices is not None:
        if len(dim.choices) == 1:
            return dim.choices[0]
        return trial.suggest_categorical(name, dim.choices)
    if isinstance(dim, IntDim):
        return trial.suggest_int(name, dim.low, dim.high)
    return trial.suggest_float(name, dim.low, dim.high, log=dim.log)


def _pattern(trial: Any, spec: StudySpec) -> str:
    space = spec.search.space
    if space.pattern:
        return (
            space.pattern[0]
            if len(space.pattern) == 1
            else trial.suggest_categorical("pattern", space.pattern)
        )
    counts = {t.name: _suggest(trial, t.name, getattr(space, t.name)) or 0 for t in layer_types()}
    placement = space.attention_placement[0]
    if len(space.attention_placement) > 1 and counts["attention"]:
        placement = trial.suggest_categorical("attention_placement", space.attention_placement)
    slots = None
    mixers = sum(counts[t.name] for t in layer_types() if t.mixes_sequence)
    skip = space.no_attention_in_first
    fits = 0 < counts["attention"] <= mixers - skip  # else build_pattern says why not
    if placement == "free" and fits:
        depths = [trial.suggest_float(f"attention_{i}_depth", 0.0, 1.0)
                  for i in range(counts["attention"])]  # fmt: skip
        slots = [skip + s for s in place_free(mixers - skip, depths)]
    return build_pattern(counts, attention_slots=slots, skip=skip)


def candidate(spec: StudySpec, trial: Any) -> TrialConfig:
    """The trial config for a trial's suggestions. Raises Infeasible."""
    search = spec.search
    space = search.space
    pattern = _pattern(trial, spec)
    model: dict[str, Any] = {}
    for key in ("d_state", "ssm_headdim"):
        value = _suggest(trial, key, getattr(space, key))
        if value is not None:
            model[key] = value
    ffn_ratio = _suggest(trial, "ffn_ratio", space.ffn_ratio)
    point: dict[str, Any] = {"model": model, "pattern": pattern}
    lr = _suggest(trial, "lr", space.lr)
    if lr is not None:
        point["lr"] = lr
    raw = trial_dict(spec, point)
    try:
        if search.budget is not None:
            return match_width(raw, search.budget, ffn_ratio)
        if ffn_ratio is not None:
            d_model = raw["model"].get("d_model") or ModelConfig.model_fields["d_model"].default
            raw["model"]["d_ffn"] = max(1, round(ffn_ratio * d_model))
        return TrialConfig.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        rule = first["msg"].removeprefix("Value error, ")
        raise Infeasible(f"pattern {pattern}: {where}: {rule}") from None


class Corner:
    """Stands in for an Optuna trial, answering every suggestion with its lowest (or
    highest) value: a search checks its space's two extremes before it starts."""

    def __init__(self, high: bool) -> None:
        self.high = high

    def suggest_int(self, name: str, low: int, high: int) -> int:
        return high if self.high else low

    def suggest_float(self, name: str, low: float, high: float, log: bool = False) -> float:
        return high if self.high else low

    def suggest_categorical(self, name: str, choices: list) -> Any:
        return choices[-1] if self.high else choices[0]


# ---- loading ---------------------------------------------------------------------------------


def load_search(path: str | Path) -> StudySpec:
    """A study spec with a search section, checked in full before anything runs: the spec,
    pruning's need for interval evaluations, and the space's two extremes."""
    spec, (base,) = load_spec(path)
    search = spec.search
    if search is None:
        raise SpecError(f"{path}: search: missing; a sweep runs with `hybridscale study`")
    if search.pruner_name != "none" and base.training.eval_every_tokens is None:
        raise SpecError(
            f"{path}: training.eval_every_tokens: the {search.pruner_name} pruner needs "
            "interval evaluations; set it, or search.pruner: none"
        )
    misses = []
    for high in (False, True):
        try:
            candidate(spec, Corner(high))
        except Infeasible as err:
            misses.append(str(err))
    if len(misses) == 2:
        field = "search.budget" if search.budget else "search.space"
        raise SpecError(f"{path}: {field}: even the smallest candidate fails: {misses[0]}")
    return spec
