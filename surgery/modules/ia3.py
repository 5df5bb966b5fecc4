"""IA3 (Liu et al. 2022): a learned vector, initialized to ones, rescales an op's output (k, v) or input (FFN).

Scaling the output multiplies the weight's rows (and the bias); scaling the input multiplies its columns. Both
fold into the weight; unmerging divides again, which is exact only up to rounding and impossible where an
entry is zero, so `inverse_weight` returns None then and merge keeps what it needs (see surgery/merge.py).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from surgery.modules.base import SiteContext, WeightAdapter
from surgery.modules.registry import Options, register


class IA3Options(Options):
    kind: Literal["ia3"] = "ia3"
    supported_actions = ("wrap",)
    scale: Literal["output", "input", "auto"] = Field(
        "auto", description="Which side the vector scales; auto: the input for ffn.out, the output otherwise.")


@register
class IA3(WeightAdapter):
    Options = IA3Options

    def __init__(self, size: int, scale_input: bool):
        super().__init__()
        self.scale_input = scale_input
        self.adapts_input = scale_input
        self.ia3_l = nn.Parameter(torch.ones(size))

    @classmethod
    def build(cls, options: IA3Options, site: SiteContext, action: str) -> "IA3":
        scale_input = options.scale == "input" or (options.scale == "auto" and site.role == "ffn.out")
        return cls(site.in_features if scale_input else site.out_features, scale_input)

    def reset_parameters(self):
        nn.init.ones_(self.ia3_l)

    def adapt_input(self, x):
        return x * self.ia3_l if self.scale_input else x

    def forward(self, x, y):
        return y if self.scale_input else y * self.ia3_l

    def transform_weight(self, weight):
        l = self.ia3_l.to(weight.dtype)
        return weight * l if self.scale_input else weight * l[:, None]

    def transform_bias(self, bias):
        return bias if self.scale_input else bias * self.ia3_l.to(bias.dtype)

    def _invertible(self) -> bool:
        return bool((self.ia3_l != 0).all())

    def inverse_weight(self, merged):
        if not self._invertible():
            return None
        l = self.ia3_l.to(merged.dtype)
        return merged / l if self.scale_input else merged / l[:, None]

    def inverse_bias(self, merged):
        if self.scale_input:
            return merged
        return merged / self.ia3_l.to(merged.dtype) if self._invertible() else None
