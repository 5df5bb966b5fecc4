"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020; He et al. 2021; Steitz & Roth 2024; Compacter),
with AdapterHub's BnConfig knobs under the same names and meanings.

With the `sublayer` action the module computes AdapterHub's `bottleneck_layer_forward(h, x, norm)`: h is the
sub-layer's branch output (after dense and dropout), x its residual input, norm the model's own post-sub-layer norm
(None in pre-norm models). With `insert_after`/`insert_before` it is the adapter alone on one value, v -> A(v) + v;
placed after the branch output (`through: [dropout]`), the model's own add and norm then give exactly BnConfig's
default flags (original_ln_before false, original_ln_after true). With `parallel` it is the branch s·A(x) that the
engine adds to the matched value.
"""
from __future__ import annotations

import math
from typing import Annotated, Literal, Union

import torch
from pydantic import Field, field_validator
from torch import nn

from surgery.errors import RewriteError
from surgery.modules.base import SiteContext
from surgery.modules.phm import PHMLayer, PHMOptions, PHMRule
from surgery.modules.registry import Options, register
from surgery.modules.options import BottleneckOptions  # noqa: F401  (defined without torch: spec validation)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


# transformers' get_activation names, which AdapterHub resolves non_linearity with
ACTIVATIONS = {
    "relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU, "silu": nn.SiLU, "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid, "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"), "quick_gelu": QuickGELU, "mish": nn.Mish,
    "relu6": nn.ReLU6, "leakyrelu": nn.LeakyReLU, "identity": nn.Identity, "linear": nn.Identity,
}


def _per_layer(value, layer: int | None, what: str):
    """A scalar, or AdapterHub's per-layer mapping {layer: value, ..., "default": value}."""
    if not isinstance(value, dict):
        return value
    for key in (layer, str(layer)):
        if key in value:
            return value[key]
    if "default" in value:
        return value["default"]
    raise RewriteError(f"{what} gives no value for layer {layer} and no 'default': {value}")


def site_width(site: SiteContext, action: str) -> int | None:
    """The width of the value the module acts on: for insert_before that is the op's input (a linear's
    in_features), where SiteContext.dim describes the op's output."""
    if action == "insert_before" and site.in_features is not None:
        return site.in_features
    return site.dim


def _sequential_needs_sublayer(o: BottleneckOptions) -> str | None:
    if o.original_ln_before:
        return "original_ln_before: true"
    if not o.original_ln_after:
        return "original_ln_after: false"
    if o.residual_before_ln == "post_add":
        return "residual_before_ln: post_add"
    return None


class StochasticDepth(nn.Module):
    """Drops the whole adapter output of a sample with probability p in training (torchvision's mode "row")."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        noise = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * noise.div_(keep)


@register
class BottleneckAdapter(nn.Module):
    """A(z) = dropout(s · up(act(down(LN_before?(z))))) [· gate(z)], with the residual and LN_after as configured.

    `mode` is how the engine calls it: "insert" (z -> A(z) [+ z]), "sublayer" ((h, x, norm) -> the sub-layer's
    output), or "branch" (x -> A(x), the parallel action adds it).
    """

    Options = BottleneckOptions
    unit_scaling = False   # a constant scaling of 1.0 (set in __init__)

    def __init__(self, dim: int, bottleneck: int, *, in_dim: int | None = None, mode: str = "insert",
                 non_linearity="relu", init_weights="bert", residual=True, original_ln_before=False,
                 original_ln_after=True, residual_before_ln=True, adapter_residual_before_ln=False,
                 is_parallel=False, scaling=1.0, dropout=0.0, stochastic_depth=0.0, ln_before=False,
                 ln_after=False, use_gating=False, phm: PHMOptions | None = None, phm_rule: PHMRule | None = None):
        super().__init__()
        in_dim = in_dim or dim
        self.mode, self.residual = mode, residual
        self.original_ln_before, self.original_ln_after = original_ln_before, original_ln_after
        self.residual_before_ln, self.adapter_residual_before_ln = residual_before_ln, adapter_residual_before_ln
        self.is_parallel = is_parallel
        self.ln_before = nn.LayerNorm(in_dim) if ln_before else None
        if phm is not None:
            if phm.shared_phm_rule and phm_rule is None:
                self.phm_rule = phm_rule = PHMRule(phm.phm_dim, factorized=phm.factorized_phm_rule,
                                                   c_init=phm.phm_c_init, init_range=phm.phm_init_range,
                                                   learn=phm.learn_phm, shared=True)
            shared = phm_rule if phm.shared_phm_rule else None
            self.down = PHMLayer(in_dim, bottleneck, phm, rule=shared)
            self.up = PHMLayer(bottleneck, dim, phm, rule=shared)
        else:
            self.down = nn.Linear(in_dim, bottleneck)
            self.up = nn.Linear(bottleneck, dim)
        self.act = ACTIVATIONS[non_linearity]()
        self.drop_path = StochasticDepth(stochastic_depth) if stochastic_depth else None
        self.dropout = nn.Dropout(dropout) if dropout else None
        self.ln_after = nn.LayerNorm(dim) if ln_after else None
        self.gate = nn.Linear(in_dim, 1) if use_gating else None
        if scaling == "learned":
            self.scaling = nn.Parameter(torch.ones(1))
        elif scaling == "channel":
            self.scaling = nn.Parameter(torch.ones(dim))
        else:
            self.register_buffer("scaling", torch.tensor(float(scaling)), persistent=False)
            self.unit_scaling = float(scaling) == 1.0   # x * 1.0 is x: the multiply is skipped (exact)
        self.init_weights = init_weights
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """AdapterHub's inits. They touch nn.Linear projections only; PHM layers keep their own init, except that
        the zero-output inits (mam, lora, zeros) zero the PHM up projection's output side too."""
        mode = self.init_weights
        linears = [m for m in (self.down, self.up) if isinstance(m, nn.Linear)]
        if mode == "bert":
            for lin in linears + ([self.gate] if self.gate is not None else []):
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
        elif mode == "houlsby":
            for lin in linears:
                nn.init.trunc_normal_(lin.weight, std=1e-2, a=-2e-2, b=2e-2)
                nn.init.zeros_(lin.bias)
        elif mode in ("mam", "mam_adapter", "lora", "zeros"):
            if isinstance(self.down, nn.Linear):
                if mode == "zeros":
                    nn.init.zeros_(self.down.weight)
                else:
                    nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
                nn.init.zeros_(self.down.bias)
            if isinstance(self.up, nn.Linear):
                nn.init.zeros_(self.up.weight)
                nn.init.zeros_(self.up.bias)
            else:
                self.up.zero_output()
            if self.gate is not None:
                nn.init.normal_(self.gate.weight, std=0.02)
                nn.init.zeros_(self.gate.bias)

    @classmethod
    def build(cls, options: BottleneckOptions, site: SiteContext, action: str) -> "BottleneckAdapter":
        mode = {"sublayer": "sublayer", "parallel": "branch"}.get(action, "insert")
        is_parallel = options.is_parallel if options.is_parallel is not None else action == "parallel"
        if mode == "insert":
            problem = _sequential_needs_sublayer(options) or ("is_parallel: true" if is_parallel else None)
            if problem:
                raise RewriteError(f"bottleneck option {problem} needs the model's residual add and norm around the "
                                   f"adapter: use action `sublayer` on role attention.residual_add/ffn.residual_add")
        elif mode == "branch":
            if not is_parallel or options.original_ln_before or not options.original_ln_after:
                raise RewriteError("action parallel is BnConfig's is_parallel with original_ln_after: true; for other "
                                   "flags use action `sublayer`")
        elif not is_parallel and options.residual_before_ln == "post_add" and not options.original_ln_before:
            raise RewriteError("residual_before_ln: post_add takes the residual after the model's add, which needs "
                               "original_ln_before: true")
        dim = site_width(site, action)
        in_dim = site.source_dim if mode == "branch" else dim
        size = _per_layer(options.bottleneck_size, site.layer, "bottleneck_size")
        if size is None:
            factor = _per_layer(options.reduction_factor, site.layer, "reduction_factor")
            size = max(1, int(dim // factor))
        residual = options.residual if options.residual is not None else mode != "branch"
        phm, rule = None, None
        if options.phm_layer:
            phm = options
            if options.shared_phm_rule:
                rule = _shared_phm_rule(site, options)
        try:
            return cls(dim, size, in_dim=in_dim, mode=mode, non_linearity=options.non_linearity,
                       init_weights=options.init_weights, residual=residual,
                       original_ln_before=options.original_ln_before, original_ln_after=options.original_ln_after,
                       residual_before_ln=options.residual_before_ln,
                       adapter_residual_before_ln=options.adapter_residual_before_ln, is_parallel=is_parallel,
                       scaling=options.scaling, dropout=options.dropout, stochastic_depth=options.stochastic_depth,
                       ln_before=options.ln_before, ln_after=options.ln_after, use_gating=options.use_gating,
                       phm=phm, phm_rule=rule)
        except ValueError as exc:
            raise RewriteError(f"bottleneck at {site.module}: {exc}") from None

    # ------------------------------------------------------------------------------------------------ forward

    def bottleneck(self, z: torch.Tensor) -> torch.Tensor:
        """s · A(z), after stochastic depth, dropout and the gate: what AdapterHub adds to the residual."""
        h = self.ln_before(z) if self.ln_before is not None else z
        out = self.up(self.act(self.down(h)))
        if self.drop_path is not None:
            out = self.drop_path(out)
        if not self.unit_scaling:
            out = out * self.scaling
        if self.dropout is not None:
            out = self.dropout(out)
        if self.gate is not None:
            out = out * torch.sigmoid(self.gate(z)).mean(dim=1, keepdim=True)
        return out

    def adapter(self, z: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """AdapterHub's Adapter.forward: the bottleneck, the residual and the adapter's own LN_after."""
        out = self.bottleneck(z)
        if residual is not None and self.adapter_residual_before_ln:
            out = out + residual
        if self.ln_after is not None:
            out = self.ln_after(out)
        if residual is not None and not self.adapter_residual_before_ln:
            out = out + residual
        return out

    def forward(self, hidden: torch.Tensor, residual_input: torch.Tensor | None = None, norm=None) -> torch.Tensor:
        if self.mode == "insert":
            if (self.unit_scaling and self.ln_before is None and self.drop_path is None and self.dropout is None
                    and self.gate is None and self.ln_after is None):
                # the plain adapter (Houlsby, Pfeiffer): adapter() and bottleneck() in one frame, the same ops
                out = self.up(self.act(self.down(hidden)))
                return out + hidden if self.residual else out
            return self.adapter(hidden, hidden if self.residual else None)
        if self.mode == "branch":
            return self.adapter(hidden, None)
        return self.sublayer(hidden, residual_input, norm)

    def sublayer(self, h: torch.Tensor, x: torch.Tensor, norm) -> torch.Tensor:
        """bottleneck_layer_forward(h, x, norm): pre_forward, the adapter, post_forward."""
        if self.is_parallel:
            out = self.adapter(x, None) + h
        else:
            residual = h
            z = h
            if self.original_ln_before:
                z = h + x
                if self.residual_before_ln == "post_add":
                    residual = z
                if norm is not None:
                    z = norm(z)
            if self.residual_before_ln is False:
                residual = z
            out = self.adapter(z, residual if self.residual else None)
        if self.original_ln_after:
            out = out + x
            if norm is not None:
                out = norm(out)
        return out


def _shared_phm_rule(site: SiteContext, options: BottleneckOptions) -> PHMRule | None:
    """The PHM rule this adapter set already holds (AdapterHub keeps one per adapter, for all its PHM layers)."""
    for module in (site.adapter.modules() if site.adapter is not None else ()):
        rule = getattr(module, "phm_rule", None)
        if isinstance(module, BottleneckAdapter) and isinstance(rule, PHMRule):
            if rule.n != options.phm_dim or rule.factorized != options.factorized_phm_rule:
                raise RewriteError(f"the adapter set already shares a PHM rule with phm_dim {rule.n} "
                                   f"(factorized: {rule.factorized}); every shared-rule PHM adapter must agree")
            return rule
    return None
