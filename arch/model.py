"""The hybrid LM: embedding, one pre-norm residual block per pattern symbol, norm, LM head."""

import math

import torch
from torch import Tensor, nn

from arch.config import ModelConfig
from arch.layers.common import RMSNorm
from arch.registry import layer_type


class Block(nn.Module):
    """x + mixer(norm(x))."""

    def __init__(self, symbol: str, config: ModelConfig) -> None:
        super().__init__()
        self.symbol = symbol
        self.norm = RMSNorm(config.d_model)
        self.mixer = layer_type(symbol).build(config)

    def forward(self, x: Tensor, cache: dict | None = None) -> Tensor:
        return x + self.mixer(self.norm(x), cache=cache)


class HybridLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(symbol, config) for symbol in config.pattern)
        self.norm_f = RMSNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self._init_weights()
        if config.tie_embeddings:
            self.lm_head.weight = self.embedding.weight

    def _init_weights(self) -> None:
        # GPT-2 style: N(0, 0.02), residual output projections shrunk by depth so the
        # residual stream's variance does not grow with the number of blocks. Layers
        # with their own initialisation (Mamba's dt_proj) mark themselves _no_reinit.
        nn.init.normal_(self.embedding.weight, std=0.02)
        residual_std = 0.02 / math.sqrt(2 * len(self.blocks))
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and not getattr(module, "_no_reinit", False):
                is_residual_out = name.endswith(("out_proj", "down_proj"))
                nn.init.normal_(module.weight, std=residual_std if is_residual_out else 0.02)

    def forward(self, tokens: Tensor, caches: list[dict] | None = None) -> Tensor:
        """Logits (batch, seqlen, vocab) for tokens (batch, seqlen)."""
        x = self.embedding(tokens)
        for i, block in enumerate(self.blocks):
            x = block(x, cache=None if caches is None else caches[i])
        return self.lm_head(self.norm_f(x))

    def allocate_caches(
        self, batch: int, max_len: int, dtype: torch.dtype | None = None
    ) -> list[dict]:
        """Static decode state for up to ``max_len`` tokens (see arch/layers/common.py): fixed
        shapes, updated in place, so a decode step can be captured in a CUDA graph. The
        first call on them is the prompt; every later call adds one token."""
        weight = self.embedding.weight
        dtype = dtype or weight.dtype
        return [b.mixer.allocate_cache(batch, max_len, weight.device, dtype) for b in self.blocks]

    @torch.no_grad()
    def generate(
        self, prompt: Tensor, max_new_tokens: int, temperature: float = 1.0,
        top_k: int | None = None, generator: torch.Generator | None = None,
    ) -> Tensor:  # fmt: skip
        """Continue ``prompt`` (batch, seqlen): prefill through the parallel path, then
        decode one token at a time from the layers' caches. temperature 0 is greedy."""
        caches = self.allocate_caches(prompt.shape[0], prompt.shape[1] + max_new_tokens)
        logits = self(prompt, caches)[:, -1]
        out = [prompt]
        for step in range(max_new_tokens):
            if temperature == 0:
                token = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits.float(), dim=-1)
                token = torch.multinomial(probs, 1, generator=generator)
            out.append(token)
            if step + 1 < max_new_tokens:
                logits = self(token, caches)[:, -1]
        return torch.cat(out, dim=1)
