"""What every layer shares: the RMSNorm of each block, and how a layer keeps decode state.

Each layer maps (batch, seqlen, d_model) to the same shape and takes an optional
``cache`` dict for decoding: ``None`` for training, an empty dict to prefill (the
layer fills it), a filled dict to continue from it one or more tokens at a time.
A cache from ``allocate_cache`` is static instead: preallocated for a maximum length and
updated in place, so a decode step can be captured in a CUDA graph; on it a multi-token
call is the prompt (at position 0) and every later call adds one token.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def store(cache: dict, name: str, state: Tensor) -> None:
    """Keep a layer's decode state: in place in a static cache, whose buffers must keep
    their address for CUDA-graph replays, else as a new entry."""
    if name in cache:
        cache[name].copy_(state)
    else:
        cache[name] = state


def keep_conv_inputs(cache: dict, x: Tensor, width: int) -> None:
    """Keep the last ``width`` inputs of a causal conv over x (batch, channels, seqlen),
    zero-padded on the left: the state ``conv_step`` continues from."""
    store(cache, "conv", F.pad(x, (width - x.shape[-1], 0)).contiguous())  # < 0 crops


def conv_step(state: Tensor, x: Tensor, conv: nn.Conv1d) -> Tensor:
    """The causal depthwise conv's output for one new input x (batch, channels), shifted
    into its inputs ``state`` (batch, channels, width) in place."""
    state.copy_(state.roll(-1, dims=-1))
    state[..., -1] = x
    out = (state * conv.weight[:, 0]).sum(-1)
    return out if conv.bias is None else out + conv.bias
