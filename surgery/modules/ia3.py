"""IA3 (Liu et al. 2022): a learned vector, initialized to ones, rescales an op's output (k, v) or input (FFN).

Scaling the output multiplies the weight's rows (and the bias); scaling the input multiplies its columns. Both
fold into the weight; unmerging divides again, which is exact only up to rounding and impossible where an
entry is zero, so `inverse_weight` returns None then and merge keeps what it needs (see surgery/merge.py).

On a convolution the vector scales channels (PEFT's `ia3.Conv*d`): output channels, or input channels for a
feed-forward module; with groups > 1 the input vector folds into each group's slice of the kernel. On an
embedding only the output (the embedding dimension) can be scaled: its input is token ids.

On MoE experts stored as one 3-D parameter (experts, out, in) read by a grouped matmul, each expert has its own
vector: `ia3_l` is (experts, out) or (experts, in), ones at init, and scales that expert's rows or columns of the
parameter the model's grouped matmul reads (PEFT's IA3 has no definition for expert parameters; this is its
per-expert form, as LoRA's `target_parameters`).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from surgery.errors import RewriteError
from surgery.modules import weight_ops
from surgery.modules.base import SiteContext, WeightAdapter
from surgery.modules.registry import Options, register
from surgery.modules.options import IA3Options  # noqa: F401  (defined without torch: spec validation)


@register
class IA3(WeightAdapter):
    Options = IA3Options
    op_kinds = ("linear", "conv", "embedding")
    supports_experts = True

    def __init__(self, size: int, scale_input: bool, op_kind: str = "linear", op_args: dict | None = None,
                 experts: int | None = None):
        super().__init__()
        if scale_input and op_kind == "embedding":
            raise RewriteError("IA3 cannot scale an embedding's input (token ids); use scale: output")
        self.scale_input = scale_input
        self.adapts_input = scale_input
        self.stacks_on_activations = not scale_input   # scales the output; an input scale is seen by all
        self.op_kind, self.op_args = op_kind, dict(op_args or {})
        self.experts = experts
        self.ia3_l = nn.Parameter(torch.ones(experts, size) if experts else torch.ones(size))

    @classmethod
    def build(cls, options: IA3Options, site: SiteContext, action: str) -> "IA3":
        scale_input = options.scale == "input" or (options.scale == "auto" and site.role == "ffn.out")
        return cls(site.in_features if scale_input else site.out_features, scale_input, site.op_kind, site.op_args,
                   experts=site.experts)

    def reset_parameters(self):
        nn.init.ones_(self.ia3_l)

    def _vector(self):
        return weight_ops.channels(self.ia3_l, self.op_kind, self.op_args)

    def adapt_input(self, x):
        if self.experts:
            raise RewriteError("IA3 on experts stored as one 3-D parameter is realized on the weight only")
        return x * self._vector() if self.scale_input else x

    def forward(self, x, y):
        if self.experts:
            raise RewriteError("IA3 on experts stored as one 3-D parameter is realized on the weight only")
        return y if self.scale_input else y * self._vector()

    def _on_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The vector shaped to multiply the (out, in, ...) weight elementwise ((experts, out, in) for experts)."""
        l = self.ia3_l.to(weight.dtype)
        if self.experts:
            return l.unsqueeze(-2) if self.scale_input else l.unsqueeze(-1)
        rest = [1] * (weight.dim() - 2)
        if not self.scale_input:
            return l.view(-1, 1, *rest)
        groups = self.op_args.get("groups", 1) if self.op_kind == "conv" else 1
        if groups > 1:   # output channel o reads input channels of its group only
            out, per_in = weight.shape[:2]
            l = l.view(groups, 1, per_in).expand(groups, out // groups, per_in).reshape(out, per_in)
            return l.view(out, per_in, *rest)
        return l.view(1, -1, *rest)

    def transform_weight(self, weight):
        return weight * self._on_weight(weight)

    def transform_bias(self, bias):
        return bias if self.scale_input else bias * self.ia3_l.to(bias.dtype)

    def _invertible(self) -> bool:
        return bool((self.ia3_l != 0).all())

    def inverse_weight(self, merged):
        if not self._invertible():
            return None
        return merged / self._on_weight(merged)

    def inverse_bias(self, merged):
        if self.scale_input:
            return merged
        return merged / self.ia3_l.to(merged.dtype) if self._invertible() else None
