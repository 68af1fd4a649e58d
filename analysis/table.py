"""Finished trials as a tidy table: one row per trial, grouped by layer mix.

Rows come from the MLflow store, the record of truth, read from the tags the trainer
writes on every trial run. Each row: trial, pattern,
params N, tokens D, training FLOPs per token, compute C = flops_per_token * D, val_loss,
and the layer mix it belongs to.
"""

from dataclasses import dataclass

import numpy as np
from mlflow.tracking import MlflowClient

from arch.allocation import ATTENTION, MAMBA1, MAMBA2, MLP

TAG = "hybridscale."


@dataclass(frozen=True, order=True)
class Mix:
    """A layer mix: which SSM layer (if any) and the shares of attention and MLP layers.
    Models of one mix at different widths and depths form one scaling curve."""

    ssm: str  # "M", "m" or "" (none)
    attention: float
    mlp: float

    @property
    def family(self) -> str:
        ssm = {MAMBA2: "Mamba-2", MAMBA1: "Mamba", "": ""}[self.ssm]
        if not ssm:
            return "Transformer"
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
    ssm = MAMBA2 if MAMBA2 in pattern else MAMBA1 if MAMBA1 in pattern else ""
    if attention_ratio or mlp_ratio:
        return Mix(ssm, round(attention_ratio, 4), round(mlp_ratio, 4))
    n = len(pattern)
    return Mix(ssm, round(pattern.count(ATTENTION) / n, 4), round(pattern.count(MLP) / n, 4))


def trial_row(
    trial: str,
    pattern: str,
    params: float,
    tokens: float,
    flops: float,
    loss: float,
    attention_ratio: float = 0.0,
    mlp_ratio: float = 0.0,
) -> dict:
    """One row of the tidy table; ``flops`` is the trial's whole training compute."""
    return {
        "trial": trial,
        "pattern": pattern,
        "params": float(params),
        "tokens": float(tokens),
        "flops_per_token": flops / tokens,
        "flops": float(flops),
        "val_loss": float(loss),
        "mix": mix_of(pattern, attention_ratio, mlp_ratio),
    }


def load_runs(client: MlflowClient, experiment: str) -> list[dict]:
    """Finished trials of a study's MLflow experiment (the latest finished run per trial)."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = client.search_runs(
        [found.experiment_id],
        f"tags.kind = 'trial' and tags.`{TAG}status` = 'finished'",
        max_results=50000,
    )
    latest = {}
    for run in sorted(runs, key=lambda r: r.info.start_time):
        if "val_loss" in run.data.metrics and f"{TAG}trial_id" in run.data.tags:
            latest[run.data.tags[f"{TAG}trial_id"]] = run
    rows = []
    for trial, run in latest.items():
        tags, params = run.data.tags, run.data.params
        tokens = float(tags[f"{TAG}tokens"])
        rows.append(
            trial_row(
                trial,
                tags[f"{TAG}pattern"],
                float(tags[f"{TAG}params"]),
                tokens,
                float(tags[f"{TAG}flops_per_token"]) * tokens,
                run.data.metrics["val_loss"],
                float(params.get("model.attention_ratio", 0)),
                float(params.get("model.mlp_ratio", 0)),
            )
        )
    return rows


def by_mix(rows: list[dict]) -> dict[Mix, list[dict]]:
    groups: dict[Mix, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["mix"], []).append(row)
    return dict(sorted(groups.items()))


def columns(rows: list[dict], *names: str) -> list[np.ndarray]:
    return [np.array([row[name] for row in rows], float) for name in names]
