"""LoHa (Hyeon-Woo et al. 2022, "FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated
Learning", ICLR 2022, arXiv:2108.06098; the LyCORIS adapter of that form).

ΔW = (W1a · W1b) ⊙ (W2a · W2b) · alpha/r, each factor of rank r, so ΔW reaches rank r² with 2·r·(d_in + d_out)
parameters. As in PEFT (peft/tuners/loha, `LoHaConfig`: r=8, alpha=8, rank_dropout=0, module_dropout=0,
tensors `hada_w1_a` (d_out, r), `hada_w1_b` (r, d_in), `hada_w2_a` (d_out, r), `hada_w2_b` (r, d_in)):
W1a, W1b, W2a kaiming-uniform(a=√5), W2b zero, so the op equals the base op at init. In training,
`rank_dropout` drops output rows of ΔW (kept rows rescaled by 1/mean, as LyCORIS) and `module_dropout` skips
the whole adapter with that probability. The delta is additive: merge folds it, unmerge subtracts it.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from surgery.modules.base import SiteContext, WeightAdapter
from surgery.modules.registry import Options, register
from surgery.modules.options import LoHaOptions  # noqa: F401  (defined without torch: spec validation)


@register
class LoHa(WeightAdapter):
    Options = LoHaOptions
    stacks_on_activations = True     # adds f(x) to the op's output

    def __init__(self, in_features: int, out_features: int, r: int = 8, alpha: float = 8,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0):
        super().__init__()
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout
        self.hada_w1_a = nn.Parameter(torch.empty(out_features, r))
        self.hada_w1_b = nn.Parameter(torch.empty(r, in_features))
        self.hada_w2_a = nn.Parameter(torch.empty(out_features, r))
        self.hada_w2_b = nn.Parameter(torch.empty(r, in_features))
        self.reset_parameters()

    def reset_parameters(self):
        for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        nn.init.zeros_(self.hada_w2_b)

    @classmethod
    def build(cls, options: LoHaOptions, site: SiteContext, action: str) -> "LoHa":
        return cls(site.in_features, site.out_features, r=options.r, alpha=options.alpha,
                   rank_dropout=options.rank_dropout, module_dropout=options.module_dropout)

    def delta_weight(self) -> torch.Tensor:
        return ((self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)) * self.scaling

    def forward(self, x, y):
        if self.training and self.module_dropout and torch.rand(1) <= self.module_dropout:
            return y
        weight = self.delta_weight()
        if self.training and self.rank_dropout:
            drop = (torch.rand(weight.shape[0], device=weight.device) > self.rank_dropout).to(weight.dtype)
            weight = weight * (drop / drop.mean())[:, None]
        return y + F.linear(x, weight.to(x.dtype))

    def transform_weight(self, weight):
        return weight + self.delta_weight().to(weight.dtype)

    def inverse_weight(self, merged):
        return merged - self.delta_weight().to(merged.dtype)
