"""Realizing rewrites on the host model: hooks at module boundaries and parametrizations of weights.

The graph says *where*; this module finds, for each matched value, a module boundary that carries exactly that
value (a module's output, or a module's input when every use of the value lies inside that module), and hooks
there. Weight-bearing ops are adapted on activations when the op is its module's whole forward (nn.Linear,
Conv1D), and on the weight through `torch.nn.utils.parametrize` otherwise (nn.MultiheadAttention reads
`in_proj_weight` and `out_proj.weight` functionally). The host keeps its class, its forward signature,
generate() and the KV cache; `torch.export` of the host gives the rewritten graph.
"""
from __future__ import annotations

import functools
import inspect
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from surgery.analyze.roles import Analysis, LinearInfo, op_name, stack_entries, stack_paths
from surgery.rewrite import compose, mixed
from surgery.rewrite.torchcalls import forward_line, torch_call_site, torch_fn_key
from surgery.rewrite.experts import attach_grouped, grouped_functions, grouped_index
from surgery.errors import RewriteError
from surgery.modules import columns as cols
from surgery.modules.columns import Columns
from surgery.trace.export import Boundary, NeedsStackTraces

STATE_ATTR = "surgery_adapters"


class RuntimeState:
    """What hooks read at run time: which adapters are active (and how they compose), and values captured
    earlier in this call."""

    def __init__(self):
        self.active: list[str] | None = None   # None: every adapter
        self.composition = None                 # a compose.Block, or None: active adapters stacked
        self.disabled = False
        # hooks and modules reading this thread's per-call state (call, slots, calls; need_call): while there are
        # none (Houlsby, LoRA, ...) and no composition splits the batch, the root hook captures nothing
        self.readers = 0
        self.on_change = None   # called when readers or the composition change (the root hook follows them)
        # what one call captures is per thread: one model may run in several threads at once
        self._local = threading.local()

    def __setattr__(self, name, value):
        object.__setattr__(self, name, value)
        if name == "composition":
            self._changed()

    def _changed(self) -> None:
        on_change = self.__dict__.get("on_change")
        if on_change is not None:
            on_change()

    @property
    def slots(self) -> dict[str, torch.Tensor]:
        """Values captured earlier in this thread's current call, by slot name."""
        slots = getattr(self._local, "slots", None)
        if slots is None:
            slots = self._local.slots = {}
        return slots

    @property
    def call(self) -> dict:
        """This thread's root call's inputs (attention_mask, whether a KV cache holds positions, ...)."""
        call = getattr(self._local, "call", None)
        if call is None:
            call = self._local.call = {}
        return call

    @call.setter
    def call(self, value: dict) -> None:
        self._local.call = value

    @property
    def modes(self) -> dict[int, list]:
        """This thread's torch-function modes entered by functional intercepts, per intercept site."""
        modes = getattr(self._local, "modes", None)
        if modes is None:
            modes = self._local.modes = {}
        return modes

    @property
    def calls(self) -> dict[int, int]:
        """This thread's count of each repeated module's calls so far in the current root call (by id)."""
        calls = getattr(self._local, "calls", None)
        if calls is None:
            calls = self._local.calls = {}
        return calls

    def __getstate__(self):   # a copy (deepcopy, pickle) starts with no call in flight
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    def on(self, name: str) -> bool:
        return not self.disabled and (self.active is None or name in self.active)

    def need_call(self) -> Callable[[], None]:
        """Declare a reader of the per-call state (`call`, `slots`, `calls`): from the next root forward on, the
        root hook records each call's inputs and clears what the previous call left, until the returned undo
        (idempotent) runs. A reader that does not declare itself would see an earlier call's state."""
        self.readers += 1
        if self.readers == 1:
            self._changed()
        return functools.partial(_release_call, self, [True])


def _release_call(runtime: RuntimeState, live: list) -> None:
    if live[0]:
        live[0] = False
        runtime.readers -= 1
        if not runtime.readers:
            runtime._changed()


class Gate:
    """Whether adapter `name` runs now; hooks also read the composition through it."""

    def __init__(self, runtime: RuntimeState, name: str):
        self.runtime, self.name = runtime, name

    def __call__(self) -> bool:
        runtime = self.runtime     # RuntimeState.on, inlined: this runs at every hooked call
        return not runtime.disabled and (runtime.active is None or self.name in runtime.active)


class CallGate(Gate):
    """A Gate on only during one call of a module called several times per forward (ALBERT's shared layer: an
    attention adapter of depth k runs in the k-th call, not in every call). Needs `count_calls(module)`."""

    def __init__(self, runtime: RuntimeState, name: str, module: nn.Module, call: int):
        super().__init__(runtime, name)
        self.module, self.call = module, call      # (a deep copy of the model maps it to the copy's module)

    def __call__(self) -> bool:
        return super().__call__() and self.runtime.calls.get(id(self.module), 0) - 1 == self.call


class Dispatcher:
    """The one hook at a module boundary (a side and a location): runs the active adapters' functions there,
    combined as the runtime's composition says."""

    def __init__(self, module: nn.Module, side: str, loc: tuple, call: int | None = None,
                 runtime: RuntimeState | None = None):
        self.entries: list[tuple[Gate, Callable]] = []
        self.fusions: list[tuple[Gate, Callable]] = []
        self.side, self.loc = side, loc
        self.call, self.runtime = call, runtime    # one call of a module called several times per forward
        if side == "out":
            self.handle = module.register_forward_hook(self._post)
        elif side == "in":
            self.handle = module.register_forward_pre_hook(self._pre, with_kwargs=True)
        else:   # "call": a weight-bearing module's output given its input
            self.handle = module.register_forward_hook(self._post)

    def run(self, value, args, module=None):
        if self.call is not None and self.runtime.calls.get(id(module), 0) - 1 != self.call:
            return value
        if len(self.entries) == 1 and not self.fusions:   # one adapter here, nothing to compose: call it
            gate, fn = self.entries[0]
            if not gate():
                return value
            composition = gate.runtime.composition
            if composition is None or (isinstance(composition, str) and composition == gate.name):
                return fn(value, args)
        live = [(g, fn) for g, fn in self.entries if g()]
        if not live:
            return value
        by_name: dict[str, list] = {}
        for g, fn in live:
            by_name.setdefault(g.name, []).append(fn)
        runtime = live[0][0].runtime
        fusions = {g.name: fn for g, fn in self.fusions if g()}
        return compose.run(mixed.composition(runtime), by_name, list(by_name), value, args, fusions)

    def _post(self, mod, args, out):
        if not self.loc:     # the output itself
            return self.run(out, args, mod)
        return _set(out, self.loc, self.run(_get(out, self.loc), args, mod))

    def _pre(self, mod, args, kwargs):
        kind, key = self.loc
        if kind == "arg":
            if key >= len(args):
                return None
            return args[:key] + (self.run(args[key], None, mod),) + args[key + 1:], kwargs
        if key not in kwargs:
            return None
        return args, {**kwargs, key: self.run(kwargs[key], None, mod)}


def _count_call(runtime: RuntimeState, module, args, kwargs):
    runtime.calls[id(module)] = runtime.calls.get(id(module), 0) + 1


def count_calls(module: nn.Module, runtime: RuntimeState) -> Callable[[], None]:
    """Count a repeated module's calls within each root forward (reference-counted; the root hook resets the
    counts); return the undo."""
    entry = module.__dict__.get("_surgery_counter")
    if entry is None:
        handle = module.register_forward_pre_hook(functools.partial(_count_call, runtime), with_kwargs=True,
                                                  prepend=True)
        entry = module.__dict__["_surgery_counter"] = [handle, 0, runtime.need_call()]
    entry[1] += 1
    return functools.partial(_uncount_calls, module, entry)


def _uncount_calls(module: nn.Module, entry: list) -> None:
    entry[1] -= 1
    if entry[1] == 0 and module.__dict__.get("_surgery_counter") is entry:
        entry[0].remove()
        entry[2]()
        del module.__dict__["_surgery_counter"]


def dispatch(module: nn.Module, side: str, loc: tuple, gate: Gate, fn: Callable, *, fusion: bool = False,
             call: int | None = None) -> Callable[[], None]:
    """Add fn(value, args) at a module boundary (of one call of a repeated module when `call` is given);
    return the undo."""
    table = module.__dict__.setdefault("_surgery_dispatch", {})
    key = (side, loc) if call is None else (side, loc, call)
    if key not in table:
        table[key] = Dispatcher(module, side, loc, call, gate.runtime)
    dispatcher = table[key]
    entry = (gate, fn)
    (dispatcher.fusions if fusion else dispatcher.entries).append(entry)
    uncount = count_calls(module, gate.runtime) if call is not None else None
    # undos and hook functions are partials of module-level functions (no closures), so a deepcopy of the model
    # rebinds them to the copy's modules and the model pickles
    return functools.partial(_undo_dispatch, module, key, dispatcher, entry, uncount)


def _undo_dispatch(module: nn.Module, key: tuple, dispatcher: Dispatcher, entry: tuple, uncount=None) -> None:
    if uncount is not None:
        uncount()
    table = module.__dict__.get("_surgery_dispatch", {})
    for entries in (dispatcher.entries, dispatcher.fusions):
        if entry in entries:
            entries.remove(entry)
    if not dispatcher.entries and not dispatcher.fusions and table.get(key) is dispatcher:
        dispatcher.handle.remove()
        del table[key]
        if not table:
            module.__dict__.pop("_surgery_dispatch", None)


class AdapterStore(nn.Module):
    """Holds every adapter module under `model.surgery_adapters[name][rule][site]`."""

    def __init__(self):
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.runtime = RuntimeState()
        self.records: dict[str, "Record"] = {}

    def forward(self, x):
        """The identity: a root that calls every child in order (an nn.Sequential model) passes through the store,
        which its adapters' hooks and modules act from, not as a step of the model."""
        return x


@dataclass
class Record:
    """What one named adapter set changed, to undo it (remove, or a failed apply)."""

    name: str
    undo: list[Callable[[], None]] = field(default_factory=list)
    weight_sites: list["WeightSite"] = field(default_factory=list)
    trained: list[tuple[nn.Parameter, bool]] = field(default_factory=list)
    frozen: list[tuple[nn.Parameter, bool]] = field(default_factory=list)   # other adapters this one froze
    specs: list = field(default_factory=list)
    fusion: dict | None = None    # an AdapterFusion's set (add_fusion): {adapters: [...], dropout}

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
    rows: tuple[int, int] | Columns | None     # the output rows covered (surgery/modules/columns.py); None: all
    bias_rows: tuple[int, int] | Columns | None
    adapter: nn.Module
    realized: str      # "activation" or "weight"
    packed: tuple[int, int] | Columns | None = None   # output columns of the op's result the site covers
    gate: Callable[[], bool] = lambda: True
    call: int | None = None     # one call of a module called several times per forward
    routed: tuple | None = None  # a projection nn.MultiheadAttention reads functionally, on activations (mha.py)
    grouped: tuple | None = None  # realized "grouped": (which grouped matmul of its module, the functions it is
    #                               called as) (MoE experts, surgery/rewrite/experts.py)
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

def _inside(node: fx.Node, module: str, call: int = 0) -> bool:
    """Whether the node runs inside that call of the module."""
    return (module, call) in stack_entries(node)


def output_anchor(analysis: Analysis, value: fx.Node) -> Boundary | None:
    for b in analysis.boundaries(value):
        if b.side == "out":
            return b
    return None


def input_anchor(analysis: Analysis, value: fx.Node, users: list[fx.Node] | None = None) -> Boundary | None:
    """A module input carrying `value` such that every user (default: all users) lies inside that call of the
    module."""
    users = list(value.users) if users is None else users
    for b in analysis.boundaries(value):
        if b.side == "in" and all(_inside(u, b.module, b.call) for u in users):
            others = [u for u in value.users if u not in users and _inside(u, b.module, b.call)]
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
        anchor = _functional_anchor(analysis, value)
    if anchor is None:
        raise RewriteError(
            f"the value of node {value.name} ({op_name(value)} in {stack_paths(value)[-1:] or ['<root>']}) is not "
            f"the input or output of any module, nor the whole result of a torch-level call in a module's forward "
            f"that surgery can intercept ({', '.join(sorted(INTERCEPTABLE))}, or a call torch.export recorded with "
            f"its forward's source line), so it cannot be changed on the host model")
    return anchor


def capture_anchor(analysis: Analysis, value: fx.Node):
    """Any boundary that sees the value (read-only), else the functional call producing it."""
    for candidate in tokenwise_chain(value):
        for b in analysis.boundaries(candidate):
            return b
    anchor = _functional_anchor(analysis, value)
    if anchor is None:
        raise RewriteError(f"the value of node {value.name} is not at any module boundary, so it cannot be read")
    return anchor


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


def hook_value(model: nn.Module, anchor, fn: Callable[[torch.Tensor], torch.Tensor],
               gate: Gate) -> Callable[[], None]:
    """Replace the value at `anchor` (a module boundary, or a functional call) by fn(value) while the adapter is
    active; return the undo."""
    if isinstance(anchor, FunctionalAnchor):
        return intercept_call(model, anchor, gate, fn)
    return dispatch(model.get_submodule(anchor.module), anchor.side, anchor.loc, gate,
                    functools.partial(_value_only, fn), call=anchor.call if anchor.calls > 1 else None)


def _value_only(fn: Callable, value, args):
    return fn(value)


def hook_capture(model: nn.Module, anchor, runtime: RuntimeState, key: str) -> Callable[[], None]:
    """Store the value at `anchor` in this thread's `runtime.slots[key]` whenever the module runs (that call of
    it, for a module called several times)."""
    if isinstance(anchor, FunctionalAnchor):
        undo = intercept_call(model, anchor, None, functools.partial(_store, runtime, key))
        return functools.partial(_run_both, undo, runtime.need_call())
    module = model.get_submodule(anchor.module)
    if anchor.calls > 1:
        undo = dispatch(module, anchor.side, anchor.loc, _Always(runtime),
                        functools.partial(_store_value, runtime, key), call=anchor.call)
    elif anchor.side == "out":
        undo = module.register_forward_hook(functools.partial(_capture_out, runtime, key, anchor.loc)).remove
    else:
        undo = module.register_forward_pre_hook(functools.partial(_capture_in, runtime, key, anchor.loc),
                                                with_kwargs=True).remove
    # the slot is read later in the same call: each root call starts with none
    return functools.partial(_run_both, undo, runtime.need_call())


def _run_both(first: Callable[[], None], second: Callable[[], None]) -> None:
    first()
    second()


class _Always:
    """A gate that is always on: captures read values whatever is active."""

    def __init__(self, runtime: RuntimeState):
        self.runtime, self.name = runtime, "__capture__"

    def __call__(self) -> bool:
        return True


def _store(runtime: RuntimeState, key: str, value):
    runtime.slots[key] = value
    return value


def _store_value(runtime: RuntimeState, key: str, value, args):
    return _store(runtime, key, value)


# ---------------------------------------------------------------- values made by functional calls

INTERCEPTABLE = {"dropout"}      # aten ops whose producing torch functions can be intercepted (_FUNCTIONS)
_FUNCTIONS = {"dropout": (F.dropout, torch.dropout)}


@dataclass(frozen=True)
class FunctionalAnchor:
    """The `index`-th call (0-based, in call order) of an interceptable function during one call of `module`:
    a value no module boundary carries (OPT's, BART's and Whisper's `F.dropout` on the residual branch).

    With `where` (a source file and line), `op` is the torch-level function as torch.export records it in a
    node's `torch_fn` meta (e.g. "method_descriptor.add" for `a + b`), and the index counts that function's
    calls made from that line of the innermost `forward` on the stack during the module's call: an elementwise
    op in a forward, such as the sum of a parallel block's attention and MLP outputs (GPT-J, GPT-NeoX, Phi) or
    a DiT's gated FFN output."""

    module: str
    call: int
    calls: int
    op: str
    index: int
    where: tuple[str, int] | None = None
    shape: tuple | None = None      # (dims, last dim) of the traced value, checked at run time


def torch_call_anchor(value: fx.Node) -> FunctionalAnchor | None:
    """The torch-level call in a module's forward producing `value` (see surgery/rewrite/torchcalls.py)."""
    site = torch_call_site(value)
    return FunctionalAnchor(**site) if site is not None else None


def _functional_anchor(analysis: Analysis, value: fx.Node) -> FunctionalAnchor | None:
    """functional_anchor; NeedsStackTraces where it would read source lines the graph was traced without."""
    if op_name(value) not in INTERCEPTABLE and not analysis.traced.stack_traces:
        raise NeedsStackTraces(value.name)
    return functional_anchor(value)


def functional_anchor(value: fx.Node) -> FunctionalAnchor | None:
    op = op_name(value)
    if op not in INTERCEPTABLE:
        return torch_call_anchor(value)
    entries = stack_entries(value)
    if not entries:
        return None
    module, call = entries[-1]
    in_call = [n for n in value.graph.nodes if n.op == "call_function" and op_name(n) == op
               and (module, call) in stack_entries(n)]
    calls = 1 + max((c for n in value.graph.nodes for m, c in stack_entries(n) if m == module), default=0)
    return FunctionalAnchor(module, call, calls, op, in_call.index(value))


class _CallMode(torch.overrides.TorchFunctionMode):
    """While one call of a module runs: the n-th call of an intercepted function has its result replaced."""

    def __init__(self, site: "_InterceptSite"):
        super().__init__()
        self.site, self.count = site, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.site.matches(func) and not getattr(_ADAPTER_DEPTH, "depth", 0):
            # the host's own calls only: an adapter's dropout (inside a hook during this forward) is not counted
            index, self.count = self.count, self.count + 1
            expected = self.site.shapes.get(index)
            if expected is not None and (not isinstance(out, torch.Tensor) or
                                         (out.dim(), out.shape[-1] if out.dim() else None) != expected):
                raise RewriteError(f"the {index}-th call of {self.site.op} at {self.site.where[0]}:"
                                   f"{self.site.where[1]} gives {tuple(getattr(out, 'shape', ()))}, not the traced "
                                   f"value's {expected} (dims, width): the model runs other code than when traced")
            runtime = self.site.runtime
            block = None if runtime.disabled else mixed.composition(runtime)
            pending: dict[str, list] = {}     # adapters' functions: combined as the composition says, as at a hook
            for gate, fn in list(self.site.entries.get(index, ())):
                if gate is not None and not gate():
                    continue
                if gate is None or block is None:     # captures (in order), or adapters stacked
                    out = _run_pending(block, pending, out)
                    out = fn(out)
                else:
                    pending.setdefault(gate.name, []).append(functools.partial(_value_only, fn))
            out = _run_pending(block, pending, out)
        return out


def _run_pending(block, pending: dict, value):
    if not pending:
        return value
    out = compose.run(block, pending, list(pending), value, None, {})
    pending.clear()
    return out


_ADAPTER_DEPTH = threading.local()   # per thread: how many adapter modules are running (their calls are not the host's)


class HostCode:
    """Host code an adapter calls back (the model's own attention function an attention adapter runs with its
    keys added) runs as the host's: functional intercepts count its calls, as the trace did. Only `first` of
    the calls through one instance counts (LLaMA-Adapter attends twice, a mixed batch once per group of rows:
    the host's one call is the first; the others are the adapter's own, as an adapter module's calls are)."""

    __slots__ = ("counted",)

    def __init__(self):
        self.counted = False

    def __call__(self, fn, *args, **kwargs):
        if self.counted:
            return fn(*args, **kwargs)
        self.counted = True
        depth = getattr(_ADAPTER_DEPTH, "depth", 0)
        _ADAPTER_DEPTH.depth = 0
        try:
            return fn(*args, **kwargs)
        finally:
            _ADAPTER_DEPTH.depth = depth


def _enter_adapter(module, args):
    _ADAPTER_DEPTH.depth = getattr(_ADAPTER_DEPTH, "depth", 0) + 1


def _leave_adapter(module, args, out):
    _ADAPTER_DEPTH.depth = max(0, getattr(_ADAPTER_DEPTH, "depth", 0) - 1)


def mark_adapters(model: nn.Module, store: "AdapterStore") -> None:
    """Where the host's functional calls are intercepted, mark every adapter module's calls (hooks counting the
    depth), so the interception skips what adapters run; other models get no such hooks."""
    if not any("_surgery_intercepts" in m.__dict__ for m in model.modules()):
        return
    for module in store.adapters.modules():
        if isinstance(module, nn.ModuleDict) or "_surgery_marked" in module.__dict__:
            continue
        module.__dict__["_surgery_marked"] = True
        module.register_forward_pre_hook(_enter_adapter)
        module.register_forward_hook(_leave_adapter, always_call=True)


class _InterceptSite:
    """The intercepts of one (module, call): a mode entered by a pre-hook and left by an always-called hook, so
    only that module's forward is affected (per thread: the modes live in the runtime's thread state)."""

    def __init__(self, module: nn.Module, anchor: FunctionalAnchor, runtime: RuntimeState):
        self.functions = _FUNCTIONS.get(anchor.op, ())
        self.op, self.where, self.name = anchor.op, anchor.where, anchor.op.rpartition(".")[2]
        self.shapes: dict[int, tuple] = {}
        self.entries: dict[int, list] = {}
        self.call = anchor.call if anchor.calls > 1 else None
        self.runtime = runtime
        self.handles = [module.register_forward_pre_hook(self._enter),
                        module.register_forward_hook(self._exit, always_call=True)]

    def _modes(self) -> list:
        return self.runtime.modes.setdefault(id(self), [])

    def matches(self, func) -> bool:
        if self.where is None:
            return func in self.functions
        if getattr(func, "__name__", None) != self.name or torch_fn_key(func) != self.op:
            return False
        if torch.compiler.is_compiling():
            raise RewriteError(f"{self.op} at {self.where[0]}:{self.where[1]} is intercepted by its source line, "
                               f"which torch.compile cannot trace; run this model eagerly (or compile its submodules)")
        return forward_line() == self.where

    def _enter(self, module, args):
        if self.call is not None and self.runtime.calls.get(id(module), 0) - 1 != self.call:
            self._modes().append(None)
            return
        mode = _CallMode(self)
        mode.__enter__()
        self._modes().append(mode)

    def _exit(self, module, args, out):
        modes = self._modes()
        mode = modes.pop() if modes else None
        if mode is not None:
            mode.__exit__(None, None, None)


def intercept_call(model: nn.Module, anchor: FunctionalAnchor, gate, fn) -> Callable[[], None]:
    """Replace the result of the anchor's functional call by fn(result) while `gate` is on (always when None);
    return the undo."""
    module = model.get_submodule(anchor.module)
    runtime = store_of(model, create=True).runtime
    table = module.__dict__.setdefault("_surgery_intercepts", {})
    key = (anchor.op, anchor.call) if anchor.where is None else (anchor.op, anchor.where, anchor.call)
    uncount = count_calls(module, runtime) if anchor.calls > 1 else None
    if key not in table:
        table[key] = _InterceptSite(module, anchor, runtime)
    site = table[key]
    entry = (gate, fn)
    site.entries.setdefault(anchor.index, []).append(entry)
    if anchor.shape is not None:
        site.shapes[anchor.index] = anchor.shape
    return functools.partial(_undo_intercept, module, key, site, anchor.index, entry, uncount)


def _undo_intercept(module, key, site, index, entry, uncount) -> None:
    if uncount is not None:
        uncount()
    table = module.__dict__.get("_surgery_intercepts", {})
    entries = site.entries.get(index, [])
    if entry in entries:
        entries.remove(entry)
    if not any(site.entries.values()) and table.get(key) is site:
        for handle in site.handles:
            handle.remove()
        del table[key]
        if not table:
            module.__dict__.pop("_surgery_intercepts", None)


def _capture_out(runtime: RuntimeState, key: str, loc: tuple, mod, args, out):
    runtime.slots[key] = _get(out, loc)


def _capture_in(runtime: RuntimeState, key: str, loc: tuple, mod, args, kwargs):
    kind, k = loc
    if kind == "arg" and k < len(args):
        runtime.slots[key] = args[k]
    elif kind == "kwarg" and k in kwargs:
        runtime.slots[key] = kwargs[k]


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
        runtime = getattr(self.gate, "runtime", None)
        weight = compose.average_weight(runtime.composition, self.gate.name) if runtime is not None else None
        if weight is None:
            return transformed(site, tensor, bias=self.bias)
        # under a flat Average: this adapter's contribution, from the base weight, times its weight
        base = site.owner.parametrizations[site.bias_name if self.bias else site.weight_name].original
        return tensor + weight * (transformed(site, base, bias=self.bias) - base)


def transformed(site: WeightSite, tensor: torch.Tensor, *, bias: bool) -> torch.Tensor:
    """Apply the adapter's weight (or bias) transform to the part of `tensor` the site covers."""
    rows = site.bias_rows if bias else site.rows
    transform = site.adapter.transform_bias if bias else site.adapter.transform_weight
    if not bias and site.layout == "in_out":
        tensor = tensor.transpose(-2, -1)   # MoE experts (experts, in, out): per expert
    if rows is None:
        out = transform(tensor)
    else:   # a slice or an index set of the output rows (q, k or v of a packed projection)
        out = cols.put(tensor, rows, transform(cols.take(tensor, rows)))
    if not bias and site.layout == "in_out":
        out = out.transpose(-2, -1)
    return out.to(tensor.dtype)   # a float32 adapter on a half-precision weight computes in float32


def wrap_weight(model: nn.Module, analysis: Analysis, info: LinearInfo, packed: tuple[int, int] | Columns | None,
                adapter: nn.Module, rule: str, key: str, gate: Callable[[], bool], realize: str) -> WeightSite:
    """Decide how a weight-bearing op is adapted and attach it. The site can be detached and attached again
    (merge/unmerge) with `attach_weight_site` and `site.detach()`."""
    owner_path = info.owner
    owner = model.get_submodule(owner_path)
    weight_name = info.weight.rpartition(".")[2]
    bias_name = info.bias.rpartition(".")[2] if info.bias and info.bias.rpartition(".")[0] == owner_path else None
    rows = info.rows or packed
    bias_rows = info.bias_rows or packed
    out_bounds = [b for b in analysis.boundaries(info.value) if b.module == owner_path and b.side == "out"
                  and b.loc == ()]
    whole_module = info.rows is None and bool(out_bounds)
    # a module called several times (ALBERT's shared layer) is one site per call: hooks of that call only
    call = out_bounds[0].call if out_bounds and out_bounds[0].calls > 1 else None
    if info.experts:
        # the model's own grouped matmul reads the parameter: the adapter is realized on it (W + ΔW per expert),
        # or, when it needs the op's input (dropout) or activation is asked for, on the grouped matmul's result
        dropout = isinstance(getattr(adapter, "dropout", None), nn.Dropout) and adapter.dropout.p > 0
        mode = "grouped" if realize == "activation" or (realize == "auto" and dropout) else "weight"
        if mode == "weight" and dropout:
            raise RewriteError(f"{owner_path}: dropout on the adapter's input needs the activation path; set dropout: "
                               f"0 or realize: auto")
        if mode == "grouped" and not callable(getattr(adapter, "grouped", None)):
            raise RewriteError(f"{owner_path}: its {info.experts} experts are one 3-D parameter ({info.weight}) read "
                               f"by a grouped matmul; {type(adapter).__name__} adapts them on the weight only "
                               f"(realize: weight or auto, and no dropout)")
        if analysis.calls(owner_path) > 1:
            raise RewriteError(f"{owner_path} is called {analysis.calls(owner_path)} times per forward (a shared "
                               f"layer); adapters of its experts would act on every call")
        grouped = (grouped_index(analysis, info), grouped_functions(info)) if mode == "grouped" else None
        site = WeightSite(rule, key, owner, owner_path, weight_name, None, info.layout, None, None, adapter, mode,
                          gate=gate, grouped=grouped)
        attach_weight_site(site)
        return site
    if whole_module and info.kind == "conv":   # the module's input is the conv's (no padding_mode other than zeros)
        whole_module = any(b.module == owner_path and b.side == "in" and b.loc == ("arg", 0)
                           for b in analysis.boundaries(info.x))
    mode = realize if realize != "auto" else ("activation" if whole_module else "weight")
    dropout = getattr(adapter, "dropout", None)
    # what a weight parametrization cannot express: dropout on the adapter's input, a gate read from it
    needs_input = getattr(adapter, "activation_only", False) or isinstance(getattr(adapter, "gate", None), nn.Module) \
        or (isinstance(dropout, nn.Dropout) and dropout.p > 0)
    routed = None
    if not whole_module and (mode == "activation" or needs_input):
        from surgery.rewrite import mha
        routed = mha.routing(model, owner_path, weight_name, rows)
        if routed is not None and analysis.calls(owner_path) <= 1:
            mode = "activation"
    if mode == "weight" and getattr(adapter, "activation_only", False):
        raise RewriteError(f"{owner_path}: {type(adapter).__name__} here is not an op of the base kind (e.g. LoRA on "
                           f"a grouped conv), so it needs the activation path, which this op does not allow")
    if mode == "activation" and not whole_module and routed is None:
        raise RewriteError(f"{owner_path}: the op reads its weight without calling the module, so it can only be "
                           f"adapted on the weight (realize: weight)")
    if mode == "weight" and isinstance(getattr(adapter, "dropout", None), nn.Dropout) and adapter.dropout.p > 0:
        raise RewriteError(f"{owner_path}: dropout on the adapter's input needs the activation path, "
                           f"which this op does not allow; set dropout: 0")
    if mode == "weight" and isinstance(getattr(adapter, "gate", None), nn.Module):
        raise RewriteError(f"{owner_path}: a gated adapter (use_gating) reads its gate from the op's input, which "
                           f"needs the activation path, which this op does not allow")
    if mode == "weight" and analysis.calls(owner_path) > 1:
        raise RewriteError(f"{owner_path} is called {analysis.calls(owner_path)} times per forward (a shared layer); "
                           f"a per-call adapter needs the activation path, which this op does not allow")
    site = WeightSite(rule, key, owner, owner_path, weight_name, bias_name, info.layout, rows, bias_rows, adapter,
                      mode, packed=packed, gate=gate, call=call, routed=routed if mode == "activation" else None)
    attach_weight_site(site)
    return site


def attach_weight_site(site: WeightSite) -> None:
    """Realize the adapter of a weight site on the host (hooks or parametrizations); record how to detach."""
    owner, adapter, gate, packed = site.owner, site.adapter, site.gate, site.packed
    undo = []
    if site.realized == "grouped":   # MoE experts: after the model's own grouped matmul (surgery/rewrite/experts.py)
        undo.append(attach_grouped(owner, *site.grouped, gate, adapter))
    elif site.realized == "activation" and site.routed is not None:
        from surgery.rewrite import mha
        if adapter.adapts_input:
            raise RewriteError(f"{site.owner_path}: {type(adapter).__name__} changes the op's input, which "
                               f"nn.MultiheadAttention's functional projection does not allow")
        undo.append(mha.attach(site))
    elif site.realized == "activation":
        if adapter.adapts_input:
            undo.append(dispatch(owner, "in", ("arg", 0), gate, functools.partial(_adapt_input, adapter),
                                 call=site.call))
        undo.append(dispatch(owner, "out", (), gate, functools.partial(_adapt_call, adapter, packed), call=site.call))
    else:
        names = [(site.weight_name, False)] + ([(site.bias_name, True)] if site.bias_name else [])
        _own_class(owner)
        for name, is_bias in names:
            parametrize.register_parametrization(owner, name, _WeightParam(site, gate, is_bias), unsafe=True)
        undo.append(functools.partial(_remove_parametrizations, owner, [n for n, _ in names], site))
        undo.extend(_keep_parameter_names(owner, [n for n, _ in names]))
    site.undo = undo
    site.attached = True


def _adapt_input(adapter: nn.Module, x, args):
    return adapter.adapt_input(x).to(x.dtype)


def _adapt_call(adapter: nn.Module, packed, out, args):
    if packed is None:
        return adapter(args[0], out)
    if isinstance(packed, cols.Columns):   # columns interleaved head by head: written back by index, k/v untouched
        return cols.put(out, packed, adapter(args[0], cols.take(out, packed, -1)), -1)
    a, b = packed
    part = adapter(args[0], out[..., a:b])
    return out + F.pad(part - out[..., a:b], (a, out.shape[-1] - b))


def _own_class(owner: nn.Module) -> None:
    """Give a parametrized module a parametrized class of its own. torch keeps the parametrized properties on a
    class made for the module, and a deepcopy shares that class with the original: adding or removing a
    parametrization on one would change the other."""
    if not parametrize.is_parametrized(owner):
        return
    cls = type(owner)
    owner.__class__ = type(cls.__name__, cls.__bases__,
                           {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")})
def _keep_parameter_names(owner: nn.Module, names: list[str]) -> list[Callable[[], None]]:
    """torch's parametrize moves `owner.<name>` to `owner.parametrizations.<name>.original`. Keep the base's
    names in `state_dict()` (so `save_pretrained`, `load_state_dict` and a base checkpoint round-trip): the
    state dict says `<prefix><name>`, and loading maps `<prefix><name>` back to the original. Both hooks do
    nothing while the tensor is not parametrized, and several sites on one weight rename it once. The hooks
    are partials of module-level functions (no closures), as every other hook here."""
    return [owner.register_state_dict_post_hook(functools.partial(_save_base_names, list(names))).remove,
            owner.register_load_state_dict_pre_hook(functools.partial(_load_base_names, list(names))).remove]


def _save_base_names(names: list[str], module, state_dict, prefix, local_metadata) -> None:
    for name in names:
        key = f"{prefix}parametrizations.{name}.original"
        if key in state_dict and f"{prefix}{name}" not in state_dict:
            state_dict[f"{prefix}{name}"] = state_dict.pop(key)


def _load_base_names(names: list[str], module, state_dict, prefix, *rest) -> None:
    for name in names:
        key = f"{prefix}{name}"
        if key in state_dict and parametrize.is_parametrized(module, name):
            state_dict.setdefault(f"{prefix}parametrizations.{name}.original", state_dict.pop(key))


def _remove_parametrizations(owner: nn.Module, names: list[str], site: WeightSite):
    _own_class(owner)
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
    legacy tuple of per-layer (key, value) tensors [batch, heads, positions, head_dim]. A recurrent cache holding
    a state counts 1 (see `cache_state`)."""
    return cache_state(values)[0]


def cache_state(values) -> tuple[int, bool]:
    """(cache_length, whether that length counts the positions): a recurrent (state-space) cache holds a
    state, not positions, so its 1 only says that this is a decoding step."""
    for value in values:
        length = getattr(value, "get_seq_length", None)
        if callable(length) and not isinstance(value, torch.Tensor):
            try:
                seen = int(length())
            except Exception:  # noqa: BLE001 - a cache that cannot say its length is treated as empty
                seen = 0
            if not seen:
                # a hybrid model's cache (MiniMax): layer 0 may hold no positions (linear attention, a state)
                # while the attention layers do; the length is the longest layer's
                try:
                    seen = max((int(length(i)) for i in range(len(value.layers))), default=0)
                except Exception:  # noqa: BLE001 - no per-layer length: the overall one stands
                    seen = 0
            previous = getattr(value, "has_previous_state", None)
            if not seen and callable(previous):
                # a recurrent (state-space) cache holds a state, not positions: a state means a decode step
                try:
                    return int(bool(previous())), False
                except Exception:  # noqa: BLE001 - asked per layer, or not at all: no state known
                    return 0, True
            return seen, True
        if isinstance(value, (tuple, list)) and value and all(
                isinstance(layer, (tuple, list)) and len(layer) >= 2
                and all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in layer[:2]) for layer in value):
            return int(value[0][0].shape[-2]), True
    return 0, True


def _positional(signature) -> tuple[str, ...]:
    """The names of the forward's leading parameters that a positional argument binds to."""
    names = []
    for name, parameter in (signature.parameters.items() if signature is not None else ()):
        if parameter.kind not in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            break
        names.append(name)
    return tuple(names)


def _bound_call(signature, args: tuple, kwargs: dict, positional: tuple[str, ...] | None = None) -> dict:
    """The root call's inputs by the forward's parameter names (positional ones included). `positional`:
    _positional(signature), when the caller has it already."""
    if signature is None:
        return dict(kwargs)
    if not kwargs:   # the common call, model(ids): the leading positional parameters, without binding
        if positional is None:
            positional = _positional(signature)
        if len(args) <= len(positional):
            return dict(zip(positional, args))
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


def _capture_call(runtime: RuntimeState, signature, positional: tuple[str, ...], mod, args, kwargs):
    """Record the root call's inputs (attention mask, whether a KV cache already holds positions) for this
    thread, for the modules that depend on them (prompts, interventions at token positions), and clear what the
    previous call left; under a Parallel composition, replicate the inputs. Called by the root pre-hook
    (rewrite/sites.py) while something reads the call: thread-local state is reached directly, not through
    RuntimeState's properties."""
    if isinstance(runtime.composition, compose.Parallel) and not runtime.disabled:
        copies = len(runtime.composition.children)
        if any(cache_state([v])[0] or callable(getattr(v, "get_seq_length", None))
               for v in (*args, *kwargs.values())):
            raise RewriteError(f"Parallel replicates the batch inside the model ({copies} x batch output rows), "
                               f"which a KV cache passed in (generate()) cannot follow; generate with each adapter "
                               f"active alone (set_active(name)), or call the model without a cache")
        args = tuple(_replicate(a, copies) for a in args)
        kwargs = {k: _replicate(v, copies) for k, v in kwargs.items()}
    named = _bound_call(signature, args, kwargs, positional)
    mask = named.get("attention_mask")
    # a tensor, or transformers' masks per layer type ({"full_attention": [batch, 1, q, k], ...}, generate()
    # with a static cache): modules reading positions (ReFT) recognize the padding from either
    call = {"attention_mask": mask if isinstance(mask, (torch.Tensor, dict)) else None}
    call["cache_length"], call["cache_counted"] = cache_state(named.values())
    call["cached"] = call["cache_length"] > 0
    first = args[0] if args else named.get("input_ids", named.get("inputs_embeds"))
    call["input"] = first if isinstance(first, torch.Tensor) else None
    # this thread's state through its dict, one thread-local lookup: right after a train step's backward and
    # optimizer step (cold caches) each attribute access of a threading.local costs microseconds
    local = runtime._local.__dict__
    local["call"] = call
    for name in ("slots", "calls"):     # what the previous call captured and counted
        held = local.get(name)
        if held:
            held.clear()
    return args, kwargs


def install_stack_capture(module: nn.Module, path: str, runtime: RuntimeState) -> Callable[[], None]:
    """Record the call of one stack's module (an encoder-decoder's encoder or decoder: generate() calls the
    encoder directly, not through the model) under `runtime.call["stacks"][path]`: its attention mask and how
    many positions its cache holds, for modules acting at positions of that stack's own input sequence."""
    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError):
        signature = None
    handle = module.register_forward_pre_hook(functools.partial(_capture_stack, runtime, signature, path),
                                              with_kwargs=True)
    return functools.partial(_run_both, handle.remove, runtime.need_call())


def _capture_stack(runtime: RuntimeState, signature, path: str, mod, args, kwargs):
    named = _bound_call(signature, args, kwargs)
    mask = named.get("attention_mask")
    length, counted = cache_state(named.values())
    runtime.call.setdefault("stacks", {})[path] = {
        "attention_mask": mask if isinstance(mask, (torch.Tensor, dict)) else None, "cache_length": length,
        "cache_counted": counted, "cached": length > 0}


def _replicate(value, copies: int):
    """Parallel composition: the batch repeated once per adapter (tensors with a batch dimension only)."""
    return torch.cat([value] * copies, dim=0) if isinstance(value, torch.Tensor) and value.dim() >= 1 else value
