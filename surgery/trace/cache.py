"""The on-disk cache of traced models: a new process that plans, applies, validates, exports or draws on a model
traced before reads the `Traced` graph back instead of running torch.export again (a LLaMA-7B shape: 3 s of CPU
to trace, a small fraction of that to read).

An entry is one file, `<key>.trace`, under the cache directory: `$SURGERY_CACHE_DIR`, else
`$XDG_CACHE_HOME/surgery/traces`, else `~/.cache/surgery/traces`. `SURGERY_CACHE=0` (or off/false/no) turns
the cache off: nothing is read or written.

The key is a SHA-256 over everything the traced graph depends on: the model's structure fingerprint (the one the
process cache uses: class, config, parameter and buffer names/shapes/dtypes/devices, module tree, example inputs'
structure), the config's attention implementation and every other private plain value of the config and its
sub-configs (transformers' `_experts_implementation`), each module's private plain attributes (a constructor flag
kept as `self._causal`), enum attributes and the public plain fields of the objects it holds, the code the forward
runs as this process has it (`_CodeWalk`: each module class's `forward` and, a few calls deep, the methods, module
functions, imported modules' functions, registered functions, held objects' methods and module-level flags it
names, the callables a module holds, torch's global forward hooks; so a class-level patch, a patched helper or
an edited helper file elsewhere changes the key), the contents of the
Python files beside the source file of every module class in the model (its own file and the helpers next to
it) and of surgery's own package, and the surgery, torch, transformers and Python versions. A model whose
class is defined where no source file can be read (a notebook cell, `python -c`) is not cached.

A file is trusted only if its header names this format and key and the SHA-256 of its payload matches; a file
that fails any check, or whose payload cannot be rebuilt into a graph, is deleted and the model traced again.
Writes go to a temporary file in the same directory, renamed over the entry (atomic: a reader sees the old entry,
the new one, or none). At most `MAX_ENTRIES` entries are kept (the least recently used go first).

Graph nodes are stored with their op, target (an aten/prims/custom operator by name, or `operator.getitem`),
arguments, and their metadata (all of it but `DROPPED_META`); tensor metadata come back as FakeTensors of the
same shape, stride, dtype and device. A graph with anything else (a higher-order operator, a `get_attr`, a symbolic
size) is not cached: it is traced each time, as without the cache.
"""
from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import enum
import functools
import gc
import hashlib
import inspect
import json
import logging
import operator
import os
import sys
import tempfile
import types
import zlib
from pathlib import Path

import torch
from torch import fx, nn

from surgery.trace import unroll
from surgery.trace.export import Boundary, Traced

FORMAT = 4
MAGIC = b"surgery-trace"
MAX_ENTRIES = 64
# node metadata torch.export writes that surgery never reads (tensor_meta repeats `val`); every other key is
# stored, and a graph whose metadata holds a value this format cannot store exactly is not cached. `stack_trace`
# is kept: a torch-level call in a forward (Granite's `branch * residual_multiplier`) is intercepted by its source
# line (surgery/rewrite/torchcalls.py); without it a cache hit refused what a fresh trace applies
DROPPED_META = frozenset({"tensor_meta"})
SUFFIX = ".trace"
_PY_TARGETS = {"getitem": operator.getitem}
_PACKAGE_DIR = Path(__file__).resolve().parent.parent   # surgery/: its code is part of the key

logger = logging.getLogger("surgery")


class Unserializable(Exception):
    """This traced graph (or model) holds something the cache does not store exactly: trace it each time."""


class Corrupt(Exception):
    """An entry that fails a check: deleted and rebuilt."""


def enabled() -> bool:
    """False when `SURGERY_CACHE` is 0, off, false or no."""
    return os.environ.get("SURGERY_CACHE", "1").strip().lower() not in ("0", "off", "false", "no")


def cache_dir() -> Path:
    """`$SURGERY_CACHE_DIR`, else `$XDG_CACHE_HOME/surgery/traces`, else `~/.cache/surgery/traces`."""
    explicit = os.environ.get("SURGERY_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "surgery" / "traces"


# ------------------------------------------------------------------------------------------------ the key

_FILE_HASHES: dict[tuple, str] = {}


def _file_hash(path: str) -> str:
    stat = os.stat(path)
    memo = (path, stat.st_mtime_ns, stat.st_size)
    if memo not in _FILE_HASHES:
        _FILE_HASHES[memo] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return _FILE_HASHES[memo]


def _directory_hash(directory: str) -> str:
    """SHA-256 over the Python files of `directory` (not its subdirectories): a module class's own file and the
    helpers beside it that its forward may call."""
    digest = hashlib.sha256()
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.name.endswith(".py") and entry.is_file():
            digest.update(f"{entry.name}:{_file_hash(entry.path)}\n".encode())
    return digest.hexdigest()


def _class_sources(model: nn.Module) -> list[tuple[str, str]]:
    """(class, hash of the Python files beside its source file) for every module class in the model;
    Unserializable for a class without a source file."""
    out = {}
    for module in model.modules():
        for cls in type(module).__mro__:
            if cls is nn.Module or cls is object:
                break
            name = f"{cls.__module__}.{cls.__qualname__}"
            if name in out:
                continue
            try:
                path = inspect.getsourcefile(cls)
            except (TypeError, OSError):
                path = None
            if not path or not os.path.isfile(path):
                raise Unserializable(f"no source file for {name}")
            out[name] = _directory_hash(os.path.dirname(os.path.abspath(path)))
    return sorted(out.items())


_CODE_DIGESTS: dict[int, tuple] = {}     # id(code object) -> (the code object, kept alive so the id stays its, digest)


def _code_digest(code) -> str:
    """SHA-256 of a code object: its bytecode, constants (nested code by digest), names, file name, first line
    and line table, so the same source in the same file gives the same digest in every process (`marshal` does
    not: its back-references follow reference counts)."""
    hit = _CODE_DIGESTS.get(id(code))
    if hit is None or hit[0] is not code:
        digest = hashlib.sha256()
        for part in (code.co_code, code.co_linetable if hasattr(code, "co_linetable") else code.co_lnotab):
            digest.update(len(part).to_bytes(8, "little") + part)
        consts = [_const_repr(c) for c in code.co_consts]
        digest.update(repr((consts, code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars,
                            code.co_filename, code.co_firstlineno, getattr(code, "co_qualname", code.co_name),
                            code.co_flags, code.co_argcount, code.co_kwonlyargcount)).encode())
        hit = _CODE_DIGESTS[id(code)] = (code, digest.hexdigest())
    return hit[1]


_CODE_NAMES: dict[int, tuple] = {}       # id(code object) -> (the code object, its names)


def _const_repr(c) -> str:
    """A code constant as text the same in every process: nested code by digest, a frozenset (`x in {"a", "b"}`)
    by its sorted elements (its repr follows the string hash seed)."""
    if isinstance(c, types.CodeType):
        return "code:" + _code_digest(c)
    if isinstance(c, (frozenset, set)):
        return type(c).__name__ + "{" + ",".join(sorted(_const_repr(x) for x in c)) + "}"
    if isinstance(c, tuple):
        return "(" + ",".join(_const_repr(x) for x in c) + ")"
    return type(c).__name__ + ":" + repr(c)


def _names(code) -> frozenset[str]:
    """The global and attribute names a code object and the code objects nested in it read."""
    hit = _CODE_NAMES.get(id(code))
    if hit is None or hit[0] is not code:
        names = set(code.co_names)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                names |= _names(const)
        hit = _CODE_NAMES[id(code)] = (code, frozenset(names))
    return hit[1]


# how far the code walk follows a forward's callees (methods, module functions, functions of imported modules):
# a forward, what it calls, and what those call
CODE_DEPTH = 3
MAPPING_LIMIT = 64     # a mapping of functions a forward names is walked when it holds at most this many entries


class _CodeWalk:
    """The identity of the code a model's forward runs, as it is in this process: each module class's `forward`
    and, up to CODE_DEPTH calls away, the methods of its class, the functions of its module and of the modules
    it imports that the code names, functions held in closures, and the callables a module instance holds
    (an activation function, an instance-level forward) and the methods it names of the objects a module holds
    (`self.kernel.run(q, k)`), the plain module-level values the code names (a flag),
    and torch's global forward hooks. A class-level patch (`LlamaMLP.forward = f`), a patched
    helper (`modeling_llama.apply_rotary_pos_emb = g`) or an edited file elsewhere changes it; the files beside
    each class cover the rest; so does a function the code picks from a mapping it names (a registry of attention
    functions). A Python function is its code's digest, its plain defaults and closure values; a builtin its
    module and name."""

    def __init__(self):
        self.digest = hashlib.sha256()
        self.seen: set[int] = set()
        self.names: set[str] = set()       # every name the walked code reads (methods of held objects: by these)

    def add(self, label: str, fn, depth: int = CODE_DEPTH, owner=None) -> None:
        if isinstance(fn, (staticmethod, classmethod)):
            fn = fn.__func__
        if isinstance(fn, types.MethodType):
            owner, fn = type(fn.__self__) if not isinstance(fn.__self__, type) else fn.__self__, fn.__func__
        if isinstance(fn, functools.partial):
            self.digest.update(f"{label}:partial:{_plain_repr(fn.args)}:{_plain_repr(fn.keywords)}\n".encode())
            fn = fn.func
        if id(fn) in self.seen:
            return
        self.seen.add(id(fn))
        code = getattr(fn, "__code__", None)
        if not isinstance(code, types.CodeType):
            name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
            self.digest.update(f"{label}:{getattr(fn, '__module__', None)}.{name}\n".encode())
            return
        self.digest.update(f"{label}:{_code_digest(code)}:{_plain_repr(fn.__defaults__)}:"
                           f"{_plain_repr(fn.__kwdefaults__)}\n".encode())
        for i, cell in enumerate(fn.__closure__ or ()):
            try:
                value = cell.cell_contents
            except ValueError:          # an empty cell
                continue
            if callable(value) and not isinstance(value, type):
                self.add(f"{label}/closure{i}", value, depth, owner)
            else:
                self.digest.update(f"{label}/closure{i}:{_plain_repr(value)}\n".encode())
        names = _names(code)
        self.names |= names
        if depth <= 0:
            return
        namespace = getattr(fn, "__globals__", {})
        for name in sorted(names):
            for where, value in (("self", getattr(owner, name, None) if owner is not None else None),
                                 ("global", namespace.get(name))):
                if isinstance(value, types.ModuleType):
                    for attr in sorted(names):
                        member = getattr(value, attr, None)
                        if isinstance(member, types.FunctionType):
                            self.add(f"{label}>{name}.{attr}", member, depth - 1)
                elif isinstance(value, (types.FunctionType, types.MethodType, staticmethod, classmethod,
                                        functools.partial)):
                    self.add(f"{label}>{where}.{name}", value, depth - 1, owner if where == "self" else None)
                elif where == "global" and unroll._plain(value):     # a module-level flag a forward reads
                    self.digest.update(f"{label}>{name}={_plain_repr(value)}\n".encode())
                elif where == "global" and hasattr(value, "items") and isinstance(value, collections.abc.Mapping):
                    # a registry of functions the forward picks from (transformers' ALL_ATTENTION_FUNCTIONS, where
                    # a user's `AttentionInterface.register("mine", f)` lands)
                    with contextlib.suppress(Exception):
                        if len(value) <= MAPPING_LIMIT:
                            for key, member in sorted(value.items(), key=lambda kv: repr(kv[0])):
                                if isinstance(member, (types.FunctionType, functools.partial)):
                                    self.add(f"{label}>{name}[{key!r}]", member, depth - 1)

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


def _plain_repr(value) -> str:
    """repr of plain data (scalars, strings, dtypes and containers of them); the type's name for anything else
    (whose repr may hold an address that differs in every process)."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return repr(value)
    if isinstance(value, (tuple, list, dict)) and len(value) > 64:     # a table, not a setting: its size only
        return f"<{type(value).__name__} of {len(value)}>"
    if isinstance(value, (tuple, list)):
        return type(value).__name__ + "(" + ",".join(_plain_repr(v) for v in value) + ")"
    if isinstance(value, dict):
        return "{" + ",".join(f"{_plain_repr(k)}:{_plain_repr(v)}" for k, v in value.items()) + "}"
    if isinstance(value, enum.Enum):
        return f"{type(value).__module__}.{type(value).__qualname__}.{value.name}"
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


def code_and_state(model: nn.Module) -> tuple[str, list]:
    """(the digest of the code the model's forward runs (`_CodeWalk`), each module's private plain attributes,
    enum attributes and the plain fields of the objects it holds, and the private plain values of the config and
    its sub-configs): what changes a traced graph and the structure fingerprint leaves out (a flag a constructor
    kept as `self._causal` or as an enum; a per-layer copy of a config with one field changed; transformers'
    `_experts_implementation`, which picks the experts' kernels)."""
    walk = _CodeWalk()
    private = []
    objects: dict[int, int] = {}      # an object modules hold (a config) -> its number; its state listed once
    held = []
    classes = set()
    for path, module in model.named_modules():
        for cls in type(module).__mro__:
            if cls is nn.Module or cls is object:
                break
            if cls not in classes:
                classes.add(cls)
                forward = cls.__dict__.get("forward")
                if forward is not None:
                    walk.add(f"{cls.__module__}.{cls.__qualname__}.forward", forward, owner=type(module))
        for k, v in vars(module).items():
            if k in unroll.MODULE_STATE:
                continue
            if isinstance(v, (nn.Module, torch.Tensor, type)):
                continue
            if callable(v):
                walk.add(f"{path}:{k}", v, owner=type(module))
            elif unroll._plain(v):
                if k.startswith("_"):      # the public ones are in the fingerprint
                    private.append((path, k, _plain_repr(v)))
            elif isinstance(v, enum.Enum):
                private.append((path, k, _plain_repr(v)))
            elif hasattr(v, "__dict__"):
                # a held object (a per-layer copy of a config, a namespace of options): its plain fields
                number = objects.get(id(v))
                if number is None:
                    number = objects[id(v)] = len(objects)
                    private.append((f"#{number}", type(v).__qualname__, _fields_of(v)))
                    held.append(v)
                private.append((path, k, f"#{number}"))
    # the methods (and properties) of held objects' classes that the walked code names (`self.kernel.run(q, k)`)
    for number, obj in enumerate(held):
        for cls in type(obj).__mro__[:-1]:
            for name in sorted(walk.names.intersection(vars(cls))):
                member = vars(cls)[name]
                if isinstance(member, property):
                    member = member.fget
                if isinstance(member, (types.FunctionType, staticmethod, classmethod)):
                    walk.add(f"#{number}:{cls.__module__}.{cls.__qualname__}.{name}", member, 1,
                             owner=type(obj))
    # torch's global module hooks run in every module's call (the forward ones change the traced graph)
    from torch.nn.modules import module as torch_module
    for table in ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_forward_hooks_with_kwargs",
                  "_global_forward_hooks_always_called"):
        for i, hook in enumerate(getattr(torch_module, table, {}).values()):
            if callable(hook):
                walk.add(f"{table}:{i}", hook)
            else:
                walk.digest.update(f"{table}:{i}={_plain_repr(hook)}\n".encode())
    configs, stack = [], [("", getattr(model, "config", None))]
    while stack:
        where, config = stack.pop()
        if config is None or not hasattr(config, "to_json_string"):
            continue
        for k, v in vars(config).items():
            if hasattr(v, "to_json_string"):
                stack.append((f"{where}.{k}", v))
            elif k.startswith("_") and unroll._plain(v):
                configs.append((where, k, _plain_repr(v)))
    return walk.hexdigest(), private + sorted(configs)



def _fields_of(obj) -> str:
    """An object's public plain and enum fields, one level deep, as text (private ones may be a hash that differs in
    every process: transformers' GenerationConfig `_original_object_hash`)."""
    try:
        fields = vars(obj)
    except TypeError:
        return ""
    return ";".join(f"{k}={_plain_repr(v)}" for k, v in sorted(fields.items())
                    if not k.startswith("_") and (unroll._plain(v) or isinstance(v, enum.Enum)))


def _versions() -> dict:
    from importlib import metadata
    versions = {"python": list(sys.version_info[:3]), "torch": torch.__version__}
    for package in ("surgery", "transformers", "diffusers"):
        module = sys.modules.get(package)
        version = getattr(module, "__version__", None)
        if version is None:
            try:
                version = metadata.version(package)
            except metadata.PackageNotFoundError:
                version = None
        versions[package] = version
    code = hashlib.sha256()
    for path in sorted(_PACKAGE_DIR.rglob("*.py")):
        code.update(f"{path.relative_to(_PACKAGE_DIR)}:{_file_hash(str(path))}\n".encode())
    versions["surgery_code"] = code.hexdigest()
    return versions


def entry_key(model: nn.Module, fingerprint, stack_traces: bool = False) -> str:
    """The entry's name: SHA-256 of what the traced graph depends on (module docstring). Unserializable when a
    module class has no source file."""
    return entry_keys(model, fingerprint)[stack_traces]


def entry_keys(model: nn.Module, fingerprint, state: tuple | None = None) -> tuple[str, str]:
    """The names of the entries without and with the nodes' source lines (`stack_traces`). `state`:
    `code_and_state(model)` when the caller has it."""
    config = getattr(model, "config", None)
    code, private = state if state is not None else code_and_state(model)
    parts = {"format": FORMAT, "fingerprint": repr(fingerprint), "versions": _versions(),
             "sources": _class_sources(model), "code": code, "private": private,
             "attention": repr(getattr(config, "_attn_implementation", None))}
    return tuple(hashlib.sha256(json.dumps({**parts, "stack_traces": flag}, sort_keys=True,
                                           default=repr).encode()).hexdigest() for flag in (False, True))


# ------------------------------------------------------------------------------------------------ values

def _enc(x):
    """An argument or metadata value as JSON data; tagged objects for what JSON lacks."""
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return {"f": repr(x)}      # exact, and inf/nan too
    if isinstance(x, fx.Node):
        return {"n": x.name}
    if isinstance(x, tuple):
        return {"tuple": [_enc(v) for v in x]}
    if isinstance(x, list):
        return [_enc(v) for v in x]
    if isinstance(x, dict):
        if not all(isinstance(k, str) for k in x):
            raise Unserializable(f"dict with non-string keys: {list(x)[:3]}")
        return {"dict": [[k, _enc(v)] for k, v in x.items()]}
    if isinstance(x, torch.dtype):
        return {"dtype": str(x).removeprefix("torch.")}
    if isinstance(x, torch.device):
        return {"device": str(x)}
    if isinstance(x, torch.layout):
        return {"layout": str(x).removeprefix("torch.")}
    if isinstance(x, torch.memory_format):
        return {"memory_format": str(x).removeprefix("torch.")}
    if isinstance(x, torch.Tensor):
        shape, stride = list(x.shape), list(x.stride()) if x.layout == torch.strided else None
        if not all(type(d) is int for d in shape + (stride or [])):
            raise Unserializable("a symbolic size")
        return {"T": [shape, stride, str(x.dtype).removeprefix("torch."), str(x.device), bool(x.requires_grad)]}
    raise Unserializable(f"a {type(x).__name__} value")


def _torch_attr(kind: str, name: str):
    value = getattr(torch, name, None)
    expected = {"dtype": torch.dtype, "layout": torch.layout, "memory_format": torch.memory_format}[kind]
    if not isinstance(value, expected):
        raise Corrupt(f"not a torch {kind}: {name!r}")
    return value


def _dec(x, nodes: dict, fake):
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, list):
        return [_dec(v, nodes, fake) for v in x]
    if not isinstance(x, dict) or len(x) != 1:
        raise Corrupt(f"unexpected value {x!r:.80}")
    (tag, v), = x.items()
    if tag == "f":
        return float(v)
    if tag == "n":
        return nodes[v]
    if tag == "tuple":
        return tuple(_dec(a, nodes, fake) for a in v)
    if tag == "dict":
        return {k: _dec(a, nodes, fake) for k, a in v}
    if tag == "device":
        return torch.device(v)
    if tag in ("dtype", "layout", "memory_format"):
        return _torch_attr(tag, v)
    if tag == "T":
        return fake(*v)
    raise Corrupt(f"unknown tag {tag!r}")


class _FakeTensors:
    """FakeTensors (one FakeTensorMode) by shape, stride, dtype, device and requires_grad; equal metadata share
    one tensor (the graph's values are read, never written: the layers of a model repeat the same few)."""

    def __init__(self):
        from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
        self.mode, self.cls, self.made = FakeTensorMode(allow_non_fake_inputs=True), FakeTensor, {}

    def __call__(self, shape, stride, dtype, device, requires_grad):
        key = (tuple(shape), None if stride is None else tuple(stride), dtype, device, requires_grad)
        if key not in self.made:
            dtype = _torch_attr("dtype", dtype)
            meta = (torch.empty(shape, dtype=dtype, device="meta") if stride is None else
                    torch.empty_strided(shape, stride, dtype=dtype, device="meta"))
            t = self.cls(self.mode, meta, torch.device(device))
            if requires_grad:
                t.requires_grad_(True)
            self.made[key] = t
        return self.made[key]


def _target(node: fx.Node):
    if node.op in ("placeholder", "output"):
        return node.target
    if node.op != "call_function":
        raise Unserializable(f"a {node.op} node")
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return {"op": [t.namespace, t._opname, t._overloadname]}
    for name, fn in _PY_TARGETS.items():
        if t is fn:
            return {"py": name}
    raise Unserializable(f"a call of {t!r}")


def _resolve(target):
    if isinstance(target, str):
        return target
    if "op" in target:
        namespace, name, overload = target["op"]
        try:
            return getattr(getattr(getattr(torch.ops, namespace), name), overload)
        except (AttributeError, RuntimeError) as exc:
            raise Corrupt(f"no operator {namespace}::{name}.{overload}") from exc
    if target.get("py") in _PY_TARGETS:
        return _PY_TARGETS[target["py"]]
    raise Corrupt(f"unknown target {target!r}")


# ------------------------------------------------------------------------------------------------ Traced

_FIELDS = {"graph", "boundaries", "params", "buffers", "calls", "module_types", "constants", "stack_traces"}


def encode(traced: Traced) -> dict:
    """`traced` as JSON data; Unserializable when it holds what this format does not store exactly."""
    for f in dataclasses.fields(traced):
        if f.name not in _FIELDS and getattr(traced, f.name) not in (None, {}, [], ()):
            raise Unserializable(f"Traced.{f.name}")
    nodes = []
    stacks: list = []                    # each distinct module stack once: most of an entry's size otherwise
    stack_at: dict[str, int] = {}
    by_object: dict[int, int] = {}       # the unroll shares one stack dict among a module's nodes
    for n in traced.graph.nodes:
        meta = {}
        for k, v in n.meta.items():
            if k in DROPPED_META:
                continue
            if k == "nn_module_stack" and isinstance(v, dict):
                index = by_object.get(id(v))
                if index is None:
                    encoded = _enc(v)
                    index = stack_at.setdefault(json.dumps(encoded), len(stacks))
                    if index == len(stacks):
                        stacks.append(encoded)
                    by_object[id(v)] = index
                meta[k] = {"stack": index}
            else:
                meta[k] = _enc(v)
        nodes.append([n.name, n.op, _target(n), _enc(n.args), _enc(n.kwargs), meta, [u.name for u in n.users]])
    return {
        "nodes": nodes,
        "stacks": stacks,
        "boundaries": [[v.name, [_enc(dataclasses.astuple(b)) for b in bs]] for v, bs in traced.boundaries.items()],
        "params": traced.params, "buffers": traced.buffers, "calls": traced.calls,
        "module_types": {k: f"{t.__module__}.{t.__qualname__}" for k, t in traced.module_types.items()},
        "constants": {k: [str(t.dtype).removeprefix("torch."), list(t.shape), t.tolist()]
                      for k, t in traced.constants.items()},
        "stack_traces": traced.stack_traces,
    }


def decode(data: dict, model: nn.Module) -> Traced:
    """Rebuild the Traced of `encode`; the module types are the live model's (checked by name)."""
    fake = _FakeTensors()
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    stacks: dict[int, dict] = {}

    def stack(ref) -> dict:
        """A module stack of the entry's table, decoded once and shared by its nodes (as the unroll shares it)."""
        index = ref.get("stack") if isinstance(ref, dict) and len(ref) == 1 else None
        if type(index) is not int or not 0 <= index < len(data["stacks"]):
            raise Corrupt(f"not a module stack reference: {ref!r:.80}")
        if index not in stacks:
            stacks[index] = _dec(data["stacks"][index], nodes, fake)
        return stacks[index]
    for name, op, target, args, kwargs, meta, _ in data["nodes"]:
        args, kwargs = _dec(args, nodes, fake), _dec(kwargs, nodes, fake)
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise Corrupt(f"node {name!r} has arguments of another kind")
        node = unroll.new_node(graph, op, _resolve(target), args, kwargs, name, None)   # as create_node
        if node.name != name:
            raise Corrupt(f"node {name!r} came back as {node.name!r}")
        for k, v in meta.items():
            node.meta[k] = stack(v) if k == "nn_module_stack" else _dec(v, nodes, fake)
        nodes[name] = node
    for name, *_, users in data["nodes"]:   # the users in their traced order (analysis reads the first ones)
        node = nodes[name]
        if set(users) != {u.name for u in node.users}:
            raise Corrupt(f"users of {name!r} differ from the graph's")
        node.users = dict.fromkeys(nodes[u] for u in users)
    live = dict(model.named_modules())
    module_types = {}
    for path, qualified in data["module_types"].items():
        cls = type(live[path]) if path in live else None
        if cls is None or f"{cls.__module__}.{cls.__qualname__}" != qualified:
            raise Corrupt(f"module {path!r} is not a {qualified}")
        module_types[path] = cls
    boundaries = {nodes[v]: [Boundary(*_dec(b, nodes, fake)) for b in bs] for v, bs in data["boundaries"]}
    constants = {k: torch.tensor(values, dtype=_torch_attr("dtype", dtype)).reshape(shape)
                 for k, (dtype, shape, values) in data["constants"].items()}
    return Traced(graph=graph, boundaries=boundaries, params=dict(data["params"]), buffers=dict(data["buffers"]),
                  calls=dict(data["calls"]), module_types=module_types, constants=constants,
                  stack_traces=bool(data["stack_traces"]))


# ------------------------------------------------------------------------------------------------ files

def _path(key: str) -> Path:
    if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
        raise ValueError(f"not a cache key: {key!r}")
    return cache_dir() / (key + SUFFIX)


def _header(key: str, payload: bytes) -> bytes:
    return MAGIC + b" " + json.dumps({"format": FORMAT, "key": key, "sha256": hashlib.sha256(payload).hexdigest(),
                                      "size": len(payload)}).encode() + b"\n"


def read(key: str, model: nn.Module) -> Traced | None:
    """The cached Traced of `key`, or None (a missing entry; a bad one is deleted first)."""
    path = _path(key)
    try:
        blob = path.read_bytes()
    except OSError:
        return None
    try:
        head, _, payload = blob.partition(b"\n")
        magic, _, header = head.partition(b" ")
        if magic != MAGIC:
            raise Corrupt("not a surgery trace file")
        header = json.loads(header)
        if header.get("format") != FORMAT or header.get("key") != key:
            raise Corrupt("another format or key")
        if header.get("size") != len(payload) or header.get("sha256") != hashlib.sha256(payload).hexdigest():
            raise Corrupt("truncated or altered (size or SHA-256 mismatch)")
        with _collection_paused():
            traced = decode(json.loads(zlib.decompress(payload)), model)
    except Exception as exc:  # noqa: BLE001 - whatever is wrong with the file, it is not trusted
        logger.info("trace cache: %s is unusable (%s): deleted, tracing again", path, exc)
        with _suppress_os_error():
            path.unlink()
        return None
    with _suppress_os_error():
        os.utime(path)   # recently used: kept when the cache is trimmed
    return traced


def write(key: str, traced: Traced) -> Path | None:
    """Store `traced` under `key` (temp file + rename); None when it cannot be stored exactly or written."""
    try:
        payload = zlib.compress(json.dumps(encode(traced), separators=(",", ":")).encode(), 1)
    except Unserializable as exc:
        logger.debug("trace cache: not stored (%s)", exc)
        return None
    path = _path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=SUFFIX, dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_header(key, payload) + payload)
            os.replace(tmp, path)
        except BaseException:
            with _suppress_os_error():
                os.unlink(tmp)
            raise
        _trim(path.parent)
    except OSError as exc:   # a read-only or full disk costs a trace next time, nothing else
        logger.debug("trace cache: not written (%s)", exc)
        return None
    return path


def _trim(directory: Path) -> None:
    """Keep the MAX_ENTRIES most recently used entries; temporary files of writers that died an hour ago go."""
    import time
    entries = sorted(directory.glob("[0-9a-f]*" + SUFFIX), key=lambda p: p.stat().st_mtime, reverse=True)
    stale = [p for p in directory.glob(".tmp-*" + SUFFIX) if p.stat().st_mtime < time.time() - 3600]
    for old in entries[MAX_ENTRIES:] + stale:
        with _suppress_os_error():
            old.unlink()


@contextlib.contextmanager
def _collection_paused():
    """Python's cyclic garbage collector off while a trace is decoded, as it was after: the decoded JSON tree
    (hundreds of thousands of short-lived containers) would otherwise outlive the collector's young passes, be
    promoted, and trigger a full collection of every object in the process (about 0.3 s with torch and
    transformers imported) for garbage reference counting frees anyway."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _suppress_os_error:
    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        return kind is not None and issubclass(kind, OSError)


def cached_trace(model: nn.Module, example_inputs, fingerprint, stack_traces: bool = False,
                 state: tuple | None = None) -> Traced:
    """`surgery.trace.trace(model, example_inputs, stack_traces=...)`, read from the cache when an entry for this
    model exists and written to it when not (`fingerprint`: the structure fingerprint; None, or the cache off,
    traces). A graph with the nodes' source lines answers for one without: once a model needed them (a rewrite
    raised NeedsStackTraces), its entry with them replaces the one without."""
    from surgery import trace as stage2
    if fingerprint is None or not enabled():
        return stage2.trace(model, example_inputs, stack_traces=stack_traces)
    try:
        plain, with_lines = entry_keys(model, fingerprint, state)
    except Unserializable as exc:
        logger.debug("trace cache: not used (%s)", exc)
        return stage2.trace(model, example_inputs, stack_traces=stack_traces)
    from surgery.progress import stage
    for key, lines in ((with_lines, True), (plain, False)) if not stack_traces else ((with_lines, True),):
        if _path(key).is_file():
            with stage(f"trace {type(model).__name__}: read from the cache {_path(key)}"):
                traced = read(key, model)
            if traced is not None and traced.stack_traces == lines:
                return traced
    traced = stage2.trace(model, example_inputs, stack_traces=stack_traces)
    write(with_lines if stack_traces else plain, traced)
    if stack_traces:
        with _suppress_os_error():
            _path(plain).unlink()
    return traced
