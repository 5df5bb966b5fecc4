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

Three inits start from the base weight W (out, in) of a linear op instead, as PEFT's `init_lora_weights`:

- `pissa` (Meng et al. 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation", NeurIPS 2024,
  arXiv:2404.02948): W = U S Vᵀ (exact SVD in float32), A = diag(√(S_r/s)) V_rᵀ, B = U_r diag(√(S_r/s)), so
  s·B·A is W's top-r part;
- `olora` (Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation", arXiv:2406.01775): W = Q R, A = R[:r],
  B = Q[:, :r].

PEFT then overwrites the base weight with the residual W − s·B₀A₀. Here the base is left as it is (so
`remove`, `disable` and a failed apply leave the user's weights untouched) and the frozen initial factors are
kept as buffers `lora_A0`, `lora_B0`: the op computes W·x + s·(B·A·x' − B₀A₀·x) (x' the dropped-out input), which
is PEFT's W_res·x + s·B·A·x' up to rounding, and equals the base op at init. Merge folds s·(BA − B₀A₀);
`to_peft` writes it as a plain LoRA of rank 2r, A' = [A; A₀], B' = [B, −B₀] (PEFT's
`path_initial_model_for_weight_conversion`), which loads onto the original base; `from_peft` of a directory
whose `init_lora_weights` is "pissa"/"olora" (PEFT's unconverted save, meant for the residual base it recomputes
at load) applies the same init, so the trained A, B meet the same residual.

- `loftq` (Li et al. 2024, "LoftQ: LoRA-Fine-Tuning-Aware Quantization", ICLR 2024, arXiv:2310.08659, one
  alternating step, PEFT's default loftq_iter=1) is for a base that will be quantized: with Q = NF4(W) (torchao,
  block 64, double-quantized scales: what `surgery.quantize_nf4` stores), s·B·A is the top-r SVD of W − Q, so
  Q + s·B·A ≈ W (A = diag(√(S_r/s)) V_rᵀ, B = U_r diag(√(S_r/s)); PEFT's init for s = 1). Apply it to the dense
  model, then call `surgery.quantize_nf4(model)`: until the op's weight has been replaced (quantized, or
  dequantized again for a merge) the forward and merge raise, since W + s·B·A would count the correction on top
  of the unquantized W. torchao is imported only when this init runs.
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
from surgery.modules.options import LoRAOptions  # noqa: F401  (defined without torch: spec validation)

WEIGHT_INITS = ("pissa", "olora")   # inits computed from the base weight (residual kept in the forward)
NF4_MODULE = "torchao.quantization.quantize_.workflows.nf4.nf4_tensor"


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
                 op_args: dict | None = None, weight: torch.Tensor | None = None, host: nn.Module | None = None):
        super().__init__()
        if use_gating and op_kind != "linear":
            raise RewriteError(f"gated LoRA (use_gating) is defined on linear ops, not on a {op_kind}")
        if init in WEIGHT_INITS + ("loftq",) and op_kind != "linear":
            raise RewriteError(f"lora init {init!r} is defined on linear ops, not on a {op_kind}")
        if init in WEIGHT_INITS:
            if weight is None:
                raise RewriteError(f"lora init {init!r} needs the base weight of the op, which is not a parameter")
            if use_gating:
                raise RewriteError(f"lora init {init!r} cannot be combined with use_gating")
            if r > min(in_features, out_features):
                raise RewriteError(f"lora init {init!r}: r={r} exceeds the weight's rank bound "
                                   f"min({out_features}, {in_features})")
            self._init_weight = [weight]     # unregistered: the base weight, read at (re)initialization only
            self.register_buffer("lora_A0", torch.empty(r, in_features))
            self.register_buffer("lora_B0", torch.empty(out_features, r))
        if init == "loftq":
            if not isinstance(weight, nn.Parameter) or use_gating:
                raise RewriteError("lora init 'loftq' needs an op whose whole weight is a parameter (an nn.Linear, "
                                   "as surgery.quantize_nf4 does) and no use_gating")
            self._init_weight = [weight]     # the dense weight: the forward refuses to run while it is still there
            self._host = [host]
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
        if self.init in WEIGHT_INITS:
            self._weight_init()
            return
        if self.init == "loftq":
            self._loftq_init()
            return
        if self.op_kind == "embedding":   # PEFT's lora.Embedding: A zeros, B normal
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)
        elif self.init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @torch.no_grad()
    def _weight_init(self):
        weight = self._init_weight[0].detach()
        if weight.device.type == "meta":      # built without memory: surgery.materialize initializes it again
            return
        weight = weight.to(torch.float32)
        r = self.r
        if self.init == "pissa":
            u, s, vh = torch.linalg.svd(weight, full_matrices=False)
            root = torch.sqrt(s[:r] / self.scaling)
            a, b = root[:, None] * vh[:r], u[:, :r] * root[None, :]
        else:   # olora
            q, rr = torch.linalg.qr(weight)
            a, b = rr[:r], q[:, :r]
        for target, value in ((self.lora_A, a), (self.lora_B, b), (self.lora_A0, a), (self.lora_B0, b)):
            target.copy_(value.to(target.dtype))

    @torch.no_grad()
    def _loftq_init(self):
        import importlib
        weight = self._init_weight[0].detach()
        if weight.device.type == "meta":      # built without memory: surgery.materialize initializes it again
            return
        try:
            nf4 = importlib.import_module(NF4_MODULE)
        except ImportError as exc:
            raise RewriteError(f"lora init 'loftq' needs torchao's NF4 (pip install torchao): {exc}") from None
        if weight.numel() % 64:
            raise RewriteError(f"lora init 'loftq': the weight has {weight.numel()} entries, not a multiple of NF4's "
                               f"block size 64")
        dense = weight.to(torch.float32).contiguous()
        scalers = dense.numel() // 64
        quantized = nf4.to_nf4(dense, 64, math.gcd(scalers, 256)).get_original_weight().to(torch.float32)
        u, s, vh = torch.linalg.svd(dense - quantized, full_matrices=False)
        root = torch.sqrt(s[:self.r] / self.scaling)
        self.lora_A.copy_((root[:, None] * vh[:self.r]).to(self.lora_A.dtype))
        self.lora_B.copy_((u[:, :self.r] * root[None, :]).to(self.lora_B.dtype))

    def _check_quantized(self):
        if self.init == "loftq" and getattr(self._host[0], "weight", None) is self._init_weight[0]:
            raise RewriteError("this LoftQ adapter corrects NF4(W)'s quantization error, but the op still holds the "
                               "dense W: call surgery.quantize_nf4(model) first")

    @classmethod
    def build(cls, options: LoRAOptions, site: SiteContext, action: str) -> "LoRA":
        warn_rank(options.r, site, "lora")
        weight = site.weight if options.init in WEIGHT_INITS + ("loftq",) else None
        return cls(site.in_features, site.out_features, r=options.r, alpha=options.alpha, dropout=options.dropout,
                   use_rslora=options.use_rslora, init=options.init, use_gating=options.use_gating,
                   op_kind=site.op_kind, op_args=site.op_args, weight=weight, host=site.host)

    def _path(self, x):
        """B(A(x)) without the scaling, for the op's kind."""
        if self.op_kind == "conv":
            return weight_ops.pointwise(weight_ops.conv_same_geometry(x, self.lora_A, self.op_args), self.lora_B,
                                        self.op_args)
        if self.op_kind == "embedding":
            return F.embedding(x, self.lora_A.t(), self.op_args.get("padding_idx")) @ self.lora_B.t()
        return x @ self.lora_A.t() @ self.lora_B.t()

    def forward(self, x, y):
        if self.init == "loftq":
            self._check_quantized()
        delta = self._path(self.dropout(x))
        if self.gate is not None:
            return y + delta * torch.sigmoid(self.gate(x)).mean(dim=-2, keepdim=True)
        if self.init in WEIGHT_INITS:
            delta = delta - x @ self.lora_A0.t() @ self.lora_B0.t()
        return y + delta * self.scaling

    def _dense_delta(self) -> torch.Tensor:
        """s·B·A as a dense kernel: (out, in) for linear/embedding, (out, in, *kernel) for conv (any groups)."""
        if self.init in WEIGHT_INITS:
            return (self.lora_B @ self.lora_A - self.lora_B0 @ self.lora_A0) * self.scaling
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
        if self.init == "loftq":
            self._check_quantized()
        return weight + self.delta_weight().to(weight.dtype)

    def inverse_weight(self, merged):
        """The base weight from a merged one (merge/unmerge)."""
        return merged - self.delta_weight().to(merged.dtype)

