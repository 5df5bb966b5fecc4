"""LoRA (Hu et al. 2021): W + s·B·A with s = alpha/r, or alpha/√r with rsLoRA (Kalajdzievski 2023).

B starts at zero, so the adapted op equals the base op at init; A is kaiming-uniform (as PEFT and the paper's
code) or Gaussian with std 1/r (PEFT's "gaussian"). The delta is additive, so merging folds it
into the base weight and unmerging subtracts it again (`inverse_weight`).

On a convolution (PEFT's `lora.Conv1d/2d/3d`): A is a conv with r output channels and the base op's kernel,
stride, padding and dilation (A (r, in, *kernel)), B a 1×…×1 conv to the output channels with the base op's
groups (B (out, r/groups, 1, …)); r must be a multiple of groups. With groups 1 the delta kernel is
B·A (merge folds it); with groups > 1 every output channel reads every input channel, which no grouped kernel
holds, so the adapter runs on activations only and does not merge (PEFT refuses that merge too). PEFT 0.21 builds A
without the base op's dilation: on a dilated conv its forward fails (numeric padding) or, with padding="same",
differs from its own merged weights (measured 1.5 at dilation 2); here A keeps the dilation, so both agree.
On an embedding (PEFT's `lora.Embedding`): y += A[:, ids]ᵀ·Bᵀ·s with A (r, num_embeddings) zeros and
B (dim, r) normal at init (PEFT's embedding init), delta (B·A)ᵀ·s on the (num_embeddings, dim) table.
"""
from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from surgery.errors import SurgeryWarning
from surgery.errors import RewriteError
from surgery.modules import weight_ops
from surgery.modules.base import SiteContext, WeightAdapter
from surgery.modules.registry import Options, register


class LoRAOptions(Options):
    kind: Literal["lora"] = "lora"
    supported_actions = ("wrap",)
    r: int = Field(8, ge=1, description="Rank of the update B·A.")
    alpha: float = Field(8, gt=0, description="Scaling numerator: s = alpha/r (alpha/sqrt(r) with use_rslora).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the op's input before A (activation path only).")
    use_rslora: bool = Field(False, description="Rank-stabilized scaling alpha/sqrt(r).")
    init: Literal["kaiming", "gaussian"] = Field(
        "kaiming", description="A's init (B is always zero): kaiming-uniform(a=√5) or Gaussian with std 1/r.")
    use_gating: bool = Field(False, description="UniPELT: a learned gate sigmoid(Linear(x)) averaged over the "
                                                "sequence replaces the scaling (input-dependent, so not mergeable).")


def warn_rank(r: int, site: SiteContext, kind: str) -> None:
    """B·A has rank at most min(d_in, d_out) (d_in·prod(kernel) for a conv): a larger r only costs memory
    (SurgeryWarning)."""
    d_in = site.in_features or r
    if site.op_kind == "conv":   # A (r, in, *kernel): B·A is (out, in·prod(kernel))
        d_in *= math.prod(site.op_args.get("kernel", ()))
    full = min(d_in, site.out_features or r)
    if r > full:
        warnings.warn(f"{kind}: r={r} exceeds min(d_in, d_out) = {full} at {site.module}: the update cannot have a "
                      f"rank above {full}, and the extra {r - full} rows only cost memory", SurgeryWarning,
                      stacklevel=3)


@register
class LoRA(WeightAdapter):
    Options = LoRAOptions
    op_kinds = ("linear", "conv", "embedding")

    def __init__(self, in_features: int, out_features: int, r: int = 8, alpha: float = 8, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "kaiming", use_gating: bool = False, op_kind: str = "linear",
                 op_args: dict | None = None):
        super().__init__()
        if use_gating and op_kind != "linear":
            raise RewriteError(f"gated LoRA (use_gating) is defined on linear ops, not on a {op_kind}")
        self.op_kind, self.op_args = op_kind, dict(op_args or {})
        groups = self.op_args.get("groups", 1)
        if op_kind == "conv" and r % groups:
            raise RewriteError(f"LoRA on a conv with groups={groups} needs r divisible by groups (B is grouped, as "
                               f"in PEFT); r={r}")
        self.gate = nn.Linear(in_features, 1) if use_gating else None
        self.activation_only = op_kind == "conv" and groups > 1
        self.mergeable = not use_gating and not self.activation_only
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        if op_kind == "conv":
            kernel_size = tuple(self.op_args["kernel"])
            ones = (1,) * len(kernel_size)
            self.lora_A = nn.Parameter(torch.empty(r, in_features, *kernel_size))
            self.lora_B = nn.Parameter(torch.empty(out_features, r // groups, *ones))
        else:
            self.lora_A = nn.Parameter(torch.empty(r, in_features))
            self.lora_B = nn.Parameter(torch.empty(out_features, r))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.init = init
        self.reset_parameters()

    def reset_parameters(self):
        if self.op_kind == "embedding":   # PEFT's lora.Embedding: A zeros, B normal
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)
        elif self.init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @classmethod
    def build(cls, options: LoRAOptions, site: SiteContext, action: str) -> "LoRA":
        warn_rank(options.r, site, "lora")
        return cls(site.in_features, site.out_features, r=options.r, alpha=options.alpha, dropout=options.dropout,
                   use_rslora=options.use_rslora, init=options.init, use_gating=options.use_gating,
                   op_kind=site.op_kind, op_args=site.op_args)

    def _path(self, x):
        """B(A(x)) without the scaling, for the op's kind."""
        if self.op_kind == "conv":
            return weight_ops.pointwise(weight_ops.conv_same_geometry(x, self.lora_A, self.op_args), self.lora_B,
                                        self.op_args)
        if self.op_kind == "embedding":
            return F.embedding(x, self.lora_A.t(), self.op_args.get("padding_idx")) @ self.lora_B.t()
        return x @ self.lora_A.t() @ self.lora_B.t()

    def forward(self, x, y):
        delta = self._path(self.dropout(x))
        if self.gate is not None:
            return y + delta * torch.sigmoid(self.gate(x)).mean(dim=-2, keepdim=True)
        return y + delta * self.scaling

    def _dense_delta(self) -> torch.Tensor:
        """s·B·A as a dense kernel: (out, in) for linear/embedding, (out, in, *kernel) for conv (any groups)."""
        if self.op_kind != "conv":
            return (self.lora_B @ self.lora_A) * self.scaling
        groups = self.op_args.get("groups", 1)
        out, per_group = self.lora_B.shape[:2]
        b = self.lora_B.reshape(out, per_group)
        if groups > 1:   # B's output channels of group g read A's rows of group g only
            b = weight_ops.grouped_to_dense(b, groups)
        return (b @ self.lora_A.flatten(1)).view(out, *self.lora_A.shape[1:]) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        if self.activation_only:
            raise RewriteError("LoRA on a grouped conv is no grouped kernel: it has no weight form to fold")
        return self._dense_delta()

    def transform_weight(self, weight):
        return weight + self.delta_weight().to(weight.dtype)

    def inverse_weight(self, merged):
        """The base weight from a merged one (merge/unmerge)."""
        return merged - self.delta_weight().to(merged.dtype)

