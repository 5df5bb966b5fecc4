"""Invertible adapters (MAD-X, Pfeiffer et al. 2020): a coupling block on the embedding output, and its exact
inverse before the output embedding (LM head), with one set of weights.

The forward rule builds the block; a second rule with `inverse_of: <forward rule's name>` builds a module that
holds no parameters of its own and runs that block's inverse. NICE and GLOW couplings as AdapterHub's
NICECouplingBlock / GLOWCouplingBlock, split along the feature (last) dimension. (AdapterHub 1.3's GLOW slices
dimension 1, the sequence, and crashes; this follows the coupling's definition.)
"""
from __future__ import annotations

from typing import Literal, Union

import torch
from pydantic import Field, model_validator
from torch import nn

from surgery.errors import RewriteError
from surgery.modules.base import SiteContext
from surgery.modules.bottleneck import ACTIVATIONS, site_width
from surgery.modules.registry import Options, register
from surgery.modules.options import InvertibleOptions  # noqa: F401  (defined without torch: spec validation)


def _subnet(dims_in: int, dims_out: int, non_linearity: str, reduction_factor: float) -> nn.Sequential:
    hidden = int(dims_in // reduction_factor)
    if hidden < 1:   # a zero-wide subnet would silently make the coupling a constant shift
        raise ValueError(f"invertible adapter: reduction_factor {reduction_factor} leaves no hidden unit for a "
                         f"{dims_in}-wide half of the value; use a factor of at most {dims_in}")
    return nn.Sequential(nn.Linear(dims_in, hidden), ACTIVATIONS[non_linearity](), nn.Linear(hidden, dims_out))


class NICECoupling(nn.Module):
    """y1 = x1 + F(x2); y2 = x2 + G(y1). Inverse: x2 = y2 − G(y1); x1 = y1 − F(x2)."""

    def __init__(self, dim: int, non_linearity: str = "relu", reduction_factor: float = 2):
        super().__init__()
        self.split1, self.split2 = dim // 2, dim - dim // 2
        self.F = _subnet(self.split2, self.split1, non_linearity, reduction_factor)
        self.G = _subnet(self.split1, self.split2, non_linearity, reduction_factor)

    def forward(self, x):
        x1, x2 = x[..., :self.split1], x[..., self.split1:]
        y1 = x1 + self.F(x2)
        y2 = x2 + self.G(y1)
        return torch.cat((y1, y2), -1)

    def inverse(self, y):
        y1, y2 = y[..., :self.split1], y[..., self.split1:]
        x2 = y2 - self.G(y1)
        x1 = y1 - self.F(x2)
        return torch.cat((x1, x2), -1)


class GLOWCoupling(nn.Module):
    """Affine coupling with soft-clamped scales e(s) = exp(clamp·0.636·atan(s/clamp)):
    [s2, t2] = s2(x2), y1 = e(s2)·x1 + t2; [s1, t1] = s1(y1), y2 = e(s1)·x2 + t1."""

    def __init__(self, dim: int, non_linearity: str = "relu", reduction_factor: float = 2, clamp: float = 5.0):
        super().__init__()
        self.split1, self.split2 = dim // 2, dim - dim // 2
        self.clamp = clamp
        self.s1 = _subnet(self.split1, 2 * self.split2, non_linearity, reduction_factor)
        self.s2 = _subnet(self.split2, 2 * self.split1, non_linearity, reduction_factor)

    def e(self, s):
        return torch.exp(self.clamp * 0.636 * torch.atan(s / self.clamp))

    def forward(self, x):
        x1, x2 = x[..., :self.split1], x[..., self.split1:]
        s2, t2 = self.s2(x2).split((self.split1, self.split1), -1)
        y1 = self.e(s2) * x1 + t2
        s1, t1 = self.s1(y1).split((self.split2, self.split2), -1)
        y2 = self.e(s1) * x2 + t1
        return torch.cat((y1, y2), -1)

    def inverse(self, y):
        y1, y2 = y[..., :self.split1], y[..., self.split1:]
        s1, t1 = self.s1(y1).split((self.split2, self.split2), -1)
        x2 = (y2 - t1) / self.e(s1)
        s2, t2 = self.s2(x2).split((self.split1, self.split1), -1)
        x1 = (y1 - t2) / self.e(s2)
        return torch.cat((x1, x2), -1)


@register
class InvertibleAdapter(nn.Module):
    """A coupling block: `forward` applies it, `inverse` undoes it. As an inverse site it holds no block: it runs
    the inverse of the block built by another rule of the same adapter set."""

    Options = InvertibleOptions

    def __init__(self, dim: int, block_type: str = "nice", non_linearity: str = "relu", reduction_factor: float = 2,
                 clamp: float = 5.0, init_weights: str = "bert"):
        super().__init__()
        if block_type == "nice":
            self.block = NICECoupling(dim, non_linearity, reduction_factor)
        else:
            self.block = GLOWCoupling(dim, non_linearity, reduction_factor, clamp)
        self._of: list[InvertibleAdapter] | None = None
        self.init_weights = init_weights
        self.reset_parameters()

    @classmethod
    def inverse_site(cls, target: "InvertibleAdapter") -> "InvertibleAdapter":
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._of = [target]   # a list: not a submodule, so the weights are saved and counted once
        module.init_weights = target.init_weights
        return module

    @torch.no_grad()
    def reset_parameters(self):
        """AdapterHub's init_bert_weights on every linear; `zeros` zeroes each subnet's output layer (identity)."""
        if self._of is not None:
            return
        for module in self.block.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        if self.init_weights == "zeros":
            for subnet in self.block.children():
                nn.init.zeros_(subnet[-1].weight)

    @classmethod
    def build(cls, options: InvertibleOptions, site: SiteContext, action: str) -> "InvertibleAdapter":
        dim = site_width(site, action)
        if options.inverse_of is None:
            return cls(dim, options.block_type, options.non_linearity, options.reduction_factor,
                       options.clamp, options.init_weights)
        rules = site.adapter if site.adapter is not None else {}
        if options.inverse_of not in rules:
            raise RewriteError(f"inverse_of: no earlier rule named {options.inverse_of!r} in this adapter set "
                               f"(earlier rules: {sorted(rules)})")
        targets = [m for m in rules[options.inverse_of].values() if isinstance(m, cls) and m._of is None]
        if len(targets) != 1:
            raise RewriteError(f"inverse_of: rule {options.inverse_of!r} built {len(targets)} invertible blocks; "
                               f"the inverse needs exactly one")
        target = targets[0]
        width = target.block.split1 + target.block.split2
        if dim != width:
            raise RewriteError(f"inverse_of {options.inverse_of!r}: the block is {width} wide, the value at "
                               f"{site.module} is {dim}")
        return cls.inverse_site(target)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._of is not None:
            return self._of[0].block.inverse(x)
        return self.block(x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        if self._of is not None:
            return self._of[0].block(y)
        return self.block.inverse(y)
