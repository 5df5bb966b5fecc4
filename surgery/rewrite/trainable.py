"""Only the active adapters train.

`set_active(model, "a")` switches adapter b off in the forward; its parameters (its modules' and the base
parameters its `train` rules select) then get `requires_grad=False` too, so an optimizer or
DistributedDataParallel sees only what the forward uses. The flags they had are kept on the store and given
back when b is active again (or every adapter is: `set_active(model, None)`), or when b is removed.

Operations that record and restore flags themselves (merge, unmerge, remove, add_fusion) run inside
`settled(store)`: the paused flags are given back first, so what they record is the user's, and the adapters
that are still inactive afterwards are paused again.
"""
from __future__ import annotations

import contextlib

from torch import nn

PAUSED_ATTR = "paused_flags"


def _paused(store) -> dict[int, nn.Parameter]:
    return store.__dict__.setdefault(PAUSED_ATTR, {})


def adapter_parameters(store, name: str) -> list[nn.Parameter]:
    """Adapter set `name`'s parameters: its modules' and the base parameters its train rules select."""
    params = list(store.adapters[name].parameters()) if name in store.adapters else []
    record = store.records.get(name)
    return params + ([p for p, _ in record.trained] if record is not None else [])


def resume(store) -> None:
    """Give the paused parameters their `requires_grad=True` back."""
    paused = _paused(store)
    for p in paused.values():
        p.requires_grad_(True)
    paused.clear()


def pause_inactive(store) -> None:
    """`requires_grad=False` on the trainable parameters of every adapter set that is not active, remembering
    them. A parameter an active set also uses (a shared base parameter) keeps training."""
    active = store.runtime.active
    if active is None:
        return
    paused = _paused(store)
    used = {id(p) for n in active if n in store.records for p in adapter_parameters(store, n)}
    for name in store.records:
        if name in active:
            continue
        for p in adapter_parameters(store, name):
            if p.requires_grad and id(p) not in used:
                paused[id(p)] = p
                p.requires_grad_(False)


@contextlib.contextmanager
def settled(store):
    """Run with every paused flag given back; pause the inactive adapters again afterwards (also on error)."""
    resume(store)
    try:
        yield
    finally:
        if store.records:
            pause_inactive(store)
