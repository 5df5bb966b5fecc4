"""Adapter modules. Each registers its kind; a spec names the kind and its options.

The options of the built-in kinds live in `options.py` (pydantic only); the module classes, which need torch, are
imported when a kind is first built (`registry.module_class`) or one of the names below is used.
"""
import importlib

from surgery.modules.registry import Options, kinds, module_class, register

__all__ = ["Options", "SiteContext", "WeightAdapter", "kinds", "module_class", "register"]


def __getattr__(name: str):
    if name in ("SiteContext", "WeightAdapter"):
        from surgery.modules import base
        return getattr(base, name)
    try:   # a submodule used as an attribute (surgery.modules.weight_ops)
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module 'surgery.modules' has no attribute {name!r}")
