"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020; He et al. 2021), as AdapterHub's BnConfig."""
from __future__ import annotations

import math
from typing import Annotated, Literal, Union

import torch
from pydantic import Field
from torch import nn

from surgery.modules.base import SiteContext
from surgery.modules.registry import Options, register

ACTIVATIONS = {
    "relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU, "silu": nn.SiLU, "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid, "gelu_new": lambda: nn.GELU(approximate="tanh"), "identity": nn.Identity,
    "leakyrelu": nn.LeakyReLU,
}


class BottleneckOptions(Options):
    kind: Literal["bottleneck"] = "bottleneck"
    supported_actions = ("insert_after", "insert_before", "parallel")
    reduction_factor: float = Field(16, gt=0)
    bottleneck_size: Union[Annotated[int, Field(ge=1)], None] = None
    non_linearity: Literal[tuple(ACTIVATIONS)] = "relu"  # type: ignore[valid-type]
    init_weights: Literal["bert", "houlsby", "mam", "lora", "zeros"] = "bert"
    residual: Union[bool, None] = None
    scaling: Union[float, Literal["learned", "channel"]] = 1.0
    dropout: float = Field(0.0, ge=0, lt=1)
    ln_before: bool = False
    ln_after: bool = False
    use_gating: bool = False


@register
class BottleneckAdapter(nn.Module):
    """z -> [z +] s * up(act(down(LN?(z)))). As an insertion it keeps the residual; as a parallel branch not."""

    Options = BottleneckOptions

    def __init__(self, dim: int, bottleneck: int, *, non_linearity="relu", init_weights="bert", residual=True,
                 scaling=1.0, dropout=0.0, ln_before=False, ln_after=False, use_gating=False, in_dim=None):
        super().__init__()
        in_dim = in_dim or dim
        self.residual = residual
        self.ln_before = nn.LayerNorm(in_dim) if ln_before else None
        self.down = nn.Linear(in_dim, bottleneck)
        self.act = ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(bottleneck, dim)
        self.dropout = nn.Dropout(dropout) if dropout else None
        self.ln_after = nn.LayerNorm(dim) if ln_after else None
        self.gate = nn.Linear(in_dim, 1) if use_gating else None
        if scaling == "learned":
            self.scaling = nn.Parameter(torch.ones(1))
        elif scaling == "channel":
            self.scaling = nn.Parameter(torch.ones(dim))
        else:
            self.register_buffer("scaling", torch.tensor(float(scaling)), persistent=False)
        self.init_weights = init_weights
        self.reset_parameters()

    def reset_parameters(self):
        mode = self.init_weights
        if mode == "bert":
            for lin in (self.down, self.up):
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
        elif mode == "houlsby":
            for lin in (self.down, self.up):
                nn.init.trunc_normal_(lin.weight, std=1e-2, a=-2e-2, b=2e-2)
                nn.init.zeros_(lin.bias)
        elif mode in ("mam", "lora"):
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        elif mode == "zeros":
            for lin in (self.down, self.up):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)

    @classmethod
    def build(cls, options: BottleneckOptions, site: SiteContext, action: str) -> "BottleneckAdapter":
        dim = site.dim
        in_dim = site.source_dim if action == "parallel" else dim
        size = options.bottleneck_size or max(1, int(dim // options.reduction_factor))
        residual = options.residual if options.residual is not None else action != "parallel"
        return cls(dim, size, non_linearity=options.non_linearity, init_weights=options.init_weights,
                   residual=residual, scaling=options.scaling, dropout=options.dropout,
                   ln_before=options.ln_before, ln_after=options.ln_after, use_gating=options.use_gating,
                   in_dim=in_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.ln_before(z) if self.ln_before is not None else z
        out = self.up(self.act(self.down(h)))
        if self.dropout is not None:
            out = self.dropout(out)
        out = out * self.scaling
        if self.gate is not None:
            out = out * torch.sigmoid(self.gate(h)).mean(dim=1, keepdim=True)
        if self.residual:
            out = out + z
        if self.ln_after is not None:
            out = self.ln_after(out)
        return out
