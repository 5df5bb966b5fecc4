"""Hand-written eager references, written as the papers write the methods, to check rewrites against."""
from __future__ import annotations

import torch
from torch import nn

from surgery.example_models import MiniGPT


class RefBottleneck(nn.Module):
    def __init__(self, d, b, act=nn.SiLU):
        super().__init__()
        self.down, self.act, self.up = nn.Linear(d, b), act(), nn.Linear(b, d)

    def forward(self, h):
        return h + self.up(self.act(self.down(h)))


class HoulsbyMiniGPT(nn.Module):
    """MiniGPT with Houlsby adapters written into its blocks by hand: LN(x + A(attn(x))), LN(x + A(ffn(x)))."""

    def __init__(self, base: MiniGPT, bottleneck: int):
        super().__init__()
        self.base = base
        d = base.embed.embedding_dim
        self.attn_adapters = nn.ModuleList(RefBottleneck(d, bottleneck) for _ in base.blocks)
        self.ffn_adapters = nn.ModuleList(RefBottleneck(d, bottleneck) for _ in base.blocks)

    def forward(self, ids):
        b = self.base
        x = b.embed(ids) + b.pos_embed[:, : ids.size(1)]
        for block, a1, a2 in zip(b.blocks, self.attn_adapters, self.ffn_adapters):
            attn_out, _ = block.attn(x, x, x, need_weights=False)
            x = block.ln1(x + a1(attn_out))
            x = block.ln2(x + a2(block.ffn(x)))
        return b.head(b.ln_f(x))

    @classmethod
    def from_surgery(cls, model: MiniGPT) -> "HoulsbyMiniGPT":
        """A reference that shares the base weights and copies the adapter weights of a surgery model."""
        store = model.surgery_adapters.adapters["default"]
        first = next(iter(store["attention_adapter"].values()))
        ref = cls(model, first.down.out_features)
        for i in range(len(model.blocks)):
            for mine, theirs in ((ref.attn_adapters[i], store["attention_adapter"][f"blocks_{i}_attn_out_proj"]),
                                 (ref.ffn_adapters[i], store["ffn_adapter"][f"blocks_{i}_ffn_3"])):
                mine.down.load_state_dict(theirs.down.state_dict())
                mine.up.load_state_dict(theirs.up.state_dict())
        return ref
