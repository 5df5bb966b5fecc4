"""Folding weight adapters into the base weights (merge) and taking them out again (unmerge).

`merge` turns every attached weight site of the chosen adapter sets into a plain base weight: it detaches the
site (its hooks or parametrization go away, so the forward, and the `torch.export` graph, are the base
model's) and writes `adapter.transform_weight(W)` into W.

**In place, into the shared tensors.** The fold writes into the model's own parameter tensors, the ones the
caller holds and every module that reads them sees, as PEFT's `merge_adapter` does; nothing is copied. A
weight that two modules share (GPT-2's LM head tied to its token embedding) is therefore not folded: that
would change the other module too. Such sites are reported, like every rewrite that cannot fold (bottleneck
adapters, prefixes: anything that is not a `WeightAdapter`); they stay in the forward.

**What unmerge needs, and its memory.** An adapter may define `inverse_weight(merged)` / `inverse_bias(merged)`
(LoRA and KronA subtract their delta, IA3 divides by its vector) returning the base from the merged tensor, or
None where it cannot. Floating-point rounding makes the inverse off by about one ulp, so with `exact=True`
(the default) merge also keeps the residual `W - inverse(merged)` where it is not zero, in bfloat16 (half the
memory of an fp32 copy of the covered rows; the residual is a rounding error of one or two ulps, which bfloat16
holds exactly except for a few tiny weights under a large delta, kept as an index/value patch; checked at
merge), or a full copy when more than 1% of the elements would need patching.
Unmerge then restores the base weights bit for bit. With `exact=False` nothing is kept for an invertible
adapter whose inverse is within 1e-6 of the base (checked at merge); anything else keeps a copy of the rows
it covers. `MergeReport.stored_bytes` says what was kept. The adapters' own parameters are small; merge keeps
a copy of them, so unmerge inverts with the values that were merged even if they changed since.

While merged, the adapters' parameters are frozen, and `disable`/`set_active` no longer switch the folded
adapters off (they are part of the base). `merge` followed by `surgery.remove` keeps the folded weights:
that is PEFT's `merge_and_unload`.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from surgery.errors import SurgeryError
from surgery.modules.base import WeightAdapter, is_weight_adapter_part
from surgery.rewrite.host import WeightSite, attach_weight_site, store_of

INVERSE_TOLERANCE = 1e-6


@dataclass
class MergeReport:
    """What a merge did. Site names read `adapter/rule/site`."""

    merged: list[str] = field(default_factory=list)            # folded into the base weights
    not_merged: dict[str, str] = field(default_factory=dict)   # still in the forward, and why
    in_place: list[str] = field(default_factory=list)          # base parameters a `train` rule selected
    stored_bytes: int = 0                                      # kept to restore the base weights on unmerge

    def __str__(self) -> str:
        lines = [f"merged {len(self.merged)} weight site(s); kept {self.stored_bytes} bytes for unmerge"]
        lines += [f"not merged: {site}: {why}" for site, why in self.not_merged.items()]
        if self.in_place:
            lines.append(f"trained in place (already in the base): {len(self.in_place)} parameter(s)")
        return "\n".join(lines)


@dataclass
class _Residual:
    """base = inverse(merged) + values, then the few elements at patch_index set to patch_values."""

    values: torch.Tensor
    patch_index: torch.Tensor
    patch_values: torch.Tensor

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.patch_index, self.patch_values))


@dataclass
class _Folded:
    """One weight (or bias) tensor part a site was folded into, and what restores it."""

    site: WeightSite
    is_bias: bool
    param: nn.Parameter
    rows: tuple[int, int] | None
    mode: str                        # "inverse", "residual" or "copy"
    kept: torch.Tensor | _Residual | None   # the copy or the residual
    adapter_state: dict | None       # the adapter's tensors when merged (for the inverse, and to fold again)


@dataclass
class _MergeState:
    sites: list[WeightSite]
    folded: list[_Folded]
    flags: list[tuple[nn.Parameter, bool]]


def _states(store) -> dict[str, _MergeState]:
    """Merge states per adapter name, kept on the store; states of adapters removed since are dropped."""
    states = store.__dict__.setdefault("merge_states", {})
    for name in [n for n in states if n not in store.records]:
        del states[name]
    return states


def _site_name(name: str, site: WeightSite) -> str:
    return f"{name}/{site.rule}/{site.key}"


def _base_param(owner: nn.Module, name: str) -> nn.Parameter:
    if parametrize.is_parametrized(owner, name):
        return owner.parametrizations[name].original
    return getattr(owner, name)


def _part(param: torch.Tensor, site: WeightSite, is_bias: bool) -> torch.Tensor:
    """The view of `param` the site covers, in (out, in) layout for weights; writes go to the parameter."""
    tensor = param if is_bias or site.layout != "in_out" else param.t()
    rows = site.bias_rows if is_bias else site.rows
    return tensor[rows[0]:rows[1]] if rows is not None else tensor


def _names_by_param(model: nn.Module) -> dict[int, list[str]]:
    names = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        names[id(p)].append(name)
    return names


def _why_not(site: WeightSite, shared: dict[int, list[str]]) -> str | None:
    adapter = site.adapter
    if not site.attached:
        return "the site is detached"
    if not isinstance(adapter, WeightAdapter) or not adapter.mergeable:
        return f"{type(adapter).__name__} does not fold into a weight"
    tensors = [site.weight_name] + ([site.bias_name] if site.bias_name else [])
    for tensor in tensors:
        param = _base_param(site.owner, tensor)
        if not param.is_floating_point():
            return f"{site.owner_path}.{tensor} is {param.dtype}, not a floating-point weight"
        names = shared.get(id(param), [])
        if len(names) > 1:
            return (f"{site.owner_path}.{tensor} is shared by {', '.join(names)}: folding it would change "
                    f"every module that reads it")
    return None


@contextlib.contextmanager
def _adapter_values(adapter: nn.Module, state: dict | None):
    """Run with the adapter holding `state` (its values at merge time), then put its current values back."""
    current = adapter.state_dict()
    if state is None or all(torch.equal(current[k], v) for k, v in state.items()):
        yield
        return
    saved = {k: v.detach().clone() for k, v in current.items()}
    with torch.no_grad():
        adapter.load_state_dict(state)
    try:
        yield
    finally:
        with torch.no_grad():
            adapter.load_state_dict(saved)


def _keep(orig: torch.Tensor, merged: torch.Tensor, inverse, exact: bool) -> tuple[str, object]:
    """What restores `orig` from `merged`: the inverse alone, the inverse plus a residual, or a copy."""
    restored = inverse(merged) if inverse is not None else None
    if restored is None:
        return "copy", orig
    if exact:
        residual = orig - restored
        if not residual.any():
            return "inverse", None
        compact = residual.to(torch.bfloat16) if orig.dtype in (torch.float32, torch.float64) else residual
        wrong = (restored + compact.to(orig.dtype) != orig).flatten().nonzero().flatten()
        if wrong.numel() <= orig.numel() // 100:   # a few tiny weights under a large delta: patch them
            return "residual", _Residual(compact, wrong, orig.flatten()[wrong].clone())
        return "copy", orig
    if orig.numel() == 0 or (restored - orig).abs().max() <= INVERSE_TOLERANCE:
        return "inverse", None
    return "copy", orig


def _fold(site: WeightSite, is_bias: bool, exact: bool, adapter_state: dict) -> _Folded | None:
    adapter = site.adapter
    param = _base_param(site.owner, site.bias_name if is_bias else site.weight_name)
    part = _part(param, site, is_bias)
    orig = part.detach().clone()
    new = adapter.transform_bias(orig) if is_bias else adapter.transform_weight(orig)
    if new is orig:            # this adapter leaves the tensor as it is (LoRA's bias)
        return None
    part.copy_(new)
    try:
        inverse = getattr(adapter, "inverse_bias" if is_bias else "inverse_weight", None)
        mode, kept = _keep(orig, part.detach().clone(), inverse, exact)
    except BaseException:
        part.copy_(orig)
        raise
    return _Folded(site, is_bias, param, site.bias_rows if is_bias else site.rows, mode, kept, adapter_state)


def _unfold(folded: _Folded) -> None:
    site = folded.site
    part = _part(folded.param, site, folded.is_bias)
    if folded.mode == "copy":
        part.copy_(folded.kept)
        return
    inverse = site.adapter.inverse_bias if folded.is_bias else site.adapter.inverse_weight
    with _adapter_values(site.adapter, folded.adapter_state):
        restored = inverse(part.detach().clone())
    if folded.mode == "residual":
        residual = folded.kept
        restored = restored + residual.values.to(restored.dtype)
        restored = restored.contiguous()
        restored.view(-1)[residual.patch_index] = residual.patch_values
    part.copy_(restored)


def _refold(folded: _Folded) -> None:
    """Undo `_unfold` (a failed unmerge): fold the values that were merged into the restored base again."""
    site = folded.site
    part = _part(folded.param, site, folded.is_bias)
    base = part.detach().clone()
    with _adapter_values(site.adapter, folded.adapter_state):
        new = site.adapter.transform_bias(base) if folded.is_bias else site.adapter.transform_weight(base)
    part.copy_(new)


def _nbytes(kept) -> int:
    if kept is None:
        return 0
    return kept.nbytes() if isinstance(kept, _Residual) else kept.numel() * kept.element_size()


def _chosen(store, name: str | None) -> list[str]:
    if name is not None:
        if name not in store.records:
            raise SurgeryError(f"no adapter named {name!r}; adapters: {sorted(store.records)}")
        return [name]
    active = store.runtime.active
    return [n for n in store.records if active is None or n in active]


def merge(model: nn.Module, name: str | None = None, *, exact: bool = True, strict: bool = False) -> MergeReport:
    """Fold the weight adapters of adapter set `name` (default: every active one) into the base weights.

    Returns a report of what was folded, what stays in the forward and why, and how many bytes were kept for
    `unmerge`. With `strict=True` any rewrite that cannot fold is an error and nothing changes. On any failure
    the model is left as it was.
    """
    store = store_of(model)
    if store is None:
        raise SurgeryError("this model has no adapters to merge")
    states = _states(store)
    names = _chosen(store, name)
    already = [n for n in names if n in states]
    if name is not None and already:
        raise SurgeryError(f"adapter {name!r} is already merged; unmerge it first")
    names = [n for n in names if n not in states]
    if not names:
        raise SurgeryError("every active adapter is already merged" if already else "no active adapter to merge")

    report = MergeReport()
    shared = _names_by_param(model)
    param_names = {id(p): n for n, p in model.named_parameters()}
    plan: dict[str, list[WeightSite]] = {}
    for n in names:
        record = store.records[n]
        plan[n] = []
        for site in record.weight_sites:
            why = _why_not(site, shared)
            if why is None:
                plan[n].append(site)
            else:
                report.not_merged[_site_name(n, site)] = why
        wrapped = {id(site.adapter) for site in record.weight_sites}
        for rule, modules in store.adapters[n].items():
            for key, module in modules.items():
                if id(module) not in wrapped and not is_weight_adapter_part(module):
                    report.not_merged[f"{n}/{rule}/{key}"] = (f"{type(module).__name__} is not a weight adapter: "
                                                             f"it stays in the forward")
        report.in_place += [param_names.get(id(p), "<unnamed>") for p in {id(p): p for p, _ in record.trained}.values()]
    if strict and report.not_merged:
        raise SurgeryError("these rewrites cannot be merged (strict=True, nothing changed):\n  " + "\n  ".join(
            f"{site}: {why}" for site, why in report.not_merged.items()))

    detached: list[WeightSite] = []
    done: dict[str, _MergeState] = {}
    try:
        with torch.no_grad():
            for n in names:
                for site in plan[n]:
                    site.detach()
                    detached.append(site)
            for n in names:
                state = _MergeState(sites=plan[n], folded=[], flags=[])
                done[n] = state
                for site in plan[n]:
                    snapshot = {k: v.detach().clone() for k, v in site.adapter.state_dict().items()}
                    for is_bias in (False, True):
                        if is_bias and not site.bias_name:
                            continue
                        folded = _fold(site, is_bias, exact, snapshot)
                        if folded is not None:
                            state.folded.append(folded)
                    report.merged.append(_site_name(n, site))
                for site in plan[n]:
                    for p in site.adapter.parameters():
                        state.flags.append((p, p.requires_grad))
                        p.requires_grad_(False)
    except Exception as exc:
        with torch.no_grad():
            for state in reversed(list(done.values())):
                for folded in reversed(state.folded):
                    _unfold(folded)
                for p, flag in state.flags:
                    p.requires_grad_(flag)
            for site in detached:
                attach_weight_site(site)
        raise SurgeryError(f"merge failed, the model is unchanged: {type(exc).__name__}: {exc}") from exc
    states.update(done)
    report.stored_bytes = sum(_nbytes(f.kept) for s in done.values() for f in s.folded)
    return report


def unmerge(model: nn.Module, name: str | None = None) -> list[str]:
    """Restore the base weights a merge changed and attach its sites again. Returns the adapter names."""
    store = store_of(model)
    states = _states(store) if store is not None else {}
    if not states:
        raise SurgeryError("nothing is merged")
    if name is not None and name not in states:
        raise SurgeryError(f"adapter {name!r} is not merged; merged: {sorted(states)}")
    names = [name] if name is not None else list(states)
    unfolded: list[_Folded] = []
    attached: list[WeightSite] = []
    try:
        with torch.no_grad():
            for n in reversed(names):
                for folded in reversed(states[n].folded):
                    _unfold(folded)
                    unfolded.append(folded)
        for n in names:
            for site in states[n].sites:
                attach_weight_site(site)
                attached.append(site)
    except Exception as exc:
        for site in reversed(attached):
            site.detach()
        with torch.no_grad():
            for folded in reversed(unfolded):
                _refold(folded)
        raise SurgeryError(f"unmerge failed, the model is unchanged (still merged): {type(exc).__name__}: "
                           f"{exc}") from exc
    for n in names:
        state = states.pop(n)
        for p, flag in state.flags:
            p.requires_grad_(flag)
    return names
