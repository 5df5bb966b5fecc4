"""Sparse fine-tuning (diff pruning, FISH masks): a fixed sparse delta W + scatter(idx, values).

The index set is chosen once, when the adapter is built: the k entries of largest |W| (`magnitude`), k entries
at random (`random`, seeded per site), or the k entries of largest squared gradient accumulated over
calibration batches the user passes to `surgery.apply(..., calibration=...)` (`gradient`, as FISH masks do).
Only the k values train; the adapter's state is the k values plus their k flat indices.

On MoE experts stored as one 3-D parameter, the indices run over all experts × out × in entries of it, viewed as
(experts, out, in): `k`/`density` count that whole tensor, and magnitude picks the largest entries across experts.
"""
from __future__ import annotations

import math
import zlib
from typing import Any, Iterable, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from surgery.errors import RewriteError
from surgery.progress import progress, stage
from surgery.modules.base import SiteContext, WeightAdapter
from surgery.modules.registry import Options, register
from surgery.modules.options import SparseOptions  # noqa: F401  (defined without torch: spec validation)


def site_seed(seed: int, site: SiteContext) -> int:
    """A seed that differs per site but is the same every time the same spec is applied to the same model."""
    return zlib.crc32(f"{seed}:{site.module}:{site.role}:{site.out_features}x{site.in_features}".encode())


@register
class SparseDelta(WeightAdapter):
    Options = SparseOptions
    stacks_on_activations = True     # adds f(x) to the op's output
    supports_experts = True

    def __init__(self, out_features: int, in_features: int, indices: torch.Tensor, experts: int | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.shape = (experts, out_features, in_features) if experts else (out_features, in_features)
        self.register_buffer("indices", indices.to(torch.long).sort().values)
        self.values = nn.Parameter(torch.zeros(indices.numel()))

    @classmethod
    def build(cls, options: SparseOptions, site: SiteContext, action: str) -> "SparseDelta":
        size = site.out_features * site.in_features * (site.experts or 1)
        k = options.k if options.k is not None else max(1, round(options.density * size))
        if k > size:
            raise RewriteError(f"{site.module}: sparse k={k} exceeds the weight's {size} entries")
        if options.select == "random":
            g = torch.Generator().manual_seed(site_seed(options.seed, site))
            indices = torch.randperm(size, generator=g)[:k]
        else:
            score = _weight_magnitude(site) if options.select == "magnitude" else _calibration_score(site)
            indices = torch.topk(score.reshape(-1).float().cpu(), k).indices
        return cls(site.out_features, site.in_features, indices, experts=site.experts)

    def reset_parameters(self):
        nn.init.zeros_(self.values)

    def delta_weight(self) -> torch.Tensor:
        flat = torch.zeros(math.prod(self.shape), dtype=self.values.dtype, device=self.values.device)
        return flat.index_put((self.indices,), self.values).view(self.shape)

    def forward(self, x, y):
        if len(self.shape) != 2:
            raise RewriteError("sparse deltas on experts stored as one 3-D parameter are realized on the weight only")
        # y[..., row] += value · x[..., col] for each of the k entries: O(tokens · k), no dense delta
        rows, cols = self.indices // self.in_features, self.indices % self.in_features
        return y.index_add(-1, rows, x[..., cols] * self.values.to(x.dtype))

    def transform_weight(self, weight):
        return weight.reshape(-1).index_put((self.indices,), self.values.to(weight.dtype),
                                            accumulate=True).view_as(weight)

    def inverse_weight(self, merged):
        """The base weight from a merged one (unmerge)."""
        return merged.reshape(-1).index_put((self.indices,), -self.values.to(merged.dtype),
                                            accumulate=True).view_as(merged)


def _weight_magnitude(site: SiteContext) -> torch.Tensor:
    if site.weight is None:
        raise RewriteError(f"{site.module}: select: magnitude needs the op's weight as a model parameter")
    if site.weight.is_meta:
        raise RewriteError(f"{site.module}: select: magnitude reads the weight's values, and this model is on the "
                           f"meta device: apply this spec after loading the weights, or use select: random")
    return site.weight.detach().abs()


def _calibration_score(site: SiteContext) -> torch.Tensor:
    """The accumulated squared gradient of the site's weight; one calibration pass per apply call."""
    calibration = site.extra.get("calibration")
    if calibration is None:
        raise RewriteError("select: gradient needs calibration data: surgery.apply(model, spec, calibration=batches)"
                           ", batches whose outputs carry a loss, or a callable model -> iterable of losses")
    if site.weight is None:
        raise RewriteError(f"{site.module}: select: gradient needs the op's weight as a model parameter")
    cache = site.extra.setdefault("apply_cache", {})   # one per apply call: one calibration pass for all sites
    if "squared_gradients" not in cache:
        cache["squared_gradients"] = accumulated_squared_gradients(site.model, calibration)
    base = site.weight._base if site.weight._base is not None else site.weight
    grads = cache["squared_gradients"].get(id(base))
    if grads is None or not base.is_contiguous():
        raise RewriteError(f"{site.module}: the calibration pass gave no gradient for this weight")
    # the site's weight may be a transpose or a row slice of the parameter: read the same view of its gradient
    return grads.as_strided(site.weight.shape, site.weight.stride(),
                            site.weight.storage_offset() - base.storage_offset())


def accumulated_squared_gradients(model: nn.Module, calibration: Any) -> dict[int, torch.Tensor]:
    """Σ over calibration batches of (∂loss/∂p)² for every dense floating parameter p of the base model, keyed
    by id(p). Adapters already in the model are off; requires_grad flags and .grad are left as they were."""
    from surgery.rewrite.host import store_of   # an earlier stage; imported late to keep module import light

    params = [p for name, p in model.named_parameters() if not name.startswith("surgery_adapters.")
              and p.is_floating_point() and type(p.detach()) is torch.Tensor]
    totals = [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in params]
    flags = [p.requires_grad for p in params]
    store = store_of(model)
    disabled = store.runtime.disabled if store is not None else None
    try:
        if store is not None:
            store.runtime.disabled = True
        for p in params:
            p.requires_grad_(True)
        count = 0
        with stage("calibration pass for gradient-selected sparse masks"):
            for loss in _losses(model, calibration):
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for total, grad in zip(totals, grads):
                    if grad is not None:
                        total.add_(grad.detach().contiguous() ** 2)
                count += 1
        if count == 0:
            raise RewriteError("the calibration data gave no batch")
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        if store is not None:
            store.runtime.disabled = disabled
    return {id(p): total for p, total in zip(params, totals)}


def _losses(model: nn.Module, calibration: Any) -> Iterable[torch.Tensor]:
    """Scalar losses from calibration data: a callable model -> losses, or batches the model takes (a dict of
    keyword inputs, a tuple of positional inputs, or one tensor) whose output is a scalar or carries `loss`."""
    if callable(calibration):
        yield from calibration(model)
        return
    for batch in progress(calibration, "calibration"):
        if isinstance(batch, dict):
            out = model(**batch)
        elif isinstance(batch, (tuple, list)):
            out = model(*batch)
        else:
            out = model(batch)
        yield _loss_of(out)


def _loss_of(out: Any) -> torch.Tensor:
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, dict):
        loss = out.get("loss")
    if loss is None and isinstance(out, torch.Tensor) and out.dim() == 0:
        loss = out
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise RewriteError("a calibration batch's output has no scalar loss: pass batches with labels (so the "
                           "output has `.loss`), or calibration=callable(model) yielding scalar losses")
    return loss

