"""Intrinsic SAID (Aghajanyan et al. 2021): every selected weight moves in one random d-dimensional subspace,
θ_t = θ₀_t + λ_t · P_t(θ_d), with one learned scale λ_t per weight tensor (the structure-aware part).

P_t is a Fastfood projection (Le et al. 2013, as Li et al. 2018 and the SAID code use it):
P_t(θ) = (H G Π H B pad(θ))[:D_t] / √(D_t · ΣG²), with H the (unnormalized) Walsh–Hadamard transform of size
n_t = 2^⌈log₂ max(D_t, d)⌉, B random signs, Π a random permutation, G Gaussian. H is applied by the fast
transform, so a tensor of D_t entries costs O(D_t) memory and O(D_t log D_t) time, never a D_t×d matrix.

On MoE experts stored as one 3-D parameter, P_t maps to all experts × out × in entries of it (one tensor,
one λ_t), viewed as (experts, out, in).

θ_d is one vector shared by all sites of a rule: it lives in the rule's shared modules (`SiteContext.shared`,
saved and counted once), and every site's adapter holds an unregistered reference to it.
"""
from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from surgery.errors import RewriteError, SurgeryWarning
from surgery.modules.base import SiteContext, WeightAdapter
from surgery.modules.registry import Options, register
from surgery.modules.options import SAIDOptions  # noqa: F401  (defined without torch: spec validation)
from surgery.modules.sparse import site_seed


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized fast Walsh–Hadamard transform over the last dimension (a power of two): x ↦ H x."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    lead = x.shape[:-1]
    h = 1
    while h < n:
        pairs = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, n)
        h *= 2
    return x


class Fastfood(nn.Module):
    """P: R^d → R^D by the Fastfood transform; its randomness is O(D) and regenerated from the seed (not saved)."""

    def __init__(self, d: int, size: int, seed: int):
        super().__init__()
        self.d, self.size = d, size
        self.n = 1 << (max(size, d) - 1).bit_length()   # the next power of two ≥ max(D, d)
        g = torch.Generator().manual_seed(seed)
        bits = torch.randint(0, 2, (self.n,), generator=g)
        permutation = torch.randperm(self.n, generator=g)
        gauss = torch.randn(self.n, generator=g)
        if gauss.is_meta:   # built without memory (a meta model): no values to compute, materialize draws them
            signs, normalizer = bits.float(), gauss.new_empty(())
        else:
            signs, normalizer = bits.float() * 2 - 1, (size * gauss.pow(2).sum()).rsqrt()
        self.register_buffer("signs", signs, persistent=False)
        self.register_buffer("permutation", permutation, persistent=False)
        self.register_buffer("gauss", gauss, persistent=False)
        self.register_buffer("normalizer", normalizer, persistent=False)

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        """P θ in float32 whatever the model's dtype: the transform sums n terms per entry."""
        x = F.pad(theta.float(), (0, self.n - self.d)) * self.signs.float()
        x = fwht(x)[self.permutation] * self.gauss.float()
        return fwht(x)[: self.size] * self.normalizer.float()


class Subspace(nn.Module):
    """θ_d, the shared point in the intrinsic subspace; zero at init, so the model starts as the base."""

    def __init__(self, d: int):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(d))


@register
class IntrinsicSAID(WeightAdapter):
    Options = SAIDOptions
    stacks_on_activations = True     # adds f(x) to the op's output
    supports_experts = True

    def __init__(self, out_features: int, in_features: int, subspace: Subspace, seed: int, experts: int | None = None):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.shape = (experts, out_features, in_features) if experts else (out_features, in_features)
        self._subspace = [subspace]   # unregistered: the rule's shared modules hold (and save) it once
        self.projection = Fastfood(subspace.theta.numel(), math.prod(self.shape), seed)
        self.scale = nn.Parameter(torch.ones(()))

    @classmethod
    def build(cls, options: SAIDOptions, site: SiteContext, action: str) -> "IntrinsicSAID":
        if site.shared is None:
            raise RewriteError("said couples all sites of a rule through one subspace: it needs the rule's "
                               "shared modules (SiteContext.shared)")
        size = (site.out_features or 0) * (site.in_features or 0) * (site.experts or 1)
        if options.d > size:
            warnings.warn(f"said: d={options.d} exceeds the {size} entries of the weight at {site.module}: its "
                          f"projection is sized by d (memory O(d) per weight) and cannot reach more than {size} "
                          f"directions", SurgeryWarning, stacklevel=2)
        if "subspace" not in site.shared:
            site.shared["subspace"] = Subspace(options.d)
        return cls(site.out_features, site.in_features, site.shared["subspace"], site_seed(options.seed, site),
                   experts=site.experts)

    @property
    def theta(self) -> nn.Parameter:
        return self._subspace[0].theta

    def reset_parameters(self):
        nn.init.ones_(self.scale)
        with torch.no_grad():
            self.theta.zero_()

    def delta_weight(self) -> torch.Tensor:
        return (self.scale.float() * self.projection(self.theta)).view(self.shape)

    def forward(self, x, y):
        if len(self.shape) != 2:
            raise RewriteError("SAID on experts stored as one 3-D parameter is realized on the weight only")
        return y + F.linear(x, self.delta_weight().to(x.dtype))

    def transform_weight(self, weight):
        return weight + self.delta_weight().to(weight.dtype)

    def inverse_weight(self, merged):
        """The base weight from a merged one (unmerge)."""
        return merged - self.delta_weight().to(merged.dtype)
