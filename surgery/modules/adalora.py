"""AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR 2023,
arXiv:2303.10512): ΔW = P Λ Q in SVD form, y = W x + B·(A ⊙ E)·x · alpha / (ranknum + 1e-5), with P = B
(d_out, r), Q = A (r, d_in) and the singular values Λ = E (r, 1); r starts at `init_r` and the rank budget is
moved between sites during training: triplets (Pᵢ, λᵢ, Qᵢ) of low importance (smoothed |θ·∇θ| times its
uncertainty) get λᵢ = 0. The schedule (`surgery.AdaLoRAAllocator`, which the user's loop or a transformers
TrainerCallback calls each step) keeps the total budget at Σ init_r for `tinit` steps, lowers it cubically to
`target_r` per site until `total_step − tfinal`, reallocating every `deltaT` steps, then fixes the pattern.

As in PEFT (peft/tuners/adalora, `AdaLoraConfig`: init_r=12, target_r=8, lora_alpha=8, tinit=0, tfinal=0,
deltaT=1, beta1=beta2=0.85, orth_reg_weight=0.5, total_step required; tensors `lora_A`, `lora_B`, `lora_E`):
E starts at zero (the op equals the base op at init), A and B ~ N(0, 0.02²); the scaling divides by `ranknum`,
the initial rank (PEFT keeps it when it loads a checkpoint pruned to `rank_pattern`); the orthogonality penalty
orth_reg_weight · mean over A, B of ‖AAᵀ − I‖_F, ‖BᵀB − I‖_F is added to the model's `loss` output by the
allocator, as PEFT's forward does. `rank_pattern` (a bool buffer, saved) records the final allocation.
Trainable count r·(d_in + d_out + 1) per site. The delta is additive: merge folds it, unmerge subtracts it.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from surgery.modules.base import SiteContext, WeightAdapter
from surgery.modules.registry import Options, register
from surgery.modules.options import AdaLoRAOptions  # noqa: F401  (defined without torch: spec validation)


@register
class AdaLoRA(WeightAdapter):
    Options = AdaLoRAOptions
    stacks_on_activations = True     # adds f(x) to the op's output

    def __init__(self, in_features: int, out_features: int, options: AdaLoRAOptions | None = None):
        super().__init__()
        options = options or AdaLoRAOptions()
        self.options = options
        r = options.init_r
        self.r = r
        self.alpha = options.alpha
        self.scaling = options.alpha if options.alpha > 0 else float(r)
        self.ranknum = float(options.ranknum if options.ranknum is not None else r)
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.empty(out_features, r))
        self.lora_E = nn.Parameter(torch.empty(r, 1))
        self.register_buffer("rank_pattern", torch.ones(r, dtype=torch.bool))
        self.dropout = nn.Dropout(options.dropout) if options.dropout else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.zeros_(self.lora_E)
        nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
        nn.init.normal_(self.lora_B, mean=0.0, std=0.02)
        with torch.no_grad():
            self.rank_pattern.fill_(True)

    @classmethod
    def build(cls, options: AdaLoRAOptions, site: SiteContext, action: str) -> "AdaLoRA":
        return cls(site.in_features, site.out_features, options)

    def forward(self, x, y):
        delta = self.dropout(x) @ (self.lora_A * self.lora_E).t() @ self.lora_B.t()
        return y + delta * self.scaling / (self.ranknum + 1e-5)

    def delta_weight(self) -> torch.Tensor:
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scaling / (self.ranknum + 1e-5)

    def transform_weight(self, weight):
        return weight + self.delta_weight().to(weight.dtype)

    def inverse_weight(self, merged):
        return merged - self.delta_weight().to(merged.dtype)
