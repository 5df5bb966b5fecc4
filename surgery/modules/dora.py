"""DoRA (Liu et al. 2024): W' = m · (W + s·BA) / ‖W + s·BA‖, the norm taken per output row of the (out, in)
weight (PEFT's `linalg.norm(W, dim=1)`: the paper's column norm of the (in, out) matrix), m initialized to ‖W‖.

As in the paper (§4.3) and PEFT, the norm is treated as a constant for the gradient (detached): it tracks
the update of BA in the forward pass, but receives no gradient.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from surgery.errors import RewriteError
from surgery.modules.lora import warn_rank
from surgery.modules.base import SiteContext
from surgery.modules.lora import LoRA
from surgery.modules.registry import Options, register


class DoRAOptions(Options):
    kind: Literal["dora"] = "dora"
    supported_actions = ("wrap",)
    r: int = Field(8, ge=1, description="Rank of the direction update B·A.")
    alpha: float = Field(8, gt=0, description="Scaling numerator: s = alpha/r (alpha/sqrt(r) with use_rslora).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the op's input (activation path only).")
    use_rslora: bool = Field(False, description="Rank-stabilized scaling alpha/sqrt(r).")
    init: Literal["kaiming", "gaussian"] = Field(
        "kaiming", description="A's init (B is always zero): kaiming-uniform(a=√5) or Gaussian with std 1/r.")


@register
class DoRA(LoRA):
    Options = DoRAOptions
    inverse_weight = None   # the row norms make W' non-invertible from W' alone: merge keeps a copy for unmerge

    def __init__(self, weight: torch.Tensor, r: int = 8, alpha: float = 8, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "kaiming"):
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                         init=init)
        # The activation path needs the base weight itself; held unregistered so it is neither saved nor trained
        # here. A Parameter is kept as the object (it survives .to()); a slice/transpose view shares its storage.
        self._base_weight = [weight if isinstance(weight, nn.Parameter) else weight.detach()]
        self.magnitude = nn.Parameter(self._row_norm(weight.detach()))

    @classmethod
    def build(cls, options: DoRAOptions, site: SiteContext, action: str) -> "DoRA":
        if site.weight is None:
            raise RewriteError(f"{site.module}: DoRA needs the base weight of the op to initialize its magnitude, "
                               f"but this op's weight is not a parameter of the model")
        warn_rank(options.r, site, "dora")
        return cls(site.weight, r=options.r, alpha=options.alpha, dropout=options.dropout,
                   use_rslora=options.use_rslora, init=options.init)

    def reset_parameters(self):
        super().reset_parameters()
        if getattr(self, "magnitude", None) is not None:   # LoRA's __init__ resets before magnitude exists
            with torch.no_grad():
                self.magnitude.copy_(self._row_norm(self._base_weight[0].detach()))

    @staticmethod
    def _row_norm(weight: torch.Tensor) -> torch.Tensor:
        return torch.linalg.norm(weight, dim=1)

    def _norm_scale(self, weight: torch.Tensor) -> torch.Tensor:
        """m / ‖W + s·BA‖ per output row, the norm detached (DoRA §4.3)."""
        combined = weight + self.delta_weight().detach().to(weight.dtype)
        return self.magnitude.to(weight.dtype) / self._row_norm(combined).detach()

    def forward(self, x, y):
        weight = self._base_weight[0].to(x.dtype)   # a float32 DoRA on a half-precision base computes in float32
        x = self.dropout(x)
        scale = self._norm_scale(weight.detach())
        lora = (x @ self.lora_A.t() @ self.lora_B.t()) * self.scaling
        return y + (scale - 1) * F.linear(x, weight) + scale * lora

    def transform_weight(self, weight):
        return self._norm_scale(weight)[:, None] * (weight + self.delta_weight().to(weight.dtype))
