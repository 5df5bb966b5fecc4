"""Small models for the quick start, tests and benchmarks. MiniGPT is the seed document's model."""
from __future__ import annotations

import torch
from torch import nn


class GPTBlock(nn.Module):
    """The seed's block: post-norm, `nn.MultiheadAttention`, ReLU FFN."""

    def __init__(self, hidden_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(hidden_dim, num_heads, batch_first=True, dropout=dropout)
        self.ln1 = nn.LayerNorm(hidden_dim)
        self.ffn = nn.Sequential(nn.Linear(hidden_dim, 4 * hidden_dim), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(4 * hidden_dim, hidden_dim))
        self.ln2 = nn.LayerNorm(hidden_dim)

    def forward(self, x):
        attn_out, _ = self.attn(x, x, x, need_weights=False)
        x = x + attn_out
        x = self.ln1(x)
        ffn_out = self.ffn(x)
        x = x + ffn_out
        x = self.ln2(x)
        return x


class MiniGPT(nn.Module):
    """The seed's MiniGPT (token ids in, logits out)."""

    def __init__(self, vocab_size: int = 100, hidden_dim: int = 64, seq_len: int = 32, n_layers: int = 2,
                 n_heads: int = 4, dropout: float = 0.1):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden_dim)
        self.pos_embed = nn.Parameter(torch.randn(1, seq_len, hidden_dim) * 0.02)
        self.blocks = nn.Sequential(*[GPTBlock(hidden_dim, n_heads, dropout) for _ in range(n_layers)])
        self.ln_f = nn.LayerNorm(hidden_dim)
        self.head = nn.Linear(hidden_dim, vocab_size)

    def forward(self, x):
        x = self.embed(x) + self.pos_embed[:, : x.size(1)]
        x = self.blocks(x)
        x = self.ln_f(x)
        return self.head(x)

    def example_inputs(self, batch: int = 2, seq: int = 8):
        return (torch.randint(0, self.embed.num_embeddings, (batch, seq)),)


def minigpt(**kwargs) -> MiniGPT:
    torch.manual_seed(kwargs.pop("seed", 0))
    return MiniGPT(**kwargs)
