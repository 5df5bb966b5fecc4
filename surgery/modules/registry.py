"""The registry of module kinds a spec may name. Specs are data: a kind is looked up here, never imported."""
from __future__ import annotations

import difflib
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, model_validator

_REGISTRY: dict[str, type] = {}


class Options(BaseModel):
    """Base of every module's spec options. Subclasses declare `kind: Literal[...]` and their knobs."""

    # validators built at a kind's first validation, not at import: loading a spec builds its kinds' only
    model_config = ConfigDict(extra="forbid", defer_build=True)
    supported_actions: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def actions(cls) -> set[str]:
        return set(cls.supported_actions)

    @model_validator(mode="wrap")
    @classmethod
    def _plain_values(cls, data, handler):
        """Finite numbers within ±65504, booleans only where the option is a boolean (modules/values.py)."""
        from surgery.modules.values import checked_options
        return checked_options(cls, data, handler)


def register(cls):
    """Class decorator: make a module class available to specs under its Options' `kind`."""
    kind = cls.Options.model_fields["kind"].default
    if kind in _REGISTRY and _REGISTRY[kind] is not cls:
        raise ValueError(f"module kind {kind!r} is already registered to {_REGISTRY[kind].__name__}")
    _REGISTRY[kind] = cls
    return cls


def module_class(kind: str):
    if kind not in _REGISTRY:
        if kind in BUILTIN_KINDS:   # the one file that defines it (a new process imports 1 file, not 14)
            import importlib
            importlib.import_module(f"surgery.modules.{BUILTIN_KINDS[kind]}")
        else:
            _ensure_builtins()
    try:
        return _REGISTRY[kind]
    except KeyError:
        raise _unknown(kind) from None


def options_model(kind: str) -> type[Options]:
    """The Options model of `kind`. A built-in kind's comes from surgery/modules/options.py without importing its
    module (nor torch): validating a spec needs pydantic only."""
    if kind in _REGISTRY:
        return _REGISTRY[kind].Options
    builtin = _builtin_options()
    if isinstance(kind, str) and kind in builtin:
        return builtin[kind]
    raise _unknown(kind)


def kind_names() -> list[str]:
    """Every kind a spec may name (built-in and registered), sorted, without importing a module class."""
    return sorted(set(_REGISTRY) | set(_builtin_options()))


def _unknown(kind) -> ValueError:
    names = kind_names()
    near = difflib.get_close_matches(str(kind), names, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return ValueError(f"unknown module kind {kind!r}{hint}; known kinds: {', '.join(names)}")


def _builtin_options() -> dict[str, type[Options]]:
    from surgery.modules.options import BUILTIN
    return BUILTIN


def kinds() -> dict[str, type]:
    _ensure_builtins()
    return dict(_REGISTRY)


# the files of surgery/modules that register the built-in kinds (importing one registers its kinds)
BUILTIN_MODULES = ("adalora", "attention", "bottleneck", "dora", "ia3", "invertible", "krona", "loha", "lora", "oft",
                   "reft", "said", "sparse", "vera")
# built-in kind -> the file of BUILTIN_MODULES that registers it (a test checks it against the registry)
BUILTIN_KINDS = {"adalora": "adalora", "prefix": "attention", "adaption_prompt": "attention", "prompt": "attention",
                 "bottleneck": "bottleneck", "dora": "dora", "ia3": "ia3", "invertible": "invertible",
                 "krona": "krona", "loha": "loha", "lora": "lora", "oft": "oft", "boft": "oft", "reft": "reft",
                 "said": "said", "sparse": "sparse", "vera": "vera"}


def _ensure_builtins():
    import importlib
    for name in BUILTIN_MODULES:
        importlib.import_module(f"surgery.modules.{name}")
