"""Modules replaced after apply: a host module that carries adapters (hooks, a parametrization, a routed
forward) and is later swapped for another one (`resize_token_embeddings`, a user's `model.lm_head = ...`) takes
its adapters with it. Surgery remembers where each such module sits (its path) and checks, at
every root forward and before merge/save/export, that it still sits there; if not, it raises, naming the
module, instead of running, merging or saving without the adapter."""
from __future__ import annotations

import functools

from torch import nn
from torch.nn.utils import parametrize

from surgery.errors import RewriteError


def _carries(module: nn.Module) -> bool:
    """Whether `module` holds any surgery state: hooks of surgery's, a surgery parametrization, a routed forward."""
    if any(key.startswith("_surgery") for key in module.__dict__) or "forward" in module.__dict__:
        return True
    if parametrize.is_parametrized(module):
        for plist in module.parametrizations.values():
            if any(type(p).__module__.startswith("surgery.") for p in plist):
                return True
    for hooks in (module._forward_hooks, module._forward_pre_hooks):
        for hook in hooks.values():
            fn = hook.func if isinstance(hook, functools.partial) else getattr(hook, "__func__", hook)
            if getattr(fn, "__module__", "").startswith("surgery."):
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
    # the parent -> child links on the hosts' paths, each once (the root's parent recorded as None: the model
    # checked): while every link holds, every host is still at its path (check_hosts' quick test, at every forward)
    links, seen = [], set()
    for path, child in hosts:
        parent, module = None, model
        for name in path.split("."):
            module, key = module._modules.get(name), (id(parent), name)
            if key not in seen:
                seen.add(key)
                links.append((parent, name, module))
            parent = module
    store.__dict__["hosts"], store.__dict__["host_links"] = hosts, links


def check_hosts(model: nn.Module, store, doing: str) -> None:
    """Raise if a module that carries adapters was replaced (or deleted, or moved with a replaced ancestor)
    since apply."""
    links = store.__dict__.get("host_links")
    if links is not None:
        # a plain loop of common bytecodes: right after a train step's backward and optimizer step (cold caches)
        # it costs half of what the same test in map/all/operator.is_ chains costs (12 vs 24 us on MiniGPT)
        for parent, name, child in links:
            if (model if parent is None else parent)._modules.get(name) is not child:
                break
        else:
            return
    for path, child in store.__dict__.get("hosts", ()):    # a link changed: is each host still at its path?
        module = model
        for name in path.split("."):
            module = module._modules.get(name) if module is not None else None
        if module is not child:
            raise RewriteError(
                f"{path} was replaced after its adapters were applied (e.g. by resize_token_embeddings), so its "
                f"adapters no longer run; refusing to {doing}. Remove the adapters and apply them again to the "
                f"new module (or change the model before applying)")
