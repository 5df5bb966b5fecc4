"""Plain-value rules every module option obeys, whatever its kind (checked when a spec is validated).

- A number is finite and its magnitude is at most `FLOAT_LIMIT` (65504, the largest float16): an option enters
  the forward as a factor or a size, and a value no model dtype can hold (`alpha: .inf`, `1e308`) turns the
  output into inf/NaN at once.
- A boolean is not a number: `r: true` is refused rather than read as 1 (YAML's `yes`/`on` are booleans too).

The rules apply inside per-layer mappings and lists as well.
"""
from __future__ import annotations

import math
import typing
from typing import Any

FLOAT_LIMIT = 65504.0


def accepts_bool(annotation: Any) -> bool:
    """Whether a field's type admits a boolean anywhere (bool, Any, or a Literal of True/False)."""
    if annotation is bool or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return any(isinstance(a, bool) for a in typing.get_args(annotation))
    if origin is typing.Annotated:
        return accepts_bool(typing.get_args(annotation)[0])
    if origin is dict:   # dict[K, V]: only the values are checked here
        args = typing.get_args(annotation)
        return not args or accepts_bool(args[-1])
    if annotation is dict or annotation is list:
        return True
    return any(accepts_bool(a) for a in typing.get_args(annotation))


def _values(value: Any):
    if isinstance(value, dict):
        for v in value.values():
            yield from _values(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _values(v)
    else:
        yield value


def bool_problem(value: Any, annotation: Any) -> str | None:
    """A message when `value` holds a boolean where the field takes numbers or text only."""
    if accepts_bool(annotation):
        return None
    if any(isinstance(v, bool) for v in _values(value)):
        return (f"{value!r}: a boolean is not a number here (write the number itself; YAML reads yes/no/on/off "
                f"as booleans)")
    return None


def float_problem(value: Any) -> str | None:
    """A message when `value` holds a float that is not finite or beyond ±FLOAT_LIMIT."""
    for v in _values(value):
        if isinstance(v, float) and not math.isfinite(v):
            return f"{v!r} is not a finite number: the model's output would be inf or NaN"
        if isinstance(v, float) and abs(v) > FLOAT_LIMIT:
            return (f"{v!r} is too large: a number option lies within ±{FLOAT_LIMIT:g} (the largest float16) so "
                    f"that every dtype can hold it and the output stays finite")
    return None


class ValueProblem(ValueError):
    """A problem with the option at `path` (the spec loader reports it at that key's line)."""

    def __init__(self, path: tuple, message: str):
        super().__init__(message)
        self.path = path


def checked_options(model, data: Any, handler):
    """Validate options `data` with pydantic's `handler`, refusing booleans for numbers and non-finite or huge
    floats; the error names the option."""
    if isinstance(data, dict):
        for key, value in data.items():
            field = model.model_fields.get(key) if isinstance(key, str) else None
            problem = bool_problem(value, field.annotation) if field is not None and key != "kind" else None
            if problem:
                raise ValueProblem((key,), problem)
    out = handler(data)
    for name in type(out).model_fields:
        problem = float_problem(getattr(out, name))
        if problem:
            raise ValueProblem((name,), problem)
    return out
