"""VeRA (Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation", ICLR 2024, arXiv:2310.11454).

ΔW = Λ_b · B · Λ_d · A, with A (r × d_in) and B (d_out × r) frozen random matrices shared by every site of
the rule, and only the vectors λ_d (r) and λ_b (d_out) trained: y = W x + λ_b ⊙ (B (λ_d ⊙ (A x))).
λ_b starts at 0 (the op equals the base op at init) and λ_d at `d_initial` (0.1).

As in PEFT (peft/tuners/vera, `VeraConfig`: r=256, vera_dropout=0, d_initial=0.1, projection_prng_key=0,
save_projection=True), the rule holds ONE pair A (r, max d_in), B (max d_out, r) over its sites, drawn
kaiming-uniform (gain √2, fan_in) from a CPU `torch.Generator` seeded with `projection_prng_key` (A first, then
B), and each site uses the top-left slice A[:, :d_in], B[:d_out, :]. The pair lives once, as buffers of the
rule's shared module (`<adapter>/<rule>/shared/vera/vera_A`), and is saved once (`save_projection: false`
keeps it out of the checkpoint; `load` draws it again from the key). Trainable count: Σ (r + d_out) over sites.
The delta is additive: merge folds it, unmerge subtracts it.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from surgery.modules.base import SiteContext, WeightAdapter
from surgery.modules.registry import Options, register
from surgery.modules.options import VeRAOptions  # noqa: F401  (defined without torch: spec validation)


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform with gain √2 over fan_in = shape[1], drawn from `generator` (PEFT's `_kaiming_init`)."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape, device="cpu").uniform_(-bound, bound, generator=generator)


class VeRAProjection(nn.Module):
    """The frozen pair A (r, d_in_max), B (d_out_max, r) one rule's sites share. Growing it (a wider site)
    draws both again from the key at the new size, so the final pair is the one PEFT draws for the same sites."""

    weight_adapter_part = True   # state of the rule's VeRA sites, not a rewrite of its own (merge, to_peft)

    def __init__(self, r: int, key: int, persistent: bool = True):
        super().__init__()
        self.r, self.key, self.persistent = r, key, persistent
        self.register_buffer("vera_A", torch.empty(r, 0), persistent=persistent)
        self.register_buffer("vera_B", torch.empty(0, r), persistent=persistent)

    def ensure(self, in_features: int, out_features: int) -> None:
        d_in, d_out = max(in_features, self.vera_A.shape[1]), max(out_features, self.vera_B.shape[0])
        if (d_in, d_out) == (self.vera_A.shape[1], self.vera_B.shape[0]):
            return
        generator = torch.Generator(device="cpu").manual_seed(self.key)
        a = kaiming_uniform((self.r, d_in), generator)
        b = kaiming_uniform((d_out, self.r), generator)
        self.vera_A = a.to(device=self.vera_A.device, dtype=self.vera_A.dtype)
        self.vera_B = b.to(device=self.vera_B.device, dtype=self.vera_B.dtype)


@register
class VeRA(WeightAdapter):
    Options = VeRAOptions
    stacks_on_activations = True     # adds f(x) to the op's output

    def __init__(self, in_features: int, out_features: int, projection: VeRAProjection, dropout: float = 0.0,
                 d_initial: float = 0.1):
        super().__init__()
        projection.ensure(in_features, out_features)
        self._projection = [projection]   # held unregistered: the rule's shared module saves it, once
        self.in_features, self.out_features, self.r = in_features, out_features, projection.r
        self.d_initial = d_initial
        self.vera_lambda_b = nn.Parameter(torch.empty(out_features))
        self.vera_lambda_d = nn.Parameter(torch.empty(projection.r))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self):
        with torch.no_grad():
            self.vera_lambda_d.fill_(self.d_initial)
            self.vera_lambda_b.zero_()

    @classmethod
    def build(cls, options: VeRAOptions, site: SiteContext, action: str) -> "VeRA":
        projection = site.shared["vera"] if "vera" in site.shared else None
        if projection is None:
            projection = VeRAProjection(options.r, options.projection_prng_key, options.save_projection)
            site.shared["vera"] = projection
        return cls(site.in_features, site.out_features, projection, dropout=options.dropout,
                   d_initial=options.d_initial)

    def _pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        projection = self._projection[0]
        return projection.vera_A[:, :self.in_features], projection.vera_B[:self.out_features, :]

    def forward(self, x, y):
        a, b = self._pair()
        lambda_d, lambda_b = self.vera_lambda_d, self.vera_lambda_b
        return y + lambda_b * nn.functional.linear(lambda_d * nn.functional.linear(self.dropout(x), a.to(x.dtype)),
                                                   b.to(x.dtype))

    def delta_weight(self) -> torch.Tensor:
        a, b = self._pair()
        return (self.vera_lambda_b[:, None] * b.to(self.vera_lambda_b.dtype)) @ (
            self.vera_lambda_d[:, None] * a.to(self.vera_lambda_d.dtype))

    def transform_weight(self, weight):
        return weight + self.delta_weight().to(weight.dtype)

    def inverse_weight(self, merged):
        return merged - self.delta_weight().to(merged.dtype)
