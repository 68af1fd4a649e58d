"""Finished trials as a tidy table: one row per trial, grouped by layer mix.

Rows come from the MLflow store, the record of truth, read from the tags, params and
final metrics the trainer writes on every trial run. Each row: trial, pattern, params N,
tokens D (those actually trained), training FLOPs per token, compute C =
flops_per_token * D, val_loss, the layer mix it belongs to; the training settings (lr,
seed, and the other knobs as ``setting``), rotary_fraction, epochs over the training
corpus (NaN where the trainer did not log it) and every task metric: each probe's and
local task's accuracy and answer loss, and a local task's chance accuracy.
"""

import re
from dataclasses import dataclass

import numpy as np
from mlflow.tracking import MlflowClient

from arch.allocation import ATTENTION, MLP
from arch.registry import layer_type, recurrent_symbols
from records.trial_run import (
    PARAMS_TAG,
    PATTERN_TAG,
    VAL_LOSS_METRIC,
    TrialRun,
    finished_runs,
)


@dataclass(frozen=True, order=True)
class Mix:
    """A layer mix: which recurrent layer (if any) and the shares of attention and MLP
    layers. Models of one mix at different widths and depths form one scaling curve."""

    ssm: str  # the recurrent layer's symbol ("M", "m", ...) or "" (none)
    attention: float
    mlp: float

    @property
    def family(self) -> str:
        if not self.ssm:
            return "Transformer"
        ssm = layer_type(self.ssm).label
        return f"{ssm}-Hybrid" if self.attention else ssm

    @property
    def label(self) -> str:
        canonical = (self.ssm == "" and self.attention == self.mlp == 0.5) or (
            self.ssm and self.attention == self.mlp == 0
        )
        if canonical:
            return self.family
        return f"{self.family} (attn {self.attention:.3g}, mlp {self.mlp:.3g})"


def mix_of(pattern: str, attention_ratio: float = 0.0, mlp_ratio: float = 0.0) -> Mix:
    """The mix of a pattern; a pattern allocated from ratios is labelled by its ratios, so
    one hybrid at every depth (whose rounded layer counts differ a little) is one mix."""
    ssm = next((symbol for symbol in recurrent_symbols() if symbol in pattern), "")
    if attention_ratio or mlp_ratio:
        return Mix(ssm, round(attention_ratio, 4), round(mlp_ratio, 4))
    n = len(pattern)
    return Mix(ssm, round(pattern.count(ATTENTION) / n, 4), round(pattern.count(MLP) / n, 4))


# probe_<name>_acc and _bpb (data/evaluate.py probe_scores), task_<name>_acc, _bpb and
# _chance (task_scores): (kind, name, measure)
TASK_METRIC = re.compile(r"^(probe|task)_(.+)_(acc|bpb|chance)$")

# Training params that are not hyperparameters: seed is averaged over, tokens define D,
# the rest change how a step is computed, not what it computes.
NOT_SETTINGS = {"seed", "lr", "tokens", "tokens_per_param", "micro_batch_size",
                "eval_every_tokens", "compile"}  # fmt: skip
OPTIONAL = {"lr": None, "seed": 0, "setting": (), "rotary_fraction": 0.0, "epochs": np.nan}


def trial_row(
    trial: str,
    pattern: str,
    params: float,
    tokens: float,
    flops: float,
    loss: float,
    attention_ratio: float = 0.0,
    mlp_ratio: float = 0.0,
    **extra,
) -> dict:
    """One row of the tidy table; ``flops`` is the trial's whole training compute, and
    ``spent_flops`` (in ``extra``; default ``flops``) what its own run computed, less for a
    budget branched from a longer run. ``extra`` overrides the defaults of the optional
    fields (lr, seed, setting, rotary_fraction, epochs) and adds task metrics (TASK_METRIC)."""
    return {
        "trial": trial,
        "pattern": pattern,
        "params": float(params),
        "tokens": float(tokens),
        "flops_per_token": flops / tokens,
        "flops": float(flops),
        "spent_flops": float(flops),
        "val_loss": float(loss),
        "mix": mix_of(pattern, attention_ratio, mlp_ratio),
        **OPTIONAL,
        **extra,
    }


def _setting(params: dict[str, str]) -> tuple:
    """The trial's training knobs other than lr and seed, as sorted (name, value) pairs."""
    knobs = {k.removeprefix("training."): v for k, v in params.items() if k.startswith("training.")}
    return tuple(sorted((k, v) for k, v in knobs.items() if k not in NOT_SETTINGS))


def _row(record: TrialRun) -> dict:
    params, metrics = record.params, record.metrics
    lr = params.get("training.lr")
    return trial_row(
        record.trial_id,
        record.tags[PATTERN_TAG],
        float(record.tags[PARAMS_TAG]),
        record.tokens,
        record.flops,
        metrics[VAL_LOSS_METRIC],
        float(params.get("model.attention_ratio", 0)),
        float(params.get("model.mlp_ratio", 0)),
        lr=None if lr is None else float(lr),
        seed=int(params.get("training.seed", 0)),
        setting=_setting(params),
        rotary_fraction=float(params.get("model.rotary_fraction", 0)),
        epochs=float(metrics.get("epochs", np.nan)),
        spent_flops=record.spent_flops,
        **{k: v for k, v in metrics.items() if TASK_METRIC.match(k)},
    )


def load_runs(client: MlflowClient, experiment: str) -> list[dict]:
    """Finished trials of a study's MLflow experiment (the latest finished run per trial)."""
    records = finished_runs(client, experiment).values()
    return [_row(record) for record in records if VAL_LOSS_METRIC in record.metrics]


def by_mix(rows: list[dict]) -> dict[Mix, list[dict]]:
    groups: dict[Mix, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["mix"], []).append(row)
    return dict(sorted(groups.items()))


def columns(rows: list[dict], *names: str) -> list[np.ndarray]:
    return [np.array([row[name] for row in rows], float) for name in names]
