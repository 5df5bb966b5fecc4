"""AdapterFusion (Pfeiffer et al. 2021), as AdapterHub's DynamicAdapterFusionConfig: at one site, attention of
the site's input over the outputs of several frozen adapters, plus the residual."""
from __future__ import annotations

import torch
from torch import nn


class AdapterFusion(nn.Module):
    """query(h) · key(up_i) -> softmax over adapters -> Σ p_i value(up_i), then + h.

    up_i is adapter i's contribution at the site (its output minus the site's input). The value projection
    (no bias) starts at the identity (+1e-6 noise), so at init fusion is a learned-weight mixture of the adapters.
    """

    def __init__(self, dim: int, dropout: float = 0.1, temperature: float = 1.0):
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.temperature = temperature
        with torch.no_grad():
            self.value.weight.copy_(torch.eye(dim) + 1e-6 * torch.randn(dim, dim))

    def forward(self, hidden: torch.Tensor, outputs: list[torch.Tensor]) -> torch.Tensor:
        ups = torch.stack([o - hidden for o in outputs], dim=-2)                 # [..., n, d]
        q = self.query(hidden).unsqueeze(-2)                                      # [..., 1, d]
        scores = (q @ self.key(ups).transpose(-1, -2)).squeeze(-2)               # [..., n]
        probs = torch.softmax(self.dropout(scores) / self.temperature, dim=-1)
        context = (probs.unsqueeze(-2) @ self.value(ups)).squeeze(-2)
        return context + hidden
