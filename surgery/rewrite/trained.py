"""Base parameters that adapter sets train (`train` rules: a task head, LayerNorms, biases), one copy each.

Several adapter sets may train the same base parameter (two tasks, each with its own classifier head). The
parameter itself holds the values of one of them at a time, the *live* one: the most recently applied active
set that trains it, or the base model when none does (or inside `surgery.disable`). The others' values are
kept aside and swapped in when `set_active`, `disable` or `remove` change which set is live, so each set runs,
saves and loads with its own values and `remove` gives the base's back. The optimizer sees one Parameter (its
state, e.g. Adam's moments, is shared across sets: use one optimizer per adapter set when switching).
"""
from __future__ import annotations

import torch
from torch import nn


class TrainedEntry:
    """One trained base parameter: the base's values and each adapter set's, except the live one's."""

    def __init__(self, param: nn.Parameter):
        self.param = param
        self.base = param.detach().clone()
        self.copies: dict[str, torch.Tensor] = {}
        self.live: str | None = None   # whose values the parameter holds; None: the base model's

    def values(self, owner: str | None) -> torch.Tensor:
        if owner == self.live:
            return self.param
        return self.base if owner is None else self.copies[owner]

    def make_live(self, owner: str | None) -> None:
        if owner == self.live:
            return
        with torch.no_grad():
            if self.live is None:
                self.base = self.param.detach().clone()
            else:
                self.copies[self.live] = self.param.detach().clone()
            self.param.copy_(self.base if owner is None else self.copies[owner])
        self.live = owner


def _entries(store) -> list[TrainedEntry]:
    return store.__dict__.setdefault("trained", [])


def adopt(store, name: str, params: list[nn.Parameter]) -> None:
    """Adapter set `name` trains `params`: it starts from the base's values."""
    entries = _entries(store)
    for param in {id(p): p for p in params}.values():
        entry = next((e for e in entries if e.param is param), None)
        if entry is None:
            entry = TrainedEntry(param)
            entries.append(entry)
        entry.make_live(None)
        entry.copies[name] = entry.base.clone()


def forget(store, name: str) -> None:
    """Adapter set `name` is removed: its values go; a parameter no set trains any more gets the base's back."""
    entries = _entries(store)
    for entry in list(entries):
        if name not in entry.copies:
            continue
        if entry.live == name:
            with torch.no_grad():
                entry.param.copy_(entry.base)
            entry.live = None
        del entry.copies[name]
        if not entry.copies:
            entries.remove(entry)
    sync(store)


def sync(store) -> None:
    """Make live, for every trained parameter, the values of the set that now runs (see the module docstring)."""
    entries = store.__dict__.get("trained")
    if not entries:
        return
    runtime = store.runtime
    order = [n for n in store.records if runtime.on(n)]
    for entry in entries:
        owner = None
        for n in order:
            if n in entry.copies:
                owner = n   # the most recently applied active set wins
        entry.make_live(owner)


def slot(store, name: str, param: nn.Parameter) -> torch.Tensor:
    """The tensor holding adapter set `name`'s values of `param` (to save them, or load into them)."""
    for entry in store.__dict__.get("trained", ()):
        if entry.param is param and name in entry.copies:
            return entry.values(name)
    return param
