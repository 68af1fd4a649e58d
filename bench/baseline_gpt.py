"""A plain nanoGPT-style Transformer: the throughput baseline our models are measured beside.

Deliberately independent of arch/: pre-norm blocks of RMSNorm -> fused-QKV causal SDPA
and RMSNorm -> squared-ReLU MLP (4d), tied embeddings, no biases, no position
embedding. The shape a well-tuned single-file GPT trainer uses; if our Transformer is
slower than this at the same size, our layers cost something they should not.
"""

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, 4 * d, bias=False)
        self.down = nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, -1).unbind(2)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.relu(self.up(self.norm2(x))).square())


class GPT(nn.Module):
    def __init__(self, vocab: int, d: int, n_layer: int, heads: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(n_layer))
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embedding.weight
        for p in self.parameters():
            nn.init.normal_(p, std=0.02) if p.dim() == 2 else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs: 6 N (every matrix, the tied head once) + 12 layers d L."""
        n = sum(p.numel() for p in self.parameters() if p.dim() == 2)
        d, layers = self.embedding.embedding_dim, len(self.blocks)
        return 6 * n + 12 * layers * d * seq_len
