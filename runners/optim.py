"""AdamW with the paper's settings and the learning-rate schedules a trial can ask for."""

import math
from dataclasses import dataclass

import torch
from torch import nn

from runners.config import TrainingConfig, TrialConfig


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Norm gains, biases and the SSM parameters (A_log, D, dt_bias) are not decayed, as
    in mamba_ssm; nor are embeddings (and so a tied LM head), as in many LM recipes: decay
    would pull rare tokens' vectors to zero for no benefit."""
    return (
        param.ndim < 2
        or getattr(param, "_no_weight_decay", False)
        or name.endswith(("A_log", "D", "dt_bias"))
        or "embedding" in name
    )


def make_optimizer(model: nn.Module, config: TrainingConfig, fused: bool) -> torch.optim.AdamW:
    decay, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (plain if no_decay(name, param) else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


@dataclass(frozen=True)
class Schedule:
    """A trial's learning rate at each step: linear warmup, then cosine decay to min_lr, or
    WSD: constant, then a linear decay over the last decay_fraction of training (Hu et al.,
    MiniCPM). Resolved once: the loop asks every step."""

    kind: str
    peak: float
    floor: float
    warmup: int
    decay_start: int
    total: int

    @classmethod
    def of(cls, trial: TrialConfig) -> "Schedule":
        t = trial.training
        return cls(t.schedule, t.lr, t.lr * t.min_lr_ratio, trial.warmup_steps,
                   trial.decay_start, trial.total_steps)  # fmt: skip

    def lr(self, step: int) -> float:
        peak, floor = self.peak, self.floor
        if step < self.warmup:
            return peak * (step + 1) / self.warmup
        if self.kind == "cosine":
            progress = (step - self.warmup) / max(1, self.total - self.warmup)
            return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if step < self.decay_start:
            return peak
        progress = (step - self.decay_start) / max(1, self.total - self.decay_start)
        return peak + (floor - peak) * min(1.0, progress)
