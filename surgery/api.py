"""The public entry points: plan (a dry run) and apply (trace, analyze, match, rewrite, freeze)."""
from __future__ import annotations

import contextlib
import functools
from collections import OrderedDict
from collections.abc import Mapping
import re
import weakref
from typing import Any, Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from surgery.analyze import Analysis, analyze
from surgery.errors import RewriteError, SpecError, SurgeryError
from surgery.match import Match, match_spec
from surgery.rewrite import Record, budget, realize, store_of
from surgery.rewrite.compose import Average, Block, Fuse, MixedBatch, Stack, block_from
from surgery.rewrite.host import mark_adapters
from surgery.rewrite.trainable import pause_inactive, resume, settled
from surgery.spec import spec_from
from surgery.spec.models import name_problem
from surgery.trace import trace
from surgery.trace.cache import cached_trace, code_and_state
from surgery.trace.export import NeedsStackTraces, rng_devices
from surgery.trace.unroll import plain_attributes
from surgery.rewrite import trained
from surgery.rewrite.mixed import row_block
from surgery.modules.attention import PromptTuning
from surgery.rewrite.sites import check_hosts, install_root_hook, record_hosts
from surgery.rewrite.wrappers import unwrapping

# model -> (its structure when analyzed, its analysis), held weakly and never on the model itself (the analysis
# holds FakeTensors, which break copy.deepcopy and pickle): a cache only, a copy of the model simply traces again,
# and so does a model whose structure changed since (a layer added, an embedding resized)
_MODEL_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, Analysis]]" = weakref.WeakKeyDictionary()


_STRUCTURE_CACHE: "OrderedDict[tuple, Analysis]" = OrderedDict()


def _fingerprint(model: nn.Module, example_inputs, structure: tuple | None = None,
                 state: tuple | None = None) -> tuple | None:
    """What the traced graph depends on: the class, its config, the parameter/buffer names, shapes, dtypes and
    device, the module tree and each module's plain attributes (a flag or stride its constructor took), and the
    example inputs' structure. Two models equal in all of these (e.g. two fresh
    instances of one architecture) have the same analysis: it names parameters, never holds them. `structure`:
    `_base_structure(model, devices)` and those devices when the caller has them (one walk of the model).
    `state`: `code_and_state(model)` (surgery/trace/cache.py: the code the forward runs as this process has it,
    private attributes and held objects' fields) when the caller has it: a class-level patch of a forward or a
    private constructor flag is another model, in this process as on disk."""
    try:
        config = getattr(model, "config", None)
        config_repr = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else \
            _config_repr(config)
        # the attention implementation (eager or sdpa) changes the graph but is no key of the config's JSON
        config_repr = (config_repr, getattr(config, "_attn_implementation", None))
        if structure is None:
            structure = _base_structure(model, devices := [])
            structure = (*structure, tuple(devices))
        modules = tuple((path, cls.__qualname__, attrs) for path, cls, attrs in structure[0])
        tensors = tuple((n, shape, str(dtype), device) for (n, shape, dtype), device in zip(structure[1], structure[2]))

        def shape(x):
            if isinstance(x, torch.Tensor):
                return ("T", tuple(x.shape), str(x.dtype))
            if isinstance(x, dict):
                return tuple((k, shape(v)) for k, v in x.items())
            if isinstance(x, (list, tuple)):
                return tuple(shape(v) for v in x)
            return repr(x)
        if state is None:
            state = code_and_state(model)
        return (type(model).__module__, type(model).__qualname__, config_repr, tensors, modules, shape(example_inputs),
                state[0], tuple(map(tuple, state[1])))
    except Exception:  # noqa: BLE001 - an unhashable corner case only costs a re-trace
        return None


def _config_repr(config) -> str:
    """A config without transformers' JSON form (a diffusers FrozenDict) as text that is the same in every
    process: its keys in order, and a private entry's collection of names sorted (diffusers'
    `_use_default_values` is built from a set: its order differs between processes)."""
    if not isinstance(config, Mapping):
        return repr(config)

    def value(key, v):
        if str(key).startswith("_") and isinstance(v, (list, tuple, set, frozenset)) \
                and all(isinstance(x, str) for x in v):
            return repr(sorted(v))
        return repr(v)
    return repr(sorted((str(k), value(k, v)) for k, v in config.items()))


def _base_structure(model: nn.Module, devices: list | None = None) -> tuple:
    """What the analysis of `model` depends on and surgery itself does not change: module paths and classes (the
    class a parametrization wraps), parameter and buffer names, shapes and dtypes, with surgery's adapter store
    and the parametrizations' containers left out. A model's cached analysis is used while this is unchanged.
    `devices`: a list to receive each of those tensors' device type, in the same order (for the fingerprint)."""
    modules, tensors = [], []
    for path, m in model.named_modules():
        if path.partition(".")[0] == "surgery_adapters" or "parametrizations" in path.split("."):
            continue
        parametrized = parametrize.is_parametrized(m)
        modules.append((path, type(m).__bases__[0] if parametrized else type(m), plain_attributes(m)))
        prefix = path + "." if path else ""
        for table in (m._parameters, m._buffers):
            for name, t in table.items():
                if t is not None:
                    tensors.append((prefix + name, tuple(t.shape), t.dtype))
                    if devices is not None:
                        devices.append(t.device.type)
        if parametrized:      # the tensors a parametrization keeps (`original`; weight_norm's original0/1)
            for name, plist in m.parametrizations.items():
                for key, t in plist._parameters.items():
                    if t is not None:
                        tensors.append((prefix + name if key == "original" else f"{prefix}{name}:{key}",
                                        tuple(t.shape), t.dtype))
                        if devices is not None:
                            devices.append(t.device.type)
    return tuple(modules), tuple(tensors)


def _analysis(model: nn.Module, example_inputs, stack_traces: bool = False) -> Analysis:
    """Trace and analyze once per model (and per example inputs given). Cached per model (weakly, off the
    model) while its structure stays as analyzed, and per structure for the process, so a second instance of one
    architecture is not traced again. `stack_traces`: an analysis whose graph records the nodes' source lines
    (see `trace`)."""
    store = store_of(model)
    structure = _base_structure(model, devices := [])
    cached = _MODEL_CACHE.get(model)
    if cached is not None and example_inputs is None and cached[0] == structure and \
            (cached[1].traced.stack_traces or not stack_traces):
        return cached[1]
    state = None
    if store is None:
        try:
            state = code_and_state(model)
        except Exception:  # noqa: BLE001 - code the walk cannot read: no cache answers for this model
            state = None
    key = _fingerprint(model, example_inputs, (*structure, tuple(devices)), state) \
        if store is None and state is not None else None
    if key is not None and key in _STRUCTURE_CACHE and (_STRUCTURE_CACHE[key].traced.stack_traces or not stack_traces):
        _STRUCTURE_CACHE.move_to_end(key)
        result = _STRUCTURE_CACHE[key]
    elif store is not None:
        # a module whose adapters run no more (replaced, deleted) is an error here, not inside the trace
        check_hosts(model, store, "analyze the model again")
        # trace the base: adapters off while tracing, so analysis sees the user's model
        with disable(model):
            result = analyze(trace(model, example_inputs, stack_traces=stack_traces))
    else:
        # from the disk cache when traced before
        result = analyze(cached_trace(model, example_inputs, key, stack_traces=stack_traces, state=state))
        if key is not None:
            _STRUCTURE_CACHE[key] = result
            while len(_STRUCTURE_CACHE) > 8:
                _STRUCTURE_CACHE.popitem(last=False)
    _MODEL_CACHE[model] = (structure, result)
    return result


@unwrapping
def plan(model: nn.Module, spec: Any, *, example_inputs=None) -> list[Match]:
    """Every site each rule of the spec matches, changing nothing."""
    spec = spec_from(spec)
    analysis = _analysis(model, example_inputs)
    return [m for matches in match_spec(spec, analysis) for m in matches]


@unwrapping
def apply(model: nn.Module, spec: Any, *, example_inputs=None, name: str | None = None,
          calibration: Any = None, adapter_dtype: "torch.dtype | str | None" = None,
          memory_limit: "int | str | None" = None) -> nn.Module:
    """Rewrite `model` in place as the spec says and return it.

    Base parameters are frozen; the new modules (and what `train` rules select) train. The model keeps its
    class, its forward signature and its parameters (shared, never copied). On any error the model is left
    exactly as it was. `calibration`: data for modules that choose their structure from the model's
    gradients (sparse `select: gradient`): batches the model takes whose outputs carry a loss, or a callable
    model -> iterable of scalar losses. `adapter_dtype`: the new modules' parameter dtype; by default float32
    on a float16/bfloat16 base (as PEFT's autocast_adapter_dtype; they compute in float32 and hand the base its
    own dtype back, so GradScaler and torch.autocast train them), else the base's; "base" keeps the base's.
    `memory_limit`: bytes (or "8GiB", or "none") the new adapters may take;
    default `SURGERY_MEMORY_LIMIT`, else a quarter of the memory available (rewrite/budget.py): a spec over it is a
    `LimitError` before anything is allocated.
    """
    spec = spec_from(spec)
    name = _checked_name(name or "default")
    store = store_of(model)
    if spec.compose is not None and not spec.rules:
        try:
            block = block_from(spec.compose)
        except ValueError as exc:
            raise SpecError(f"compose: {exc}") from None
        if isinstance(block, Fuse):
            return add_fusion(model, block.names(), name=name)
        set_active(model, block)
        return model
    if store is not None and name in store.records:
        raise SurgeryError(f"an adapter named {name!r} is already applied; remove it first or choose another name")
    analysis = _analysis(model, example_inputs)
    rng = _rng_states(model)
    try:
        return _apply_rules(model, spec, name, analysis, calibration, adapter_dtype, memory_limit)
    except NeedsStackTraces:
        # a site the model computes with a torch-level call no module boundary carries: the call is found by its
        # source line, which the first trace did not record. The model is back as it was, and so are the random
        # states the adapters built so far drew from: the adapters are those a first attempt would have made
        _set_rng_states(rng)
        analysis = _analysis(model, example_inputs, stack_traces=True)
        return _apply_rules(model, spec, name, analysis, calibration, adapter_dtype, memory_limit)


def _rng_states(model: nn.Module) -> list:
    """The states of the generators building adapters for `model` may draw from: the CPU's and its devices'."""
    return [(None, torch.random.get_rng_state())] + [(d, torch.cuda.get_rng_state(d)) for d in rng_devices(model)]


def _set_rng_states(states: list) -> None:
    for device, state in states:
        if device is None:
            torch.random.set_rng_state(state)
        else:
            torch.cuda.set_rng_state(state, device)


def _apply_rules(model: nn.Module, spec, name: str, analysis: Analysis, calibration, adapter_dtype,
                 memory_limit) -> nn.Module:
    """apply's work once the analysis exists: match, check the budget, realize every rule, or undo it all."""
    store = store_of(model)
    all_matches = match_spec(spec, analysis)
    budget.check(model, analysis, spec, all_matches, memory_limit)   # before anything is allocated
    snapshot = _snapshot(model)
    created_store = store is None
    store = store_of(model, create=True)
    if created_store:
        store.uninstall = install_root_hook(model, store)
        # the user's own requires_grad flags, given back when the last adapter set is removed
        store.base_flags = list(snapshot["requires_grad"].values())
    record = Record(name=name, specs=[spec])
    # one dict for every site of this call: modules compute per-call statistics once (`apply_cache`)
    site_extra = {"calibration": calibration, "apply_cache": {}, "adapter_dtype": adapter_dtype}
    try:
        store.adapters[name] = nn.ModuleDict()
        record.undo.append(functools.partial(store.adapters.pop, name))
        for rule, matches in zip(spec.rules, all_matches):
            realize(model, analysis, store, record, rule, matches, site_extra)
        mark_adapters(model, store)
        _set_trainable(model, store, record)
        store.records[name] = record
        trained.adopt(store, name, [p for p, _ in record.trained])
        if spec.compose is not None:
            set_active(model, block_from(spec.compose))
        trained.sync(store)
        record_hosts(model, store)
    except BaseException as exc:   # Ctrl-C (KeyboardInterrupt) too: any interruption leaves the model as it was
        record.rollback()
        if store.records.pop(name, None) is not None:
            trained.forget(store, name)
        _restore(model, snapshot)
        if created_store:
            store.uninstall()
            delattr(model, "surgery_adapters")
        if isinstance(exc, (SurgeryError, NeedsStackTraces)) or not isinstance(exc, Exception):
            raise
        raise RewriteError(f"rewrite failed: {type(exc).__name__}: {exc}") from exc
    pause_inactive(store)   # an adapter applied while others are chosen by set_active is inactive: it waits
    return model


def _checked_name(name: Any) -> str:
    problem = name_problem(name, "adapter name")
    if problem:
        raise SurgeryError(problem)
    return name


def _snapshot(model: nn.Module) -> dict:
    """Every parameter's requires_grad (in `model.parameters()` order) and every module's training flag, in one
    walk of the module tree."""
    flags, training = {}, {}
    for m in model.modules():
        training[id(m)] = (m, m.training)
        for p in m._parameters.values():
            if p is not None and id(p) not in flags:
                flags[id(p)] = (p, p.requires_grad)
    return {"requires_grad": flags, "training": training}


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
@unwrapping
def disable(model: nn.Module):
    """Run the base model: every adapter off inside the block."""
    store = store_of(model)
    if store is None:
        yield model
        return
    previous = store.runtime.disabled
    store.runtime.disabled = True
    trained.sync(store)   # trained base parameters: the base's values inside
    try:
        yield model
    finally:
        store.runtime.disabled = previous
        trained.sync(store)


@unwrapping
def set_active(model: nn.Module, names: "str | Iterable[str] | Block | dict | None") -> None:
    """Choose what runs: one adapter name, several (stacked in the order applied), a composition block
    (Stack, Average, BatchSplit, Split, Parallel, Fuse), or None for every adapter."""
    store = store_of(model)
    if store is None:
        raise SurgeryError("this model has no adapters")
    block = None
    if isinstance(names, (Block, dict)):
        try:
            block = block_from(names)
        except ValueError as exc:
            raise SurgeryError(str(exc)) from None
        names = block.names() if isinstance(block, Block) else [block]
        if isinstance(block, Block):
            names += [n for n in _fusion_names(block) if n not in names]
    elif names is not None:
        if not isinstance(names, (str, list, tuple)):
            raise SurgeryError(f"set_active takes an adapter name, a list of names or a composition, not {names!r}")
        names = [names] if isinstance(names, str) else list(names)
    if names is not None:
        unknown = [n for n in names if n not in store.records]
        if unknown:
            raise SurgeryError(f"no adapter named {unknown[0]!r}; adapters: {sorted(store.records)}")
    flat_average = isinstance(block, Average) and all(isinstance(c, str) for c in block.children)
    if isinstance(block, Block) and not isinstance(block, Stack) and not flat_average:
        for n in block.names():
            weight_sites = [s for s in store.records[n].weight_sites if s.realized == "weight"]
            if weight_sites:
                raise SurgeryError(f"{type(block).__name__} needs every adapter computed on activations, but "
                                   f"adapter {n!r} adapts {weight_sites[0].owner_path} on its weight (a "
                                   f"parametrization, which only adds up or averages): use Stack, an Average "
                                   f"of adapter names, or realize: activation")
            grouped = [s for s in store.records[n].weight_sites if s.realized == "grouped"]
            if grouped:
                raise SurgeryError(f"{type(block).__name__} needs every adapter to see batch rows, but adapter {n!r} "
                                   f"adapts the MoE experts of {grouped[0].owner_path} inside their grouped matmul, "
                                   f"where tokens are sorted by expert: use Stack or an Average of adapter names")
    if isinstance(block, MixedBatch):
        _check_per_row(store, block)
    if isinstance(block, Block) and not isinstance(block, Stack) and row_block(block) is None:
        prompts = [n for n in block.names() if any(isinstance(m, PromptTuning) for m in store.adapters[n].modules())]
        if prompts:
            raise SurgeryError(f"{type(block).__name__} over prompt tuning adapter {prompts[0]!r}: prompts add "
                               f"positions to the sequence, which {type(block).__name__} cannot combine (every "
                               f"prompt would be prepended to every row); use Stack, or MixedBatch/BatchSplit for "
                               f"one prompt per row")
    resume(store)
    store.runtime.active = names
    store.runtime.composition = block if isinstance(block, Block) else None
    trained.sync(store)
    pause_inactive(store)   # only the active adapters' parameters train


def _check_per_row(store, block: MixedBatch) -> None:
    """MixedBatch runs each row through its adapter at every hooked site; rewrites that do not act per row
    (trained base weights, replaced forwards, fusion) would silently apply to every row or to none, so they are
    refused."""
    for n in block.names():
        record = store.records[n]
        if not record.specs:
            raise SurgeryError(f"MixedBatch: adapter {n!r} is an AdapterFusion set, which does not run per row")
        for spec in record.specs:
            for rule in spec.rules:
                if rule.action not in MixedBatch.PER_ROW_ACTIONS:
                    raise SurgeryError(f"MixedBatch: adapter {n!r} rule {rule.name!r} uses action {rule.action!r}, "
                                       f"which does not act per row (supported: "
                                       f"{', '.join(MixedBatch.PER_ROW_ACTIONS)}); run those rows separately")


def _fusion_names(block) -> list[str]:
    out = [block.name] if isinstance(block, Fuse) and block.name else []
    for child in block.children:
        if isinstance(child, Block):
            out += _fusion_names(child)
    return out


@unwrapping
def add_fusion(model: nn.Module, adapters: list[str], *, name: str, dropout: float = 0.1) -> nn.Module:
    """AdapterFusion over `adapters` under the new adapter `name`: a fusion module at every site where all of
    them act. Only the fusion modules train; the fused adapters are frozen. Activates Fuse(*adapters)."""
    from surgery.modules.fusion import AdapterFusion
    from surgery.rewrite.host import Gate, dispatch
    store = store_of(model)
    if store is None or any(a not in store.records for a in adapters):
        raise SurgeryError(f"fusion needs applied adapters {adapters}; have {sorted(store.records) if store else []}")
    if name in store.records:
        raise SurgeryError(f"an adapter named {name!r} is already applied")
    _checked_name(name)
    resume(store)   # the fused adapters' own flags are what the fusion records (set_active pauses again)
    dim = _analysis(model, None).hidden_size
    record = Record(name=name, fusion={"adapters": list(adapters), "dropout": dropout})
    modules = nn.ModuleDict()
    store.adapters[name] = nn.ModuleDict({"fusion": modules})
    record.undo.append(functools.partial(store.adapters.pop, name))
    gate = Gate(store.runtime, name)
    for path, module in model.named_modules():
        for (side, loc), dispatcher in list(module.__dict__.get("_surgery_dispatch", {}).items()):
            present = {g.name for g, _ in dispatcher.entries}
            if not set(adapters) <= present:
                continue
            key = re.sub(r"[^0-9A-Za-z_]", "_", f"{path}_{side}")
            fusion = AdapterFusion(dim, dropout=dropout)
            ref = next(model.parameters())
            fusion.to(device=ref.device, dtype=ref.dtype)
            modules[key] = fusion
            record.undo.append(dispatch(module, side, loc, gate, fusion, fusion=True))
    if not len(modules):
        record.rollback()
        pause_inactive(store)
        raise SurgeryError(f"adapters {adapters} share no site to fuse at")
    for a in adapters:
        for p in store.adapters[a].parameters():
            record.frozen.append((p, p.requires_grad))
            p.requires_grad_(False)
    for p in modules.parameters():
        p.requires_grad_(True)
    modules.train(model.training)     # new modules follow the model's mode (no fusion dropout in eval)
    store.records[name] = record
    set_active(model, Fuse(*adapters, name=name))
    return model


@unwrapping
def remove(model: nn.Module, name: str = "default") -> nn.Module:
    """Delete one adapter set and restore what it changed."""
    store = store_of(model)
    if store is None or name not in store.records:
        raise SurgeryError(f"no adapter named {name!r}")
    with settled(store):
        record = store.records.pop(name)
        record.rollback()
        record_hosts(model, store)
        for p, flag in record.trained + record.frozen:
            p.requires_grad_(flag)
        if store.runtime.active and name in store.runtime.active:
            store.runtime.active, store.runtime.composition = None, None
        trained.forget(store, name)   # its trained base parameters: the base's values again, or another set's
    if not store.records:
        store.uninstall()
        for p, flag in getattr(store, "base_flags", []):
            p.requires_grad_(flag)
        delattr(model, "surgery_adapters")
        _MODEL_CACHE.pop(model, None)   # the model may change before the next apply (resize_token_embeddings)
    return model


@unwrapping
def eject(model: nn.Module, name: str | None = None) -> nn.Module:
    """Replace reparameterizations used only for training (prefix tuning's MLP) by the values they produce:
    same outputs, fewer parameters."""
    store = store_of(model)
    if store is None:
        raise SurgeryError("this model has no adapters")
    names = [name] if name else list(store.adapters.keys())
    for adapter_name in names:
        ejected = set()
        for rule_name, rule_modules in store.adapters[adapter_name].items():
            for key, module in list(rule_modules.items()):
                if hasattr(module, "eject"):
                    module.eject()
                    ejected.add(rule_name)
            if "shared" in rule_modules and all(hasattr(m, "eject") for k, m in rule_modules.items() if k != "shared"):
                del rule_modules["shared"]
        record = store.records.get(adapter_name)
        if record is not None and ejected:
            # the spec `save` writes says what the modules are now (flat prefixes), so `load` builds those
            record.specs = [spec.model_copy(update={"rules": [
                rule.model_copy(update={"module": rule.module.model_copy(update={"flat": True})})
                if (rule.name or f"rule{i}") in ejected and hasattr(rule.module, "flat") else rule
                for i, rule in enumerate(spec.rules)]}) for spec in record.specs]
    return model


@unwrapping
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
