"""Helpers for adapters of MoE experts inside the model's grouped matmul (see surgery/rewrite/experts.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def expert_of_rows(offs: torch.Tensor, rows: int, experts: int) -> torch.Tensor:
    """(rows, experts) one-hot of the expert each row of a grouped matmul belongs to: e where
    offs[e-1] <= row < offs[e] (offs the cumulative row counts per expert; rows past offs[-1], expert
    parallelism's sentinels, belong to none)."""
    ids = torch.bucketize(torch.arange(rows, device=offs.device), offs.to(torch.long), right=True)
    return F.one_hot(ids, experts + 1)[:, :experts]
