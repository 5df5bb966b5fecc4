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
import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from surgery.errors import SurgeryError
from surgery.modules import columns as cols
from surgery.modules.base import WeightAdapter, is_weight_adapter_part
from surgery.rewrite.compose import Average, Block, Stack
from surgery.rewrite.host import WeightSite, attach_weight_site, store_of
from surgery.rewrite.sites import check_hosts, record_hosts
from surgery.rewrite.wrappers import unwrapping
from surgery.rewrite.trainable import settled

INVERSE_TOLERANCE = 1e-6
_PARAMETRIZED = re.compile(r"\.parametrizations\.([^.]+)\.original$")


@dataclass
class MergeReport:
    """What a merge did. Site names read `adapter/rule/site`."""

    merged: list[str] = field(default_factory=list)            # folded into the base weights
    not_merged: dict[str, str] = field(default_factory=dict)   # still in the forward, and why
    in_place: list[str] = field(default_factory=list)          # base parameters a `train` rule selected
    stored_bytes: int = 0                                      # kept to restore the base weights on unmerge

    def __str__(self) -> str:
        lines = [f"merged {len(self.merged)} weight site(s); kept {self.stored_bytes} bytes for unmerge"]
        lines += [f"merged: {site}" for site in self.merged[:20]]
        if len(self.merged) > 20:
            lines.append(f"merged: ... and {len(self.merged) - 20} more (MergeReport.merged lists every one)")
        lines += [f"not merged: {site}: {why}" for site, why in self.not_merged.items()]
        if self.in_place:
            lines.append(f"trained in place (already in the base): {len(self.in_place)} parameter(s): "
                         + ", ".join(self.in_place[:20]) + (" ..." if len(self.in_place) > 20 else ""))
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
    mode: str                        # "inverse", "residual", "copy" or "rows"
    kept: "torch.Tensor | _Residual | _RowsCopy | None"   # the copy, the residual or the rows
    adapter_state: dict | None       # the adapter's tensors when merged (for the inverse, and to fold again)


@dataclass
class _MergeState:
    sites: list[WeightSite]
    folded: list[_Folded]
    flags: list[tuple[nn.Parameter, bool]]
    group: tuple[str, ...] = ()      # adapters folded together under one Average (unmerged together)


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


class _Part:
    """The part of `param` the site covers (a row slice, or an index set of rows: q of BLOOM's interleaved
    query_key_value), in (out, in) layout for weights: `read()` a copy, `write()` into the parameter in place."""

    def __init__(self, param: torch.Tensor, site: WeightSite, is_bias: bool):
        self.tensor = param if is_bias or site.layout != "in_out" else param.transpose(-2, -1)   # experts: per expert
        self.rows = site.bias_rows if is_bias else site.rows
        self.dtype = param.dtype

    def read(self) -> torch.Tensor:
        return cols.take(self.tensor, self.rows).detach().clone()

    def write(self, value: torch.Tensor) -> None:
        cols.put_(self.tensor, self.rows, value)

    def write_rows(self, index: torch.Tensor, values: torch.Tensor) -> None:
        """Write `values` into rows `index` of the part (in place on the parameter for a whole tensor)."""
        if self.rows is None:
            self.tensor.index_copy_(0, index, values)
        else:
            self.write(self.read().index_copy_(0, index, values))


def _part(param: torch.Tensor, site: WeightSite, is_bias: bool) -> _Part:
    return _Part(param, site, is_bias)


def _names_by_param(model: nn.Module) -> dict[int, list[str]]:
    names = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        names[id(p)].append(name)
    return names


def _why_not(site: WeightSite, shared: dict[int, list[str]], sites: list[WeightSite] = ()) -> str | None:
    adapter = site.adapter
    if not site.attached:
        return "the site is detached"
    if not isinstance(adapter, WeightAdapter) or not adapter.mergeable:
        why = " (on a grouped conv it is no grouped kernel)" if getattr(adapter, "activation_only", False) else ""
        return f"{type(adapter).__name__} does not fold into a weight{why}"
    tensors = [site.weight_name] + ([site.bias_name] if site.bias_name else [])
    for tensor in tensors:
        param = _base_param(site.owner, tensor)
        if not param.is_floating_point():
            return f"{site.owner_path}.{tensor} is {param.dtype}, not a floating-point weight"
        names = shared.get(id(param), [])
        covered = {f"{s.owner_path}.{s.weight_name}" if s.owner_path else s.weight_name
                   for s in sites if s.adapter is site.adapter}
        if len(names) > 1 and not {_PARAMETRIZED.sub(r".\1", n) for n in names} <= covered:
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


@dataclass
class _RowsCopy:
    """The base values of the only rows a fold changed (an adapter's `covered_rows`)."""

    index: torch.Tensor
    values: torch.Tensor

    def nbytes(self) -> int:
        return self.index.numel() * self.index.element_size() + self.values.numel() * self.values.element_size()


def _run_inverse(inverse, merged: torch.Tensor) -> torch.Tensor:
    """The adapter's inverse of the fold; in float32 for a half-precision weight whose inverse has no kernel in
    that dtype (OFT's and BOFT's solve: torch has no LU for bfloat16/float16 on the CPU), so merge (and export,
    which merges) of a half-precision model works. What unmerge keeps is checked against the original either way."""
    try:
        return inverse(merged)
    except NotImplementedError:
        if merged.dtype not in (torch.float16, torch.bfloat16):
            raise
        restored = inverse(merged.float())
        return None if restored is None else restored.to(merged.dtype)


def _keep(orig: torch.Tensor, merged: torch.Tensor, inverse, exact: bool, rows=None) -> tuple[str, object]:
    """What restores `orig` from `merged`: the inverse alone, the inverse plus a residual, or a copy (of the
    covered `rows` only, when the adapter changes only those)."""
    if rows is not None:
        return "rows", _RowsCopy(rows.clone(), orig[rows].clone())
    restored = _run_inverse(inverse, merged) if inverse is not None else None
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
    orig = part.read()
    new = adapter.transform_bias(orig) if is_bias else adapter.transform_weight(orig)
    if new is orig:            # this adapter leaves the tensor as it is (LoRA's bias)
        return None
    part.write(new)
    try:
        inverse = getattr(adapter, "inverse_bias" if is_bias else "inverse_weight", None)
        rows = None if is_bias else getattr(adapter, "covered_rows", None)
        mode, kept = _keep(orig, part.read(), inverse, exact, rows)
    except BaseException:
        part.write(orig)
        raise
    return _Folded(site, is_bias, param, site.bias_rows if is_bias else site.rows, mode, kept, adapter_state)


def _unfold(folded: _Folded) -> None:
    site = folded.site
    part = _part(folded.param, site, folded.is_bias)
    if folded.mode == "copy":
        part.write(folded.kept)
        return
    if folded.mode == "rows":
        part.write_rows(folded.kept.index, folded.kept.values)
        return
    inverse = site.adapter.inverse_bias if folded.is_bias else site.adapter.inverse_weight
    with _adapter_values(site.adapter, folded.adapter_state):
        restored = _run_inverse(inverse, part.read())
    if folded.mode == "residual":
        residual = folded.kept
        restored = restored + residual.values.to(restored.dtype)
        restored = restored.contiguous()
        restored.view(-1)[residual.patch_index] = residual.patch_values
    part.write(restored)


def _refold(folded: _Folded) -> None:
    """Undo `_unfold` (a failed unmerge): fold the values that were merged into the restored base again."""
    site = folded.site
    part = _part(folded.param, site, folded.is_bias)
    base = part.read()
    with _adapter_values(site.adapter, folded.adapter_state):
        new = site.adapter.transform_bias(base) if folded.is_bias else site.adapter.transform_weight(base)
    part.write(new)


def _nbytes(kept) -> int:
    if kept is None:
        return 0
    return kept.nbytes() if isinstance(kept, (_Residual, _RowsCopy)) else kept.numel() * kept.element_size()


def _chosen(store, name: str | None) -> list[str]:
    if name is not None:
        if name not in store.records:
            raise SurgeryError(f"no adapter named {name!r}; adapters: {sorted(store.records)}")
        return [name]
    active = store.runtime.active
    return [n for n in store.records if active is None or n in active]


NOT_A_FOLD = {
    "BatchSplit": "it gives different batch rows different adapters, and one weight serves every row",
    "Split": "it gives different sequence positions different adapters, and one weight serves every position",
    "Parallel": "it runs the batch once per adapter, and one weight serves every copy",
    "Fuse": "AdapterFusion weighs the adapters' outputs by attention over each input, which no fixed weight computes",
}


def _fold_steps(block, names: list[str]) -> list[list[tuple[str, float]]]:
    """What the active configuration computes, as folds in order: each step is one adapter at full strength, or
    an Average's adapters with their weights, all computed from the weights entering that step. Refuses a block
    whose result is not a fold of the weights (SurgeryError, nothing changed)."""
    if block is None:
        return [[(n, 1.0)] for n in names]
    if isinstance(block, str):
        return [[(block, 1.0)]]
    if isinstance(block, Stack):
        return [step for child in block.children for step in _fold_steps(child, names)]
    if isinstance(block, Average):
        nested = [c for c in block.children if not isinstance(c, str)]
        if nested:
            raise SurgeryError(f"cannot merge under {block!r}: merge folds an Average of adapter names, and its "
                               f"child {nested[0]!r} is a {type(nested[0]).__name__} (nothing changed); activate "
                               f"a flat Average to merge")
        return [list(zip(block.children, block.weights))]
    reason = NOT_A_FOLD.get(type(block).__name__, "its result is not a fold of the weights")
    raise SurgeryError(f"cannot merge under {type(block).__name__}{tuple(block.names())}: {reason} (nothing "
                       f"changed); set_active one adapter, a Stack or an Average to merge it")


@unwrapping
def merge(model: nn.Module, name: str | None = None, *, exact: bool = True, strict: bool = False) -> MergeReport:
    """Fold the weight adapters of adapter set `name` (default: every active one) into the base weights.

    Without `name`, merge folds exactly what the active configuration computes: adapters active without a block
    or under a Stack are folded one after another at full strength (for additive deltas: their sum); an
    Average folds each adapter's contribution times its weight, all computed from the weights before it
    (LoRA: W + sum_i w_i ΔW_i). A block whose result is not a fold of the weights (BatchSplit, Split,
    Parallel, Fuse) is a SurgeryError saying why, and so is `name` when that adapter is active under a block
    other than Stack (it would be folded at full strength while the forward runs it weighted).

    Returns a report of what was folded, what stays in the forward and why, and how many bytes were kept for
    `unmerge`. With `strict=True` any rewrite that cannot fold is an error and nothing changes. On any failure
    the model is left as it was.
    """
    store = store_of(model)
    if store is None:
        raise SurgeryError("this model has no adapters to merge")
    check_hosts(model, store, "merge")
    with settled(store):   # inactive adapters' paused flags are not what merge records and restores
        return _merge(model, store, name, exact, strict)


def _merge(model: nn.Module, store, name: str | None, exact: bool, strict: bool) -> MergeReport:
    states = _states(store)
    names = _chosen(store, name)
    composition = store.runtime.composition
    if name is not None and isinstance(composition, Block) and not isinstance(composition, Stack) \
            and name in composition.names():
        raise SurgeryError(f"adapter {name!r} is active under {type(composition).__name__}"
                           f"{tuple(composition.names())}: merging it alone would fold it at full strength while "
                           f"the forward runs it combined (nothing changed); merge(model) folds the active "
                           f"configuration, or set_active(model, {name!r}) first")
    steps = _fold_steps(composition if name is None else None, names)
    already = [n for n in names if n in states]
    if name is not None and already:
        raise SurgeryError(f"adapter {name!r} is already merged; unmerge it first")
    for step in steps:
        if len(step) > 1 or step[0][1] != 1.0:
            merged_before = [n for n, _ in step if n in states]
            if merged_before:
                raise SurgeryError(f"adapter {merged_before[0]!r} of the active Average is already merged (at "
                                   f"full strength); unmerge it first (nothing changed)")
    steps = [[(n, w) for n, w in step if n not in states and n in store.records] for step in steps]
    seen: set[str] = set()
    for step in steps:
        if any(n in seen for n, _ in step):
            raise SurgeryError(f"adapter {next(n for n, _ in step if n in seen)!r} appears twice in the active "
                               f"composition; merge folds each adapter once (nothing changed)")
        seen.update(n for n, _ in step)
    steps = [step for step in steps if step]
    names = list(dict.fromkeys(n for step in steps for n, _ in step))
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
            why = _why_not(site, shared, record.weight_sites)
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
    _refuse_nf4(plan)
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
            for step in steps:
                group = tuple(n for n, _ in step) if len(step) > 1 or step[0][1] != 1.0 else ()
                for n, _ in step:
                    done[n] = _MergeState(sites=plan[n], folded=[], flags=[], group=group)
                if not group:
                    n = step[0][0]
                    for site in _once_per_tensor(plan[n]):
                        snapshot = {k: v.detach().clone() for k, v in site.adapter.state_dict().items()}
                        for is_bias in (False, True):
                            if is_bias and not site.bias_name:
                                continue
                            folded = _fold(site, is_bias, exact, snapshot)
                            if folded is not None:
                                done[n].folded.append(folded)
                else:
                    _fold_weighted(step, plan, done)
                for n, _ in step:
                    report.merged += [_site_name(n, site) for site in plan[n]]
                    for site in plan[n]:
                        for p in site.adapter.parameters():
                            done[n].flags.append((p, p.requires_grad))
                            p.requires_grad_(False)
    except BaseException as exc:   # Ctrl-C too
        with torch.no_grad():
            for state in reversed(list(done.values())):
                for folded in reversed(state.folded):
                    _unfold(folded)
                for p, flag in state.flags:
                    p.requires_grad_(flag)
            for site in detached:
                attach_weight_site(site)
        if not isinstance(exc, Exception):   # Ctrl-C: undone, and passed on as it is
            raise
        raise SurgeryError(f"merge failed, the model is unchanged: {type(exc).__name__}: {exc}") from exc
    states.update(done)
    report.stored_bytes = sum(_nbytes(f.kept) for s in done.values() for f in s.folded)
    return report


def _fold_weighted(step: list[tuple[str, float]], plan: dict, done: dict) -> None:
    """One Average: every adapter's contribution w·(T(W) - W), computed from the weights entering the step,
    then added. Unmerge restores a copy of the covered rows (the contribution of a non-additive adapter
    depends on the weights it was computed from)."""
    contributions = []
    for n, w in step:
        for site in _once_per_tensor(plan[n]):
            snapshot = {k: v.detach().clone() for k, v in site.adapter.state_dict().items()}
            for is_bias in (False, True):
                if is_bias and not site.bias_name:
                    continue
                param = _base_param(site.owner, site.bias_name if is_bias else site.weight_name)
                base = _part(param, site, is_bias).read()
                new = site.adapter.transform_bias(base) if is_bias else site.adapter.transform_weight(base)
                if new is base:
                    continue
                contributions.append((n, site, is_bias, param, (new - base) * w, snapshot))
    for n, site, is_bias, param, delta, snapshot in contributions:
        part = _part(param, site, is_bias)
        orig = part.read()
        part.write(orig + delta.to(part.dtype))
        done[n].folded.append(_Folded(site, is_bias, param, site.bias_rows if is_bias else site.rows, "copy",
                                      orig, snapshot))


def _once_per_tensor(sites: list[WeightSite]) -> list[WeightSite]:
    """One site per (adapter, weight tensor): a weight two modules share (an embedding and its tied LM head)
    has a site on each, both with the same adapter, and is folded once."""
    seen, out = set(), []
    for site in sites:
        key = (id(site.adapter), id(_base_param(site.owner, site.weight_name)))
        if key not in seen:
            seen.add(key)
            out.append(site)
    return out


def _refuse_nf4(plan: dict) -> None:
    """Merging into a 4-bit NF4 weight would round the merged weight to 4 bits again: refuse, naming the fix."""
    from surgery.quantize import is_nf4
    for n, sites in plan.items():
        for site in sites:
            for tensor in [site.weight_name] + ([site.bias_name] if site.bias_name else []):
                if is_nf4(_base_param(site.owner, tensor)):
                    raise SurgeryError(
                        f"cannot merge {n!r} into {site.owner_path}.{tensor}: it is an NF4 (4-bit) weight, and the "
                        f"merged weight would be rounded to 4 bits again (nothing changed). Call "
                        f"surgery.dequantize_nf4(model) first, then surgery.merge(model)")


@unwrapping
def unmerge(model: nn.Module, name: str | None = None) -> list[str]:
    """Restore the base weights a merge changed and attach its sites again. Returns the adapter names."""
    store = store_of(model)
    states = _states(store) if store is not None else {}
    if not states:
        raise SurgeryError("nothing is merged")
    check_hosts(model, store, "unmerge")      # a merged module replaced since: its base weights are not there
    with settled(store):
        names = _unmerge(store, states, name)
    record_hosts(model, store)                # the hosts carry their adapters again
    return names


def _unmerge(store, states: dict, name: str | None) -> list[str]:
    if name is not None and name not in states:
        raise SurgeryError(f"adapter {name!r} is not merged; merged: {sorted(states)}")
    names = [name] if name is not None else list(states)
    if name is not None and len(states[name].group) > 1:
        others = [n for n in states[name].group if n != name and n in states]
        if others:
            raise SurgeryError(f"adapter {name!r} was merged together with {others} under one Average; unmerge them "
                               f"together: surgery.unmerge(model)")
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
    except BaseException as exc:
        for site in reversed(attached):
            site.detach()
        with torch.no_grad():
            for folded in reversed(unfolded):
                _refold(folded)
        if not isinstance(exc, Exception):
            raise
        raise SurgeryError(f"unmerge failed, the model is unchanged (still merged): {type(exc).__name__}: "
                           f"{exc}") from exc
    for n in names:
        state = states.pop(n)
        for p, flag in state.flags:
            p.requires_grad_(flag)
    return names
