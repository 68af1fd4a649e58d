"""AdamW with the paper's settings and the learning-rate schedules a trial can ask for."""

import math

import torch
from torch import nn

from runners.config import TrainingConfig


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


def lr_at(step: int, total_steps: int, config: TrainingConfig) -> float:
    """Linear warmup, then cosine decay to min_lr, or WSD: constant, then a linear decay
    over the last decay_fraction of training (Hu et al., MiniCPM)."""
    peak, floor = config.lr, config.lr * config.min_lr_ratio
    warmup = round(config.warmup_fraction * total_steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    if config.schedule == "cosine":
        progress = (step - warmup) / max(1, total_steps - warmup)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_start = total_steps - round(config.decay_fraction * total_steps)
    if step < decay_start:
        return peak
    progress = (step - decay_start) / max(1, total_steps - decay_start)
    return peak + (floor - peak) * min(1.0, progress)
