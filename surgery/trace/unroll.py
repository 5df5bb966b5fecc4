"""Trace one layer of each kind, not the whole depth: truncate the layer stacks, export, unroll the graph.

A model's depth is repeated layers (an `nn.ModuleList` of blocks called once each, in order). Exporting all 32 (or
80) of them costs time linear in depth for graphs that are copies of each other. Here each such stack is
temporarily replaced by a prefix of its layers that holds each kind of the stack's repeating tail twice (LLaMA: 2
of 32; T5, whose block 0 holds the relative position bias: 3; first-k-dense-then-MoE: k + 2; sliding and global
layers in turn: 4, of period 2), the shorter model is exported with its module marks, and the graph of each
missing layer j is copied from the prefix's layer of its kind in the last period (the template): its inputs from
the previous layer map to the previous layer's
values, values computed outside the layers (masks, rotary tables) stay shared, its parameter and buffer
placeholders become layer j's, and module paths in the metadata and marks name layer j. The nodes after the
stack then read the last copy. Nodes are finally renamed in graph order, as `torch.export` names them, so the
result is the graph a full export gives.

What is checked, not assumed (any failure: `None`, and the caller exports the whole model):
- a layer's kind is its module tree (types), its parameters' and buffers' names, shapes and dtypes, and its
  modules' attributes: plain values, enum members, small dicts, tensors, functions and classes by identity, and
  the fields of objects it holds where layers hold different ones (a number that differs between every
  layer, such as `layer_idx`, is an index, not a kind), and the entries its index attributes select in
  per-layer lists of the objects it holds (a config's `layer_types[layer_idx]`, read at forward time by some
  models); parameters shared with anything else, hooks (torch's global module hooks: every stack),
  parametrizations or instance-level forwards on a layer keep its stack whole;
- while the prefix is exported, the container's length, iteration and indexing are the whole stack's: layers
  from `keep` on are stand-ins that run nothing and return their template's output, so the forward's loop
  runs to its end and each missing layer's call is observed: it is called once, in order, with no op traced
  between those calls, and with its template's arguments (the same shared values, the previous layer's output
  where the template got its predecessor's); reading an attribute of a stand-in other than a plain value, or
  setting one, stops the truncated export (`self.layers[-1].norm`). A kept layer's index attributes are
  objects that note being read as numbers, by Python or C code: a forward that reads its index (`if
  self.layer_idx == n - 1`, `types[self.layer_idx]`) or a per-layer number is exported whole; so is one that
  changes an object the layers hold;
- the forward takes only whole slices of a truncated container (`layers[:config.num_hidden_layers]` with
  fewer layers configured than the container holds runs all of a prefix but not all of the stack);
- after the export: every kept layer ran exactly once; each stack's layers are contiguous in the graph, in order,
  with nothing else between them; each template and the previous layer of its kind are the same graph (same ops, constants,
  shapes, marks, and inputs corresponding: their own nodes at the same positions, the same shared values, or
  their own parameters); nothing outside a stack reads a layer but the last one, and a layer reads only itself,
  its predecessor and values outside the stack.
"""
from __future__ import annotations

import contextlib
import enum
import functools
import inspect
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.immutable_collections import immutable_dict
from torch.utils._pytree import tree_flatten

SCALARS = (int, float, str, bool, type(None), torch.dtype)
_SCALAR_TYPES = frozenset(SCALARS)
_NO_KWARGS = immutable_dict()    # one empty kwargs for every copied node without any (fx never mutates it)
MIN_SAVED = 1      # truncate a stack only when it saves at least this many layers


@dataclass
class Stack:
    """A layer container and how much of it is traced: entries [0, keep) run; from `start` on the kinds repeat
    with `period` (1: one kind; 2: alternating local/global layers), and entry j >= keep is a copy of the
    template of its phase in the prefix's last period."""

    path: str            # the container's module path ("model.layers")
    parent: nn.Module
    attr: str
    container: nn.ModuleList
    keep: int
    length: int
    start: int = 0
    period: int = 1
    slices: list = field(default_factory=list)   # the slices the truncated export's forward took of the container
    index_attrs: list = field(default_factory=list)   # (module path in the layer, name) of its index attributes
    held: list = field(default_factory=list)          # the objects its layers hold (a config): watched for changes
    watch: "_Watch | None" = None                 # what the export saw of the layers it did not run

    def entry(self, i: int) -> str:
        return f"{self.path}.{i}" if self.path else str(i)

    def template(self, j: int) -> int:
        """The prefix layer entry j is a copy of (j itself inside the prefix)."""
        if j < self.keep:
            return j
        return self.keep - self.period + (j - self.keep) % self.period


def _plan_prefix(kinds: list) -> tuple[int, int, int] | None:
    """(keep, start, period): the shortest prefix holding every phase of the repeating tail twice, and ending
    in the same phase as the whole stack (so the last layer is a copy of the prefix's last)."""
    n = len(kinds)
    best = None
    for period in range(1, n // 2 + 1):
        start = n - period
        while start > 0 and kinds[start - 1] == kinds[start - 1 + period]:
            start -= 1
        keep = start + 2 * period
        keep += (n - keep) % period
        if keep < n and (best is None or keep < best[0]):
            best = (keep, start, period)
    return best


def _plain(value) -> bool:
    if type(value) in _SCALAR_TYPES or isinstance(value, SCALARS):
        return True
    return isinstance(value, (tuple, list)) and len(value) <= 16 and all(isinstance(v, SCALARS) for v in value)


# nn.Module's own bookkeeping (parameter/buffer/module tables, hook tables, `training`): no part of a layer's kind,
# of the trace cache's key, nor what tracing puts back (export.py)
MODULE_STATE = frozenset(vars(nn.Module()))
_HOOK_TABLES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _fields(module: nn.Module) -> tuple[dict, list]:
    """A module's attributes that can make its forward differ from another instance's, as comparable values:
    plain ones (scalars, tuples of them, enum members), tensors that are neither parameters nor buffers (an
    export lifts those as constants, small ones by value), small dicts of plain values, callables and classes
    by identity (`self.score_fn = qk`: one function object per kind of layer) and the objects it holds (a
    config) as `Held` (compared by identity here; `find_stacks` compares their fields where layers hold
    different ones). Also the held objects themselves (for their per-layer lists)."""
    attrs, held = {}, []
    for k, v in vars(module).items():
        if k in MODULE_STATE or k.startswith("__"):
            continue
        value = _attribute_value(v)
        if value is _SKIP:
            continue
        attrs[k] = value
        if isinstance(value, Held) or isinstance(v, (dict, list)):
            held.append(v)
        owner = getattr(v, "__self__", None)
        if inspect.ismethod(v) and not isinstance(owner, (nn.Module, type)) and hasattr(owner, "__dict__"):
            # a bound method of an object of the layer's own (`self.pick = Chooser(...).pick`): that object's
            # fields are part of the kind, as a held object's
            attrs[f"{k}.__self__"] = Held(owner)
            held.append(owner)
    return attrs, held


class Held:
    """An object a module holds, compared by identity (its fields are compared where layers hold different
    objects: `find_stacks`)."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return isinstance(other, Held) and other.obj is self.obj

    def __hash__(self):
        return id(self.obj)

    def __repr__(self):
        return f"<held {type(self.obj).__qualname__} {id(self.obj):#x}>"


_SKIP = object()
_PLAIN_TENSORS = (torch.Tensor, nn.Parameter)


def _attribute_value(v, depth: int = 0):
    """`v` as a comparable value for a layer's kind (see `_fields`), or _SKIP (a module: part of the tree)."""
    if _plain(v) or isinstance(v, enum.Enum):
        return tuple(v) if isinstance(v, list) else v
    if isinstance(v, torch.Tensor):
        small = v.numel() <= 4096 and not v.is_meta
        return ("tensor", tuple(v.shape), str(v.dtype), v.device.type,
                tuple(v.detach().cpu().flatten().tolist()) if small else None)
    if isinstance(v, nn.Module):
        return _SKIP
    if isinstance(v, dict) and len(v) <= 64 and all(_plain(x) or isinstance(x, enum.Enum) for x in v) \
            and all(_plain(x) or isinstance(x, enum.Enum) for x in v.values()):
        return ("dict", tuple(sorted(((repr(a), repr(b)) for a, b in v.items()))))
    if isinstance(v, functools.partial):
        return ("partial", _attribute_value(v.func, depth + 1), tuple(repr(_attribute_value(a, depth + 1))
                                                                      for a in v.args),
                tuple(sorted((key, repr(_attribute_value(a, depth + 1))) for key, a in v.keywords.items())))
    if isinstance(v, type) or (callable(v) and not hasattr(v, "__dict__")) or inspect.isroutine(v):
        # a function, a builtin, a class; a bound method by its function and its object's class
        func = getattr(v, "__func__", v)
        owner = getattr(v, "__self__", None)
        return ("callable", id(func), getattr(func, "__qualname__", type(func).__qualname__),
                None if owner is None or inspect.ismodule(owner) else type(owner).__qualname__)
    if hasattr(v, "__dict__") or hasattr(v, "__slots__"):
        return Held(v)
    return ("object", type(v).__qualname__, id(v))


def _held_fields(obj, limit: int = 256) -> dict | None:
    """An object's attributes as comparable values (see `_attribute_value`; a held object inside it by
    identity), or None where it has more than `limit` or none can be read."""
    try:
        fields = vars(obj)
    except TypeError:
        slots = [name for klass in type(obj).__mro__ for name in getattr(klass, "__slots__", ())]
        fields = {name: getattr(obj, name) for name in slots if hasattr(obj, name)}
    if len(fields) > limit:
        return None
    out = {}
    for k, v in fields.items():
        if k.startswith("__"):
            continue
        value = _attribute_value(v, 1)
        if value is not _SKIP:
            out[k] = value
    return out


def plain_attributes(module: nn.Module) -> tuple:
    """A module's public plain attributes (scalars and short tuples of them: a conv's stride, a flag a constructor
    took) as sorted (name, value) pairs: what can change the traced graph between two instances with the same
    classes, config and tensors. Private ones are bookkeeping (nn.Module's, transformers' `_is_hf_initialized`,
    surgery's marks, a conv's padding derived from its public one)."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in vars(module).items()
                        if not k.startswith("_") and k != "training" and _plain(v)))


def _hooked(module: nn.Module) -> bool:
    state = vars(module)
    return (any(state.get(h) for h in _HOOK_TABLES) or "forward" in state
            or bool(state.get("_modules", {}).get("parametrizations")))


def _per_layer(obj, n: int) -> dict:
    """The sequences of plain values of length `n` (one per layer: a config's `layer_types`) that `obj` holds."""
    out = {}
    try:
        fields = vars(obj)
    except TypeError:
        return out
    for k, v in fields.items():
        if isinstance(v, (list, tuple)) and len(v) == n and all(isinstance(x, SCALARS) for x in v):
            out[k] = tuple(v)
    return out


def _describe(entry: nn.Module, counts: dict, module_counts: dict) -> tuple | None:
    """The entry's kind, in one walk of its modules: (module tree, tensors, plain attributes by (module, name),
    held objects). None (never truncate its stack): a module or tensor reachable twice (shared with another
    layer or the rest of the model), or a hooked module."""
    modules, tensors, attrs, held = [], [], {}, {}
    for rel, m in entry.named_modules(remove_duplicate=False):
        if module_counts.get(id(m), 0) != 1 or _hooked(m):
            return None
        modules.append((rel, type(m)))      # the class itself: a factory's classes share a name, not a forward
        prefix = rel + "." if rel else ""
        for kind, table in (("p", m._parameters), ("b", m._buffers)):
            for name, t in table.items():
                if t is None:
                    continue
                if counts.get(id(t), 0) != 1:
                    return None
                tensors.append((kind, prefix + name, tuple(t.shape), str(t.dtype), t.device.type,
                                bool(t.requires_grad), type(t) if type(t) not in _PLAIN_TENSORS else None))
        fields, objects = _fields(m)
        for k, v in fields.items():
            attrs[(rel, k)] = v
        for obj in objects:
            held[id(obj)] = obj
    tensors.sort(key=lambda x: x[0] != "p")     # parameters first, then buffers, each in module order
    return tuple(modules), tuple(tensors), attrs, list(held.values())


def _expand_held(attrs: list[dict], depth: int = 3) -> None:
    """Where layers hold different objects at one attribute (a per-layer copy of a config with one field
    changed), compare those objects' fields instead of their identities: each such attribute is replaced, in
    place, by one entry per field (`cfg.swap`), down to `depth` levels. An object whose fields cannot be read
    stays compared by identity."""
    memo: dict[int, dict | None] = {}
    for _ in range(depth):
        keys = {k for a in attrs for k, v in a.items() if type(v) is Held}
        differing = []
        for key in keys:
            values = [a.get(key) for a in attrs]
            if any(isinstance(v, Held) for v in values) and \
                    len({("held", id(v.obj)) if isinstance(v, Held) else repr(v) for v in values}) > 1:
                differing.append(key)
        if not differing:
            return
        for key in differing:
            rel, name = key
            for a in attrs:
                v = a.get(key)
                if not isinstance(v, Held):
                    continue
                if id(v.obj) not in memo:
                    memo[id(v.obj)] = _held_fields(v.obj)
                fields = memo[id(v.obj)]
                if fields is None:
                    a[key] = ("object", type(v.obj).__qualname__, id(v.obj))
                    continue
                del a[key]
                a[(rel, f"{name}.{{fields}}")] = tuple(sorted(fields))
                for f, fv in fields.items():
                    a[(rel, f"{name}.{f}")] = fv


def _global_hooks() -> bool:
    """Whether torch's process-wide module hooks are set (`register_module_forward_hook`, as profilers and
    activation tools install): they run on every module call, the layers the export does not run included,
    and may treat each layer differently."""
    from torch.nn.modules import module as torch_module
    return any(getattr(torch_module, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks", "_global_forward_hooks_always_called"))


def find_stacks(model: nn.Module) -> list[Stack]:
    """The outermost layer containers worth truncating, with their prefix length (none while torch's global
    module hooks are set)."""
    if _global_hooks():
        return []
    counts: dict[int, int] = defaultdict(int)           # how many places hold each tensor, and each module
    module_counts: dict[int, int] = defaultdict(int)
    for _, m in model.named_modules(remove_duplicate=False):
        module_counts[id(m)] += 1
        for table in (m._parameters, m._buffers):
            for t in table.values():
                if t is not None:
                    counts[id(t)] += 1
    stacks: list[Stack] = []
    taken: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(t + ".") for t in taken):
            continue
        if type(module) is not nn.ModuleList or len(module) < 3:
            continue
        keys = list(module._modules)
        if keys != [str(i) for i in range(len(keys))]:
            continue
        entries = list(module)
        described = [None] if module_counts[id(module)] != 1 else \
            [_describe(e, counts, module_counts) if e is not None else None for e in entries]
        if any(d is None for d in described):
            # a layer (or the container) reachable twice, a shared tensor, a hook: keep the stack whole
            taken.append(path)
            continue
        structures = [d[:2] for d in described]
        attrs = [d[2] for d in described]
        _expand_held(attrs)
        keys_all = set().union(*attrs)
        # a number that differs between every two layers (layer_idx, a per-layer scale) indexes them, and the
        # export watches whether a forward computes with it (`_watched`); other attributes are kinds
        index_like = {k for k in keys_all if len({repr(a.get(k)) for a in attrs}) == len(entries)
                      and "." not in k[1] and all(type(a.get(k)) in (int, float) for a in attrs)}
        n = len(entries)
        # a layer may read a per-layer list of an object it holds at forward time
        # (`config.layer_types[self.layer_idx]`): the entries its index attributes select are part of its kind
        lists: dict[int, dict] = {}
        looked = []
        for d, a in zip(described, attrs):
            picked = []
            for obj in d[3]:
                if id(obj) not in lists:
                    lists[id(obj)] = _per_layer(obj, n)
                for name, seq in lists[id(obj)].items():
                    for k in sorted(index_like, key=repr):
                        v = a.get(k)
                        if type(v) is int and 0 <= v < n:
                            picked.append((name, k, repr(seq[v])))
            looked.append(tuple(sorted(set(picked))))
        kinds = [(s, tuple(sorted((k, repr(v)) for k, v in a.items() if k not in index_like)), pick)
                 for s, a, pick in zip(structures, attrs, looked)]
        taken.append(path)
        numbered: dict = {}
        planned = _plan_prefix([numbered.setdefault(kind, len(numbered)) for kind in kinds])
        if planned is None or n - planned[0] < MIN_SAVED:
            continue
        keep, start, period = planned
        parent_path, _, attr = path.rpartition(".")
        stacks.append(Stack(path=path, parent=model.get_submodule(parent_path), attr=attr, container=module,
                            keep=keep, length=n, start=start, period=period,
                            index_attrs=sorted(index_like),
                            held=list({id(o): o for d in described for o in d[3]}.values())))
    return stacks


class Refused(Exception):
    """The truncated graph does not check out: export the whole model instead."""


_NUMBER_METHODS = ("__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__hash__", "__bool__", "__index__",
                "__int__", "__float__", "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__",
                "__truediv__", "__rtruediv__", "__floordiv__", "__rfloordiv__", "__mod__", "__rmod__", "__divmod__",
                "__rdivmod__", "__pow__", "__rpow__", "__neg__", "__pos__", "__abs__", "__invert__", "__and__",
                "__rand__", "__or__", "__ror__", "__xor__", "__rxor__", "__lshift__", "__rlshift__", "__rshift__",
                "__rrshift__", "__str__", "__repr__", "__format__", "__round__", "__trunc__", "__floor__",
                "__ceil__")


def _watched(value: int | float, used: list, where: str):
    """`value` (an int or a float) as an object that notes `where` in `used` whenever anything reads it as a
    number: Python code comparing, hashing, formatting or computing with it, and C code too (a sequence
    subscript `seq[self.layer_idx]` and `"%d" % idx` call `__index__`/`__int__`; torch calls them or refuses the
    object, and a refusal exports the whole model): a layer whose forward reads its index (`if self.layer_idx >=
    k`, `types[self.layer_idx]`) may compute something else in the layers the export does not run. Not an int
    subclass on purpose: C code reads an int subclass's value without calling any of its methods. Passing it
    along unread notes nothing."""
    kind = type(value)

    def method(name):
        base = getattr(kind, name)

        def read(self, *args):
            used.append(where)
            args = tuple(a._value if type(a) is watched else a for a in args)
            return base(value, *args)
        read.__name__ = name
        return read
    body = {name: method(name) for name in _NUMBER_METHODS if hasattr(kind, name)}

    def type_read(self):      # isinstance(idx, int) holds as for the number; what the code then does with it notes
        return kind
    body.update(__slots__=("_value",), __module__=__name__, __class__=property(type_read))
    watched = type(f"watched_{kind.__name__}", (), body)
    obj = watched()
    obj._value = value
    return obj


class _StandIn:
    """Layer j >= keep of a truncated stack while the export runs: the forward's loop calls it in the layer's
    place. It runs nothing and returns what its template returned; the watch compares the call with the
    template's (same shared values, the previous layer's output in the same places). Reading an attribute the
    layer holds as a plain value answers it (`decoder_layer.attention_type`); anything else stops the export
    (the whole model is exported instead)."""

    def __init__(self, watch: "_Watch", j: int, layer: nn.Module):
        self._watch, self._j, self._layer = watch, j, layer

    @property
    def __class__(self):       # isinstance(layer, DecoderLayer) in a forward's loop holds, as for the layer
        return type(self._layer)

    def __call__(self, *args, **kwargs):
        return self._watch.stand_in_called(self._j, args, kwargs)

    def __setattr__(self, name, value):
        if name in ("_watch", "_j", "_layer"):
            object.__setattr__(self, name, value)
            return
        raise _NotRun(f"the forward sets {name!r} on {self._watch.stack.entry(self._j)}, which the truncated "
                      f"export does not run")

    def __delattr__(self, name):
        raise _NotRun(f"the forward deletes {name!r} of {self._watch.stack.entry(self._j)}, which the truncated "
                      f"export does not run")

    def __getattr__(self, name):
        value = getattr(self._layer, name)       # an AttributeError as the layer's own (`hasattr` answers False)
        if _plain(value) or isinstance(value, enum.Enum):
            return value
        raise _NotRun(f"the forward reads {name!r} of {self._watch.stack.entry(self._j)}, which the truncated "
                      f"export does not run")


class _NotRun(Refused):
    pass


def _graph_size() -> int | None:
    """How many nodes the graph being traced has now (None outside a trace)."""
    try:
        from torch.fx.experimental.proxy_tensor import get_proxy_mode
        mode = get_proxy_mode()
        return len(mode.tracer.graph.nodes) if mode is not None else None
    except Exception:  # noqa: BLE001 - a torch without it: the caller refuses
        return None


class _Watch:
    """What one export shows of a truncated stack beyond the layers it runs: how the forward calls the stand-ins
    of layers keep..length-1 (each once, in order, right after the prefix, with no op traced between them,
    with the arguments its template got: the same shared values and the previous layer's output where the
    template got its predecessor's), and whether a kept layer's forward read its index attribute."""

    def __init__(self, stack: Stack):
        self.stack = stack
        self.calls: dict[int, tuple] = {}        # kept layer -> (leaves, spec) of the arguments its caller passed
        self.outputs: dict[int, object] = {}     # kept layer -> the output its caller received
        self.out_ids: dict[int, dict] = {}       # kept layer -> {id(tensor leaf of its output): position}
        self.after_prefix: int | None = None     # graph size when the last kept layer returned
        self.next = stack.keep                   # the stand-in expected next
        self.used: list[str] = []                # index attributes the forward computed with
        self.problems: list[str] = []
        # the fields of the objects the layers hold, before the export: a forward that changes one (a call
        # counter all layers share) computes something else in each call
        self.held = [(obj, _held_fields(obj)) for obj in stack.held if not isinstance(obj, (dict, list))]
        self.state_at: dict[int, tuple] = {}     # kept layer -> what the objects its layers hold hold, at its call
        self.fields: dict[int, list] = {}       # kept layer -> the fields of the argument objects at its call

    def install(self) -> list:
        """Hooks on the kept layers (after surgery's marks: the output seen is the one the caller receives; the
        arguments before them: the ones the caller passed)."""
        handles = []
        for i, layer in enumerate(list(self.stack.container)[:self.stack.keep]):
            def pre(module, args, kwargs, i=i):
                self.calls[i] = tree_flatten((args, kwargs))
                self.fields[i] = [_object_fields(x) for x in self.calls[i][0]]
                self.state_at[i] = _held_state(self.stack.held)

            def post(module, args, kwargs, out, i=i):
                self.outputs[i] = out
                self.out_ids[i] = {id(x): p for p, x in enumerate(tree_flatten(out)[0])
                                   if isinstance(x, torch.Tensor)}
                if i == self.stack.keep - 1:
                    self.after_prefix = _graph_size()
            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
            handles.append(layer.register_forward_hook(post, with_kwargs=True))
        return handles

    def stand_in_called(self, j: int, args, kwargs):
        s = self.stack
        t = s.template(j)
        if j != self.next:
            self.problems.append(f"{s.entry(j)} called where {s.entry(self.next)} was due")
        self.next = j + 1
        if t not in self.calls or s.keep - 1 not in self.outputs:
            self.problems.append(f"{s.entry(j)} called before the layers of the prefix")
            raise _NotRun(self.problems[-1])
        size = _graph_size()
        if size is None or size != self.after_prefix:
            self.problems.append(f"ops run between the layers of {s.path} after the prefix")
        if _held_state(s.held) != self.state_at[t]:
            self.problems.append(f"the objects the layers of {s.path} hold are changed between their calls")
        leaves, spec = tree_flatten((args, kwargs))
        t_leaves, t_spec = self.calls[t]
        if spec != t_spec:
            self.problems.append(f"{s.entry(j)} is called with other arguments than {s.entry(t)}")
        else:
            before_t = self.out_ids.get(t - 1, {})
            before_j = tree_flatten(self.outputs[s.template(j - 1) if j - 1 >= s.keep else j - 1])[0]
            for a, b, fields in zip(leaves, t_leaves, self.fields[t]):
                if not _corresponds(a, b, before_t, before_j) or _object_fields(a) != fields:
                    self.problems.append(f"{s.entry(j)} gets another argument than {s.entry(t)}")
                    break
        return self.outputs[t]

    def check(self) -> None:
        """Raise Refused where the export saw a stack's layers differ from their copies."""
        s = self.stack
        if self.next != s.length and not self.problems:
            self.problems.append(f"the forward ran {self.next} of the {s.length} layers of {s.path}")
        if self.used:
            self.problems.append(f"the forward computes with {self.used[0]}, an attribute that differs in every "
                                 f"layer")
        for obj, before in self.held:
            if _held_fields(obj) != before:
                self.problems.append(f"the forward changes a {type(obj).__qualname__} the layers of {s.path} hold")
        if self.problems:
            raise Refused(self.problems[0])


def _held_state(objects: list) -> tuple:
    """What the objects layers hold hold now, by identity (a field set to another value is another object; small
    ints and interned strings are one object per value): cheap enough to take at every layer's call."""
    return tuple(tuple(map(id, obj.values())) + tuple(obj) if isinstance(obj, dict)
                 else tuple(map(id, obj)) if isinstance(obj, list)
                 else tuple(map(id, vars(obj).values())) if hasattr(obj, "__dict__") else ()
                 for obj in objects)


def _object_fields(x):
    """An argument object's fields as they are now (None for tensors and plain values): the same object passed
    to every layer may have been changed by the forward between two calls."""
    if isinstance(x, torch.Tensor) or _plain(x) or isinstance(x, enum.Enum) or not hasattr(x, "__dict__"):
        return None
    return _held_fields(x)


def _corresponds(a, b, before_t: dict, before_j: list) -> bool:
    """Argument leaf `a` of a stand-in's call against `b`, its template's: where `b` is (a tensor of) the
    template's predecessor's output, `a` is the same part of the stand-in's predecessor's output; any other
    tensor or object is the very same one; a plain value (a number, a string, a flag) equal."""
    if isinstance(b, torch.Tensor):
        position = before_t.get(id(b))
        if position is not None:
            return position < len(before_j) and a is before_j[position]
        return a is b
    if type(a) is not type(b):
        return False
    if not (_plain(b) or isinstance(b, (enum.Enum, torch.device))):
        return a is b          # an object's equality may leave out what the forward reads: only itself
    return a == b


def _container(s: Stack, watch: _Watch) -> type:
    """A ModuleList class holding a stack's kept layers whose length, iteration and indexing are the whole
    stack's, layers keep.. as stand-ins; its slicing is recorded in `s.slices` (transformers'
    `self.layers[: self.config.num_hidden_layers]`). A class of its own per export: no state on the user's
    modules, none shared between exports."""
    stand_ins = [_StandIn(watch, j, s.container[j]) for j in range(s.keep, s.length)]

    def whole(self) -> list:
        return list(self._modules.values()) + stand_ins

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            s.slices.append(idx)
        return whole(self)[idx]

    def __iter__(self):
        return iter(whole(self))

    def __len__(self):
        return s.length
    return type("ModuleList", (nn.ModuleList,), {"__getitem__": __getitem__, "__iter__": __iter__,
                                                  "__len__": __len__, "__module__": nn.ModuleList.__module__})


@contextlib.contextmanager
def truncated(stacks: list[Stack]):
    """Each stack's container replaced by one holding its first `keep` entries and stand-ins for the others
    (`_Container`), the kept layers' index attributes by ints that note being computed with; the user's own
    container objects and attributes are put back however the block ends (an error, Ctrl-C). After the
    export, `check_watched(stacks)` says whether the rest of each stack was called as its copies will be."""
    done, swapped = [], []
    try:
        for s in stacks:
            s.slices.clear()
            s.watch = _Watch(s)
            short = _container(s, s.watch)()
            for i in range(s.keep):      # its own keys: ModuleList's extend numbers from len(), the whole length
                short._modules[str(i)] = s.container[i]
            short.training = s.container.training
            s.parent._modules[s.attr] = short
            done.append(s)
            for i in range(s.keep):
                layer = s.container[i]
                for rel, name in s.index_attrs:
                    module = layer.get_submodule(rel) if rel else layer
                    value = vars(module)[name]
                    swapped.append((module, name, value))
                    module.__dict__[name] = _watched(value, s.watch.used, f"{s.entry(i)}"
                                                     f"{'.' + rel if rel else ''}.{name}")
        yield
    finally:
        for module, name, value in reversed(swapped):
            module.__dict__[name] = value
        for s in done:
            s.parent._modules[s.attr] = s.container


def watch_layers(stacks: list[Stack]) -> list:
    """The hooks that watch each stack's kept layers (install after the module marks)."""
    return [h for s in stacks if s.watch is not None for h in s.watch.install()]


def check_watched(stacks: list[Stack]) -> None:
    """Refused where an export under `truncated` saw a stack's other layers called otherwise than their copies
    will be, or a kept layer compute with its index."""
    for s in stacks:
        if s.watch is None:
            raise Refused(f"{s.path} was not watched")
        s.watch.check()


# ------------------------------------------------------------------------------------------------- the graph

def _paths(node: fx.Node) -> list[str]:
    return [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]


def _swap(path: str, old: str, new: str) -> str:
    if path == old:
        return new
    if path.startswith(old + "."):
        return new + path[len(old):]
    return path


def _mark_tag(tag: str, old: str, new: str) -> str:
    name, side, loc, call = json.loads(tag)
    return json.dumps([_swap(name, old, new), side, loc, call])


def _is_mark(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.ops.surgery.mark.default


def _sanitize(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]", "_", name).lower()


def _val_key(val):
    if isinstance(val, torch.Tensor):
        return ("T", tuple(val.shape), val.dtype)
    if isinstance(val, (tuple, list)):
        return tuple(_val_key(v) for v in val)
    return type(val).__name__



def unroll(graph: fx.Graph, stacks: list[Stack], params: dict[str, str], buffers: dict[str, str],
           calls: dict[str, int], param_order: dict[str, int], buffer_order: dict[str, int],
           constants: dict[str, str], values: dict[str, object]) -> tuple[fx.Graph, list[tuple]]:
    """The graph of the whole model from the marked graph of the truncated one: each stack's template layer
    copied into the missing layers' places, and its module marks taken out as (value, module, side, loc, call),
    in graph order. `params`/`buffers` (placeholder name -> qualified name), `constants` (placeholder name -> the
    export's name of a lifted constant), `values` (placeholder name -> the constant) and `calls` are updated in
    place to the whole model's. Raises Refused when something does not check out."""
    for s in stacks:
        whole = range(s.length)
        for idx in s.slices:
            if whole[idx] != whole:
                raise Refused(f"{s.path}: the forward runs {s.path}[{idx.start}:{idx.stop}:{idx.step}] of "
                              f"{s.length} layers")
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    tensor_of = {**params, **buffers}
    # region of each node: (stack index, layer) or None
    entry_region = {s.entry(i): (k, i) for k, s in enumerate(stacks) for i in range(s.keep)}
    region: dict[fx.Node, tuple[int, int]] = {}
    for n in nodes:
        if n.op != "call_function":
            continue
        hits = {entry_region[p] for p in _paths(n) if p in entry_region}
        if len(hits) > 1:
            raise Refused(f"{n.name} runs in two layers")
        if hits:
            region[n] = hits.pop()
    members: dict[tuple[int, int], list[fx.Node]] = defaultdict(list)
    for n in nodes:
        if n in region:
            members[region[n]].append(n)
    for k, s in enumerate(stacks):
        for i in range(s.keep):
            entry = s.entry(i)
            if calls.get(entry) != 1 or not members[(k, i)]:
                raise Refused(f"{entry} ran {calls.get(entry, 0)} times")
        # contiguous and in order, nothing else between the layers
        first, last = position[members[(k, 0)][0]], position[members[(k, s.keep - 1)][-1]]
        expected = [n for i in range(s.keep) for n in members[(k, i)]]
        between = [n for n in nodes[first:last + 1] if n.op == "call_function"]
        if between != expected:
            raise Refused(f"{s.path}: other ops run between its layers")

    # who reads a layer: itself, the next layer, or (the last layer only) anything after the stack
    for n in nodes:
        mine = region.get(n)
        for a in n.all_input_nodes:
            theirs = region.get(a)
            if theirs is None or theirs == mine:
                continue
            k, i = theirs
            if mine is not None and mine[0] == k and mine[1] == i + 1:
                continue
            if mine is None or mine[0] != k:
                if i == stacks[k].keep - 1:
                    continue
            raise Refused(f"{n.name} reads {a.name} of another layer")

    for k, s in enumerate(stacks):
        if s.template(s.length - 1) != s.keep - 1:
            raise Refused(f"{s.path}: the last layer is not of the prefix's last kind")
        for t in range(s.keep - s.period, s.keep):     # each phase's template against its previous occurrence
            _check_same(members, k, s, t, region, tensor_of, constants, values)

    return _build(nodes, stacks, members, region, params, buffers, calls, param_order, buffer_order, constants,
                  values)


_LIFTED = re.compile(r"lifted_tensor_(\d+)$")


def _base_name(name: str) -> str:
    """The name torch.export numbers (`linear_9` -> `linear`): naming the nodes afresh in graph order gives the
    names a full export gives."""
    m = re.match(r"(.*)_(\d+)$", name)
    return m.group(1) if m else name


def _build(nodes, stacks, members, region, params, buffers, calls, param_order, buffer_order, constants, values):
    """The unrolled graph, built in one pass in a new fx.Graph: placeholders first (the new layers' parameters,
    buffers and constants where a full export puts them), then every node of the truncated graph, each stack's
    copies right after its template, every node named afresh in that order."""
    tensor_of = {**params, **buffers}
    order = {n: i for i, n in enumerate(nodes)}
    plans = []           # per stack: (k, stack, prefix end)
    for k, s in enumerate(stacks):
        plans.append((k, s, members[(k, s.keep - 1)][-1]))
    end_of = {p[2]: p for p in plans}

    # the placeholders the copies read: (template placeholder, layer) -> (name, qualified name or target, kind)
    new_ph: dict[tuple[fx.Node, int], list] = {}
    first_use: dict = {}       # placeholder key -> sort key of its first reader in the final order
    for n in nodes:
        for a in n.all_input_nodes:
            if a.op == "placeholder" and a not in first_use:
                first_use[a] = (order[n], 0, 0)
    tensor_phs = [n for n in nodes if n.op == "placeholder" and n.name in tensor_of]
    for k, s, end in plans:
        for j in range(s.keep, s.length):
            new, old = s.entry(j), s.entry(s.template(j))
            template = members[(k, s.template(j))]
            # every parameter and buffer of the template has its copy, read or not (a full export lists
            # them all: Longformer's global q/k/v, which no op reads without a global attention mask)
            for a in tensor_phs:
                qual = _swap(tensor_of[a.name], old, new)
                if qual != tensor_of[a.name]:
                    new_ph[(a, j)] = [f"{'p' if a.name in params else 'b'}_{_sanitize(qual)}", qual,
                                      "p" if a.name in params else "b"]
            for i, t in enumerate(template):
                for a in t.all_input_nodes:
                    if a.op != "placeholder" or (a, j) in new_ph:
                        continue
                    if a.name in tensor_of:
                        qual = _swap(tensor_of[a.name], old, new)
                        if qual == tensor_of[a.name]:
                            continue
                        kind = "p" if a.name in params else "b"
                        new_ph[(a, j)] = [f"{kind}_{_sanitize(qual)}", qual, kind]
                    elif a.name in constants:
                        target = _swap(constants[a.name], old, new)
                        if target == constants[a.name]:
                            continue
                        new_ph[(a, j)] = [None, target, "c"]
                    else:
                        continue
                    first_use[(a, j)] = (order[end], j, i + 1)
    # lifted constants are numbered in order of first use, as the export numbers them
    const_keys = [n for n in nodes if n.op == "placeholder" and n.name in constants] + \
        [key for key, v in new_ph.items() if v[2] == "c"]
    const_keys.sort(key=lambda key: first_use.get(key, (1 << 30, 0, 0)))
    const_name: dict = {}
    originals = [key for key in const_keys if isinstance(key, fx.Node)]
    numbers = [int(m.group(1)) if (m := _LIFTED.search(constants[key.name])) else None for key in originals]
    if [x for x in numbers if x is not None] != sorted(x for x in numbers if x is not None):
        raise Refused("lifted constants not numbered in order of use")
    count = 0
    targets: dict = {}
    for key in const_keys:
        target = constants[key.name] if isinstance(key, fx.Node) else new_ph[key][1]
        if _LIFTED.search(target):
            target = _LIFTED.sub(f"lifted_tensor_{count}", target)
            count += 1
        targets[key] = target
        const_name[key] = "c_" + _sanitize(target) if (not isinstance(key, fx.Node) or target != constants[key.name]) \
            else key.name
    for key, v in new_ph.items():
        if v[2] == "c":
            v[0] = const_name[key]

    # placeholder order: parameters, buffers (each in the model's order), constants (numbered), the rest
    def ph_key(key):
        if isinstance(key, fx.Node):
            name = key.name
            if name in params:
                return (0, param_order.get(params[name], 1 << 30), 0)
            if name in buffers:
                return (1, buffer_order.get(buffers[name], 1 << 30), 0)
            if name in constants:
                return (2, const_keys.index(key), 0)
            return (3, order[key], 0)
        name, qual, kind = new_ph[key]
        if kind == "p":
            return (0, param_order.get(qual, 1 << 30), 0)
        if kind == "b":
            return (1, buffer_order.get(qual, 1 << 30), 0)
        return (2, const_keys.index(key), 0)
    old_phs = [n for n in nodes if n.op == "placeholder"]
    if old_phs != sorted(old_phs, key=ph_key):
        raise Refused("placeholders are not in the export's order")
    all_phs = sorted(old_phs + list(new_ph), key=ph_key)

    out = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    copy_ph: dict[tuple[fx.Node, int], fx.Node] = {}
    new_params, new_buffers, new_constants, new_values = {}, {}, {}, {}
    for key in all_phs:
        if isinstance(key, fx.Node):
            name = const_name.get(key, key.name)
            ph = out.create_node("placeholder", name, name=name, type_expr=key.type)
            ph.meta = key.meta
            env[key] = ph
            if key.name in params:
                new_params[name] = params[key.name]
            elif key.name in buffers:
                new_buffers[name] = buffers[key.name]
            elif key.name in constants:
                new_constants[name] = targets[key]
                if key.name in values:
                    new_values[name] = values[key.name]
        else:
            name, qual, kind = new_ph[key]
            src = key[0]
            ph = out.create_node("placeholder", name, name=name, type_expr=src.type)
            ph.meta = dict(src.meta)
            copy_ph[key] = ph
            if kind == "p":
                new_params[name] = qual
            elif kind == "b":
                new_buffers[name] = qual
            else:
                new_constants[name] = targets[key]
                if src.name in values:
                    new_values[name] = values[src.name]
        if ph.name != name:
            raise Refused(f"placeholder name {name} taken")

    last_of: dict[fx.Node, fx.Node] = {}       # a template node -> its last copy, as read from outside the stack

    def outside(a: fx.Node, k) -> fx.Node:
        r = region.get(a)
        if a in last_of and (k is None or r[0] != k):
            return last_of[a]
        return env[a]

    marks: list[tuple] = []
    for n in nodes:
        if n.op == "placeholder":
            continue
        k = (region.get(n) or (None,))[0]
        if _is_mark(n) and isinstance(n.args[0], fx.Node):
            env[n] = value = outside(n.args[0], k)
            marks.append((value, *json.loads(n.args[1])))
        else:
            c = new_node(out, n.op, n.target, _map(n.args, lambda a: outside(a, k)),
                      _map(n.kwargs, lambda a: outside(a, k)), _base_name(n.name), n.type)
            c.meta = n.meta
            env[n] = c
        if n in end_of:
            _copies(out, end_of[n], members, env, copy_ph, last_of, outside, calls, marks)
    _check_order(out)
    for table, new_table in ((params, new_params), (buffers, new_buffers), (constants, new_constants),
                             (values, new_values)):
        table.clear()
        table.update(new_table)
    return out, marks


def _check_order(graph: fx.Graph) -> None:
    """Every node reads only nodes of `graph` defined before it (what `Graph.lint` checks of a graph built node by
    node; lint also formats a message for every argument it checks, a seventh of the unroll's time). Names are
    unique by construction: every node got its name from the graph's namespace."""
    seen: set[fx.Node] = set()
    for node in graph.nodes:
        for a in node.all_input_nodes:
            if a not in seen:
                raise Refused(f"{node.name} reads {a.name} before it is defined")
        seen.add(node)


def _copies(out: fx.Graph, plan, members, env, copy_ph, last_of, outside, calls, marks):
    """Layers keep..length-1 of one stack, each a copy of its template reading the layer before it; a mark is
    not copied but recorded in `marks` as (value, module, side, loc, call)."""
    k, s, _ = plan
    layer_nodes = {i: [env[n] for n in members[(k, i)]] for i in range(s.keep)}
    templates = {t: _Template(members[(k, t)], members[(k, t - 1)], s.entry(t), calls, copy_ph,
                              lambda a: outside(a, k)) for t in range(s.keep - s.period, s.keep)}
    for j in range(s.keep, s.length):
        template = templates[s.template(j)]
        new = s.entry(j)
        previous = layer_nodes[j - 1]
        current: list[fx.Node] = []
        stacks: list[dict | None] = [None] * len(template.stacks)

        def resolve(slot):
            kind, x = slot
            if kind == 0:
                return current[x]
            if kind == 1:
                return previous[x]
            if kind == 2:
                return copy_ph[(x, j)]
            return x
        for t, name, args, kwargs, stack, tag in template.recipes:
            args = tuple([resolve(a) if type(a) is tuple else a for a in args]) if type(args) is list \
                else _map(args, lambda a: resolve(template.slot(a)))
            if tag is not None:        # a mark: the copy reads its input
                swapped, module, side, loc, call = tag
                marks.append((args[0], new + module if swapped else module, side, loc, call))
                current.append(args[0])
                continue
            kwargs = _map(kwargs, lambda a: resolve(template.slot(a))) if kwargs else kwargs
            c = new_node(out, t.op, t.target, args, kwargs, name, t.type)
            meta = c.meta
            meta.update(t.meta)
            if stack is not None:
                # one module stack per module of the copy, shared by its nodes as by the template's
                copied = stacks[stack]
                if copied is None:
                    copied = stacks[stack] = {
                        (lead + new + key_rest if swapped else key): ((new + path_rest if swapped else path), ty)
                        for swapped, lead, key_rest, path_rest, key, path, ty in template.stacks[stack]}
                meta["nn_module_stack"] = copied
            current.append(c)
        layer_nodes[j] = current
        for m in template.inner:
            calls[_swap(m, old=template.path, new=new)] = calls[m]
    for t, c in zip(members[(k, s.keep - 1)], layer_nodes[s.length - 1]):
        last_of[t] = c


class _Template:
    """What copying one template layer needs, worked out once: per node its name, its arguments with each input
    node as a slot (0: a node of the copy itself, by position; 1: of the layer before, by position; 2: a
    placeholder the copy has its own of; 3: a value from outside the stack, shared), its module stack pattern
    and, for a mark, its tag split around the module path."""

    def __init__(self, template, previous, path, calls, copy_ph, outside):
        self.path = path
        self.own = {n: i for i, n in enumerate(template)}
        self.prev = {n: i for i, n in enumerate(previous)}
        self.copy_ph = {a for a, _ in copy_ph}
        self.outside = outside
        self.inner = [m for m in calls if m == path or m.startswith(path + ".")]
        self.recipes = []
        self.stacks: list[tuple] = []      # the distinct module stack patterns; a recipe holds its index
        numbers: dict[tuple, int] = {}
        for n in template:
            flat = type(n.args) is tuple and all(type(a) is fx.Node or isinstance(a, SCALARS) for a in n.args)
            args = [self.slot(a) if type(a) is fx.Node else a for a in n.args] if flat else n.args
            tag = self._tag(n.args[1]) if _is_mark(n) and isinstance(n.args[0], fx.Node) else None
            pattern = _stack_pattern(n.meta.get("nn_module_stack"), path)
            number = None
            if pattern is not None:
                number = numbers.setdefault(tuple(pattern), len(numbers))
                if number == len(self.stacks):
                    self.stacks.append(tuple(pattern))
            self.recipes.append((n, _base_name(n.name), args, n.kwargs, number, tag))

    def slot(self, a: fx.Node) -> tuple:
        if a in self.own:
            return (0, self.own[a])
        if a in self.prev:
            return (1, self.prev[a])
        if a in self.copy_ph:
            return (2, a)
        return (3, self.outside(a))

    def _tag(self, tag: str) -> tuple:
        """A mark's tag as (module in the layer, path after the layer's or the whole path, side, loc, call)."""
        name, side, loc, call = json.loads(tag)
        if name == self.path or name.startswith(self.path + "."):
            return True, name[len(self.path):], side, loc, call
        return False, name, side, loc, call


def new_node(graph: fx.Graph, op: str, target, args: tuple, kwargs: dict, name: str, type_expr) -> fx.Node:
    """`graph.create_node(op, target, args, kwargs, name=name, type_expr=type_expr)` without its scan of the
    arguments for raw SymInts (six times the rest of its cost; these arguments come from an exported graph,
    where there are none: the unroll's copies, a trace read back from the cache). Where this torch's Graph lacks
    the parts it uses: create_node itself."""
    namespace = getattr(graph, "_graph_namespace", None)
    table = getattr(graph, "_find_nodes_lookup_table", None)
    if namespace is None or table is None or not hasattr(graph, "_insert") or graph.owning_module is not None:
        return graph.create_node(op, target, args, kwargs, name=name, type_expr=type_expr)
    name = namespace.create_name(name, None)
    node = fx.Node(graph, name, op, target, args, kwargs if kwargs else _NO_KWARGS, type_expr)
    namespace.associate_name_with_obj(name, node)
    graph._insert(node)
    table.insert(node)
    graph._len += 1
    return node


def _map(a, fn):
    """fx.map_arg without its generality: nodes in tuples, lists, dicts and slices."""
    if isinstance(a, fx.Node):
        return fn(a)
    if isinstance(a, tuple):
        return tuple(_map(x, fn) for x in a)
    if isinstance(a, list):
        return [_map(x, fn) for x in a]
    if isinstance(a, dict):
        return {key: _map(v, fn) for key, v in a.items()}
    if isinstance(a, slice):
        return slice(_map(a.start, fn), _map(a.stop, fn), _map(a.step, fn))
    return a


def _stack_pattern(stack, old: str):
    """A module stack as parts to put another layer's path into: (swapped, lead, key rest, path rest, key,
    path, type) per entry."""
    if not stack:
        return None
    pattern = []
    for key, (path, ty) in stack.items():
        swapped = path == old or path.startswith(old + ".")
        lead = "L__self__" if key.startswith("L__self__") else ""
        body = key[len(lead):]
        if swapped and not (body == old or body.startswith((old + ".", old + "@"))):
            raise Refused(f"module stack key {key} does not name {path}")
        pattern.append((swapped, lead, body[len(old):], path[len(old):], key, path, ty))
    return pattern


def _stack_key(key: str, old: str, new: str) -> str:
    base, at, call = key.rpartition("@")
    if not at or not call.isdigit():
        base, at, call = key, "", ""
    for lead in ("L__self__", ""):
        if base.startswith(lead) and _swap(base[len(lead):], old, new) != base[len(lead):]:
            return lead + _swap(base[len(lead):], old, new) + at + call
    return key


def _check_same(members, k: int, s: Stack, t: int, region, tensor_of, constants, values):
    """Layer t (a template) and the previous layer of its kind, t - period, are one graph: same ops, constants,
    value shapes and marks, and inputs that correspond (their own nodes at the same positions, their
    predecessors' nodes at the same positions, the same shared values, their own parameters)."""
    p = t - s.period
    prev, tmpl = members[(k, p)], members[(k, t)]
    prev_path, tmpl_path = s.entry(p), s.entry(t)
    if len(prev) != len(tmpl):
        raise Refused(f"{prev_path} and {tmpl_path} differ in size ({len(prev)} / {len(tmpl)} ops)")
    at_prev = {n: i for i, n in enumerate(prev)}
    at_tmpl = {n: i for i, n in enumerate(tmpl)}
    at_tmpl_pred = {n: i for i, n in enumerate(members[(k, t - 1)])}
    same_kind_pred = p - 1 >= s.start     # the two predecessors are of one kind too: positions must agree
    at_prev_pred = {n: i for i, n in enumerate(members[(k, p - 1)])} if p >= 1 else {}

    def same(x, y) -> bool:
        if isinstance(x, fx.Node) or isinstance(y, fx.Node):
            if not (isinstance(x, fx.Node) and isinstance(y, fx.Node)):
                return False
            if x in at_prev and y in at_tmpl:
                return at_prev[x] == at_tmpl[y]
            if y in at_tmpl_pred:                  # the template reads its predecessor
                if x in at_prev_pred:
                    return not same_kind_pred or at_prev_pred[x] == at_tmpl_pred[y]
                rx = region.get(x)
                return rx is None or rx[0] != k
            if x is y:                             # a shared value from outside the stack
                return region.get(x) is None or region[x][0] != k
            if x.op == "placeholder" and y.op == "placeholder" and x.name in tensor_of and y.name in tensor_of:
                return _swap(tensor_of[x.name], prev_path, tmpl_path) == tensor_of[y.name] \
                    and tensor_of[x.name] != tensor_of[y.name]
            if x.op == "placeholder" and y.op == "placeholder" and x.name in constants and y.name in constants:
                vx, vy = values.get(x.name), values.get(y.name)
                return (re.sub(r"lifted_tensor_\d+$", "", _swap(constants[x.name], prev_path, tmpl_path))
                        == re.sub(r"lifted_tensor_\d+$", "", constants[y.name]) and constants[x.name] != constants[y.name]
                        and isinstance(vx, torch.Tensor) and isinstance(vy, torch.Tensor)
                        and vx.dtype == vy.dtype and vx.shape == vy.shape and vx.device == vy.device
                        and (vx.is_meta or bool(torch.equal(vx, vy))))
            return False
        if isinstance(x, (list, tuple)):
            return isinstance(y, (list, tuple)) and type(x) is type(y) and len(x) == len(y) and \
                all(same(a, b) for a, b in zip(x, y))
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(same(x[key], y[key]) for key in x)
        if type(x) is not type(y):
            return False
        if isinstance(x, float) and x != x:
            return y != y
        return x == y

    for a, b in zip(prev, tmpl):
        if a.op != b.op or a.target != b.target:
            raise Refused(f"{prev_path} and {tmpl_path} differ at {a.name} / {b.name}")
        if _val_key(a.meta.get("val")) != _val_key(b.meta.get("val")):
            raise Refused(f"{prev_path} and {tmpl_path} differ in shape at {a.name} / {b.name}")
        args_a = a.args
        if _is_mark(a):
            args_a = (a.args[0], _mark_tag(a.args[1], prev_path, tmpl_path))
        if not same(args_a, b.args) or not same(dict(a.kwargs), dict(b.kwargs)):
            raise Refused(f"{prev_path} and {tmpl_path} differ in the inputs of {a.name} / {b.name}")
        sa = [(_stack_key(key, prev_path, tmpl_path), _swap(p, prev_path, tmpl_path))
              for key, (p, _) in (a.meta.get("nn_module_stack") or {}).items()]
        if sa != [(key, p) for key, (p, _) in (b.meta.get("nn_module_stack") or {}).items()]:
            raise Refused(f"{prev_path} and {tmpl_path} differ in modules at {a.name} / {b.name}")
