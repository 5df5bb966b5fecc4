"""Models built on the meta device: load the base weights, then give every adapter its initial values.

A model built under `with torch.device("meta"):` has shapes but no storage, so a spec can be applied to a
7B-parameter model in seconds and a few hundred MB. The adapters built there are on the meta device too, and
some of their initial values depend on the base weights (DoRA's magnitude is the norm of W, sparse masks pick
the largest |W|, ...), so no per-module `reset_parameters` can give them their values. `materialize` instead
rebuilds every adapter set from the spec it was applied with, once the base weights are real: each adapter is
initialized exactly as `surgery.apply` initializes it on a model built with weights, on the base weights'
device and dtype. The analysis traced on the meta model is reused (it is cached on the model), so nothing is
traced again.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from surgery.api import apply, remove, set_active
from surgery.errors import SurgeryError
from surgery.rewrite.host import STATE_ATTR, store_of
from surgery.spec import Spec
from surgery.rewrite.wrappers import unwrapping

Slot = tuple[nn.Module, str, bool]   # owner module, attribute, is a parameter


class MaterializeError(SurgeryError):
    """Base weights that do not fit the model, or an adapter set that cannot be rebuilt."""


@unwrapping
def materialize(model: nn.Module, weights: "str | os.PathLike | Iterable | Mapping[str, torch.Tensor] | None" = None,
                *, device: "str | torch.device" = "cpu", calibration: Any = None) -> nn.Module:
    """Give a model built on the meta device its base weights and its adapters their initial values; return it.

    `weights`: the base model's tensors by their usual names (what `model.state_dict()` of the model without
    adapters has): a safetensors file, a list of files (shards), or a dict. They are assigned, not copied
    (`load_state_dict(..., assign=True)`: the parameters take the file's dtype and `device`), tied parameters
    stay tied, and `requires_grad` flags are kept. Every parameter and persistent buffer must be given; a
    non-persistent buffer left on the meta device (a rotary embedding's `inv_freq`) is computed by the model's
    own initializer where it has one (transformers' `_init_weights`). With `weights=None` the base must already
    be loaded (`model.load_state_dict(state, strict=False, assign=True)` works for every realization: a
    parametrized weight keeps its base name in the state dict).

    Every adapter set is then rebuilt from its spec under its name, in the order applied, and the active
    adapters and composition are restored. `calibration` is passed to `apply` for specs that need it. On any
    error a SurgeryError is raised and the model is left as it was.
    """
    store = store_of(model)
    sets = _adapter_sets(store)
    state = _read_weights(weights, device) if weights is not None else None
    active = (store.runtime.composition or store.runtime.active) if store is not None else None
    flags = {id(p): (p, p.requires_grad) for p in model.parameters()}

    for name, _ in reversed(sets):
        remove(model, name)
    slots = _base_slots(model)
    saved = {name: getattr(owner, attr) for name, (owner, attr, _) in slots.items()}
    applied: list[str] = []
    try:
        if state is not None:
            _assign(model, slots, state)
        _init_buffers(model, slots, device)
        still_meta = [n for n, (owner, attr, _) in _base_slots(model).items() if getattr(owner, attr).is_meta]
        if still_meta:
            raise MaterializeError(f"{len(still_meta)} base tensor(s) have no values yet, e.g. "
                                   f"{', '.join(still_meta[:4])}: load them first, or pass `weights`")
        for name, spec in sets:
            apply(model, spec, name=name, calibration=calibration)
            applied.append(name)
        if sets and active is not None:
            set_active(model, active)
    except BaseException as exc:   # Ctrl-C too
        for name in reversed(applied):
            remove(model, name)
        _restore(model, slots, saved, sets, active, flags)
        if isinstance(exc, SurgeryError) or not isinstance(exc, Exception):
            raise
        raise MaterializeError(f"materialize failed, the model is unchanged: {type(exc).__name__}: {exc}") from exc
    return model


def _adapter_sets(store) -> list[tuple[str, Spec]]:
    """(name, spec) of every adapter set, in the order applied; refuses what cannot be rebuilt from a spec."""
    if store is None:
        return []
    if store.__dict__.get("merge_states"):
        raise MaterializeError(f"adapters {sorted(store.__dict__['merge_states'])} are merged; unmerge them "
                               f"before materializing")
    sets = []
    for name, record in store.records.items():
        if not record.specs:
            raise MaterializeError(f"adapter {name!r} was not applied from a spec (an AdapterFusion?): remove it, "
                                   f"materialize, and add it again")
        rules = [rule for spec in record.specs for rule in spec.rules]
        sets.append((name, record.specs[0].model_copy(update={"rules": rules, "include": []})))
    return sets


def _base_slots(model: nn.Module) -> dict[str, Slot]:
    """Every parameter and buffer of the base model (adapters excluded) by qualified name, tied names too."""
    slots = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if path == STATE_ATTR or path.startswith(STATE_ATTR + "."):
            continue
        prefix = f"{path}." if path else ""
        for attr, param in module._parameters.items():
            if param is not None:
                slots[prefix + attr] = (module, attr, True)
        for attr, buffer in module._buffers.items():
            if buffer is not None:
                slots[prefix + attr] = (module, attr, False)
    return slots


def _read_weights(weights, device) -> dict[str, torch.Tensor]:
    if isinstance(weights, Mapping):
        return dict(weights)
    files = [weights] if isinstance(weights, (str, os.PathLike)) else list(weights)
    from safetensors.torch import load_file
    state: dict[str, torch.Tensor] = {}
    for file in files:
        path = Path(file)
        if path.suffix != ".safetensors":
            raise MaterializeError(f"{path}: base weights are read from safetensors files only")
        try:
            part = load_file(str(path), device=str(device))
        except Exception as exc:  # noqa: BLE001 - a missing or corrupt file is the user's input
            raise MaterializeError(f"cannot read base weights from {path}: {type(exc).__name__}: {exc}") from None
        clash = state.keys() & part.keys()
        if clash:
            raise MaterializeError(f"{path}: tensor {sorted(clash)[0]!r} is in two of the files")
        state.update(part)
    return state


def _assign(model: nn.Module, slots: dict[str, Slot], state: dict[str, torch.Tensor]) -> None:
    """Check every name and shape first, then assign each distinct tensor once to all its (tied) names."""
    groups: dict[int, list[str]] = {}
    for name, (owner, attr, _) in slots.items():
        groups.setdefault(id(getattr(owner, attr)), []).append(name)
    unexpected = sorted(state.keys() - slots.keys())
    if unexpected:
        raise MaterializeError(f"{len(unexpected)} tensor(s) in the weights are not in the model, e.g. "
                               f"{', '.join(unexpected[:4])}")
    plan, missing = [], []
    for names in groups.values():
        owner, attr, is_param = slots[names[0]]
        current = getattr(owner, attr)
        given = [n for n in names if n in state]
        persistent = is_param or attr not in owner._non_persistent_buffers_set
        if not given:
            if persistent:
                missing.append(names[0])
            continue
        value = state[given[0]]
        for n in given[1:]:
            if state[n] is not value and not torch.equal(state[n], value):
                raise MaterializeError(f"{given[0]} and {n} are one tied tensor in the model but differ in the weights")
        if tuple(value.shape) != tuple(current.shape):
            raise MaterializeError(f"{given[0]}: the weights have shape {list(value.shape)}, the model "
                                   f"{list(current.shape)}")
        if is_param:
            value = nn.Parameter(value, requires_grad=current.requires_grad and value.is_floating_point())
        plan.append((names, value))
    if missing:
        raise MaterializeError(f"{len(missing)} base tensor(s) are missing from the weights, e.g. "
                               f"{', '.join(missing[:4])}")
    for names, value in plan:
        for name in names:
            owner, attr, is_param = slots[name]
            (owner._parameters if is_param else owner._buffers)[attr] = value


def _init_buffers(model: nn.Module, slots: dict[str, Slot], device) -> None:
    """Non-persistent buffers are in no weights file: the model's own initializer computes them."""
    owners = {}
    for name, (owner, attr, is_param) in slots.items():
        if not is_param and getattr(owner, attr).is_meta:
            owners.setdefault(id(owner), (owner, []))[1].append(name)
    if not owners:
        return
    init = getattr(model, "_init_weights", None)
    for owner, names in owners.values():
        if init is None or any(True for _ in owner.parameters(recurse=False)):
            raise MaterializeError(f"buffer(s) {', '.join(names)} have no values and the model has no initializer "
                                   f"for them: pass them in `weights`")
        owner.to_empty(device=device, recurse=False)
        init(owner)


def _restore(model, slots, saved, sets, active, flags) -> None:
    """Put the base tensors back and apply the adapter sets again as they were (on the meta device)."""
    for name, (owner, attr, is_param) in slots.items():
        (owner._parameters if is_param else owner._buffers)[attr] = saved[name]
    placeholders = {}
    for name, (owner, attr, is_param) in slots.items():
        tensor = saved[name]
        if not tensor.is_meta:     # base loaded by the caller: rebuild the old adapters on meta stand-ins
            stand_in = placeholders.setdefault(id(tensor), torch.empty_like(tensor, device="meta"))
            if is_param:
                stand_in = placeholders.setdefault(("p", id(tensor)),
                                                   nn.Parameter(stand_in, requires_grad=tensor.requires_grad))
            (owner._parameters if is_param else owner._buffers)[attr] = stand_in
    for name, spec in sets:
        apply(model, spec, name=name)
    if sets and active is not None:
        set_active(model, active)
    for name, (owner, attr, is_param) in slots.items():
        (owner._parameters if is_param else owner._buffers)[attr] = saved[name]
    for p, flag in flags.values():
        p.requires_grad_(flag)
