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

- `loftq` (Li et al. 2024, "LoftQ: LoRA-Fine-Tuning-Aware Quantization", ICLR 2024, arXiv:2310.08659,
  Algorithm 1) is for a base that will be quantized. `loftq_iter` T alternating steps (PEFT's
  `LoftQConfig.loftq_iter`, default 1): starting from L₀R₀ = 0, step t quantizes Q_t = NF4(W − L_{t−1}R_{t−1})
  and sets L_tR_t to the top-r SVD of W − Q_t; the result is Q_T and s·B·A = L_TR_T (A = diag(√(S_r/s)) V_rᵀ,
  B = U_r diag(√(S_r/s))), so Q_T + s·B·A ≈ W, and ‖W − Q_t − L_tR_t‖ falls with t (`loftq_errors`). The
  quantizer (`loftq_quantizer`): `torchao` (block 64, double-quantized scales: what `surgery.quantize_nf4`
  stores; it then quantizes W − L_{T−1}R_{T−1}, so the stored base is Q_T) or `bitsandbytes` (PEFT's LoftQ
  quantizer, `Params4bit(compress_statistics=False, quant_type="nf4")`, float32 block scales:
  `modules/nf4.py`, no bitsandbytes needed); with it, put `loftq_quantized()` (PEFT's new base weight) in the op,
  or a bitsandbytes NF4 of it. PEFT sets B·A (not s·B·A) to L_TR_T: for alpha = r both are the same. Apply it
  to the dense model, then replace the op's weight: until then the forward and merge raise, since W + s·B·A
  would count the correction on top of the unquantized W. torchao is imported only when it is the quantizer.

On MoE experts stored as one 3-D parameter (experts, out, in) read by a grouped matmul (transformers 5's Mixtral,
Qwen2-MoE), each expert e has its own pair: A (experts, r, in), B (experts, out, r), and W_e + s·B_e·A_e is what
the model's own grouped matmul reads (a parametrization of that parameter; PEFT's `target_parameters` /
`lora.ParamWrapper`, whose Linear(in, r·experts) A is this A row for row). A_e is kaiming-uniform with fan-in
`in` (as each of PEFT's rows), B zero. With dropout (which PEFT's ParamWrapper refuses) the adapter runs inside
the model's grouped matmul instead (surgery/rewrite/experts.py): y + s·B_e·A_e·dropout(x) for each row block of
expert e, computed for all rows at once (x·[A_1; ...; A_E]ᵀ, masked to each row's expert, times [B_1 ... B_E]ᵀ),
so the routing is the model's own. Gating and the weight-derived inits are refused on experts.
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
    stacks_on_activations = True     # adds f(x) to the op's output
    op_kinds = ("linear", "conv", "embedding")
    supports_experts = True

    def __init__(self, in_features: int, out_features: int, r: int = 8, alpha: float = 8, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "kaiming", use_gating: bool = False, op_kind: str = "linear",
                 op_args: dict | None = None, weight: torch.Tensor | None = None, host: nn.Module | None = None,
                 experts: int | None = None, loftq_iter: int = 1, loftq_quantizer: str = "torchao"):
        super().__init__()
        self.experts = experts
        self.loftq_iter, self.loftq_quantizer = loftq_iter, loftq_quantizer
        if experts and (use_gating or init not in ("kaiming", "gaussian")):
            raise RewriteError(f"LoRA on {experts} experts stored as one 3-D parameter: use_gating and init {init!r} "
                               f"are defined on one 2-D weight (use init: kaiming or gaussian, no use_gating)")
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
        elif experts:
            self.lora_A = nn.Parameter(torch.empty(experts, r, in_features))
            self.lora_B = nn.Parameter(torch.empty(experts, out_features, r))
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
        elif self.experts:
            with torch.no_grad():
                for a in self.lora_A:     # per expert: fan-in `in`, as nn.init computes it on a (r, in) matrix
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
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

    def _nf4(self):
        """The quantizer: dense float32 -> its NF4 round trip (float32)."""
        if self.loftq_quantizer == "bitsandbytes":
            from surgery.modules.nf4 import nf4_round_trip
            return nf4_round_trip
        import importlib
        try:
            nf4 = importlib.import_module(NF4_MODULE)
        except ImportError as exc:
            raise RewriteError(f"lora init 'loftq' needs torchao's NF4 (pip install torchao): {exc}") from None
        return lambda dense: nf4.to_nf4(dense.contiguous(), 64, math.gcd(dense.numel() // 64, 256)) \
            .get_original_weight().to(torch.float32)

    @torch.no_grad()
    def loftq_steps(self) -> list[dict]:
        """LoftQ's alternating steps from the dense base weight (deterministic: the same every call): per step t,
        `source` (W − L_{t−1}R_{t−1}, what is quantized), `quantized` (Q_t), `low_rank` (L_tR_t, the top-r SVD of
        W − Q_t as (u·√S, √S·vh)) and `error` ‖W − Q_t − L_tR_t‖ (Frobenius)."""
        weight = self._init_weight[0].detach()
        if self.loftq_quantizer == "torchao" and weight.numel() % 64:
            raise RewriteError(f"lora init 'loftq': the weight has {weight.numel()} entries, not a multiple of NF4's "
                               f"block size 64")
        quantize = self._nf4()
        dense = weight.to(torch.float32)
        steps, low = [], torch.zeros_like(dense)
        for _ in range(self.loftq_iter):
            source = dense - low
            quantized = quantize(source)
            u, s, vh = torch.linalg.svd(dense - quantized, full_matrices=False)
            root = torch.sqrt(s[:self.r])
            left, right = u[:, :self.r] * root[None, :], root[:, None] * vh[:self.r]
            low = left @ right
            steps.append({"source": source, "quantized": quantized, "low_rank": (left, right),
                          "error": float(torch.linalg.norm(dense - quantized - low))})
        return steps

    def loftq_errors(self) -> list[float]:
        """‖W − Q_t − L_tR_t‖ after each alternating step t = 1..loftq_iter (falls with t, Li et al. 2023)."""
        return [step["error"] for step in self.loftq_steps()]

    def loftq_source(self) -> torch.Tensor:
        """What the base must be quantized from so that it holds Q_T: W − L_{T−1}R_{T−1} (W for one step)."""
        return self.loftq_steps()[-1]["source"].to(self._init_weight[0].dtype)

    def loftq_quantized(self) -> torch.Tensor:
        """Q_T, the dequantized base the correction was computed for (PEFT writes it as the op's weight)."""
        return self.loftq_steps()[-1]["quantized"].to(self._init_weight[0].dtype)

    @torch.no_grad()
    def _loftq_init(self):
        weight = self._init_weight[0].detach()
        if weight.device.type == "meta":      # built without memory: surgery.materialize initializes it again
            return
        left, right = self.loftq_steps()[-1]["low_rank"]
        root = math.sqrt(1 / self.scaling)         # s·B·A = L·R
        self.lora_A.copy_((right * root).to(self.lora_A.dtype))
        self.lora_B.copy_((left * root).to(self.lora_B.dtype))

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
                   op_kind=site.op_kind, op_args=site.op_args, weight=weight, host=site.host, experts=site.experts,
                   loftq_iter=options.loftq_iter, loftq_quantizer=options.loftq_quantizer)

    def _path(self, x):
        """B(A(x)) without the scaling, for the op's kind."""
        if self.op_kind == "conv":
            return weight_ops.pointwise(weight_ops.conv_same_geometry(x, self.lora_A, self.op_args), self.lora_B,
                                        self.op_args)
        if self.op_kind == "embedding":
            return F.embedding(x, self.lora_A.t(), self.op_args.get("padding_idx")) @ self.lora_B.t()
        return x @ self.lora_A.t() @ self.lora_B.t()

    def grouped(self, x: torch.Tensor, y: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """Experts: y (rows, out) of the grouped matmul of x (rows, in) sorted by expert, offs (experts,) the
        cumulative row counts; returns y + s·B_e·A_e·dropout(x_row) for each row's expert e."""
        from surgery.modules.experts import expert_of_rows
        experts, r = self.experts, self.r
        a = self.lora_A.reshape(experts * r, -1)                     # (experts·r, in)
        b = self.lora_B.transpose(1, 2).reshape(experts * r, -1)     # (experts·r, out)
        h = self.dropout(x.to(a.dtype)) @ a.t()                      # every expert's A on every row
        mask = expert_of_rows(offs, x.shape[0], experts).to(h.dtype)  # ... kept for the row's own expert only
        h = (h.view(-1, experts, r) * mask[:, :, None]).reshape(-1, experts * r)
        return y + ((h @ b) * self.scaling).to(y.dtype)

    def forward(self, x, y):
        if self.experts:
            raise RewriteError("LoRA on experts stored as one 3-D parameter runs on the weight or inside the grouped "
                               "matmul (grouped)")
        if self.init == "loftq":
            self._check_quantized()
        delta = self._path(self.dropout(x))
        if self.gate is not None:
            return y + delta * torch.sigmoid(self.gate(x)).mean(dim=-2, keepdim=True)
        if self.init in WEIGHT_INITS:
            delta = delta - x @ self.lora_A0.t() @ self.lora_B0.t()
        return y + delta * self.scaling

    def _dense_delta(self) -> torch.Tensor:
        """s·B·A as a dense kernel: (out, in) for linear/embedding, (out, in, *kernel) for conv (any groups),
        (experts, out, in) for experts (a batched product, one per expert)."""
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

