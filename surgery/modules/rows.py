"""Selected rows of a frozen weight trained on their own (PEFT's `trainable_token_indices`).

A `train` rule with `rows: [i, ...]` builds one `TrainableRows` per selected weight: the rows start as a copy
of the base rows, and the weight the model reads is the base weight with those rows replaced
(`W.index_copy(0, indices, rows)`), realized as a parametrization on every module that reads the weight, so an
LM head tied to the embedding sees the same new rows. Only `rows` trains and is saved ([len(indices), dim]);
merge writes the rows into the base weight (exact: a copy), and unmerge puts the saved base rows back.
"""
from __future__ import annotations

import torch
from torch import nn

from surgery.modules.base import WeightAdapter


class TrainableRows(WeightAdapter):
    """W -> W with rows `indices` replaced by the trained `rows`; in (out, in) layout, rows are the first index."""

    def __init__(self, base: torch.Tensor, indices: list[int]):
        super().__init__()
        index = torch.tensor(sorted(set(indices)), dtype=torch.long, device=base.device)
        self.register_buffer("indices", index, persistent=False)   # from the spec; not saved
        self.rows = nn.Parameter(base.detach()[index].clone())

    @property
    def covered_rows(self) -> torch.Tensor:
        """The rows a merge changes (merge keeps only those for unmerge)."""
        return self.indices

    def forward(self, x, y):   # only realized on the weight
        raise NotImplementedError("TrainableRows is realized on the weight")

    def transform_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.index_copy(0, self.indices.to(weight.device), self.rows.to(weight.dtype))
