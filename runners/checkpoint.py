"""A trial's checkpoint: its model and optimizer state laid out as one unsharded model's,
whether or not the ranks shard it, so it resumes on any number of ranks; written aside and
renamed, so a crash mid-write never leaves a torn one."""

import os
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

# Sharded state gathered whole for the checkpoint, into rank 0's CPU memory alone.
GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
WHOLE = StateDictOptions(full_state_dict=True)


def trials_dir(results_dir: Path, study: str) -> Path:
    """Where a study's trials checkpoint by default, a folder per trial id."""
    return results_dir / study / "trials"


def checkpoint_path(workdir: Path, trial_id: str) -> Path:
    """A trial's checkpoint, which it resumes from."""
    return workdir / trial_id / "checkpoint.pt"


def branch_point(workdir: Path, trunk_id: str, step: int) -> Path:
    """Where a trial leaves its state at ``step`` for a shorter budget to start from: a
    file of its own, as the trial's checkpoint moves on."""
    return workdir / trunk_id / f"branch_{step}.pt"


def gather(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, shard: bool, chief: bool
) -> tuple[dict, dict] | None:
    """The model's and optimizer's state, whole, on the chief (None elsewhere). Sharded,
    gathering is collective: every rank must call this."""
    if not shard:
        return model.state_dict(), optimizer.state_dict()
    model_state = get_model_state_dict(model, options=GATHER)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=GATHER)
    if not chief:
        return None
    numbers = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    return model_state, _rekey(optimizer_state, numbers)


def scatter(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, shard: bool, state: dict
) -> None:
    """Load a checkpoint's whole state into the model and optimizer (a rank's slices when
    sharded). Raises what torch raises when the state does not fit them."""
    if not shard:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        return
    set_model_state_dict(model, state["model"], options=WHOLE)
    names = dict(enumerate(_param_names(model, optimizer)))
    set_optimizer_state_dict(model, optimizer, _rekey(state["optimizer"], names), options=WHOLE)


def save_atomic(state: dict, path: Path) -> None:
    """Write aside, then rename: a crash mid-write never leaves a torn checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: Path) -> dict:
    """Mapped into CPU memory (where RNG states must be), from which every tensor is copied
    straight to its place: a parameter, or a sharded rank's slice of one."""
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The optimizer's parameters by name, in the order its own state dict numbers them."""
    names = {param: name for name, param in model.named_parameters()}
    return [names[param] for group in optimizer.param_groups for param in group["params"]]


def _rekey(optimizer_state: dict, key: dict) -> dict:
    """An optimizer state dict with its parameters' keys mapped through ``key``: from the
    names the gathered state uses to the numbers of the optimizer's own layout, or back."""
    groups = optimizer_state["param_groups"]
    return {
        "state": {key[p]: value for p, value in optimizer_state["state"].items()},
        "param_groups": [{**g, "params": [key[p] for p in g["params"]]} for g in groups],
    }
