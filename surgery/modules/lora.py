"""LoRA (Hu et al. 2021): W + s·B·A with s = alpha/r, or alpha/√r with rsLoRA (Kalajdzievski 2023).

B starts at zero, so the adapted op equals the base op at init; A is kaiming-uniform (as PEFT and the paper's
code) or Gaussian with std 1/r (PEFT's "gaussian"). The delta is additive, so merging folds it
into the base weight and unmerging subtracts it again (`inverse_weight`).
"""
from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from surgery.errors import SurgeryWarning
from surgery.modules.base import SiteContext, WeightAdapter
from surgery.modules.registry import Options, register


class LoRAOptions(Options):
    kind: Literal["lora"] = "lora"
    supported_actions = ("wrap",)
    r: int = Field(8, ge=1, description="Rank of the update B·A.")
    alpha: float = Field(8, gt=0, description="Scaling numerator: s = alpha/r (alpha/sqrt(r) with use_rslora).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the op's input before A (activation path only).")
    use_rslora: bool = Field(False, description="Rank-stabilized scaling alpha/sqrt(r).")
    init: Literal["kaiming", "gaussian"] = Field(
        "kaiming", description="A's init (B is always zero): kaiming-uniform(a=√5) or Gaussian with std 1/r.")
    use_gating: bool = Field(False, description="UniPELT: a learned gate sigmoid(Linear(x)) averaged over the "
                                                "sequence replaces the scaling (input-dependent, so not mergeable).")


def warn_rank(r: int, site: SiteContext, kind: str) -> None:
    """B·A has rank at most min(d_in, d_out): a larger r only costs memory (SurgeryWarning)."""
    full = min(site.in_features or r, site.out_features or r)
    if r > full:
        warnings.warn(f"{kind}: r={r} exceeds min(d_in, d_out) = {full} at {site.module}: the update cannot have a "
                      f"rank above {full}, and the extra {r - full} rows only cost memory", SurgeryWarning,
                      stacklevel=3)


@register
class LoRA(WeightAdapter):
    Options = LoRAOptions

    def __init__(self, in_features: int, out_features: int, r: int = 8, alpha: float = 8, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "kaiming", use_gating: bool = False):
        super().__init__()
        self.gate = nn.Linear(in_features, 1) if use_gating else None
        self.mergeable = not use_gating
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.empty(out_features, r))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.init = init
        self.reset_parameters()

    def reset_parameters(self):
        if self.init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @classmethod
    def build(cls, options: LoRAOptions, site: SiteContext, action: str) -> "LoRA":
        warn_rank(options.r, site, "lora")
        return cls(site.in_features, site.out_features, r=options.r, alpha=options.alpha, dropout=options.dropout,
                   use_rslora=options.use_rslora, init=options.init, use_gating=options.use_gating)

    def forward(self, x, y):
        delta = self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()
        if self.gate is not None:
            return y + delta * torch.sigmoid(self.gate(x)).mean(dim=-2, keepdim=True)
        return y + delta * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def transform_weight(self, weight):
        return weight + self.delta_weight().to(weight.dtype)

    def inverse_weight(self, merged):
        """The base weight from a merged one (merge/unmerge)."""
        return merged - self.delta_weight().to(merged.dtype)
