"""Stage 2: trace a model into one canonical graph (torch.export, aten level) annotated with module boundaries."""
from surgery.trace.export import Boundary, Traced, default_example_inputs, trace

__all__ = ["Boundary", "Traced", "default_example_inputs", "trace"]
