"""Building adapters for a model on the meta device without computing values that do not exist.

A model built under `with torch.device("meta")` has shapes only, and so have the adapters built for it (their
values are drawn again by `surgery.materialize` once the base weights are real). Their constructors still run
their initializers, though, and torch 2.x implements the meta kernels of random fills and of most pointwise ops
in Python: on a meta tensor `normal_` costs about 0.17 ms, `randn` with a generator 0.15 ms, for nothing. At 64
to 224 sites of a 7B shape that was most of what building the adapters cost.

`building_on_meta()` is `torch.device("meta")` plus a function mode that answers the random fills of a meta
tensor (`Tensor.normal_`, `Tensor.uniform_`, `nn.init.normal_`, `nn.init.uniform_`, `nn.init.kaiming_uniform_`)
with the tensor itself, unchanged, without dispatching them: on the meta device they have no values to write and
draw nothing from their generator. Random factories (`torch.randn`, `torch.rand`) that make a floating meta
tensor make it with `torch.empty` (the same size, dtype, layout and flags; the meta kernel would not advance their
generator either).
Only calls whose meta kernel would succeed are answered (a floating tensor, scalar arguments, std >= 0, a <= b,
kaiming's fan and gain defined, no autograd history to record); anything else runs as before, so errors and
warnings are unchanged. The tensor's version counter is bumped as the op would have bumped it.
Values computed from other values (a norm, a sum) are the module's to skip on meta (`tensor.is_meta`).
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


def _normal_ok(args, kwargs) -> bool:      # normal_(self, mean=0, std=1, *, generator=None), nn.init.normal_ alike
    mean, std = _arg(args, kwargs, 1, "mean", 0.0), _arg(args, kwargs, 2, "std", 1.0)
    return _number(mean) and _number(std) and std >= 0


def _uniform_ok(args, kwargs) -> bool:     # uniform_(self, from=0, to=1, *, generator=None)
    low, high = _arg(args, kwargs, 1, "from", 0.0), _arg(args, kwargs, 2, "to", 1.0)
    return _number(low) and _number(high) and low <= high


def _init_uniform_ok(args, kwargs) -> bool:  # nn.init.uniform_(tensor, a=0, b=1, generator=None)
    low, high = _arg(args, kwargs, 1, "a", 0.0), _arg(args, kwargs, 2, "b", 1.0)
    return _number(low) and _number(high) and low <= high


def _init_kaiming_ok(args, kwargs) -> bool:  # nn.init.kaiming_uniform_(tensor, a=0, mode="fan_in", nonlinearity=...)
    tensor = args[0]
    a, mode = _arg(args, kwargs, 1, "a", 0), _arg(args, kwargs, 2, "mode", "fan_in")
    nonlinearity = _arg(args, kwargs, 3, "nonlinearity", "leaky_relu")
    if tensor.dim() < 2 or 0 in tensor.shape or not isinstance(mode, str) or mode.lower() not in ("fan_in", "fan_out"):
        return False    # nn.init raises, or warns (zero elements): let it
    try:
        nn.init.calculate_gain(nonlinearity, a)
    except Exception:  # noqa: BLE001 - whatever nn.init would raise, it raises itself
        return False
    return True


# function -> check of its arguments (besides the tensor): when it passes, the op on a meta tensor is a no-op
_VALUE_FILLS = {
    torch.Tensor.normal_: _normal_ok,
    torch.Tensor.uniform_: _uniform_ok,
    nn.init.normal_: _normal_ok,
    nn.init.uniform_: _init_uniform_ok,
    nn.init.kaiming_uniform_: _init_kaiming_ok,
}
_NO_GRAD_FILLS = (nn.init.normal_, nn.init.uniform_, nn.init.kaiming_uniform_)
_RANDOM_FACTORIES = (torch.randn, torch.rand)


class _SkipMetaValues(TorchFunctionMode):
    """Answers value-only fills of meta tensors without running their meta kernels (see the module doc)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        check = _VALUE_FILLS.get(func)
        if check is not None:
            # nn.init's fills hand everything over by keyword (tensor=..., mean=..., generator=...)
            tensor = args[0] if args else kwargs.get("tensor")
            rest = {k: v for k, v in kwargs.items() if k not in ("tensor", "generator")}
            # nn.init's fills run under no_grad; a Tensor method records autograd history unless grad is off
            recorded = func not in _NO_GRAD_FILLS and tensor.requires_grad and torch.is_grad_enabled() \
                if isinstance(tensor, torch.Tensor) else True
            if (isinstance(tensor, torch.Tensor) and type(tensor) in (torch.Tensor, nn.Parameter) and tensor.is_meta
                    and tensor.is_floating_point() and not recorded and check((tensor,) + tuple(args[1:]), rest)):
                increment_version(tensor)
                return tensor
        elif func in _RANDOM_FACTORIES and kwargs.get("out") is None:
            generator, dtype, device = kwargs.get("generator"), kwargs.get("dtype"), kwargs.get("device")
            if ((generator is None or isinstance(generator, torch.Generator) and generator.device.type == "cpu")
                    and (dtype is None or dtype.is_floating_point)
                    and (torch.device(device) if device is not None else torch.get_default_device()) == _META):
                # what randn/rand make on meta: an empty tensor of that size, dtype and layout (nothing drawn)
                return torch.empty(*args, **{k: v for k, v in kwargs.items() if k != "generator"})
        return func(*args, **kwargs)


@contextlib.contextmanager
def building_on_meta():
    """`with torch.device("meta")` for building adapters: value-only fills of meta tensors are skipped."""
    with torch.device(_META), _SkipMetaValues():
        yield
