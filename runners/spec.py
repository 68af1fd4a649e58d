"""Study specs: YAML with presets, validated in full before any compute, expanded into trials.

A spec names a base trial (``model``, ``data``, ``training``; each may name a
preset from ``configs/<section>/`` and override its fields) and a ``sweep`` of
axes. Axes cross each other, except those listed in ``sweep.zip``, which
advance together. Instead of a sweep, a ``search`` section declares the space an
Optuna search samples (runners/search_schema.py, runners/search_space.py). Every error is
a :class:`SpecError` whose one-line message names the file, the field path and the
rule broken.
"""

import difflib
import itertools
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from arch.accounting import param_counts
from arch.config import Count, Pattern, Ratio, StrictModel
from data.corpus import DataError
from data.tasks import read_examples
from data.tokenizer import vocabulary_size
from runners.config import TrialConfig
from runners.search_schema import Search

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
PRESET_SECTIONS = ("model", "data", "training")


class SpecError(Exception):
    """A spec that cannot be run; the message is the whole, one-line explanation."""


class Shape(StrictModel):
    """A model size: the shape fields a ``sweep.size`` entry may set."""

    preset: str | None = None  # the configs/size/ name it came from, for labels

    d_model: PositiveInt | None = None
    n_layers: PositiveInt | None = None
    n_heads: PositiveInt | None = None
    n_kv_heads: PositiveInt | None = None
    d_ffn: PositiveInt | None = None
    d_state: PositiveInt | None = None
    expand: PositiveInt | None = None
    ssm_headdim: PositiveInt | None = None
    ssm_ngroups: PositiveInt | None = None


def _values(item: Any) -> Any:
    return Annotated[list[item], Field(min_length=1)] | None


Axis = Literal[
    "model",
    "attention_ratio",
    "mlp_ratio",
    "pattern",
    "size",
    "tokens",
    "tokens_per_param",
    "lr",
    "seed",
]


class Sweep(StrictModel):
    """The axes a study varies. Each is a non-empty list of values."""

    model: _values(dict[str, Any]) = None  # model presets from configs/model/, or inline
    attention_ratio: _values(Ratio) = None
    mlp_ratio: _values(Ratio) = None
    pattern: _values(Pattern) = None
    size: _values(Shape) = None  # preset names from configs/size/, or inline shapes
    tokens: _values(Count) = None
    tokens_per_param: _values(PositiveFloat) = None
    lr: _values(PositiveFloat) = None
    seed: _values(int) = None
    zip: list[Axis] = []  # these axes advance together instead of crossing

    @model_validator(mode="after")
    def _check(self) -> "Sweep":
        if self.pattern and (self.attention_ratio or self.mlp_ratio):
            raise ValueError("sweep pattern or attention_ratio/mlp_ratio, not both")
        if self.tokens and self.tokens_per_param:
            raise ValueError("sweep tokens or tokens_per_param, not both")
        if len(set(self.zip)) != len(self.zip):
            raise ValueError(f"zip names an axis twice: {self.zip}")
        lengths = {}
        for axis in self.zip:
            values = getattr(self, axis)
            if values is None:
                raise ValueError(f"zip names {axis!r}, which the sweep does not set")
            lengths[axis] = len(values)
        if len(set(lengths.values())) > 1:
            raise ValueError(f"zipped axes differ in length: {lengths}")
        return self

    def axes(self) -> dict[str, list]:
        """The axes that are set, in a fixed order, values as given."""
        names = Axis.__args__
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


class Resources(StrictModel):
    """How a study's trials run, not what they are: nothing here enters a trial's id, and
    more workers at the same global batch train the same curve."""

    # Data-parallel workers (a GPU each) per trial: one number for every trial, or a size
    # rule {min_params: workers}, e.g. {300M: 2, 1B: 4}: a trial takes the rule of the
    # largest threshold its parameter count reaches, and one worker below them all.
    workers: dict[Count, PositiveInt] = {1: 1}
    # Trials of at least this many parameters that run on several workers shard their
    # weights, gradients and Adam moments across them (FSDP) instead of each worker holding
    # them whole (DDP): for trials whose ~16 bytes a parameter do not fit one GPU. The same
    # loss curve either way, and the same checkpoints. None: data-parallel trials use DDP.
    shard_from: Count | None = None

    @field_validator("workers", mode="before")
    @classmethod
    def _every_trial(cls, value: Any) -> Any:
        """One number is the rule for every trial (from one parameter up)."""
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise ValueError(f"{value}: give a number of workers >= 1, or {{min_params: n}}")
            return {1: value}
        return value

    def workers_for(self, trial: TrialConfig) -> int:
        params = param_counts(trial.model)["total"]
        reached = [(t, w) for t, w in self.workers.items() if params >= t]
        return max(reached)[1] if reached else 1

    def shards(self, trial: TrialConfig) -> bool:
        """Whether the trial's workers shard it (when it has more than one)."""
        return self.shard_from is not None and param_counts(trial.model)["total"] >= self.shard_from


class LrRule(StrictModel):
    """A learning rate by model size, lr = lr_at * (N / params)^exponent for a trial of N
    parameters, so each size of a scaling study trains near its own optimum. The defaults
    are nanoGPT's 6e-4 for GPT-2 small (124M) and the -1/3 of OLMo's model ladder (after
    Porian et al. 2024): 3e-3 at 1M parameters, 1.3e-3 at 10M."""

    lr_at: PositiveFloat = 6e-4
    params: Count = 124_000_000
    exponent: float = -1 / 3

    def lr_for(self, params: int) -> float:
        return float(f"{self.lr_at * (params / self.params) ** self.exponent:.3g}")


class StudySpec(StrictModel):
    """A whole study: a name, the base trial and the sweep around it."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    description: str = ""
    model: dict[str, Any] = {}
    data: dict[str, Any] = {}
    training: dict[str, Any] = {}
    sweep: Sweep = Sweep()
    search: Search | None = None  # an Optuna search instead of a sweep
    lr_rule: LrRule | None = None  # each trial's lr from its size (a sweep's lr overrides it)
    resources: Resources = Resources()
    # Budgets of one model that can share their first steps train them once: shorter ones
    # branch from the longest (runners/branching.py). Not part of any trial: the same curves.
    branch_budgets: bool = True

    @model_validator(mode="after")
    def _one_plan(self) -> "StudySpec":
        if self.search and self.sweep.axes():
            raise ValueError("a spec has a sweep or a search, not both")
        return self


# ---- loading -------------------------------------------------------------------------------


def load_spec(path: str | Path) -> tuple[StudySpec, list[TrialConfig]]:
    """Read, validate and expand a study spec. Raises SpecError; computes and writes nothing."""
    path = Path(path)
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: the spec must be a mapping of keys to values")
    for section in PRESET_SECTIONS:
        raw[section] = _apply_preset(path, section, raw.get(section, {}))
    sweep = raw.get("sweep")
    for axis in ("model", "size"):
        if isinstance(sweep, dict) and isinstance(sweep.get(axis), list):
            sweep[axis] = [_named(path, axis, i, value) for i, value in enumerate(sweep[axis])]
    try:
        spec = StudySpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(_describe(path, err)) from None
    trials = expand(spec, path)
    _check_workers(spec, trials, path)
    _check_vocabulary(trials, path)
    _check_tasks(trials, path)
    return spec, trials


def load_trial(path: str | Path, overrides: list[str] = ()) -> TrialConfig:
    """One trial from a YAML of ``model``/``data``/``training`` sections (presets allowed),
    with ``key.path=value`` overrides (values read as YAML)."""
    path = Path(path)
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: the config must be a mapping of keys to values")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError(f"--set {item!r}: write key.path=value")
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SpecError(f"--set {item!r}: {part} is not a section")
        node[leaf] = yaml.safe_load(value)
    for section in PRESET_SECTIONS:
        raw[section] = _apply_preset(path, section, raw.get(section, {}))
    try:
        trial = TrialConfig.model_validate(raw)
    except ValidationError as err:
        raise SpecError(_describe(path, err)) from None
    _check_vocabulary([trial], path)
    _check_tasks([trial], path)
    return trial


class _RepeatedKey(yaml.MarkedYAMLError):
    """A mapping key given twice: valid YAML syntax, so told apart from syntax errors."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML whose mappings refuse a repeated key, which PyYAML would read as the last one:
    two ``name:`` lines in a spec are a mistake, not an override."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` is how YAML says "these keys, then mine"
            key, line = self.construct_object(key_node), key_node.start_mark.line + 1
            try:
                first = lines.get(key)
            except TypeError:
                continue  # an unhashable key, which the SafeLoader refuses itself
            if first is not None:
                raise _RepeatedKey(
                    problem=f"key {key!r} is given twice, on lines {first} and {line}",
                    problem_mark=key_node.start_mark,
                )
            lines[key] = line
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path) -> Any:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except OSError as err:
        raise SpecError(f"{path}: cannot read: {err.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        bad = err.object[err.start]
        raise SpecError(f"{path}: not UTF-8 text (byte {bad:#04x} at offset {err.start})") from None
    try:
        return yaml.load(text, _UniqueKeyLoader)
    except _RepeatedKey as err:
        raise SpecError(f"{path}: line {err.problem_mark.line + 1}: {err.problem}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SpecError(f"{path}: {where}YAML syntax error: {problem}") from None


def _preset(path: Path, field: str, kind: str, name: Any) -> dict:
    folder = CONFIGS_DIR / kind
    if not isinstance(name, str) or not (folder / f"{name}.yaml").is_file():
        available = ", ".join(sorted(p.stem for p in folder.glob("*.yaml"))) or "none"
        raise SpecError(
            f"{path}: {field}: no preset {name!r} in configs/{kind}/ (available: {available})"
        )
    preset_path = folder / f"{name}.yaml"
    content = _read_yaml(preset_path)
    if not isinstance(content, dict):
        raise SpecError(f"{preset_path}: a preset must be a mapping of keys to values")
    return content


def _apply_preset(path: Path, section: str, value: Any) -> Any:
    """``{preset: name, **overrides}`` becomes the preset's fields updated by the overrides."""
    if not isinstance(value, dict) or "preset" not in value:
        return value
    overrides = dict(value)
    base = _preset(path, f"{section}.preset", section, overrides.pop("preset"))
    return {**base, **overrides}


def _named(path: Path, axis: str, index: int, value: Any) -> Any:
    """A sweep value given as a preset name becomes the preset's fields."""
    if not isinstance(value, str):
        return value
    return {"preset": value, **_preset(path, f"sweep.{axis}[{index}]", axis, value)}


def _describe(path: Path, err: ValidationError, prefix: str = "") -> str:
    """One line for a pydantic error: file, field path, rule broken."""
    errors = err.errors()
    first = errors[0]
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"])
    # An error of the whole trial (no field) names its fields in its message.
    where = prefix + field.lstrip(".") if field else prefix.removesuffix(": ") or "spec"
    if first["type"] == "extra_forbidden":
        rule = "unknown key"
        parent = _model_at(err.title, first["loc"][:-1])
        close = difflib.get_close_matches(str(first["loc"][-1]), parent, n=1) if parent else []
        if close:
            rule += f" (did you mean {close[0]!r}?)"
    elif first["type"] == "too_short":
        rule = "is empty; give at least one value"
    else:
        rule = first["msg"].removeprefix("Value error, ")
        scalar = isinstance(first.get("input"), str | int | float | bool)
        if first["type"] != "value_error" and scalar:
            rule = f"{first['input']!r}: {rule}"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{path}: {where}: {rule}{more}"


_MODELS = {
    "StudySpec": StudySpec,
    "TrialConfig": TrialConfig,
}


def _model_at(title: str, loc: tuple) -> list[str]:
    """Field names of the config model found at ``loc``, for did-you-mean hints."""
    model = _MODELS.get(title)
    for part in loc:
        if model is None or isinstance(part, int):
            return []
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        options = (annotation, *typing.get_args(annotation))  # Search | None: Search
        model = next(
            (a for a in options if isinstance(a, type) and issubclass(a, StrictModel)), None
        )
    return list(model.model_fields) if model else []


# ---- expansion -----------------------------------------------------------------------------


def expand(spec: StudySpec, path: Path) -> list[TrialConfig]:
    """Every trial of the study, in a stable order, each validated and unique."""
    axes = spec.sweep.axes()
    zipped = [axis for axis in axes if axis in spec.sweep.zip]
    groups = [
        [{axis: value} for value in values] for axis, values in axes.items() if axis not in zipped
    ]
    if zipped:
        groups.insert(
            0,
            [
                dict(zip(zipped, row, strict=True))
                for row in zip(*(axes[a] for a in zipped), strict=True)
            ],
        )
    trials, seen = [], {}
    for combo in itertools.product(*groups):
        point = {axis: value for part in combo for axis, value in part.items()}
        label = ", ".join(f"{axis}={_show(value)}" for axis, value in point.items())
        raw = trial_dict(spec, point)
        try:
            trial = TrialConfig.model_validate(raw)
            if spec.lr_rule and "lr" not in point:
                raw["training"]["lr"] = spec.lr_rule.lr_for(param_counts(trial.model)["total"])
                trial = TrialConfig.model_validate(raw)
        except ValidationError as err:
            prefix = f"sweep point ({label}): " if point else ""
            raise SpecError(_describe(path, err, prefix)) from None
        if trial.trial_id in seen:
            raise SpecError(
                f"{path}: sweep: ({label}) gives the same trial as ({seen[trial.trial_id]})"
            )
        seen[trial.trial_id] = label
        trials.append(trial)
    return trials


def _check_workers(spec: StudySpec, trials: list[TrialConfig], path: Path) -> None:
    """Each worker takes an equal slice of the global batch, in whole micro-batches."""
    for trial in trials:
        workers, t = spec.resources.workers_for(trial), trial.training
        if t.batch_size % (workers * (t.micro_batch_size or 1)):
            micro = f" x micro_batch_size {t.micro_batch_size}" if t.micro_batch_size else ""
            raise SpecError(
                f"{path}: resources.workers: trial {trial.trial_id} has batch_size "
                f"{t.batch_size}, not a multiple of its {workers} workers{micro}"
            )


def _check_vocabulary(trials: list[TrialConfig], path: Path) -> None:
    """The model embeds every token the tokenizer can give (the trainer would stop later)."""
    for trial in trials:
        try:
            needed = vocabulary_size(trial.data)
        except DataError as err:
            raise SpecError(f"{path}: {err}") from None
        if needed is not None and trial.model.vocab_size < needed:
            tokenizer = {"byte": "the byte tokenizer", "bpe": "the BPE (data.bpe_vocab_size)"}
            raise SpecError(
                f"{path}: model.vocab_size: {trial.model.vocab_size} is smaller than the "
                f"{needed} tokens of {tokenizer.get(trial.data.tokenizer, trial.data.tokenizer)}"
            )


def _check_tasks(trials: list[TrialConfig], path: Path) -> None:
    """Every local task's file is there and holds well-formed examples."""
    for name, file in {item for t in trials for item in t.data.tasks.items()}:
        try:
            read_examples(name, file)
        except DataError as err:
            raise SpecError(f"{path}: {err}") from None


def _show(value: Any) -> str:
    if isinstance(value, Shape):
        value = value.model_dump(exclude_none=True)
    if isinstance(value, dict):
        if "preset" in value:
            return value["preset"]
        return "{" + ", ".join(f"{k}={v}" for k, v in value.items()) + "}"
    return repr(value) if isinstance(value, str) else str(value)


def trial_dict(spec: StudySpec, point: dict[str, Any]) -> dict:
    """The base trial with one sweep point applied on top."""
    model, data, training = dict(spec.model), dict(spec.data), dict(spec.training)
    if "model" in point:
        model.update({k: v for k, v in point["model"].items() if k != "preset"})
    if "size" in point:
        model.update(point["size"].model_dump(exclude_none=True, exclude={"preset"}))
    if "pattern" in point:
        # The pattern decides the depth and the mix; drop the base's ratios and depth.
        model.update(pattern=point["pattern"], attention_ratio=0.0, mlp_ratio=0.0)
        if "size" not in point or point["size"].n_layers is None:
            model.pop("n_layers", None)
    for ratio in ("attention_ratio", "mlp_ratio"):
        if ratio in point:
            model.update({ratio: point[ratio]})
            model.pop("pattern", None)
    depth, pattern = "size" in point and point["size"].n_layers, model.get("pattern")
    if depth and isinstance(pattern, str) and pattern and depth % len(pattern) == 0:
        # A pattern repeats to a swept size's depth: "*-" at 16 layers is "*-" x 8, the
        # paper's Transformer, and "M" is pure Mamba-2 at any depth.
        model["pattern"] = pattern * (depth // len(pattern))
    if "tokens" in point:
        training.update(tokens=point["tokens"], tokens_per_param=None)
    if "tokens_per_param" in point:
        training.update(tokens_per_param=point["tokens_per_param"], tokens=None)
    if "lr" in point:
        training["lr"] = point["lr"]
    if "seed" in point:
        training["seed"] = point["seed"]
    return {"model": model, "data": data, "training": training}
