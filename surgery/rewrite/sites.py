"""Modules replaced after apply: a host module that carries adapters (hooks, a parametrization, a routed
forward) and is later swapped for another one (`resize_token_embeddings`, a user's `model.lm_head = ...`) takes
its adapters with it. Surgery remembers where each such module sits (its path) and checks, at the first root
forward after the module tree on those paths changed and before merge/unmerge/save/to_peft/export, that it still
sits there; if not, it raises, naming the module, instead of running, merging or saving without the adapter.

A change is seen where it happens: the `_modules` dict of every module on a host's path (the root included) is
replaced at record time by a dict of the same kind that reports its changes (a child set, deleted or replaced:
setattr, delattr, add_module, ModuleList/ModuleDict/Sequential edits, `_modules[name] = ...`); a report arms
the model's one root pre-hook (`install_root_hook`), which checks the hosts at the next forward, records the
links again when they are all in place, and takes itself off when nothing else needs it (it also records the
root call while a hook or module reads it: `RuntimeState.need_call`). While armed, every module on the hosts'
paths has a pre-hook too (`_PartCheck`): a part called alone checks the hosts under it. A replaced host stays
recorded (a later apply or remove of another set does not forget it) until its own adapters are removed. So a
model whose tree stays as recorded runs with no root hook at all (issue 20: each root hook costs several µs of
cold cache after a train step). What such a dict cannot see: `_modules` itself reassigned (`module._modules =
{...}`, private) without a delattr before it. The dicts go back to plain ones when the last adapter is removed;
copies and pickles keep reporting to the copy's own model."""
from __future__ import annotations

import copy
import functools
import inspect
from collections import OrderedDict
from typing import Callable

from torch import nn
from torch.nn.utils import parametrize

from surgery.errors import RewriteError
from surgery.rewrite import compose
from surgery.rewrite.host import _capture_call, _positional


def _carries(module: nn.Module) -> bool:
    """Whether `module` holds any surgery state: hooks of surgery's (not the tree checks of this module), a surgery
    parametrization, a routed forward (not a forward of the user's or another library's, e.g. accelerate's)."""
    if any(key.startswith("_surgery") for key in module.__dict__) or \
            type(module.__dict__.get("forward")).__module__.startswith("surgery."):
        return True
    if parametrize.is_parametrized(module):
        for plist in module.parametrizations.values():
            if any(type(p).__module__.startswith("surgery.") for p in plist):
                return True
    for hooks in (module._forward_hooks, module._forward_pre_hooks):
        for hook in hooks.values():
            fn = hook.func if isinstance(hook, functools.partial) else getattr(hook, "__func__", hook)
            if getattr(fn, "__module__", "").startswith("surgery.") and not isinstance(fn, _PartCheck):
                return True
    return False


def record_hosts(model: nn.Module, store) -> None:
    """Remember where every module carrying adapters sits (after apply, remove, merge)."""
    hosts = []
    for parent_path, parent in model.named_modules():
        for name, child in parent._modules.items():
            if child is not None and name != "surgery_adapters" and not parent_path.startswith("surgery_adapters") \
                    and _carries(child):
                hosts.append((f"{parent_path}.{name}" if parent_path else name, child))
    # a host replaced since the last record whose adapters are still on it (not removed) stays recorded at its
    # path: applying or removing another adapter set must not forget it (the next forward still raises)
    found = {id(child) for _, child in hosts}
    hosts += [(path, child) for path, child in store.__dict__.get("hosts", ())
              if id(child) not in found and _carries(child)]
    store.__dict__["hosts"] = hosts
    _relink(model, store)


def _links(model: nn.Module, hosts: list) -> list:
    """The parent -> child links on the hosts' paths, each once (the root's parent recorded as None: the model
    checked): while every link holds, every host is still at its path (check_hosts' quick test)."""
    links, seen = [], set()
    for path, child in hosts:
        parent, module = None, model
        names = path.split(".")
        for i, name in enumerate(names):
            module = module._modules.get(name)
            # the last link is to the host itself, which a replaced host (still recorded) no longer satisfies
            target = child if i == len(names) - 1 else module
            key = (id(parent), name, id(target))
            if key not in seen:
                seen.add(key)
                links.append((parent, name, target))
            if module is None:      # a replaced host's path that no longer exists: that link is broken
                break
            parent = module
    return links


def _links_hold(model: nn.Module, links) -> bool:
    """A link to None is a path that no longer exists (a deleted layer above a replaced host): broken. A plain
    loop of common bytecodes: right after a train step's backward and optimizer step (cold caches) it costs half
    of what the same test in map/all/operator.is_ chains costs (12 vs 24 us on MiniGPT)."""
    for parent, name, child in links:
        if child is None or (model if parent is None else parent)._modules.get(name) is not child:
            return False
    return True


def check_hosts(model: nn.Module, store, doing: str) -> None:
    """Raise if a module that carries adapters was replaced (or deleted, or moved with a replaced ancestor)
    since apply."""
    links = store.__dict__.get("host_links")
    if links is not None:
        if _links_hold(model, links):
            return
    for path, child in store.__dict__.get("hosts", ()):    # a link changed: is each host still at its path?
        if _module_at(model, path) is not child:
            raise _replaced(path, doing)


def _module_at(root: nn.Module | None, path: str) -> nn.Module | None:
    """The module at dotted `path` under `root` through the `_modules` tables (no `__getattr__`), None where the
    path no longer exists."""
    module = root
    for name in path.split("."):
        module = module._modules.get(name) if module is not None else None
    return module


def _replaced(path: str, doing: str) -> RewriteError:
    return RewriteError(
        f"{path} was replaced after its adapters were applied (e.g. by resize_token_embeddings), so its "
        f"adapters no longer run; refusing to {doing}. Remove the adapters and apply them again to the "
        f"new module (or change the model before applying)")


# ---------------------------------------------------------------- watching the module tree

class _Watching:
    """A `_modules` dict that calls its watchers after every change of its children (see the module docstring).
    Reads are the base dict's own (C) methods; copies and pickles are rebuilt without calling the watchers."""

    __slots__ = ()

    def _report(self):
        for watcher in tuple(getattr(self, "_surgery_watchers", ())):
            watcher()

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self._report()

    def __delitem__(self, key):
        super().__delitem__(key)
        self._report()

    def pop(self, *args):
        try:
            return super().pop(*args)
        finally:
            self._report()

    def popitem(self, *args):
        try:
            return super().popitem(*args)
        finally:
            self._report()

    def clear(self):
        super().clear()
        self._report()

    def update(self, *args, **kwargs):
        try:
            super().update(*args, **kwargs)
        finally:
            self._report()

    def setdefault(self, key, default=None):
        try:
            return super().setdefault(key, default)
        finally:
            self._report()

    def __ior__(self, other):
        self.update(other)
        return self

    def __reduce_ex__(self, protocol):
        return _rebuild, (type(self), list(self.items()), list(getattr(self, "_surgery_watchers", ())))

    def copy(self):   # a plain copy (DataParallel's replicas copy `_modules`): reports to nobody
        return _PLAIN[type(self)](self)


class _WatchedDict(_Watching, dict):
    __slots__ = ("_surgery_watchers",)


class _WatchedOrderedDict(_Watching, OrderedDict):
    __slots__ = ("_surgery_watchers",)


_PLAIN = {_WatchedDict: dict, _WatchedOrderedDict: OrderedDict}


def _rebuild(cls, items, watchers):
    watched = cls()
    watched.update(items)           # no watchers yet: nothing reported
    watched._surgery_watchers = watchers
    return watched


def _watch(parent: nn.Module, watcher: Callable[[], None]):
    modules = parent.__dict__.get("_modules")
    if not isinstance(modules, _Watching):
        modules = (_WatchedOrderedDict if isinstance(modules, OrderedDict) else _WatchedDict)(modules or {})
        modules._surgery_watchers = []
        parent.__dict__["_modules"] = modules
    if not any(w is watcher for w in modules._surgery_watchers):
        modules._surgery_watchers.append(watcher)
    return modules


def _unwatch(parent: nn.Module, modules, watcher: Callable[[], None]) -> None:
    watchers = getattr(modules, "_surgery_watchers", [])
    watchers[:] = [w for w in watchers if w is not watcher]
    if not watchers and parent.__dict__.get("_modules") is modules:
        parent.__dict__["_modules"] = _PLAIN[type(modules)](modules)


def _relink(model: nn.Module, store) -> None:
    """Record the links to the hosts (each at its path now) and watch the `_modules` of every module on them
    (and no others)."""
    links = store.__dict__["host_links"] = _links(model, store.__dict__.get("hosts", ()))
    watcher = store.__dict__.get("tree_changed")
    if watcher is None:     # no root hook installed (yet): nothing to arm
        return
    parents = {}
    for parent, _, _ in store.__dict__.get("host_links", ()):
        parent = model if parent is None else parent
        parents[id(parent)] = parent
    watched = [(parent, _watch(parent, watcher)) for parent in parents.values()]
    # the path of each module on the hosts' paths but the root: called directly (`model.model(...)`, a T5's
    # encoder), it checks the hosts under it while the tree may have changed (`_PartCheck`)
    paths, entries = {}, {}
    for path, _ in store.__dict__.get("hosts", ()):
        module, prefix, repeated = model, "", False
        for name in path.split(".")[:-1]:
            parent, module = module, module._modules.get(name)
            if module is None:
                break
            prefix = f"{prefix}.{name}" if prefix else name
            paths.setdefault(id(module), (module, prefix))
            # a call can start here (`model.model(...)`, an encoder run by generate()): not inside a layer stack
            repeated = repeated or isinstance(parent, _CONTAINERS)
            if not repeated and not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
                entries.setdefault(id(module), module)
    store.__dict__["parts"] = list(paths.values())
    store.__dict__["entries"] = list(entries.values())
    kept = {id(modules) for _, modules in watched}
    for parent, modules in store.__dict__.get("watched", ()):
        if id(modules) not in kept:
            _unwatch(parent, modules, watcher)
    store.__dict__["watched"] = watched
    store.__dict__["armed"] = not _links_hold(model, links)   # a replaced host still recorded: check again
    for key in ("part_hooks", "entry_hooks"):     # on the parts as they are now, where wanted
        for handle in store.__dict__.pop(key, None) or ():
            handle.remove()
    _sync_root(model, store)


# ---------------------------------------------------------------- the root pre-hook

def install_root_hook(model: nn.Module, store) -> Callable[[], None]:
    """Manage the model's one root pre-hook (one cold entry per forward where there is one): it exists while
    the module tree on the hosts' paths may have changed since it was recorded (it then checks the hosts), or
    while something reads the root call (`RuntimeState.need_call`, or a Parallel/MixedBatch composition: it
    records the call, host.py's `_capture_call`). Returns the remover of the hook and of the watching."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        signature = None
    store.__dict__.update(root_call=(signature, _positional(signature)), root_hook=None, armed=False,
                          tree_changed=_OfModel(_tree_changed, model, store))
    store.runtime.on_change = _OfModel(_sync_root, model, store)
    _relink(model, store)
    _sync_root(model, store)
    return functools.partial(_uninstall_root, model, store)


class _OfModel:
    """fn(model, store) as a watcher: a deep copy of the whole model calls the copy's; a deep copy of a part of
    it (a layer, whose `_modules` or hooks lead here) calls nothing, and does not copy the whole model with it.
    A pickle cannot tell the two apart: pickling a part of an adapted model alone carries the model with it
    (pickle the model, or a state_dict)."""

    __slots__ = ("fn", "model", "store")

    def __init__(self, fn, model, store):
        self.fn, self.model, self.store = fn, model, store

    def __call__(self):
        if self.model is not None:
            self.fn(self.model, self.store)

    def __deepcopy__(self, memo):
        model = memo.get(id(self.model))
        if model is None:       # the model itself is not being copied
            return _OfModel(self.fn, None, None)
        return _OfModel(self.fn, model, copy.deepcopy(self.store, memo))

    def __reduce__(self):
        return _OfModel, (self.fn, self.model, self.store)


class _PartCheck:
    """The pre-hook of a module on the hosts' paths while the tree may have changed: a forward of that module
    alone (`model.model(...)`, `model.get_encoder()(...)`) raises if a host under it was replaced, as the root's
    does. It checks the part it was installed on, also when called on a DataParallel replica of it (whose
    children are the replica's copies, never the recorded hosts). A deep copy of a part alone (not of the whole
    model) checks nothing, as `_OfModel`."""

    __slots__ = ("model", "store", "path", "part")

    def __init__(self, model, store, path: str, part):
        self.model, self.store, self.path, self.part = model, store, path, part

    def __call__(self, module, args):
        if self.store is None or not self.store.__dict__.get("armed"):
            return
        prefix = self.path + "."
        for path, child in self.store.__dict__.get("hosts", ()):
            if path.startswith(prefix) and _module_at(self.part, path[len(prefix):]) is not child:
                raise _replaced(path, "run the forward")

    def __deepcopy__(self, memo):
        model = memo.get(id(self.model))
        if model is None:
            return _PartCheck(None, None, self.path, None)
        return _PartCheck(model, copy.deepcopy(self.store, memo), self.path, copy.deepcopy(self.part, memo))

    def __reduce__(self):
        return _PartCheck, (self.model, self.store, self.path, self.part)


def _uninstall_root(model: nn.Module, store) -> None:
    store.runtime.on_change = None
    for key in ("part_hooks", "entry_hooks"):
        for handle in store.__dict__.pop(key, None) or ():
            handle.remove()
    watcher = store.__dict__.pop("tree_changed", None)
    for parent, modules in store.__dict__.pop("watched", ()):
        _unwatch(parent, modules, watcher)
    handle = store.__dict__.pop("root_hook", None)
    if handle is not None:
        handle.remove()


def _tree_changed(model: nn.Module, store) -> None:
    store.__dict__["armed"] = True
    _sync_root(model, store)


def _sync_root(model: nn.Module, store) -> None:
    """Install the root pre-hook where something needs it, take it off where nothing does."""
    if "root_call" not in store.__dict__:   # being copied or unpickled: the copy's state is complete later
        return
    runtime = store.runtime
    reading = bool(runtime.readers) or isinstance(runtime.composition, (compose.Parallel, compose.MixedBatch))
    wanted = store.__dict__.get("armed") or reading
    handle = store.__dict__.get("root_hook")
    if wanted and handle is None:
        signature, positional = store.__dict__["root_call"]
        store.__dict__["root_hook"] = model.register_forward_pre_hook(
            functools.partial(_root_call, store, runtime, signature, positional), with_kwargs=True, prepend=True)
    elif not wanted and handle is not None:
        store.__dict__["root_hook"] = None
        handle.remove()
    # while something reads the call, a call of a part alone starts a call as the root's does (`_CallEntry`)
    entry_hooks = store.__dict__.get("entry_hooks")
    if reading and entry_hooks is None:
        store.__dict__["entry_hooks"] = _install_entries(model, store, runtime)
    elif not reading and entry_hooks is not None:
        store.__dict__["entry_hooks"] = None
        for handle in entry_hooks:
            handle.remove()
    # while armed, each module on the hosts' paths checks the hosts under it when called without the root
    armed, handles = store.__dict__.get("armed"), store.__dict__.get("part_hooks")
    if armed and handles is None:
        store.__dict__["part_hooks"] = [
            part.register_forward_pre_hook(_PartCheck(model, store, path, part), prepend=True)
            for part, path in store.__dict__.get("parts", ())]
    elif not armed and handles is not None:
        store.__dict__["part_hooks"] = None
        for handle in handles:
            handle.remove()


def _root_call(store, runtime, signature, positional: tuple[str, ...], mod, args, kwargs):
    """The root pre-hook (a partial of this function: the model deep-copies and pickles)."""
    if store.__dict__.get("armed"):
        # the model the store belongs to: `mod` itself, or the model a DataParallel replica `mod` was made from
        # (whose children are the replica's copies, never the recorded hosts)
        model = getattr(store.__dict__.get("tree_changed"), "model", None)
        model = mod if model is None else model
        check_hosts(model, store, "run the forward")    # raises, and stays armed, while a host is missing
        _relink(model, store)                            # all in place: watch the tree as it is now
    if runtime.readers or isinstance(runtime.composition, (compose.Parallel, compose.MixedBatch)):
        return _enter_call(runtime, signature, positional, mod, args, kwargs)
    return None


# ---------------------------------------------------------------- where a call starts

_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


def _enter_call(runtime, signature, positional, mod, args, kwargs):
    """A forward of the root or of a part (`_CallEntry`) begins: the outermost one in this thread records its
    inputs and clears what the previous call left (`_capture_call`); one nested in it (the base model inside
    the LM's forward) leaves them (an encoder's 4-D mask is no input positions). `_leave_call` ends it."""
    local = runtime._local.__dict__
    depth = local.get("depth", 0)
    local["depth"] = depth + 1
    if depth:
        return None
    return _capture_call(runtime, signature, positional, mod, args, kwargs)


def _leave_call(runtime, mod, args, out):
    """The forward hook (always called, also when the forward raises) that ends `_enter_call`'s call."""
    local = runtime._local.__dict__
    local["depth"] = max(local.get("depth", 0) - 1, 0)


class _CallEntry:
    """The pre-hook of the root (after `_root_call`'s check) and of each part a call can start at, while something
    reads the per-call state: a part called alone (`model.model(ids, attention_mask=...)`, ALBERT's
    `model.albert(...)`) then reads its own call's mask and counts its own repeated calls from zero, not what the
    last root call left. Deep-copies and pickles with the model (its state is the signature and the runtime)."""

    __slots__ = ("runtime", "signature", "positional")

    def __init__(self, runtime, signature):
        self.runtime, self.signature, self.positional = runtime, signature, _positional(signature)

    def __call__(self, mod, args, kwargs):
        return _enter_call(self.runtime, self.signature, self.positional, mod, args, kwargs)

    def __reduce__(self):
        return _CallEntry, (self.runtime, self.signature)


def _install_entries(model: nn.Module, store, runtime) -> list:
    """The root's `_leave_call` and each entry part's `_CallEntry` and `_leave_call` (see `_enter_call`)."""
    leave = functools.partial(_leave_call, runtime)
    handles = [model.register_forward_hook(leave, always_call=True)]
    for part in store.__dict__.get("entries", ()):
        try:
            signature = inspect.signature(part.forward)
        except (TypeError, ValueError):
            signature = None
        handles.append(part.register_forward_pre_hook(_CallEntry(runtime, signature), with_kwargs=True,
                                                      prepend=True))
        handles.append(part.register_forward_hook(leave, always_call=True))
    return handles
