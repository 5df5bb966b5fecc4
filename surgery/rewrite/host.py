"""Realizing rewrites on the host model: hooks at module boundaries and parametrizations of weights.

The graph says *where*; this module finds, for each matched value, a module boundary that carries exactly that
value (a module's output, or a module's input when every use of the value lies inside that module), and hooks
there. Weight-bearing ops are adapted on activations when the op is its module's whole forward (nn.Linear,
Conv1D), and on the weight through `torch.nn.utils.parametrize` otherwise (nn.MultiheadAttention reads
`in_proj_weight` and `out_proj.weight` functionally). The host keeps its class, its forward signature,
generate() and the KV cache; `torch.export` of the host gives the rewritten graph.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from surgery.analyze.roles import Analysis, LinearInfo, op_name, stack_paths
from surgery.rewrite import compose
from surgery.errors import RewriteError
from surgery.trace.export import Boundary

STATE_ATTR = "surgery_adapters"


class RuntimeState:
    """What hooks read at run time: which adapters are active (and how they compose), and values captured
    earlier in this call."""

    def __init__(self):
        self.active: list[str] | None = None   # None: every adapter
        self.composition = None                 # a compose.Block, or None: active adapters stacked
        self.disabled = False
        self.slots: dict[str, torch.Tensor] = {}
        self.call: dict = {}                    # the root call's keyword inputs (attention_mask, ...)

    def on(self, name: str) -> bool:
        return not self.disabled and (self.active is None or name in self.active)


class Gate:
    """Whether adapter `name` runs now; hooks also read the composition through it."""

    def __init__(self, runtime: RuntimeState, name: str):
        self.runtime, self.name = runtime, name

    def __call__(self) -> bool:
        return self.runtime.on(self.name)


class Dispatcher:
    """The one hook at a module boundary (a side and a location): runs the active adapters' functions there,
    combined as the runtime's composition says."""

    def __init__(self, module: nn.Module, side: str, loc: tuple):
        self.entries: list[tuple[Gate, Callable]] = []
        self.fusions: list[tuple[Gate, Callable]] = []
        self.side, self.loc = side, loc
        if side == "out":
            self.handle = module.register_forward_hook(self._post)
        elif side == "in":
            self.handle = module.register_forward_pre_hook(self._pre, with_kwargs=True)
        else:   # "call": a weight-bearing module's output given its input
            self.handle = module.register_forward_hook(self._post)

    def run(self, value, args):
        live = [(g, fn) for g, fn in self.entries if g()]
        if not live:
            return value
        by_name: dict[str, list] = {}
        for g, fn in live:
            by_name.setdefault(g.name, []).append(fn)
        runtime = live[0][0].runtime
        fusions = {g.name: fn for g, fn in self.fusions if g()}
        return compose.run(runtime.composition, by_name, list(by_name), value, args, fusions)

    def _post(self, mod, args, out):
        return _set(out, self.loc, self.run(_get(out, self.loc), args))

    def _pre(self, mod, args, kwargs):
        kind, key = self.loc
        if kind == "arg":
            if key >= len(args):
                return None
            return args[:key] + (self.run(args[key], None),) + args[key + 1:], kwargs
        if key not in kwargs:
            return None
        return args, {**kwargs, key: self.run(kwargs[key], None)}


def dispatch(module: nn.Module, side: str, loc: tuple, gate: Gate, fn: Callable, *, fusion: bool = False
             ) -> Callable[[], None]:
    """Add fn(value, args) at a module boundary; return the undo."""
    table = module.__dict__.setdefault("_surgery_dispatch", {})
    key = (side, loc)
    if key not in table:
        table[key] = Dispatcher(module, side, loc)
    dispatcher = table[key]
    entry = (gate, fn)
    (dispatcher.fusions if fusion else dispatcher.entries).append(entry)

    def undo():
        for entries in (dispatcher.entries, dispatcher.fusions):
            if entry in entries:
                entries.remove(entry)
        if not dispatcher.entries and not dispatcher.fusions and table.get(key) is dispatcher:
            dispatcher.handle.remove()
            del table[key]
            if not table:
                module.__dict__.pop("_surgery_dispatch", None)
    return undo


class AdapterStore(nn.Module):
    """Holds every adapter module under `model.surgery_adapters[name][rule][site]`."""

    def __init__(self):
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.runtime = RuntimeState()
        self.records: dict[str, "Record"] = {}


@dataclass
class Record:
    """What one named adapter set changed, to undo it (remove, or a failed apply)."""

    name: str
    undo: list[Callable[[], None]] = field(default_factory=list)
    weight_sites: list["WeightSite"] = field(default_factory=list)
    trained: list[tuple[nn.Parameter, bool]] = field(default_factory=list)
    frozen: list[tuple[nn.Parameter, bool]] = field(default_factory=list)   # other adapters this one froze
    specs: list = field(default_factory=list)

    def rollback(self):
        while self.undo:
            self.undo.pop()()


@dataclass
class WeightSite:
    """A wrapped weight: where it lives, its layout and slice, and the adapter that transforms it."""

    rule: str
    key: str
    owner: nn.Module
    owner_path: str
    weight_name: str
    bias_name: str | None
    layout: str
    rows: tuple[int, int] | None
    bias_rows: tuple[int, int] | None
    adapter: nn.Module
    realized: str      # "activation" or "weight"
    packed: tuple[int, int] | None = None
    gate: Callable[[], bool] = lambda: True
    undo: list = field(default_factory=list)
    attached: bool = True

    def detach(self) -> None:
        while self.undo:
            self.undo.pop()()
        self.attached = False


def store_of(model: nn.Module, create: bool = False) -> AdapterStore | None:
    store = getattr(model, STATE_ATTR, None)
    if store is None and create:
        store = AdapterStore()
        model.add_module(STATE_ATTR, store)
    return store


# ---------------------------------------------------------------- locating values on module boundaries

def _inside(node: fx.Node, module: str) -> bool:
    return module in stack_paths(node)


def output_anchor(analysis: Analysis, value: fx.Node) -> Boundary | None:
    for b in analysis.boundaries(value):
        if b.side == "out" and analysis.calls(b.module) == 1:
            return b
    return None


def input_anchor(analysis: Analysis, value: fx.Node, users: list[fx.Node] | None = None) -> Boundary | None:
    """A module input carrying `value` such that every user (default: all users) lies inside that module."""
    users = list(value.users) if users is None else users
    for b in analysis.boundaries(value):
        if b.side == "in" and analysis.calls(b.module) == 1 and all(_inside(u, b.module) for u in users):
            others = [u for u in value.users if u not in users and _inside(u, b.module)]
            if not others:
                return b
    return None


TOKENWISE = {"view", "reshape", "_unsafe_view", "transpose", "permute", "contiguous", "clone", "alias"}


def _keeps_last_dim(node: fx.Node) -> bool:
    """A shape op that moves whole feature vectors around: a per-token module commutes with it."""
    op = op_name(node)
    src, out = node.args[0].meta.get("val"), node.meta.get("val")
    if src is None or out is None or src.shape[-1] != out.shape[-1]:
        return False
    if op == "transpose":
        dims = {d % src.dim() for d in node.args[1:3]}
        return src.dim() - 1 not in dims
    if op == "permute":
        return node.args[1][-1] % src.dim() == src.dim() - 1
    return True


def tokenwise_chain(value: fx.Node) -> list[fx.Node]:
    """`value` and the single-use shape ops after it that keep each feature vector whole."""
    chain = [value]
    while True:
        users = list(chain[-1].users)
        if len(users) != 1 or op_name(users[0]) not in TOKENWISE or not _keeps_last_dim(users[0]):
            return chain
        chain.append(users[0])


def value_anchor(analysis: Analysis, value: fx.Node) -> Boundary:
    """Where to change `value` for all its users. A per-token module may also act a few reshapes later."""
    anchor = None
    for candidate in tokenwise_chain(value):
        anchor = output_anchor(analysis, candidate) or input_anchor(analysis, candidate)
        if anchor is not None:
            break
    if anchor is None:
        raise RewriteError(
            f"the value of node {value.name} ({op_name(value)} in {stack_paths(value)[-1:] or ['<root>']}) is not "
            f"the input or output of any module, so it cannot be changed on the host model; match a nearby "
            f"module boundary instead (e.g. add `through: [dropout]` or choose the projection's output)")
    return anchor


def capture_anchor(analysis: Analysis, value: fx.Node) -> Boundary:
    """Any boundary that sees the value (read-only)."""
    for candidate in tokenwise_chain(value):
        for b in analysis.boundaries(candidate):
            if analysis.calls(b.module) == 1:
                return b
    raise RewriteError(f"the value of node {value.name} is not at any module boundary, so it cannot be read")


# ---------------------------------------------------------------- hooks

def _get(container, loc):
    kind = loc[0] if loc else None
    if kind is None:
        return container
    if kind == "item":
        return container[loc[1]]
    if kind == "key":
        return container[loc[1]]
    raise KeyError(loc)


def _set(container, loc, value):
    kind = loc[0] if loc else None
    if kind is None:
        return value
    if kind == "item":
        items = list(container)
        items[loc[1]] = value
        return type(container)(items) if type(container) is tuple else tuple(items)
    if kind == "key":
        container[loc[1]] = value
        return container
    raise KeyError(loc)


def hook_value(model: nn.Module, anchor: Boundary, fn: Callable[[torch.Tensor], torch.Tensor],
               gate: Gate) -> Callable[[], None]:
    """Replace the value at `anchor` by fn(value) while the adapter is active; return the undo."""
    return dispatch(model.get_submodule(anchor.module), anchor.side, anchor.loc, gate, lambda v, args: fn(v))


def hook_capture(model: nn.Module, anchor: Boundary, slots: dict, key: str) -> Callable[[], None]:
    module = model.get_submodule(anchor.module)
    if anchor.side == "out":
        def post(mod, args, out):
            slots[key] = _get(out, anchor.loc)
        handle = module.register_forward_hook(post)
    else:
        kind, k = anchor.loc

        def pre(mod, args, kwargs):
            if kind == "arg" and k < len(args):
                slots[key] = args[k]
            elif kind == "kwarg" and k in kwargs:
                slots[key] = kwargs[k]
        handle = module.register_forward_pre_hook(pre, with_kwargs=True)
    return handle.remove


# ---------------------------------------------------------------- weights

class _WeightParam(nn.Module):
    """A parametrization W -> adapter.transform(W) on the (rows of the) weight, in the weight's own layout."""

    def __init__(self, site: WeightSite, gate: Callable[[], bool], bias: bool):
        super().__init__()
        self.site = [site]   # a list, so the adapter is not registered twice as a submodule
        self.gate = gate
        self.bias = bias

    def forward(self, tensor):
        site = self.site[0]
        if not self.gate():
            return tensor
        return transformed(site, tensor, bias=self.bias)


def transformed(site: WeightSite, tensor: torch.Tensor, *, bias: bool) -> torch.Tensor:
    """Apply the adapter's weight (or bias) transform to the part of `tensor` the site covers."""
    rows = site.bias_rows if bias else site.rows
    transform = site.adapter.transform_bias if bias else site.adapter.transform_weight
    if not bias and site.layout == "in_out":
        tensor = tensor.t()
    if rows is None:
        out = transform(tensor)
    else:
        a, b = rows
        out = torch.cat([tensor[:a], transform(tensor[a:b]), tensor[b:]], dim=0)
    if not bias and site.layout == "in_out":
        out = out.t()
    return out


def wrap_weight(model: nn.Module, analysis: Analysis, info: LinearInfo, packed: tuple[int, int] | None,
                adapter: nn.Module, rule: str, key: str, gate: Callable[[], bool], realize: str) -> WeightSite:
    """Decide how a weight-bearing op is adapted and attach it. The site can be detached and attached again
    (merge/unmerge) with `attach_weight_site` and `site.detach()`."""
    owner_path = info.owner
    owner = model.get_submodule(owner_path)
    weight_name = info.weight.rpartition(".")[2]
    bias_name = info.bias.rpartition(".")[2] if info.bias and info.bias.rpartition(".")[0] == owner_path else None
    rows = info.rows or packed
    bias_rows = info.bias_rows or packed
    whole_module = (info.rows is None and analysis.calls(owner_path) == 1 and any(
        b.module == owner_path and b.side == "out" and b.loc == () for b in analysis.boundaries(info.value)))
    if whole_module and info.kind == "conv":   # the module's input is the conv's (no padding_mode other than zeros)
        whole_module = any(b.module == owner_path and b.side == "in" and b.loc == ("arg", 0)
                           for b in analysis.boundaries(info.x))
    mode = realize if realize != "auto" else ("activation" if whole_module else "weight")
    if mode == "weight" and getattr(adapter, "activation_only", False):
        raise RewriteError(f"{owner_path}: {type(adapter).__name__} here is not an op of the base kind (e.g. LoRA on "
                           f"a grouped conv), so it needs the activation path, which this op does not allow")
    if mode == "activation" and not whole_module:
        raise RewriteError(f"{owner_path}: the op reads its weight without calling the module, so it can only be "
                           f"adapted on the weight (realize: weight)")
    if mode == "weight" and isinstance(getattr(adapter, "dropout", None), nn.Dropout) and adapter.dropout.p > 0:
        raise RewriteError(f"{owner_path}: dropout on the adapter's input needs the activation path, "
                           f"which this op does not allow; set dropout: 0")
    site = WeightSite(rule, key, owner, owner_path, weight_name, bias_name, info.layout, rows, bias_rows, adapter,
                      mode, packed=packed, gate=gate)
    attach_weight_site(site)
    return site


def attach_weight_site(site: WeightSite) -> None:
    """Realize the adapter of a weight site on the host (hooks or parametrizations); record how to detach."""
    owner, adapter, gate, packed = site.owner, site.adapter, site.gate, site.packed
    undo = []
    if site.realized == "activation":
        if adapter.adapts_input:
            undo.append(dispatch(owner, "in", ("arg", 0), gate, lambda x, args: adapter.adapt_input(x)))

        def post(out, args):
            if packed is None:
                return adapter(args[0], out)
            a, b = packed
            part = adapter(args[0], out[..., a:b])
            return out + F.pad(part - out[..., a:b], (a, out.shape[-1] - b))
        undo.append(dispatch(owner, "out", (), gate, post))
    else:
        names = [(site.weight_name, False)] + ([(site.bias_name, True)] if site.bias_name else [])
        for name, is_bias in names:
            parametrize.register_parametrization(owner, name, _WeightParam(site, gate, is_bias), unsafe=True)
        undo.append(lambda: _remove_parametrizations(owner, [n for n, _ in names], site))
    site.undo = undo
    site.attached = True


def _remove_parametrizations(owner: nn.Module, names: list[str], site: WeightSite):
    for name in names:
        plist = owner.parametrizations[name]
        keep = [p for p in plist if not (isinstance(p, _WeightParam) and p.site[0] is site)]
        parametrize.remove_parametrizations(owner, name, leave_parametrized=False)
        for p in keep:
            parametrize.register_parametrization(owner, name, p, unsafe=True)


def cache_length(values) -> int:
    """How many positions a KV cache among `values` already holds (0: no cache, or an empty one).

    Recognized by what it is, whatever the argument is called (`past_key_values` through transformers 5.23,
    `cache` from 5.24): an object with `get_seq_length()` (transformers' `Cache`, `EncoderDecoderCache`), or the
    legacy tuple of per-layer (key, value) tensors [batch, heads, positions, head_dim]."""
    for value in values:
        length = getattr(value, "get_seq_length", None)
        if callable(length) and not isinstance(value, torch.Tensor):
            try:
                return int(length())
            except Exception:  # noqa: BLE001 - a cache that cannot say its length is treated as empty
                return 0
        if isinstance(value, (tuple, list)) and value and all(
                isinstance(layer, (tuple, list)) and len(layer) >= 2
                and all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in layer[:2]) for layer in value):
            return int(value[0][0].shape[-2])
    return 0


def _bound_call(signature, args: tuple, kwargs: dict) -> dict:
    """The root call's inputs by the forward's parameter names (positional ones included)."""
    if signature is None:
        return dict(kwargs)
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError:
        return dict(kwargs)
    named = {}
    for name, value in bound.arguments.items():
        if signature.parameters[name].kind is signature.parameters[name].VAR_KEYWORD:
            named.update(value)
        elif signature.parameters[name].kind is not signature.parameters[name].VAR_POSITIONAL:
            named[name] = value
    return named


def install_call_capture(model: nn.Module, runtime: RuntimeState) -> Callable[[], None]:
    """Record the root call's inputs (attention mask, whether a KV cache already holds positions) for
    modules that depend on them (prompts, interventions at token positions)."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        signature = None

    def capture(mod, args, kwargs):
        if isinstance(runtime.composition, compose.Parallel) and not runtime.disabled:
            copies = len(runtime.composition.children)
            args = tuple(_replicate(a, copies) for a in args)
            kwargs = {k: _replicate(v, copies) for k, v in kwargs.items()}
        named = _bound_call(signature, args, kwargs)
        mask = named.get("attention_mask")
        call = {"attention_mask": mask if isinstance(mask, torch.Tensor) else None}
        call["cache_length"] = cache_length(named.values())
        call["cached"] = call["cache_length"] > 0
        first = args[0] if args else named.get("input_ids", named.get("inputs_embeds"))
        call["input"] = first if isinstance(first, torch.Tensor) else None
        runtime.call = call
        runtime.slots.clear()
        return args, kwargs

    handle = model.register_forward_pre_hook(capture, with_kwargs=True, prepend=True)
    return handle.remove


def _replicate(value, copies: int):
    """Parallel composition: the batch repeated once per adapter (tensors with a batch dimension only)."""
    return torch.cat([value] * copies, dim=0) if isinstance(value, torch.Tensor) and value.dim() >= 1 else value
