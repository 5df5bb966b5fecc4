"""Adapter modules. Each registers its kind; a spec names the kind and its options."""
from surgery.modules.base import SiteContext, WeightAdapter
from surgery.modules.registry import Options, kinds, module_class, register
from surgery.modules import attention, bottleneck, ia3, lora, reft  # noqa: F401  (register the built-in kinds)
from surgery.modules import krona  # noqa: F401
from surgery.modules import invertible  # noqa: F401
from surgery.modules import dora, said, sparse  # noqa: F401
from surgery.modules import adalora, loha, oft, vera  # noqa: F401

__all__ = ["Options", "SiteContext", "WeightAdapter", "kinds", "module_class", "register"]
