"""ReFT (Wu et al. 2024): interventions h + Rᵀ(W h + b − R h) on hidden states at chosen token positions.

LoReFT keeps R's rows orthonormal (a QR parametrization, see `Orthonormal`), NoReFT leaves R free, DiReFT also drops
the −R h term. Positions are the first `prefix_positions` and last `suffix_positions` real tokens of each
sequence (padding read from the call's attention mask). With a KV cache the intervention acts on the prompt
(the first call), as pyreft does; a decoding step's new position is intervened only when it is among the first
`prefix_positions` real tokens of the sequence (a prompt shorter than that: an encoder-decoder's decoder starts
from one token), so generate() with the cache equals full forwards. In an encoder-decoder the positions are those
of each stack's own input sequence: the encoder's input (token ids, or Whisper's feature frames after its
convolutions), the decoder's `decoder_input_ids` (its mask `decoder_attention_mask`).
"""
from __future__ import annotations

from typing import Literal, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from surgery.modules.base import SiteContext
from surgery.modules.registry import Options, register
from surgery.modules.options import ReftOptions  # noqa: F401  (defined without torch: spec validation)
from surgery.modules.call_rows import rows_of_call


class Orthonormal(nn.Module):
    """Parametrization R = rows of Q from the QR decomposition of the free matrix (signs fixed, so a matrix whose
    rows are already orthonormal maps to itself). torch's `parametrizations.orthogonal` (householder map for
    r x d) keeps ±1 signs in the free matrix's diagonal and truncates them with `.int()`: weight decay or any
    update moving them off ±1 turns R into zero and silently removes the intervention. Here every free matrix of
    full rank gives orthonormal rows, and scaling it (weight decay) changes nothing."""

    def forward(self, free: torch.Tensor) -> torch.Tensor:
        q, r = torch.linalg.qr(free.mT.float())   # QR has no half-precision kernels
        sign = torch.where(torch.diagonal(r, dim1=-2, dim2=-1) < 0, -1.0, 1.0)
        return (q * sign).mT.to(free.dtype)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return weight


class ReftUnit(nn.Module):
    def __init__(self, dim: int, r: int, orthogonal: bool, subtract: bool, act: nn.Module, dropout: float):
        super().__init__()
        self.learned_source = nn.Linear(dim, r)
        projection = nn.Linear(dim, r, bias=False)
        if orthogonal:
            parametrize.register_parametrization(projection, "weight", Orthonormal())
        self.projection = projection
        self.subtract = subtract
        self.act = act
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        R = self.projection.weight
        delta = self.act(self.learned_source(h))
        if self.subtract:
            delta = delta - h @ R.t()
        return self.dropout(h + delta @ R)


@register
class ReftIntervention(nn.Module):
    Options = ReftOptions
    input_positions = True    # intervenes at positions of the model's input sequence (the prompt)

    def __init__(self, dim, options: ReftOptions, runtime):
        super().__init__()
        act = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}.get(options.non_linearity or "", nn.Identity)()
        make = lambda: ReftUnit(dim, options.r, options.orthogonal, options.subtract_projection, act, options.dropout)
        self.prefix_positions, self.suffix_positions = options.prefix_positions, options.suffix_positions
        self.units = nn.ModuleList()
        if self.prefix_positions:
            self.units.append(make())
        if self.suffix_positions and (not options.tied_weights or not self.prefix_positions):
            self.units.append(make())
        self.tied = options.tied_weights
        self._runtime = [runtime]
        self.stack_call: str | None = None   # an encoder-decoder's stack module whose call holds the positions

    @classmethod
    def build(cls, options: ReftOptions, site: SiteContext, action: str) -> "ReftIntervention":
        module = cls(site.dim, options, site.runtime)
        module.stack_call = site.extra.get("stack_call")
        return module

    def _call(self) -> dict:
        """The inputs of the call whose sequence the positions index: the stack's own call, else the root's."""
        runtime = self._runtime[0]
        if runtime is None:
            return {}
        call = runtime.call
        if self.stack_call is not None:
            return call.get("stacks", {}).get(self.stack_call, {})
        return call

    def _positions(self, hidden: torch.Tensor, call: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Bool [batch, seq] selections of the first and last real tokens of the sequence; after `past` cached
        positions, the new ones among the first real tokens (the last are not known before the sequence ends)."""
        mask, past = call.get("attention_mask"), int(call.get("cache_length") or 0)
        batch, seq = hidden.shape[:2]
        counted = call.get("cache_counted", True)
        mask = token_mask(mask, past + seq) if counted else mask
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] != batch:
            # a composition (MixedBatch, BatchSplit) runs this adapter on some rows of the call: theirs of the mask
            rows = rows_of_call(mask.shape[0], mask.device)
            mask = mask[rows] if rows is not None and rows.numel() == batch else mask
        if not (isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == batch):
            mask = None
        elif counted and mask.shape[1] > past + seq:
            # as long as a static cache (BLOOM's generate()): the columns are positions, those after the call's
            # tokens the cache's empty slots
            mask = mask[:, :past + seq]
        elif counted and mask.shape[1] < past + seq:
            mask = None
        elif not counted:
            # a recurrent cache holds a state, not a count: the mask, covering the cached positions, counts them
            mask = mask if mask.shape[1] > seq or (mask.shape[1] == seq and not past) else None
            past = mask.shape[1] - seq if mask is not None else past
        if mask is None:
            if past and not counted:     # how many positions came before is unknown: only the prompt is intervened
                return (torch.zeros(batch, seq, dtype=torch.bool, device=hidden.device),) * 2
            mask = torch.ones(batch, past + seq, dtype=torch.long, device=hidden.device)
        mask = mask.to(torch.long)
        rank = mask.cumsum(1) - 1
        real = mask.bool()
        first = real & (rank < self.prefix_positions)
        last = real & ((mask.sum(1, keepdim=True) - 1 - rank) < self.suffix_positions) & (past == 0)
        return first[:, past:], last[:, past:]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        call = self._call()
        past = int(call.get("cache_length") or 0)
        if past and past >= self.prefix_positions and not isinstance(call.get("attention_mask"), (torch.Tensor, dict)):
            # a decoding step past the first positions; with a mask, a left-padded row's first real tokens may
            # come after `past` positions: the selections below say (without a branch on tensor values)
            return hidden
        first, last = self._positions(hidden, call)
        out = hidden
        if self.prefix_positions:
            out = torch.where(first[..., None], self.units[0](hidden), out)
        if self.suffix_positions:
            unit = self.units[0] if (self.tied and self.prefix_positions) else self.units[-1]
            out = torch.where(last[..., None], unit(hidden), out)
        return out


def token_mask(mask, length: int):
    """The call's attention mask as [batch, length] (1 = a real token) over the `length` positions so far, when it
    is given per key instead: a 4-D mask [batch, 1 or heads, q, k] (bool True = attend, or additive float, 0 =
    attend), or transformers' masks per layer type ({"full_attention": ..., "sliding_attention": ...}), as
    generate() passes with a static cache. A key column is a real token when some query attends to it (padding
    is hidden from every query; a static cache's empty slots from every query by causality), provided the
    columns are the positions (k >= `length`: a full-attention layout; a sliding window's ring buffer is not, and
    gives None). Anything else is returned unchanged."""
    if isinstance(mask, dict):
        tensors = [mask.get("full_attention")] + [m for m in mask.values()]
        mask = next((m for m in tensors if isinstance(m, torch.Tensor) and m.dim() == 4 and m.shape[-1] >= length),
                    None)
    if not (isinstance(mask, torch.Tensor) and mask.dim() == 4):
        return mask
    if mask.shape[-1] < length:
        return None
    if mask.dtype == torch.bool:
        seen = mask
    else:   # additive: hidden keys carry the dtype's minimum (or -inf)
        seen = mask > torch.finfo(mask.dtype).min / 2
    return seen[..., :length].any(dim=-2).any(dim=1).to(torch.long)
