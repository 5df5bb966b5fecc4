"""KronA (Edalati et al. 2022): W + s·(A ⊗ B), a Kronecker-product update of a weight-bearing op.

A is (a_out, a_in) and B is (out/a_out, in/a_in). The forward never builds the (out, in) product: with x of
width in reshaped to X (a_in, in/a_in), (A ⊗ B)·x = vec(A · X · Bᵀ) in row-major order, two small matmuls.
A starts at zero (the op equals the base op at init) and B is kaiming-uniform, as PEFT's LoKr does. The update
is additive, so it merges into the base weight and unmerges by subtraction.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from surgery.errors import RewriteError
from surgery.modules.base import SiteContext, WeightAdapter
from surgery.modules.registry import Options, register
from surgery.modules.options import KronAOptions  # noqa: F401  (defined without torch: spec validation)


def near_sqrt_divisor(n: int) -> int:
    """The largest divisor of n not above √n (1 for primes)."""
    for d in range(math.isqrt(n), 0, -1):
        if n % d == 0:
            return d
    return 1


@register
class KronA(WeightAdapter):
    Options = KronAOptions
    stacks_on_activations = True     # adds f(x) to the op's output

    def __init__(self, in_features: int, out_features: int, a_out: int, a_in: int, scale: float = 1.0):
        super().__init__()
        if out_features % a_out or in_features % a_in:
            raise RewriteError(f"krona: A of shape ({a_out}, {a_in}) does not tile a ({out_features}, "
                               f"{in_features}) weight; a_out must divide {out_features} and a_in {in_features}")
        self.in_features, self.out_features, self.scale = in_features, out_features, scale
        self.krona_A = nn.Parameter(torch.empty(a_out, a_in))
        self.krona_B = nn.Parameter(torch.empty(out_features // a_out, in_features // a_in))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.zeros_(self.krona_A)
        nn.init.kaiming_uniform_(self.krona_B, a=math.sqrt(5))

    @classmethod
    def build(cls, options: KronAOptions, site: SiteContext, action: str) -> "KronA":
        a_out = options.a_out or near_sqrt_divisor(site.out_features)
        a_in = options.a_in or near_sqrt_divisor(site.in_features)
        return cls(site.in_features, site.out_features, a_out, a_in, options.scale)

    def forward(self, x, y):
        lead = x.shape[:-1]
        a_in, b_in = self.krona_A.shape[1], self.krona_B.shape[1]
        xs = x.reshape(*lead, a_in, b_in)
        z = self.krona_A @ (xs @ self.krona_B.t())          # (..., a_out, b_out)
        return y + self.scale * z.reshape(*lead, self.out_features)

    def delta_weight(self) -> torch.Tensor:
        return self.scale * torch.kron(self.krona_A, self.krona_B)

    def transform_weight(self, weight):
        return weight + self.delta_weight().to(weight.dtype)

    def inverse_weight(self, merged):
        return merged - self.delta_weight().to(merged.dtype)
