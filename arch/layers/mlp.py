"""The MLP (``-``)."""

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from arch.allocation import MLP as MLP_SYMBOL
from arch.registry import LayerType, register

if TYPE_CHECKING:
    from arch.config import ModelConfig

_ACTIVATIONS = {
    "squared_relu": lambda x: F.relu(x).square(),
    "gelu": F.gelu,
}


class MLP(nn.Module):
    """The paper's MLP: up-projection, activation, down-projection, no biases.

    The Transformer uses squared ReLU, the hybrid Megatron-LM's default GeLU; SwiGLU
    (gated, two up-projections) is offered for comparison with Llama-style models.
    """

    def __init__(self, d_model: int, d_ffn: int, activation: str = "squared_relu") -> None:
        super().__init__()
        self.activation = activation
        gated = activation == "swiglu"
        self.up_proj = nn.Linear(d_model, (2 if gated else 1) * d_ffn, bias=False)
        self.down_proj = nn.Linear(d_ffn, d_model, bias=False)

    def forward(self, x: Tensor, cache: dict | None = None) -> Tensor:
        h = self.up_proj(x)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = _ACTIVATIONS[self.activation](h)
        return self.down_proj(h)

    def allocate_cache(
        self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> dict:
        return {}  # no state


def d_ffn(c: "ModelConfig") -> int:
    return c.d_ffn or 4 * c.d_model


def _matrix_params(c: "ModelConfig") -> int:
    up = (2 if c.mlp_activation == "swiglu" else 1) * c.d_model * d_ffn(c)
    return up + d_ffn(c) * c.d_model


register(
    LayerType(
        symbol=MLP_SYMBOL,
        name="mlp",
        label="MLP",
        build=lambda c: MLP(c.d_model, d_ffn(c), c.mlp_activation),
        matrix_params=_matrix_params,
        fused_launches=4,
        mixes_sequence=False,
    )
)
