"""Realizing `attend` (change what one attention op sees) and `prepend` (positions added to the sequence).

The attention op is reached where the host calls it: a transformers model routes every attention call through
its attention-function registry, so surgery registers one function there that runs the adapters of the calling
module around the model's own implementation (this keeps the KV cache, generate() and torch.compile). Any
other module whose forward calls `F.scaled_dot_product_attention` (nn.MultiheadAttention, hand-written models)
has that call routed through its adapters during that module's forward only: a wrapper of the instance's
forward marks which adapters are current, and F.scaled_dot_product_attention is replaced (while any module is
intercepted) by a function that routes by that mark, so torch.compile(fullgraph=True) traces it as well.
"""
from __future__ import annotations

import types
import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import RewriteError


def extend_mask(mask, prefix: int, query: torch.Tensor, key: torch.Tensor, causal: bool):
    """The mask for keys [prefix columns, original keys]: the prefix is visible to every query.

    `mask` is None (then causal or full over the original keys), a bool mask (True = attend) or an additive
    float mask, broadcastable to [batch, heads, q, k_original].
    """
    q_len, k_len = query.shape[-2], key.shape[-2] - prefix
    if k_len <= 0:   # attention over added keys alone (with an outer adapter's prefix counted in: all visible)
        return torch.ones(1, 1, q_len, key.shape[-2], dtype=torch.bool, device=query.device)
    if mask is None:
        if causal and q_len > 1:
            offset = k_len - q_len
            rows = torch.arange(q_len, device=query.device)[:, None]
            cols = torch.arange(k_len, device=query.device)[None, :]
            body = cols <= rows + offset
        else:
            body = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device)
        mask = body[None, None]
    if mask.dtype == torch.bool:
        pad = torch.ones(*mask.shape[:-1], prefix, dtype=torch.bool, device=mask.device)
    else:
        pad = torch.zeros(*mask.shape[:-1], prefix, dtype=mask.dtype, device=mask.device)
    return torch.cat([pad, mask], dim=-1)


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
        if original == "eager":
            raise RewriteError("attention adapters need an attention function from the registry; "
                               "load the model with attn_implementation='sdpa'")
        self.base = ALL_ATTENTION_FUNCTIONS[original]
        # one registered function per implementation, shared by every model in the process (transformers'
        # registry is global by name): adapters are found by the calling module, weakly held
        self.sites: weakref.WeakKeyDictionary[nn.Module, list[tuple[nn.Module, Callable[[], bool]]]] = \
            weakref.WeakKeyDictionary()
        AttentionInterface.register(self.name, self)
        AttentionMaskInterface.register(self.name, AttentionMaskInterface._global_mapping[original])

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        adapters = [a for a, gate in self.sites.get(module, ()) if gate()]
        if not adapters:
            return self.base(module, query, key, value, attention_mask, **kwargs)
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", True) if causal is None else causal

        def attend(q, k, v, prefix=0):
            mask = extend_mask(attention_mask, prefix, q, k, causal) if prefix else attention_mask
            out, _ = self.base(module, q, k, v, mask, **{**kwargs, "is_causal": False if prefix else kwargs.get("is_causal")})
            return out
        return chain(adapters, attend)(query, key, value), None


_REGISTRIES: dict[str, RegistryAttention] = {}


def registry_of(model: nn.Module) -> RegistryAttention | None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        return None
    current = getattr(config, "_attn_implementation", None) or "sdpa"
    existing = model.__dict__.get("_surgery_attention")
    if existing is not None:
        return existing
    original = current.removeprefix("surgery_")
    registry = _REGISTRIES.get(original)
    if registry is None:
        registry = _REGISTRIES[original] = RegistryAttention(original)
    model.__dict__["_surgery_attention"] = registry
    return registry


def attach_registry(model: nn.Module, registry: RegistryAttention, module: nn.Module, adapter: nn.Module,
                    gate: Callable[[], bool]) -> Callable[[], None]:
    entry = (adapter, gate)
    registry.sites.setdefault(module, []).append(entry)
    if model.config._attn_implementation != registry.name:
        model.set_attn_implementation(registry.name)

    def undo():
        entries = registry.sites.get(module, [])
        if entry in entries:
            entries.remove(entry)
        if not any(registry.sites.get(m) for m in model.modules()):
            model.set_attn_implementation(registry.original)
            model.__dict__.pop("_surgery_attention", None)
    return undo


# ---------------------------------------------------------------- F.scaled_dot_product_attention in a module

def _intercepting(original: Callable, adapters: list) -> Callable:
    """F.scaled_dot_product_attention with the adapters around it."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")

    def sdpa(*args, **kwargs):
        bound = dict(zip(names, args))
        bound.update(kwargs)
        mask, causal = bound.get("attn_mask"), bool(bound.get("is_causal", False))
        rest = {k: v for k, v in bound.items() if k in ("dropout_p", "scale", "enable_gqa")}

        def attend(q, k, v, prefix=0):
            if prefix:
                return original(q, k, v, attn_mask=extend_mask(mask, prefix, q, k, causal), is_causal=False, **rest)
            return original(q, k, v, attn_mask=mask, is_causal=causal, **rest)
        return chain(adapters, attend)(bound["query"], bound["key"], bound["value"])
    return sdpa


class _NoFastPath(torch.overrides.TorchFunctionMode):
    """A pass-through mode: while one is active, nn.MultiheadAttention sees a torch-function override and stays
    off its fused fast path (which would not call F.scaled_dot_product_attention). Unlike
    torch.backends.mha.set_fastpath_enabled, entering it is traceable by torch.compile."""

    def __torch_function__(self, func, arg_types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


_INTERCEPT_ATTR = "_surgery_attend"
_RELEASES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # module -> finalizer releasing it
_RUNNING: list[list] = []          # the adapters of each intercepting forward now running, innermost last
_ATTACHED = [0]                    # intercepting modules attached, process-wide
_ROUTED = [0]                      # calls routed through adapters so far, process-wide
_PLAIN_SDPA = F.scaled_dot_product_attention


def _routed_sdpa(*args, **kwargs):
    """Stands in for F.scaled_dot_product_attention while any module is intercepted: inside an intercepting
    forward the call goes through that module's adapters, everywhere else it is the plain function."""
    if not _RUNNING:
        return _PLAIN_SDPA(*args, **kwargs)
    _ROUTED[0] += 1
    return _intercepting(_PLAIN_SDPA, _RUNNING[-1])(*args, **kwargs)


def _release_one():
    """One intercepted module fewer; with none left, F.scaled_dot_product_attention is the plain one again."""
    _ATTACHED[0] -= 1
    if not _ATTACHED[0] and F.scaled_dot_product_attention is _routed_sdpa:
        F.scaled_dot_product_attention = _PLAIN_SDPA


def _intercepted_forward(self, *args, **kwargs):
    """The module's own forward, with its active adapters made current for F.scaled_dot_product_attention.
    The function is replaced in torch.nn.functional while intercepts exist, not per call: code compiled by
    torch.compile reads module globals when it is traced, so only a lasting replacement is seen there."""
    active = [adapter for adapter, on in self.__dict__[_INTERCEPT_ATTR] if on()]
    if not active:
        return type(self).forward(self, *args, **kwargs)
    _RUNNING.append(active)
    routed = _ROUTED[0]
    try:
        with _NoFastPath():
            out = type(self).forward(self, *args, **kwargs)
    finally:
        _RUNNING.pop()
    if _ROUTED[0] == routed:
        raise RewriteError(
            f"{type(self).__name__}: its forward made no call of F.scaled_dot_product_attention that surgery could "
            f"route through the attention adapters (nn.MultiheadAttention with need_weights=True computes the "
            f"weights itself; under torch.compile it runs as one opaque op); the adapters would be skipped")
    return out


def attach_intercept(module: nn.Module, adapter: nn.Module, gate: Callable[[], bool]) -> Callable[[], None]:
    """While `module`'s forward runs, its calls of F.scaled_dot_product_attention go through the adapters.

    The forward is wrapped on the instance (rather than changed in a pre-hook and restored in a post-hook), so
    the change is lexically scoped and torch.compile(fullgraph=True) traces it. Adapters at one op compose in
    the order they were attached (the first attached innermost). The undo restores the plain function when the
    last intercepted module goes."""
    entries = module.__dict__.get(_INTERCEPT_ATTR)
    if entries is None:
        if "forward" in module.__dict__:
            raise RewriteError(f"{type(module).__name__}: its forward is already replaced; cannot also intercept "
                               f"its attention")
        entries = module.__dict__[_INTERCEPT_ATTR] = []
        module.forward = types.MethodType(_intercepted_forward, module)   # bound: a deepcopy rebinds it
        _ATTACHED[0] += 1
        F.scaled_dot_product_attention = _routed_sdpa
        # runs once: at the last undo, or when the module is freed without one
        _RELEASES[module] = weakref.finalize(module, _release_one)
    entries.append((adapter, gate))

    def undo():
        # look the list up again: torch.export (the trace of a later apply) restores module attributes as copies
        current = module.__dict__.get(_INTERCEPT_ATTR)
        if current is None:
            return
        current[:] = [(a, g) for a, g in current if not (a is adapter and g is gate)]
        if not current:
            module.__dict__.pop(_INTERCEPT_ATTR, None)
            module.__dict__.pop("forward", None)
            _RELEASES.pop(module)()
    return undo
