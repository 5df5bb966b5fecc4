"""The public entry points: plan (a dry run) and apply (trace, analyze, match, rewrite, freeze)."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from surgery.analyze import Analysis, analyze
from surgery.errors import RewriteError, SurgeryError
from surgery.match import Match, match_spec
from surgery.rewrite import Record, realize, store_of
from surgery.rewrite.host import install_call_capture
from surgery.spec import Spec, spec_from
from surgery.trace import trace

_ANALYSIS_CACHE_ATTR = "_surgery_analysis"


def _analysis(model: nn.Module, example_inputs) -> Analysis:
    """Trace and analyze once per model (and per example inputs given); the cache lives on the model."""
    cached = model.__dict__.get(_ANALYSIS_CACHE_ATTR)
    if cached is not None and example_inputs is None:
        return cached
    store = store_of(model)
    if store is not None:
        # trace the base: adapters off while tracing, so analysis sees the user's model
        with disable(model):
            result = analyze(trace(model, example_inputs))
    else:
        result = analyze(trace(model, example_inputs))
    model.__dict__[_ANALYSIS_CACHE_ATTR] = result
    return result


def plan(model: nn.Module, spec: Any, *, example_inputs=None) -> list[Match]:
    """Every site each rule of the spec matches, changing nothing."""
    spec = spec_from(spec)
    analysis = _analysis(model, example_inputs)
    return [m for matches in match_spec(spec, analysis) for m in matches]


def apply(model: nn.Module, spec: Any, *, example_inputs=None, name: str | None = None,
          calibration: Any = None) -> nn.Module:
    """Rewrite `model` in place as the spec says and return it.

    Base parameters are frozen; the new modules (and what `train` rules select) train. The model keeps its
    class, its forward signature and its parameters (shared, never copied). On any error the model is left
    exactly as it was. `calibration`: data for modules that choose their structure from the model's
    gradients (sparse `select: gradient`): batches the model takes whose outputs carry a loss, or a callable
    model -> iterable of scalar losses.
    """
    spec = spec_from(spec)
    name = name or "default"
    store = store_of(model)
    if store is not None and name in store.records:
        raise SurgeryError(f"an adapter named {name!r} is already applied; remove it first or choose another name")
    analysis = _analysis(model, example_inputs)
    all_matches = match_spec(spec, analysis)
    snapshot = _snapshot(model)
    created_store = store is None
    store = store_of(model, create=True)
    if created_store:
        store.uninstall = install_call_capture(model, store.runtime)
    record = Record(name=name, specs=[spec])
    # one dict for every site of this call: modules compute per-call statistics once (`apply_cache`)
    site_extra = {"calibration": calibration, "apply_cache": {}}
    try:
        store.adapters[name] = nn.ModuleDict()
        record.undo.append(lambda: store.adapters.pop(name))
        for rule, matches in zip(spec.rules, all_matches):
            realize(model, analysis, store, record, rule, matches, site_extra)
        _set_trainable(model, store, record)
        store.records[name] = record
    except Exception as exc:
        record.rollback()
        _restore(model, snapshot)
        if created_store:
            store.uninstall()
            delattr(model, "surgery_adapters")
        if isinstance(exc, SurgeryError):
            raise
        raise RewriteError(f"rewrite failed: {type(exc).__name__}: {exc}") from exc
    return model


def _snapshot(model: nn.Module) -> dict:
    return {"requires_grad": {id(p): (p, p.requires_grad) for p in model.parameters()},
            "training": {id(m): (m, m.training) for m in model.modules()}}


def _restore(model: nn.Module, snapshot: dict):
    for p, flag in snapshot["requires_grad"].values():
        p.requires_grad_(flag)
    for m, flag in snapshot["training"].values():
        m.training = flag


def _set_trainable(model: nn.Module, store, record: Record):
    adapter_params = {id(p) for p in store.adapters[record.name].parameters()}
    other_adapters = {id(p) for n, mod in store.adapters.items() if n != record.name for p in mod.parameters()}
    for p in model.parameters():
        if id(p) in adapter_params:
            p.requires_grad_(True)
        elif id(p) not in other_adapters:
            p.requires_grad_(False)
    for p, _ in record.trained:
        p.requires_grad_(True)


@contextlib.contextmanager
def disable(model: nn.Module):
    """Run the base model: every adapter off inside the block."""
    store = store_of(model)
    if store is None:
        yield model
        return
    previous = store.runtime.disabled
    store.runtime.disabled = True
    try:
        yield model
    finally:
        store.runtime.disabled = previous


def set_active(model: nn.Module, names: str | Iterable[str] | None) -> None:
    """Choose which named adapters run (None: all)."""
    store = store_of(model)
    if store is None:
        raise SurgeryError("this model has no adapters")
    if names is not None:
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in store.records]
        if unknown:
            raise SurgeryError(f"no adapter named {unknown[0]!r}; adapters: {sorted(store.records)}")
    store.runtime.active = names


def remove(model: nn.Module, name: str = "default") -> nn.Module:
    """Delete one adapter set and restore what it changed."""
    store = store_of(model)
    if store is None or name not in store.records:
        raise SurgeryError(f"no adapter named {name!r}")
    record = store.records.pop(name)
    record.rollback()
    for p, flag in record.trained:
        p.requires_grad_(flag)
    if not store.records:
        store.uninstall()
        delattr(model, "surgery_adapters")
    return model


def eject(model: nn.Module, name: str | None = None) -> nn.Module:
    """Replace reparameterizations used only for training (prefix tuning's MLP) by the values they produce:
    same outputs, fewer parameters."""
    store = store_of(model)
    if store is None:
        raise SurgeryError("this model has no adapters")
    names = [name] if name else list(store.adapters.keys())
    for adapter_name in names:
        for rule_modules in store.adapters[adapter_name].values():
            for key, module in list(rule_modules.items()):
                if hasattr(module, "eject"):
                    module.eject()
            if "shared" in rule_modules and all(hasattr(m, "eject") for k, m in rule_modules.items() if k != "shared"):
                del rule_modules["shared"]
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied parameters counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total
