"""What every adapter module is told about its site, and the small protocols the rewrite stage calls."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class SiteContext:
    """Facts about one matched site that a module needs to build itself."""

    dim: int | None                    # last dimension of the value at the site (hidden size for most sites)
    layer: int | None
    role: str | None
    module: str                        # qualified name of the host module the site comes from
    num_layers: int
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    in_features: int | None = None     # wrap: the weight-bearing op's input and output sizes
    out_features: int | None = None
    weight: torch.Tensor | None = None  # wrap: the base weight in (out, in) layout (read-only; DoRA init)
    op_kind: str = "linear"             # wrap: "linear", "conv" or "embedding" (see surgery/modules/weight_ops.py)
    op_args: dict[str, Any] = field(default_factory=dict)   # wrap: conv stride/padding/dilation/groups/dims, ...
    bias: torch.Tensor | None = None    # wrap: the op's base bias (rows of the site), or None (read-only; BOFT)
    rows: Any = None  # wrap: the output rows of a packed weight the site covers, (start, stop) or Columns; None: all
    live_weight: Any = None   # wrap on Columns: a LiveRows reading `weight`'s rows from the parameter (weight is a copy)
    experts: int | None = None          # wrap: MoE experts stored as one 3-D parameter read by a grouped matmul:
    #                                     `weight` is then (experts, out, in) and the module adapts every expert
    host: nn.Module | None = None       # the host module at the site (replace/attend)
    source_dim: int | None = None       # parallel: last dimension of the span's input
    model: nn.Module | None = None
    shared: nn.ModuleDict | None = None  # one per rule: modules shared by all its sites (e.g. a prefix MLP)
    runtime: Any = None                  # the run-time state: `runtime.call` holds the root call's inputs
    adapter: nn.ModuleDict | None = None  # this adapter set's modules built so far: rule name -> site key -> module
    extra: dict[str, Any] = field(default_factory=dict)


class WeightAdapter(nn.Module):
    """A module that changes what a weight-bearing op computes (action `wrap`).

    Two realizations must agree: on activations (`adapt_input` before the op, `forward(x, y)` after it, x the
    op's input and y its output) and on the weight (`transform_weight`/`transform_bias`, in (out, in) layout),
    which is also what merging folds into the base.

    A module that sets `supports_experts` also adapts MoE experts stored as one 3-D parameter (`SiteContext.experts`):
    there it is realized on the weight only, and `transform_weight` receives (experts, out, in).
    """

    mergeable: bool = True
    adapts_input: bool = False   # True when adapt_input is not the identity
    op_kinds: tuple[str, ...] = ("linear",)   # weight-bearing op kinds it computes right (conv, embedding: opt in)
    activation_only: bool = False   # True when the adapted op is no op of the base kind (no weight path, no merge)
    supports_experts: bool = False  # True when it adapts a 3-D (experts, out, in) weight per expert
    # True when on activations it adds f(x) to the op's output or scales that output (LoRA, LoHa, IA3 on the output):
    # stacked with others at one op it then computes what their weights compose to (rewrite/actions.py)
    stacks_on_activations: bool = False

    def adapt_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # noqa: D401
        raise NotImplementedError

    def transform_weight(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def transform_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias


def is_weight_adapter_part(module: nn.Module) -> bool:
    """Whether `module` (a rule's `shared` dict) only holds state of the rule's weight adapters, such as VeRA's
    shared random projections: it then folds with them and is no rewrite of its own (merge, to_peft)."""
    if getattr(module, "weight_adapter_part", False):
        return True
    return isinstance(module, nn.ModuleDict) and len(module) > 0 and all(
        getattr(m, "weight_adapter_part", False) for m in module.values())
