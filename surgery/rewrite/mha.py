"""nn.MultiheadAttention's projections adapted on activations.

nn.MultiheadAttention reads `in_proj_weight` (or `q/k/v_proj_weight`) and `out_proj.weight` inside
`F.multi_head_attention_forward`, without calling a module, so no module boundary carries a projection's input
and output. A weight parametrization covers adapters that are a function of the weight alone (LoRA's W + s·B·A);
an adapter that reads the activation (LoRA with dropout on its input, QLoRA's recipe: s·B·A·dropout(x); UniPELT's
gated LoRA, whose gate is sigmoid(Linear(x)) averaged over the sequence) needs the projection's input.

While such an adapter is on, the module's calls of `F.multi_head_attention_forward` run surgery's copy of it
(surgery/rewrite/attention.py: the same code object with its own globals), in which `_in_projection_packed`,
`_in_projection` and `linear` (the output projection) compute the base projection and then apply the module's
adapters to (input, output) of each projection, as on an nn.Linear's forward hook. Inside that function tensors
are sequence-first, (L, N, E); the adapters get them batch-first, (N, L, E), as from a batch-first module, so a
gate's mean over the sequence is over the sequence. A torch-function mode entered by the module's pre-hook (and
left by an always-called post-hook) does the routing, per thread, for that module's forward only; torch's fused
encoder fast path (which calls no projection) is kept off while the adapter is on.
"""
from __future__ import annotations

import functools
import threading

import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import RewriteError
from surgery.rewrite import compose
from surgery.rewrite.attention import (_FAST_PATH_MODULES, _MHA_GLOBALS, _PLAIN_MHA, _ROUTED_MHA, ModeHooks,
                                       _SlowPathHooks)

SITES_ATTR = "_surgery_mha_sites"
_LOCAL = threading.local()      # per thread: the projection sites of the nn.MultiheadAttention call running now
_PLAIN_PACKED = F._in_projection_packed
_PLAIN_SEPARATE = F._in_projection
_PLAIN_LINEAR = F.linear
_IN_NAMES = {"in_proj_weight": None, "q_proj_weight": 0, "k_proj_weight": 1, "v_proj_weight": 2}


def routing(model: nn.Module, owner_path: str, weight_name: str, rows: tuple[int, int] | None):
    """How a weight read inside F.multi_head_attention_forward is reached on activations: (the MHA module, "in"
    or "out", which of q/k/v (0, 1, 2; "all" for the whole packed in_proj), the columns of that projection's
    output (None: all), the modules whose fused fast path must stay off), or None when the weight is no
    nn.MultiheadAttention projection."""
    owner = model.get_submodule(owner_path)
    if isinstance(owner, nn.MultiheadAttention) and weight_name in _IN_NAMES:
        mha, path, kind = owner, owner_path, "in"
        width = owner.embed_dim
        chunk = _IN_NAMES[weight_name]
        if chunk is None:
            if rows is None:
                chunk, cols = "all", None
            else:
                chunk = rows[0] // width
                cols = (rows[0] - chunk * width, rows[1] - chunk * width)
                if cols[1] > width:
                    raise RewriteError(f"{owner_path}.in_proj_weight rows {rows} span two of q, k and v; adapt each "
                                       f"projection alone")
        else:
            cols = rows
    else:
        path = owner_path.rpartition(".")[0]
        mha = model.get_submodule(path) if owner_path else None
        if not isinstance(mha, nn.MultiheadAttention) or mha.out_proj is not owner or weight_name != "weight":
            return None
        kind, chunk, cols = "out", 0, rows
    if cols is not None and cols == (0, mha.embed_dim):
        cols = None
    fast = []
    parts = path.split(".") if path else []
    for k in range(len(parts) + 1):
        prefix = ".".join(parts[:k])
        module = model.get_submodule(prefix) if prefix else model
        if isinstance(module, _FAST_PATH_MODULES):
            fast.append(module)
    return mha, kind, chunk, cols, tuple(fast)


def attach(site) -> callable:
    """Realize a WeightSite routed by `routing` (its `routed` field); return the undo."""
    mha, kind, chunk, cols, fast = site.routed
    entries = mha.__dict__.get(SITES_ATTR)
    if entries is None:
        entries = mha.__dict__[SITES_ATTR] = []
        hooks = _Enter()
        mha.__dict__["_surgery_mha_hooks"] = [mha.register_forward_pre_hook(hooks.enter),
                                              mha.register_forward_hook(hooks.exit, always_call=True)]
    entry = (site.gate, kind, chunk, cols, site.adapter)
    entries.append(entry)
    slow = _SlowPathHooks(site.gate)
    handles = []
    for module in fast:
        handles += [module.register_forward_pre_hook(slow.enter), module.register_forward_hook(slow.exit,
                                                                                                always_call=True)]
    return functools.partial(_detach, mha, entry, handles)


def _detach(mha: nn.Module, entry: tuple, handles: list) -> None:
    for handle in handles:
        handle.remove()
    entries = mha.__dict__.get(SITES_ATTR, [])
    if entry in entries:
        entries.remove(entry)
    if not entries:
        mha.__dict__.pop(SITES_ATTR, None)
        for handle in mha.__dict__.pop("_surgery_mha_hooks", []):
            handle.remove()


class _Mode(torch.overrides.TorchFunctionMode):
    """Routes one module's F.multi_head_attention_forward call through surgery's copy, with its sites."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _PLAIN_MHA or func is _ROUTED_MHA:
            previous = getattr(_LOCAL, "state", None)
            _LOCAL.state = {"entries": list(self.module.__dict__.get(SITES_ATTR, ())), "shape": None}
            try:
                return _ROUTED_MHA(*args, **kwargs)
            finally:
                _LOCAL.state = previous
        return func(*args, **kwargs)


class _Enter(ModeHooks):
    """The routing mode while one of the module's sites is on."""

    def mode_for(self, module):
        return _Mode(module) if any(gate() for gate, *_ in module.__dict__.get(SITES_ATTR, ())) else None


def _adapt(state: dict, kind: str, chunk, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y (a projection's output, (L, N, F)) with the active sites of (kind, chunk) applied, given its input x."""
    live = [(gate, cols, adapter) for gate, k, c, cols, adapter in state["entries"]
            if k == kind and c == chunk and gate()]
    if not live:
        return y
    by_name: dict[str, list] = {}
    for gate, cols, adapter in live:
        by_name.setdefault(gate.name, []).append(functools.partial(_adapt_call, adapter, cols))
    runtime = live[0][0].runtime
    out = compose.run(runtime.composition, by_name, list(by_name), y.transpose(0, 1), (x.transpose(0, 1),), {})
    return out.transpose(0, 1)


def _adapt_call(adapter: nn.Module, cols, out, args):
    if cols is None:
        return adapter(args[0], out)
    a, b = cols
    part = adapter(args[0], out[..., a:b])
    return out + F.pad(part - out[..., a:b], (a, out.shape[-1] - b))


def _routed_packed(q, k, v, w, b=None):
    out = _PLAIN_PACKED(q, k, v, w, b)
    state = getattr(_LOCAL, "state", None)
    if state is None:
        return out
    state["shape"] = q.shape[:2]
    if any(c == "all" for _, kind, c, *_ in state["entries"]):
        if not (q is k and k is v):
            raise RewriteError("an adapter on the whole packed in_proj of nn.MultiheadAttention needs one input for "
                               "q, k and v (self-attention); adapt q, k and v separately")
        out = _adapt(state, "in", "all", q, torch.cat(out, dim=-1)).chunk(3, dim=-1)
    return tuple(_adapt(state, "in", i, x, y) for i, (x, y) in enumerate(zip((q, k, v), out)))


def _routed_separate(q, k, v, w_q, w_k, w_v, b_q=None, b_k=None, b_v=None):
    out = _PLAIN_SEPARATE(q, k, v, w_q, w_k, w_v, b_q, b_k, b_v)
    state = getattr(_LOCAL, "state", None)
    if state is None:
        return out
    state["shape"] = q.shape[:2]
    return tuple(_adapt(state, "in", i, x, y) for i, (x, y) in enumerate(zip((q, k, v), out)))


def _routed_linear(x, weight, bias=None):
    """The output projection: F.multi_head_attention_forward calls `linear` for it alone, on (L·N, E) rows."""
    y = _PLAIN_LINEAR(x, weight, bias)
    state = getattr(_LOCAL, "state", None)
    if state is None or state["shape"] is None:
        return y
    length, batch = state["shape"]
    out = _adapt(state, "out", 0, x.reshape(length, batch, -1), y.reshape(length, batch, -1))
    return out.reshape(y.shape)


_MHA_GLOBALS.update({"_in_projection_packed": _routed_packed, "_in_projection": _routed_separate,
                     "linear": _routed_linear})
