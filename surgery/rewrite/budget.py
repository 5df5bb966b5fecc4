"""How much memory an apply will allocate, known before anything is allocated, and the limit it must fit.

Every site's module is built once on the meta device (shapes, no storage) exactly as `realize` will build it,
and the bytes of its parameters and buffers are summed at the dtype it will get (the model's floating dtype).
An apply whose adapters exceed the limit is refused with a `LimitError` naming the largest rules, before the
model is touched: `r: 10000000` on a 64-wide model, or Intrinsic SAID with `d: 10**9`, is a clear error
instead of an allocation that takes the machine down.

The limit, in order: `surgery.apply(..., memory_limit=...)`, the environment variable `SURGERY_MEMORY_LIMIT`,
else `DEFAULT_FRACTION` of the memory available on the model's device (CPU: MemAvailable; CUDA: free memory).
A limit is a number of bytes or a string such as "512MiB", "8GB", "1.5GiB"; "none" (or "off") disables it.
A model on the meta device allocates nothing real, so it is not limited.
"""
from __future__ import annotations

import os
import re
import types
from dataclasses import dataclass, field

import torch
from torch import nn

from surgery.errors import LimitError
from surgery.modules.registry import module_class
from surgery.rewrite.meta_build import building_on_meta

DEFAULT_FRACTION = 0.25
ENV = "SURGERY_MEMORY_LIMIT"
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


@dataclass
class Estimate:
    """Bytes the adapters of one apply call will hold, in all and per rule (name -> (bytes, sites))."""

    total: int = 0
    rules: dict[str, tuple[int, int]] = field(default_factory=dict)
    device: str = "cpu"


def parse_limit(value, source: str) -> int | None:
    """Bytes from an int or a string with a unit; None for "none"/"off" (no limit)."""
    if isinstance(value, bool):
        raise LimitError(f"{source}: a memory limit is a number of bytes or a size such as '8GiB', not {value!r}")
    if isinstance(value, (int, float)):
        if value != value or value <= 0:
            raise LimitError(f"{source}: a memory limit must be positive, not {value!r}")
        return int(value) if value != float("inf") else None
    text = str(value).strip().lower()
    if text in ("none", "off", "unlimited"):
        return None
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)", text)
    if not m or m.group(2) not in _UNITS or float(m.group(1)) <= 0:
        raise LimitError(f"{source}: {value!r} is not a memory limit (a number of bytes, a size such as '8GiB' or "
                         f"'512MB', or 'none')")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def available_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on `device` (None when unknown)."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # noqa: BLE001 - no driver answer: no default limit
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def resolve_limit(memory_limit, device: torch.device) -> tuple[int | None, str]:
    """(bytes or None, where the limit comes from)."""
    if memory_limit is not None:
        return parse_limit(memory_limit, "memory_limit"), "memory_limit"
    if os.environ.get(ENV):
        return parse_limit(os.environ[ENV], ENV), ENV
    free = available_bytes(device)
    if free is None:
        return None, "unknown"
    return int(free * DEFAULT_FRACTION), f"{DEFAULT_FRACTION:.0%} of the {_size(free)} available on {device.type}"


def _module_bytes(modules, dtype: torch.dtype, seen: set[int]) -> int:
    total = 0
    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            if id(t) in seen:
                continue
            seen.add(id(t))
            item = dtype.itemsize if t.is_floating_point() and dtype.is_floating_point else t.element_size()
            total += t.numel() * item
    return total


def estimate(model: nn.Module, analysis, spec, all_matches) -> Estimate:
    """Bytes the rules' modules will hold, from meta-device builds of every site (nothing real is allocated).

    A site whose module cannot be built on the meta device (it reads weight values, or its options are wrong)
    is left out: the real build reports its own error. Kinds registered outside surgery are built here only
    when their class sets `estimate_on_meta = True` (a build may have side effects surgery cannot see); the
    global random state is restored afterwards, so the real build draws the same initial values."""
    with torch.random.fork_rng(devices=[]):
        return _estimate(model, analysis, spec, all_matches)


def _estimate(model: nn.Module, analysis, spec, all_matches) -> Estimate:
    from surgery.rewrite.actions import _context, _site_value, _through

    out = Estimate()
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    if ref is not None and ref.device.type == "meta":
        out.device = "meta"
        return out
    if ref is not None:
        out.device = str(ref.device)
    runtime = types.SimpleNamespace(call=None, active=None, disabled=False, composition=None, slots={})
    adapter = nn.ModuleDict()
    for i, (rule, matches) in enumerate(zip(spec.rules, all_matches)):
        if rule.action == "train" or rule.module is None or not matches:
            continue
        try:
            cls = module_class(rule.module.kind)
        except ValueError:
            continue
        if not getattr(cls, "estimate_on_meta", cls.__module__.startswith("surgery.modules.")):
            continue
        name = matches[0].rule
        built, shared, seen, total, dtype = nn.ModuleDict(), nn.ModuleDict(), set(), 0, None
        adapter[name] = built
        per_layer = any(isinstance(v, dict) for v in rule.module.model_dump().values())
        sizes: dict[tuple, int] = {}   # sites of one shape cost the same: build one of them
        for match in matches:
            if rule.action == "wrap" and match.site.linear is None:
                continue
            value = _through(_site_value(match.site), rule.through)
            if rule.action == "insert_before":
                inputs = match.site.node.all_input_nodes
                value = match.site.linear.x if match.site.linear is not None else (inputs[0] if inputs else value)
            try:
                ctx = _context(model, analysis, match, value, rule, ref)
                shape = (ctx.in_features, ctx.out_features, ctx.experts, ctx.dim, ctx.source_dim, ctx.role, ctx.dtype,
                         ctx.layer if per_layer else None,
                         tuple(sorted((k, v) for k, v in ctx.extra.items() if isinstance(v, (int, str)))))
                if shape in sizes and not rule.module.model_dump().get("inverse_of"):
                    total += sizes[shape]
                    continue
                if ctx.weight is not None:
                    ctx.weight = ctx.weight.detach().to("meta")
                ctx.extra.update({"calibration": None, "apply_cache": {}})
                ctx.shared, ctx.runtime, ctx.adapter = shared, runtime, adapter
                with building_on_meta():
                    module = cls.build(rule.module, ctx, rule.action)
            except Exception:  # noqa: BLE001 - the real build raises the error the user should see
                continue
            dtype = ctx.dtype
            sizes[shape] = _module_bytes([module], dtype, seen)
            total += sizes[shape]
            key = f"site{len(built)}"
            built[key] = module
        if dtype is not None:
            total += _module_bytes([shared], dtype, seen)
        out.rules[name] = (total, len(matches))
        out.total += total
    return out


def check(model: nn.Module, analysis, spec, all_matches, memory_limit=None) -> Estimate:
    """Raise LimitError when the adapters the spec builds would exceed the memory limit (see the module doc)."""
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    if device.type == "meta":
        return Estimate(device="meta")
    limit, source = resolve_limit(memory_limit, device)
    if limit is None:
        return Estimate(device=str(device))
    found = estimate(model, analysis, spec, all_matches)
    if found.total > limit:
        largest = sorted(found.rules.items(), key=lambda kv: -kv[1][0])[:3]
        parts = ", ".join(f"rule {n!r} {_size(b)} over {s} site(s)" for n, (b, s) in largest)
        raise LimitError(f"the adapters would take about {_size(found.total)} on {device.type} ({parts}), over "
                         f"the memory limit of {_size(limit)} ({source}); nothing was allocated and the model is "
                         f"unchanged. Use smaller sizes (r, d, lengths) or raise the limit: "
                         f"surgery.apply(..., memory_limit='64GiB') or {ENV}=64GiB")
    return found


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"
