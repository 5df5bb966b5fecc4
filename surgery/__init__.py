"""surgery: declarative model surgery for PyTorch.

    model = surgery.apply(model, "specs/houlsby.yaml")

The spec format and the errors are imported with the package; everything that needs torch (apply, plan, merge,
save, export, ...) is imported on first use, so loading and validating specs (`surgery validate`, a pre-commit
hook) does not import torch.
"""
import importlib
import sys
import types

from surgery.errors import LimitError, MatchError, RewriteError, SpecError, SurgeryError, SurgeryWarning
from surgery.spec import Spec, load_spec

__version__ = "0.1.0"

# public name -> (module, attribute): imported when first used (PEP 562)
_LAZY = {
    **{name: ("surgery.api", name) for name in
       ("add_fusion", "apply", "disable", "eject", "plan", "remove", "set_active", "trainable_parameters")},
    **{name: ("surgery.rewrite.compose", name) for name in
       ("Average", "BatchSplit", "Fuse", "MixedBatch", "Parallel", "Split", "Stack")},
    "Match": ("surgery.match", "Match"),
    "register_module": ("surgery.modules.registry", "register"),
    **{name: ("surgery.merge", name) for name in ("MergeReport", "merge", "unmerge")},
    **{name: ("surgery.io.peft", name) for name in ("from_peft", "to_peft")},
    **{name: ("surgery.quantize", name) for name in ("dequantize_nf4", "nf4_memory", "quantize_nf4")},
    **{name: ("surgery.io", name) for name in ("CheckpointError", "load", "save")},
    **{name: ("surgery.export", name) for name in ("ExportError", "draw", "export")},
    "materialize": ("surgery.materialize", "materialize"),
    "AdaLoRAAllocator": ("surgery.adalora", "AdaLoRAAllocator"),
}

__all__ = [
    "apply", "plan", "disable", "eject", "add_fusion", "Stack", "Average", "BatchSplit", "Split", "Parallel", "Fuse", "remove", "set_active", "trainable_parameters", "load_spec", "Spec", "Match",
    "register_module", "SurgeryError", "SpecError", "MatchError", "RewriteError", "LimitError", "SurgeryWarning",
] + ["merge", "unmerge", "MergeReport", "from_peft", "to_peft"]
__all__ += ["quantize_nf4", "dequantize_nf4", "nf4_memory"]
__all__ += ["save", "load", "export", "draw", "CheckpointError", "ExportError"]
__all__ += ["materialize"]
__all__ += ["AdaLoRAAllocator"]
__all__ += ["MixedBatch"]


# names of both a stage module and the function it defines: `surgery.merge` is the function, even after the
# module has been imported (importing a submodule sets the package's attribute of that name to the module)
_SHADOWED = {"export", "materialize", "merge"}


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        if name in _SHADOWED and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in _LAZY:
        module, attribute = _LAZY[name]
        try:
            value = getattr(importlib.import_module(module), attribute)
        except ModuleNotFoundError as exc:   # an installation without that stage: the name is not there
            if exc.name != module:
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r} ({module} is missing)") from None
        globals()[name] = value   # the next lookup is a plain attribute
        return value
    if name in _SHADOWED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:   # a stage package (surgery.rewrite, surgery.modules, ...) used as an attribute
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
