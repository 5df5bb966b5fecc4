"""Building adapters for a model on the meta device without computing values that do not exist.

A model built under `with torch.device("meta")` has shapes only, and so have the adapters built for it (their
values are drawn again by `surgery.materialize` once the base weights are real). Their constructors still run
their initializers, though, and on the meta device each of those calls costs the Python meta kernel of its op
(torch 2.x implements the meta kernels of random fills and most pointwise ops in Python: `normal_` about
0.2 ms, a `trunc_normal_` five such ops), which on a 7B shape is most of what building the adapters costs.

`building_on_meta()` is `torch.device("meta")` plus a function mode that answers the fills whose result on a
meta tensor is the tensor itself, unchanged (no values, no consumed random numbers: a meta fill draws nothing
from its generator), without dispatching them: the random fills (`normal_`, `uniform_`, `nn.init.normal_`,
`nn.init.uniform_`) and the in-place scalar arithmetic `nn.init.trunc_normal_` is made of (`erfinv_`, `mul_`,
`add_`, `clamp_`). Random factories (`torch.randn`, `torch.rand`) that make a meta tensor drop their generator,
which the meta kernel would not advance (the slow path of the meta kernel is the one with a generator).
Only calls whose meta kernel would succeed are answered (floating tensors, scalar arguments, std ≥ 0,
a ≤ b, no autograd history to record); anything else runs as before, so errors and warnings are unchanged.
The tensor's version counter is bumped as the op would have bumped it.
"""
from __future__ import annotations

import contextlib
import numbers

import torch
from torch import nn
from torch.autograd.graph import increment_version
from torch.overrides import TorchFunctionMode

_META = torch.device("meta")


def _number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, torch.Tensor)


def _arg(args, kwargs, index: int, name: str, default):
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _normal_ok(args, kwargs) -> bool:      # normal_(self, mean=0, std=1, *, generator=None)
    mean, std = _arg(args, kwargs, 1, "mean", 0.0), _arg(args, kwargs, 2, "std", 1.0)
    return _number(mean) and _number(std) and std >= 0


def _uniform_ok(args, kwargs) -> bool:     # uniform_(self, from=0, to=1, *, generator=None)
    low, high = _arg(args, kwargs, 1, "from", 0.0), _arg(args, kwargs, 2, "to", 1.0)
    return _number(low) and _number(high) and low <= high


def _init_normal_ok(args, kwargs) -> bool:   # nn.init.normal_(tensor, mean=0, std=1, generator=None)
    mean, std = _arg(args, kwargs, 1, "mean", 0.0), _arg(args, kwargs, 2, "std", 1.0)
    return _number(mean) and _number(std) and std >= 0


def _init_uniform_ok(args, kwargs) -> bool:  # nn.init.uniform_(tensor, a=0, b=1, generator=None)
    low, high = _arg(args, kwargs, 1, "a", 0.0), _arg(args, kwargs, 2, "b", 1.0)
    return _number(low) and _number(high) and low <= high


def _scalars_ok(args, kwargs) -> bool:     # mul_/add_(self, number[, alpha=number]), erfinv_(self)
    rest = list(args[1:]) + list(kwargs.values())
    return all(_number(v) for v in rest)


def _clamp_ok(args, kwargs) -> bool:       # clamp_(self, min=None, max=None)
    low, high = _arg(args, kwargs, 1, "min", None), _arg(args, kwargs, 2, "max", None)
    bounds = [v for v in (low, high) if v is not None]
    return bool(bounds) and all(_number(v) for v in bounds) and set(kwargs) <= {"min", "max"}


# function -> check of its arguments (besides the tensor): when it passes, the op on a meta tensor is a no-op
_VALUE_FILLS = {
    torch.Tensor.normal_: _normal_ok,
    torch.Tensor.uniform_: _uniform_ok,
    torch.Tensor.erfinv_: _scalars_ok,
    torch.Tensor.mul_: _scalars_ok,
    torch.Tensor.add_: _scalars_ok,
    torch.Tensor.clamp_: _clamp_ok,
    nn.init.normal_: _init_normal_ok,
    nn.init.uniform_: _init_uniform_ok,
}
_NO_GRAD_FILLS = (nn.init.normal_, nn.init.uniform_)
_RANDOM_FACTORIES = (torch.randn, torch.rand)


class _SkipMetaValues(TorchFunctionMode):
    """Answers value-only fills of meta tensors without running their meta kernels (see the module doc)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        check = _VALUE_FILLS.get(func)
        if check is not None:
            # nn.init.normal_/uniform_ hand everything over by keyword (tensor=..., mean=..., generator=...)
            tensor = args[0] if args else kwargs.get("tensor")
            rest = {k: v for k, v in kwargs.items() if k not in ("tensor", "generator")}
            # nn.init's fills run under no_grad; a Tensor method records autograd history unless grad is off
            recorded = func not in _NO_GRAD_FILLS and tensor.requires_grad and torch.is_grad_enabled() \
                if isinstance(tensor, torch.Tensor) else True
            if (isinstance(tensor, torch.Tensor) and type(tensor) in (torch.Tensor, nn.Parameter) and tensor.is_meta
                    and tensor.is_floating_point() and not recorded and check((tensor,) + tuple(args[1:]), rest)):
                increment_version(tensor)
                return tensor
        elif (func in _RANDOM_FACTORIES and isinstance(kwargs.get("generator"), torch.Generator)
              and kwargs["generator"].device.type == "cpu" and kwargs.get("out") is None):
            device = kwargs.get("device")
            if (torch.device(device) if device is not None else torch.get_default_device()) == _META:
                kwargs = {k: v for k, v in kwargs.items() if k != "generator"}
        return func(*args, **kwargs)


@contextlib.contextmanager
def building_on_meta():
    """`with torch.device("meta")` for building adapters: value-only fills of meta tensors are skipped."""
    with torch.device(_META), _SkipMetaValues():
        yield
