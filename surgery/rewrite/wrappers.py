"""Models handed over inside a wrapper: torch.compile's OptimizedModule (`_orig_mod`), DistributedDataParallel,
DataParallel and FullyShardedDataParallel (`.module`). Every public entry point works on the wrapped model, so
hooks, adapter names and checkpoint keys never carry the wrapper's prefix."""
from __future__ import annotations

import functools
from typing import Callable

from torch import nn


def _wrapper_types() -> tuple[type, ...]:
    types: list[type] = [nn.DataParallel, nn.parallel.DistributedDataParallel]
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        types.append(FullyShardedDataParallel)
    except ImportError:   # a build without torch.distributed
        pass
    return tuple(types)


def unwrap(model):
    """The user's model inside any number of wrappers (the argument itself when it is not wrapped)."""
    wrappers = _wrapper_types()
    for _ in range(8):
        inner = None
        if isinstance(model, wrappers):
            inner = model.module
        elif isinstance(model, nn.Module) and isinstance(model.__dict__.get("_modules", {}).get("_orig_mod"), nn.Module) \
                and type(model).__name__ == "OptimizedModule":
            inner = model._orig_mod
        if inner is None:
            return model
        model = inner
    return model


def unwrapping(fn: Callable) -> Callable:
    """Call `fn` with its first argument unwrapped; where it returns that model, return what the caller gave."""
    @functools.wraps(fn)
    def call(model, *args, **kwargs):
        inner = unwrap(model)
        result = fn(inner, *args, **kwargs)
        return model if result is inner and inner is not model else result
    return call
