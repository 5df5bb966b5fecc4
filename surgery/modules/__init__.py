"""Adapter modules. Each registers its kind; a spec names the kind and its options."""
from surgery.modules.base import SiteContext, WeightAdapter
from surgery.modules.registry import Options, kinds, module_class, register
from surgery.modules import bottleneck, ia3, lora  # noqa: F401  (register the built-in kinds)

__all__ = ["Options", "SiteContext", "WeightAdapter", "kinds", "module_class", "register"]
