"""From the small runs' fits to the paper's scale: losses of each mix at its 8B
configuration, compute-optimal sizes, crossovers between mixes, the hybrid-ratio curve;
and, beside the losses, the 8B configuration's decode speed from arch.decode_cost.

Compute is one axis for every mix: training FLOPs from ``arch.accounting`` (the matmuls,
attention's sequence term, the SSD scan). Turning a budget C into (N, D) needs FLOPs per
token as a function of N; each mix's is a power law through its own trials and its 8B
configuration at the paper's sequence length, exact at both ends.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from analysis.fit import log_predict
from analysis.table import Mix, mix_of
from arch.accounting import flops_per_token, param_counts
from arch.allocation import MAMBA2
from arch.config import ModelConfig
from arch.decode_cost import H100, Calibration, decode_seconds_per_token

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "model"
PAPER_MODELS = ("transformer_8b", "mamba_8b", "mamba2_8b", "hybrid_8b")
PAPER_SEQ_LEN = 4096
PAPER_TOKENS = (1.1e12, 3.5e12)
LOG_N_GRID = np.linspace(np.log(1e3), np.log(1e14), 881)  # compute-optimal N is sought here
DECODE_BATCHES = (1, 8)  # sequences decoded together, each after PAPER_SEQ_LEN tokens


@dataclass
class Target:
    """An 8B configuration of one mix: its parameters and training FLOPs per token."""

    name: str
    params: float
    flops_per_token: float
    config: ModelConfig


def _load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


def paper_target(mix: Mix) -> Target:
    """The paper's 8B model of this mix, or the 8B hybrid's shape re-allocated to it."""
    for name in PAPER_MODELS:
        config = ModelConfig(**_load(name))
        if mix_of(config.pattern, config.attention_ratio, config.mlp_ratio) == mix:
            return _target(name, config)
    raw = _load("hybrid_8b")
    raw.update(attention_ratio=mix.attention, mlp_ratio=mix.mlp)
    config = ModelConfig(**raw)
    if mix.ssm not in ("", MAMBA2):  # our other hybrids: the same allocation, their layers
        raw.update(pattern=config.pattern.replace(MAMBA2, mix.ssm))
        config = ModelConfig(**raw)
    return _target("hybrid_8b shape at this mix", config)


def _target(name: str, config: ModelConfig) -> Target:
    fpt = flops_per_token(config, PAPER_SEQ_LEN)["training"]
    return Target(name, float(param_counts(config)["total"]), float(fpt), config)


def decode_tokens_per_s(config: ModelConfig, batch: int, context: int = PAPER_SEQ_LEN) -> float:
    """Tokens generated per second, over all ``batch`` sequences, each after ``context``
    tokens: the decode cost model's fused kernels on an H100 at its default (uncalibrated)
    constants, a prediction of a serving stack, not of this repository's PyTorch step."""
    return 1.0 / decode_seconds_per_token(config, batch, context, Calibration(), H100, "fused")


def flops_law(params: np.ndarray, fpt: np.ndarray, target: Target) -> np.ndarray:
    """(p0, p1) with log FLOPs-per-token = p0 + p1 log N, through the trials and the target."""
    logn = np.log(np.append(params, target.params))
    logf = np.log(np.append(fpt, target.flops_per_token))
    weights = np.append(np.ones(len(params)), len(params))  # the anchor as much as the trials
    return np.polyfit(logn, logf, 1, w=np.sqrt(weights))[::-1]


def compute_optimal(thetas: np.ndarray, law: np.ndarray, compute) -> dict[str, np.ndarray]:
    """N_opt, D_opt and L_opt of L(N, D) laws ``thetas`` (S, 5) at each compute (C,),
    minimising L(N, C / fpt(N)) over a grid of N; each result has shape (S, C). A failed
    bootstrap refit (NaN theta) gives NaN."""
    thetas = np.atleast_2d(thetas)
    logc = np.log(np.atleast_1d(compute))[:, None]
    logn = np.broadcast_to(LOG_N_GRID, (len(logc), len(LOG_N_GRID)))
    logd = logc - (law[0] + law[1] * logn)
    logx = np.stack([logn.ravel(), logd.ravel()])
    bad = np.isnan(thetas).any(-1)
    loss = np.exp(log_predict(np.where(bad[:, None], 0.0, thetas), logx))
    loss = loss.reshape(len(thetas), *logn.shape)
    best = loss.argmin(-1)
    logn_opt = LOG_N_GRID[best]
    out = {
        "N_opt": np.exp(logn_opt),
        "D_opt": np.exp(logc[:, 0] - (law[0] + law[1] * logn_opt)),
        "L_opt": np.take_along_axis(loss, best[..., None], -1)[..., 0],
    }
    for value in out.values():
        value[bad] = np.nan
    return out


def crossovers(c: np.ndarray, loss_a: np.ndarray, loss_b: np.ndarray) -> list[tuple[float, str]]:
    """Computes where the sign of loss_a - loss_b changes, and which leads after each."""
    diff = loss_a - loss_b
    found = []
    for i in np.nonzero(np.sign(diff[:-1]) * np.sign(diff[1:]) < 0)[0]:
        t = diff[i] / (diff[i] - diff[i + 1])  # linear in log C between grid points
        logc = np.log(c[i]) + t * (np.log(c[i + 1]) - np.log(c[i]))
        found.append((float(np.exp(logc)), "a" if diff[i + 1] < 0 else "b"))
    return found


def first_crossover(c: np.ndarray, loss_a: np.ndarray, loss_b: np.ndarray) -> float:
    found = crossovers(c, loss_a, loss_b)
    return found[0][0] if found else np.nan


def is_hybrid_axis(mix: Mix) -> bool:
    """Mixes on a hybrid-ratio curve: an SSM with or without attention (not Transformers)."""
    return mix.ssm != ""
