"""LoRA (Hu et al. 2021): W + (alpha/r) B A, with rsLoRA scaling (alpha/sqrt(r)) as an option."""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from surgery.modules.base import SiteContext, WeightAdapter
from surgery.modules.registry import Options, register


class LoRAOptions(Options):
    kind: Literal["lora"] = "lora"
    supported_actions = ("wrap",)
    r: int = Field(8, ge=1)
    alpha: float = 8
    dropout: float = Field(0.0, ge=0, lt=1)
    use_rslora: bool = False
    init: Literal["kaiming", "gaussian", "zeros"] = "kaiming"


@register
class LoRA(WeightAdapter):
    Options = LoRAOptions

    def __init__(self, in_features: int, out_features: int, r: int = 8, alpha: float = 8, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "kaiming"):
        super().__init__()
        self.r = r
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
        return cls(site.in_features, site.out_features, r=options.r, alpha=options.alpha, dropout=options.dropout,
                   use_rslora=options.use_rslora, init=options.init)

    def forward(self, x, y):
        return y + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def transform_weight(self, weight):
        return weight + self.delta_weight().to(weight.dtype)
