"""Study specs: YAML with presets, validated in full before any compute, expanded into trials.

A spec names a base trial (``model``, ``data``, ``training``; each may name a
preset from ``configs/<section>/`` and override its fields) and a ``sweep`` of
axes. Axes cross each other, except those listed in ``sweep.zip``, which
advance together. Every error is a :class:`SpecError` whose one-line message
names the file, the field path and the rule broken.
"""

import difflib
import itertools
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, PositiveFloat, PositiveInt, ValidationError, model_validator

from arch.config import Pattern, Ratio, StrictModel
from runners.config import Count, TrialConfig

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


class StudySpec(StrictModel):
    """A whole study: a name, the base trial and the sweep around it."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    description: str = ""
    model: dict[str, Any] = {}
    data: dict[str, Any] = {}
    training: dict[str, Any] = {}
    sweep: Sweep = Sweep()


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
    return spec, expand(spec, path)


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
        return TrialConfig.model_validate(raw)
    except ValidationError as err:
        raise SpecError(_describe(path, err)) from None


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except OSError as err:
        raise SpecError(f"{path}: cannot read: {err.strerror}") from None
    try:
        return yaml.safe_load(text)
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
    where = prefix + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"])
    where = where.lstrip(".") or "spec"
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
        model = (
            annotation
            if isinstance(annotation, type) and issubclass(annotation, StrictModel)
            else None
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
        raw = _trial_dict(spec, point)
        try:
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


def _show(value: Any) -> str:
    if isinstance(value, Shape):
        value = value.model_dump(exclude_none=True)
    if isinstance(value, dict):
        if "preset" in value:
            return value["preset"]
        return "{" + ", ".join(f"{k}={v}" for k, v in value.items()) + "}"
    return repr(value) if isinstance(value, str) else str(value)


def _trial_dict(spec: StudySpec, point: dict[str, Any]) -> dict:
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
    if "tokens" in point:
        training.update(tokens=point["tokens"], tokens_per_param=None)
    if "tokens_per_param" in point:
        training.update(tokens_per_param=point["tokens_per_param"], tokens=None)
    if "lr" in point:
        training["lr"] = point["lr"]
    if "seed" in point:
        training["seed"] = point["seed"]
    return {"model": model, "data": data, "training": training}
