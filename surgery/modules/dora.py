"""DoRA (Liu et al. 2024): W' = m · (W + s·BA) / ‖W + s·BA‖, the norm taken per output row of the (out, in)
weight (PEFT's `linalg.norm(W, dim=1)`: the paper's column norm of the (in, out) matrix), m initialized to ‖W‖.

As in the paper (§4.3) and PEFT, the norm is treated as a constant for the gradient (detached): it tracks
the update of BA in the forward pass, but receives no gradient.

On a convolution the norm is per output channel over (in, *kernel) (PEFT's `_DoraConvNdLayer`), on an
embedding per embedding dimension over the vocabulary (PEFT's `DoraEmbeddingLayer`, the table read as
(dim, num_embeddings)). On a grouped conv, LoRA's B·A reads every input channel, so W + s·BA is the dense
kernel (W with zeros across groups, plus s·BA): its per-channel norm is used here; PEFT reshapes the grouped
B (out, r/groups) as (-1, r) for the norm, which mixes channels once B is trained (equal at init).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from surgery.errors import RewriteError
from surgery.modules.lora import warn_rank
from surgery.modules import columns, weight_ops
from surgery.modules.base import SiteContext
from surgery.modules.lora import LoRA
from surgery.modules.registry import Options, register
from surgery.modules.options import DoRAOptions  # noqa: F401  (defined without torch: spec validation)


@register
class DoRA(LoRA):
    Options = DoRAOptions
    stacks_on_activations = False    # renormalizes the base weight: an earlier adapter's change is unseen
    inverse_weight = None   # the row norms make W' non-invertible from W' alone: merge keeps a copy for unmerge
    supports_experts = False   # LoRA's per-expert factors, but no per-expert magnitude yet

    def __init__(self, weight: torch.Tensor, r: int = 8, alpha: float = 8, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "kaiming", op_kind: str = "linear", op_args: dict | None = None,
                 live_weight=None):
        op_args = dict(op_args or {})
        out_features, in_features = weight.shape[0], weight.shape[1] * op_args.get("groups", 1)
        super().__init__(in_features, out_features, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                         init=init, op_kind=op_kind, op_args=op_args)
        # The activation path needs the base weight itself; held unregistered so it is neither saved nor trained
        # here. A Parameter is kept as the object (it survives .to()); a slice/transpose view shares its storage.
        # q's heads of an interleaved projection (no view can select them): read from the parameter when used
        self._base_weight = [live_weight if live_weight is not None else
                             weight if isinstance(weight, nn.Parameter) else weight.detach()]
        self.magnitude = nn.Parameter(self._row_norm(self._dense(weight.detach())))

    @classmethod
    def build(cls, options: DoRAOptions, site: SiteContext, action: str) -> "DoRA":
        if site.weight is None:
            raise RewriteError(f"{site.module}: DoRA needs the base weight of the op to initialize its magnitude, "
                               f"but this op's weight is not a parameter of the model")
        warn_rank(options.r, site, "dora")
        return cls(site.weight, r=options.r, alpha=options.alpha, dropout=options.dropout,
                   use_rslora=options.use_rslora, init=options.init, op_kind=site.op_kind, op_args=site.op_args,
                   live_weight=site.live_weight)

    def reset_parameters(self):
        super().reset_parameters()
        if getattr(self, "magnitude", None) is not None:   # LoRA's __init__ resets before magnitude exists
            with torch.no_grad():
                self.magnitude.copy_(self._row_norm(self._dense(columns.live(self._base_weight[0]).detach())))

    @staticmethod
    def _row_norm(weight: torch.Tensor) -> torch.Tensor:
        """The norm of each output row (channel) over every other axis."""
        flat = weight.flatten(1)
        if flat.is_meta:   # no values (a meta model): the norm's shape and dtype, without running its meta kernel
            return flat.new_empty(flat.shape[0], dtype=flat.real.dtype if flat.is_complex() else flat.dtype)
        return torch.linalg.norm(flat, dim=1)

    def _dense(self, weight: torch.Tensor) -> torch.Tensor:
        return weight_ops.grouped_to_dense(weight, self.op_args.get("groups", 1)) if self.op_kind == "conv" else weight

    def _norm_scale(self, weight: torch.Tensor) -> torch.Tensor:
        """m / ‖W + s·BA‖ per output row, the norm detached (DoRA §4.3)."""
        combined = self._dense(weight) + self._dense_delta().detach().to(weight.dtype)
        return self.magnitude.to(weight.dtype) / self._row_norm(combined).detach()

    def forward(self, x, y):
        weight = columns.live(self._base_weight[0])
        if x.is_floating_point():   # a float32 DoRA on a half-precision base computes in float32 (ids stay ids)
            weight = weight.to(x.dtype)
        x = self.dropout(x)
        scale = weight_ops.channels(self._norm_scale(weight.detach()), self.op_kind, self.op_args)
        lora = self._path(x) * self.scaling
        return y + (scale - 1) * weight_ops.base_op(x, weight, self.op_kind, self.op_args) + scale * lora

    def transform_weight(self, weight):
        scale = self._norm_scale(weight).view(-1, *([1] * (weight.dim() - 1)))
        return scale * (weight + self.delta_weight().to(weight.dtype))
