"""Realizing `attend` (change what one attention op sees) and `prepend` (positions added to the sequence).

The attention op is reached where the host calls it: a transformers model routes every attention call through
its attention-function registry, so surgery registers one function there that runs the adapters of the calling
module around the model's own implementation (this keeps the KV cache, generate() and torch.compile). Any
other module whose forward calls `F.scaled_dot_product_attention` (nn.MultiheadAttention, hand-written models)
has that call routed through its adapters during that module's forward only: the instance's forward runs the
class's forward inside a torch-function mode (per thread, lexically scoped) that routes the attention call by
the module's adapters; torch.nn.functional itself is never changed, and torch.compile(fullgraph=True) traces it.
Softmax attention a module computes with its own ops (no SDPA, no registry) is realized in rewrite/shadow.py.
"""
from __future__ import annotations

import functools
import threading
import types
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import RewriteError
from surgery.rewrite import mixed
from surgery.rewrite.host import HostCode


def extend_mask(mask, prefix: int, query: torch.Tensor, key: torch.Tensor, causal: bool, align: str = "top_left"):
    """The mask for keys [prefix columns, original keys]: the prefix is visible to every query.

    `mask` is None (then the mask the host's attention function implies without one, see `implicit_mask`: causal
    with `align` when `causal`, else full), a bool mask (True = attend) or an additive float mask, broadcastable
    to [batch, heads, q, k_original].
    """
    q_len, k_len = query.shape[-2], key.shape[-2] - prefix
    if k_len <= 0:   # attention over added keys alone (with an outer adapter's prefix counted in: all visible)
        return torch.ones(1, 1, q_len, key.shape[-2], dtype=torch.bool, device=query.device)
    if mask is None:
        mask = implicit_mask(q_len, k_len, causal, align, query.device)[None, None]
    if mask.dtype == torch.bool:
        pad = torch.ones(*mask.shape[:-1], prefix, dtype=torch.bool, device=mask.device)
    else:
        pad = torch.zeros(*mask.shape[:-1], prefix, dtype=mask.dtype, device=mask.device)
    return torch.cat([pad, mask], dim=-1)


def implicit_mask(q_len: int, k_len: int, causal: bool, align: str, device) -> torch.Tensor:
    """[q, k] bool: what an attention function computes over k keys when given no mask. Not `causal`: every key.
    Causal "top_left" (torch's `scaled_dot_product_attention(is_causal=True)`, `torch.ones(L, S).tril()`): query i
    sees keys 0..i, whatever k is; with a static cache transformers passes no mask at prefill and the keys after
    the q prompt positions are the cache's empty slots, hidden this way. Causal "bottom_right" (flash-attention
    >= 2.1): query i sees keys 0..i + k - q, the queries being the last q of the keys."""
    if not causal:
        return torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    offset = k_len - q_len if align == "bottom_right" else 0
    rows = torch.arange(q_len, device=device)[:, None]
    cols = torch.arange(k_len, device=device)[None, :]
    return cols <= rows + offset


def registry_causality(original: str, q_len: int, causal: bool) -> tuple[bool, str]:
    """(whether, aligned how) transformers' attention function `original` masks causally when the model passes
    `attention_mask=None`: "sdpa" (transformers/integrations/sdpa_attention.py) uses SDPA's top-left `is_causal`
    for q > 1 only (a single query sees every key); "flash_attention_*" the kernel's bottom-right causal for
    q > 1; "eager" and "flex_attention" add no mask at all (their `is_causal` is unused)."""
    if original in ("eager", "flex_attention") or original.endswith("_eager"):
        return False, "top_left"
    if "flash" in original:
        return causal and q_len > 1, "bottom_right"
    return causal and q_len > 1, "top_left"


def chain(adapters: list, base: Callable) -> Callable:
    """Compose several attention adapters at one op: each sees the next one's attention as its own."""
    attend = base
    for adapter in adapters:
        attend = (lambda a, inner: (lambda q, k, v, prefix=0: a(q, k, v, _with_prefix(inner, prefix))))(adapter, attend)
    return attend


def _with_prefix(inner: Callable, outer_prefix: int) -> Callable:
    return lambda q, k, v, prefix=0: inner(q, k, v, prefix=prefix + outer_prefix)


# ---------------------------------------------------------------- transformers' attention registry

class RegistryAttention:
    """One attention function registered with transformers, dispatching on the calling module."""

    def __init__(self, original: str):
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        self.original = original
        self.name = f"surgery_{original}"
        # "eager" is no registered function: each attention class passes its own (the model file's
        # eager_attention_forward, with its soft-capping and scaling) as the registry's default
        self.base = None if original == "eager" else ALL_ATTENTION_FUNCTIONS[original]
        # one registered function per implementation, shared by every model in the process (transformers'
        # registry is global by name); it holds no state: adapters are found on the calling module
        # (module.__dict__[_SITES_ATTR]), so copies of a model carry theirs
        AttentionInterface.register(self.name, self)
        AttentionMaskInterface.register(self.name, AttentionMaskInterface._global_mapping[original])

    def __reduce__(self):   # a pickled model refers to the process's registered function by name
        return (_registry_for, (self.original,))

    def __deepcopy__(self, memo):
        return self

    def base_for(self, module: nn.Module) -> Callable:
        return self.base if self.base is not None else eager_function(module)

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        entries = [(a, gate) for a, gate in module.__dict__.get(_SITES_ATTR, ()) if gate()]
        base = self.base_for(module)
        if not entries:
            return base(module, query, key, value, attention_mask, **kwargs)
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", True) if causal is None else causal
        batch = query.shape[0]
        host_call = HostCode()    # the model's attention as the host's own call (its F.dropout), once
        maps = []                 # (rows, attention weights) of the calls over the host's own keys

        def make_attend(rows):   # the model's attention on `rows` (None: all) of a mixed-adapter batch
            row_mask = attention_mask if rows is None else mixed.take(attention_mask, rows, batch)
            row_kwargs = kwargs if rows is None else {n: mixed.take(v, rows, batch) for n, v in kwargs.items()}

            def attend(q, k, v, prefix=0):
                if prefix:
                    implied, align = registry_causality(self.original, q.shape[-2], causal)
                    mask = extend_mask(row_mask, prefix, q, k, implied, align)
                else:
                    mask = row_mask
                extra = {**row_kwargs, "is_causal": False if prefix else row_kwargs.get("is_causal")}
                if prefix:
                    extra = {name: _extend_scores(value, prefix, k, key.shape[-2]) for name, value in extra.items()}
                out, weights = host_call(base, module, q, k, v, mask, **extra)
                if isinstance(weights, torch.Tensor) and k.shape[-2] > prefix:   # not over added keys alone
                    maps.append((rows, weights))
                return out
            return attend
        out = mixed.attention(entries, make_attend, query, key, value, chain)
        return out, _attention_maps(maps, batch)


def _attention_maps(maps: list, batch: int):
    """The attention weights the host's function returns (eager: [batch, heads, q, keys]; sdpa: None), as the
    model would give them with the adapters: over the keys its own attention saw, added prefix columns first
    (as PEFT's prefix tuning gives them). Per group of rows (a MixedBatch), the call over the most keys (the
    one with every prefix); groups whose prefixes differ in length get zero columns on the left (keys that
    row does not have). LLaMA-Adapter's separate attention over its prompts alone is not among them (as PEFT's
    adaption prompt returns the layer's own weights). None when the function gave none."""
    if not maps:
        return None
    best: dict = {}
    for rows, weights in maps:
        key = id(rows) if rows is not None else None
        if key not in best or weights.shape[-1] > best[key][1].shape[-1]:
            best[key] = (rows, weights)
    parts = list(best.values())
    if len(parts) == 1 and parts[0][0] is None:
        return parts[0][1]
    width = max(w.shape[-1] for _, w in parts)
    parts = [(rows, F.pad(w, (width - w.shape[-1], 0)) if w.shape[-1] < width else w) for rows, w in parts]
    if sum(len(range(batch)[r]) if isinstance(r, slice) else len(r) for r, _ in parts) != batch:
        return None
    return mixed.place(parts, batch)


def _extend_scores(value, prefix: int, key: torch.Tensor, original: int):
    """A score-shaped additive term the model passes along ([batch, heads, q, `original` keys]: T5's relative
    position bias) gets zero columns for the added keys, as the mask does; over added keys alone (LLaMA-Adapter's
    prompts) it is zeros; anything else is passed unchanged."""
    if not (isinstance(value, torch.Tensor) and value.dim() == 4 and value.is_floating_point()
            and value.shape[-1] == original):
        return value
    kept = key.shape[-2] - prefix
    if kept <= 0:
        return value.new_zeros(*value.shape[:-1], key.shape[-2])
    if value.shape[-1] == kept:
        return torch.cat([value.new_zeros(*value.shape[:-1], prefix), value], dim=-1)
    return value


_REGISTRIES: dict[str, RegistryAttention] = {}
_SITES_ATTR = "_surgery_registry_sites"


def _registry_for(original: str) -> RegistryAttention:
    registry = _REGISTRIES.get(original)
    if registry is None:
        registry = _REGISTRIES[original] = RegistryAttention(original)
    return registry


def registry_of(model: nn.Module) -> RegistryAttention | None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        return None
    current = getattr(config, "_attn_implementation", None) or "sdpa"
    existing = model.__dict__.get("_surgery_attention")
    if existing is not None:
        return existing
    registry = _registry_for(current.removeprefix("surgery_"))
    model.__dict__["_surgery_attention"] = registry
    return registry


def eager_function(module: nn.Module) -> Callable:
    """The eager attention function an attention class uses when no registered implementation is chosen: the one
    its forward's module passes as the registry's default."""
    import inspect
    function = getattr(inspect.unwrap(type(module).forward), "__globals__", {}).get("eager_attention_forward")
    if not callable(function):
        raise RewriteError(f"{type(module).__name__} has no eager attention function surgery can call")
    return function


def uses_registry(module: nn.Module) -> bool:
    """Whether the attention class's forward routes its attention through transformers' registry (DeBERTa's and
    GPT-Neo's compute it themselves)."""
    import inspect
    forward = inspect.unwrap(type(module).forward)     # through decorators (deprecated-kwarg wrappers)
    code = getattr(forward, "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names


def attach_registry(model: nn.Module, registry: RegistryAttention, module: nn.Module, adapter: nn.Module,
                    gate: Callable[[], bool]) -> Callable[[], None]:
    if not uses_registry(module):
        raise RewriteError(f"{type(module).__name__} computes its attention itself, not through transformers' "
                           f"attention registry, so attention adapters (prefix tuning, LLaMA-Adapter) cannot reach "
                           f"its keys and values; adapters on projections and blocks apply")
    registry.base_for(module)
    entry = (adapter, gate)
    if not module.__dict__.get(_SITES_ATTR) and getattr(module, "config", None) is not None:
        module.__dict__[_SWITCH_CHECK] = module.register_forward_pre_hook(_RoutedThroughRegistry(registry.name))
    module.__dict__.setdefault(_SITES_ATTR, []).append(entry)
    if model.config._attn_implementation != registry.name:
        model.set_attn_implementation(registry.name)
    return functools.partial(_detach_registry, model, registry, module, entry)


_SWITCH_CHECK = "_surgery_registry_check"


class _RoutedThroughRegistry:
    """A pre-hook of an attention module whose adapters run in surgery's registered attention function: the
    model's attention implementation switched after apply (`model.set_attn_implementation("eager")` to get
    `output_attentions`) would run the module without them, silently: refused instead."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, module, args):
        current = getattr(module.config, "_attn_implementation", None)
        if current != self.name:
            raise RewriteError(f"{type(module).__name__}'s attention adapters (prefix tuning, LLaMA-Adapter) run in "
                               f"the attention function surgery registered ({self.name!r}), but the model's "
                               f"attention implementation is now {current!r} (set_attn_implementation after "
                               f"apply): they would not run. Choose the implementation before surgery.apply, or "
                               f"set it back with model.set_attn_implementation({self.name!r})")


def _detach_registry(model: nn.Module, registry: RegistryAttention, module: nn.Module, entry: tuple) -> None:
    entries = module.__dict__.get(_SITES_ATTR, [])
    if entry in entries:
        entries.remove(entry)
    if not entries:
        module.__dict__.pop(_SITES_ATTR, None)
        check = module.__dict__.pop(_SWITCH_CHECK, None)
        if check is not None:
            check.remove()
    if not any(m.__dict__.get(_SITES_ATTR) for m in model.modules()):
        model.set_attn_implementation(registry.original)
        model.__dict__.pop("_surgery_attention", None)


# ---------------------------------------------------------------- F.scaled_dot_product_attention in a module

def _intercepting(original: Callable, entries: list) -> Callable:
    """F.scaled_dot_product_attention with the adapters of `entries` [(adapter, gate), ...] around it."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")

    def sdpa(*args, **kwargs):
        bound = dict(zip(names, args))
        bound.update(kwargs)
        full_mask, causal = bound.get("attn_mask"), bool(bound.get("is_causal", False))
        rest = {k: v for k, v in bound.items() if k in ("dropout_p", "scale", "enable_gqa")}
        batch = bound["query"].shape[0]

        def make_attend(rows):   # the attention on `rows` (None: all) of a mixed-adapter batch
            mask = full_mask if rows is None else mixed.take(full_mask, rows, batch)

            def attend(q, k, v, prefix=0):
                if prefix:
                    return original(q, k, v, attn_mask=extend_mask(mask, prefix, q, k, causal), is_causal=False,
                                    **rest)
                return original(q, k, v, attn_mask=mask, is_causal=causal, **rest)
            return attend
        return mixed.attention(entries, make_attend, bound["query"], bound["key"], bound["value"], chain)
    return sdpa


_INTERCEPT_ATTR = "_surgery_attend"
_PLAIN_SDPA = F.scaled_dot_product_attention
_PLAIN_MHA = F.multi_head_attention_forward
_MHA_LOCAL = threading.local()   # per thread: the mode whose adapters F.multi_head_attention_forward routes through


def _mha_sdpa(*args, **kwargs):
    """What `scaled_dot_product_attention` names inside surgery's own copy of F.multi_head_attention_forward."""
    mode = getattr(_MHA_LOCAL, "mode", None)
    if mode is None:
        return _PLAIN_SDPA(*args, **kwargs)
    return mode.route(*args, **kwargs)


# a copy of F.multi_head_attention_forward reading its globals from a namespace of its own, in which the
# attention call is routed: torch.nn.functional itself is never changed
_MHA_GLOBALS = dict(vars(F))
_MHA_GLOBALS["scaled_dot_product_attention"] = _mha_sdpa
_ROUTED_MHA = types.FunctionType(_PLAIN_MHA.__code__, _MHA_GLOBALS, _PLAIN_MHA.__name__, _PLAIN_MHA.__defaults__,
                                 _PLAIN_MHA.__closure__)
_ROUTED_MHA.__kwdefaults__ = _PLAIN_MHA.__kwdefaults__
# its own torch-function re-dispatch (another mode on the stack) must come back to the routed copy
_MHA_GLOBALS["multi_head_attention_forward"] = _ROUTED_MHA


class _RoutedAttention(torch.overrides.TorchFunctionMode):
    """Entered by an intercepted module's forward, and only there: the forward's own calls of
    F.scaled_dot_product_attention (direct, or inside nn.MultiheadAttention's F.multi_head_attention_forward) go
    through that module's adapters. A torch-function mode is per thread and lexically scoped, so other models,
    other threads and code outside the forward see the plain function; torch.compile(fullgraph=True) traces it.
    While it is active nn.MultiheadAttention also stays off its fused fast path (which calls no attention op)."""

    def __init__(self, entries: list):
        super().__init__()
        self.entries = entries      # [(adapter, gate), ...] live now
        self.routed = 0

    def route(self, *args, **kwargs):
        self.routed += 1
        return _intercepting(_PLAIN_SDPA, self.entries)(*args, **kwargs)

    def __torch_function__(self, func, arg_types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _PLAIN_SDPA:
            return self.route(*args, **kwargs)
        if func is _PLAIN_MHA:
            previous = getattr(_MHA_LOCAL, "mode", None)
            _MHA_LOCAL.mode = self
            try:
                return _ROUTED_MHA(*args, **kwargs)
            finally:
                _MHA_LOCAL.mode = previous
        return func(*args, **kwargs)


def _intercepted_forward(self, *args, **kwargs):
    """The module's own forward, run inside a mode that routes its attention calls through the active adapters."""
    active = [(adapter, on) for adapter, on in self.__dict__[_INTERCEPT_ATTR] if on()]
    if not active:
        return type(self).forward(self, *args, **kwargs)
    mode = _RoutedAttention(active)
    with mode:
        out = type(self).forward(self, *args, **kwargs)
    if not mode.routed:
        raise RewriteError(
            f"{type(self).__name__}: its forward made no call of F.scaled_dot_product_attention that surgery could "
            f"route through the attention adapters (nn.MultiheadAttention with need_weights=True computes the "
            f"weights itself; under torch.compile it runs as one opaque op); the adapters would be skipped")
    return out


class _InterceptedForward:
    """`module.forward` of an intercepted module: a small picklable callable (a deepcopy or pickle of the
    model carries it along with its module)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return _intercepted_forward(self.module, *args, **kwargs)


def attach_intercept(module: nn.Module, adapter: nn.Module, gate: Callable[[], bool]) -> Callable[[], None]:
    """While `module`'s forward runs, its calls of F.scaled_dot_product_attention go through the adapters.

    The forward is wrapped on the instance (rather than changed in a pre-hook and restored in a post-hook), so
    the change is lexically scoped and torch.compile(fullgraph=True) traces it. Adapters at one op compose in
    the order they were attached (the first attached innermost). Nothing outside the module changes."""
    return wrap_forward(module, _INTERCEPT_ATTR, _InterceptedForward, adapter, gate, "intercept its attention")


def wrap_forward(module: nn.Module, attr: str, forward_cls: type, adapter, gate: Callable[[], bool],
                 what: str) -> Callable[[], None]:
    """Add (adapter, gate) to the list `module.__dict__[attr]`, the first one replacing the instance's forward
    by `forward_cls(module)` (which reads that list); returns the undo. Refused (RewriteError) where something
    else already replaced the instance's forward."""
    entries = module.__dict__.get(attr)
    if entries is None:
        if "forward" in module.__dict__:
            raise RewriteError(f"{type(module).__name__}: its forward is already replaced; cannot also {what}")
        entries = module.__dict__[attr] = []
        module.forward = forward_cls(module)
    entries.append((adapter, gate))
    return _ForwardUndo(module, attr, adapter, gate)


class _ForwardUndo:
    """Removes one (adapter, gate) of `wrap_forward`; the last one removed restores the class's forward.
    A class, not a closure, so an adapted model deep-copies and pickles."""

    def __init__(self, module, attr, adapter, gate):
        self.module, self.attr, self.adapter, self.gate = module, attr, adapter, gate

    def __call__(self):
        module = self.module
        # look the list up again: torch.export (the trace of a later apply) restores module attributes as copies
        current = module.__dict__.get(self.attr)
        if current is None:
            return
        current[:] = [(a, g) for a, g in current if not (a is self.adapter and g is self.gate)]
        if not current:
            module.__dict__.pop(self.attr, None)
            module.__dict__.pop("forward", None)


# ---------------------------------------------------------------- torch's fused encoder fast path

class _SlowPath(torch.overrides.TorchFunctionMode):
    """A pass-through mode: while it is active, `has_torch_function` holds for every tensor, so
    nn.TransformerEncoderLayer / nn.TransformerEncoder stay off their fused eval fast path (which calls no
    attention function an adapter could reach)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


_FAST_PATH_MODULES = (nn.TransformerEncoderLayer, nn.TransformerEncoder)


class ModeHooks:
    """A module's pre-hook enters the torch-function mode `mode_for(module)` returns (None: none this call), an
    always-called post-hook leaves it; a stack per thread, so nested and concurrent calls each leave their own.
    A copy (deepcopy, pickle) starts with no call in flight."""

    def __init__(self):
        self.local = threading.local()

    def mode_for(self, module):
        raise NotImplementedError

    def enter(self, module, args, kwargs=None):
        stack = self.local.__dict__.setdefault("modes", [])
        mode = self.mode_for(module)
        if mode is not None:
            mode.__enter__()
        stack.append(mode)

    def exit(self, module, args, out):
        stack = self.local.__dict__.setdefault("modes", [])
        mode = stack.pop() if stack else None
        if mode is not None:
            mode.__exit__(None, None, None)

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["local"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.local = threading.local()


class _SlowPathHooks(ModeHooks):
    """The slow-path mode while the gate is on."""

    def __init__(self, gate: Callable[[], bool]):
        super().__init__()
        self.gate = gate

    def mode_for(self, module):
        return _SlowPath() if self.gate() else None


def keep_off_fast_path(model: nn.Module, path: str, gate: Callable[[], bool]) -> Callable[[], None]:
    """torch's encoder layers fuse the whole layer in eval mode without calling their attention module: while the
    adapter is on, the layers and encoders around `path` take the regular path, so the adapters run."""
    handles = []
    parts = path.split(".")
    for k in range(len(parts) + 1):
        prefix = ".".join(parts[:k])
        module = model.get_submodule(prefix) if prefix else model
        if isinstance(module, _FAST_PATH_MODULES):
            hooks = _SlowPathHooks(gate)
            handles += [module.register_forward_pre_hook(hooks.enter),
                        module.register_forward_hook(hooks.exit, always_call=True)]
    return functools.partial(_remove_all, handles)


def _remove_all(handles: list) -> None:
    for handle in handles:
        handle.remove()
