"""How a trial's model is spread over its data-parallel ranks: replicated on each (DDP) or
sharded across them (FSDP2), and the collectives the training step needs either way."""

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from arch.model import HybridLM


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of ranks: (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def place(
    model: HybridLM, device: torch.device, world: int, shard: bool
) -> DistributedDataParallel | None:
    """Put ``model`` on ``device``: sharded across ``world`` ranks, or whole on each and
    wrapped in DDP (returned), or whole on one rank. Before the optimizer is made: it must
    hold the parameters as placed."""
    if shard:
        shard_model(model, device, world)
        return None
    model.to(device)
    return DistributedDataParallel(model) if world > 1 else None


def shard_model(model: HybridLM, device: torch.device, world: int) -> None:
    """FSDP2, in place: each block is a unit whose weights are gathered only for its own
    forward and backward; the embedding, final norm and head are the root's unit. Each rank
    keeps 1/world of every weight, gradient and Adam moment. Units move to ``device`` one
    at a time as they are sharded, so no GPU ever holds the whole model."""
    marks = {name: dict(vars(param)) for name, param in model.named_parameters()}
    mesh = init_device_mesh(device.type, (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for name, param in model.named_parameters():  # new parameters: keep the layers' marks
        vars(param).update(marks[name])  # (e.g. _no_weight_decay, which the optimizer reads)


def sum_over_ranks(values: torch.Tensor, world: int) -> torch.Tensor:
    """``values`` summed over the ranks (gloo has no average); as they are on one rank."""
    if world > 1:
        dist.all_reduce(values)
    return values


def whole(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm whole: sharded, each rank holds a part of it."""
    return norm.full_tensor() if isinstance(norm, DTensor) else norm
