"""surgery: declarative model surgery for PyTorch.

    model = surgery.apply(model, "specs/houlsby.yaml")
"""
from surgery.api import add_fusion, apply, disable, eject, plan, remove, set_active, trainable_parameters
from surgery.rewrite.compose import Average, BatchSplit, Fuse, MixedBatch, Parallel, Split, Stack
from surgery.errors import LimitError, MatchError, RewriteError, SpecError, SurgeryError, SurgeryWarning
from surgery.match import Match
from surgery.modules.registry import register as register_module
from surgery.spec import Spec, load_spec
from surgery.merge import MergeReport, merge, unmerge  # noqa: E402
from surgery.io.peft import from_peft, to_peft  # noqa: E402
from surgery.quantize import dequantize_nf4, nf4_memory, quantize_nf4  # noqa: E402

__all__ = [
    "apply", "plan", "disable", "eject", "add_fusion", "Stack", "Average", "BatchSplit", "Split", "Parallel", "Fuse", "remove", "set_active", "trainable_parameters", "load_spec", "Spec", "Match",
    "register_module", "SurgeryError", "SpecError", "MatchError", "RewriteError", "LimitError", "SurgeryWarning",
] + ["merge", "unmerge", "MergeReport", "from_peft", "to_peft"]
__all__ += ["quantize_nf4", "dequantize_nf4", "nf4_memory"]
__version__ = "0.1.0"
from surgery.io import CheckpointError, load, save  # noqa: E402
from surgery.export import ExportError, draw, export  # noqa: E402
__all__ += ["save", "load", "export", "draw", "CheckpointError", "ExportError"]
from surgery.materialize import materialize  # noqa: E402
__all__ += ["materialize"]
from surgery.adalora import AdaLoRAAllocator  # noqa: E402
__all__ += ["AdaLoRAAllocator"]
__all__ += ["MixedBatch"]
