"""Torch-level calls in a module's forward, as the graph records them and as they happen at run time.

A value no module boundary carries (the sum of a parallel block's attention and MLP outputs, a DiT's gated FFN
output) is still the result of one torch-level call in some module's forward. torch.export (non-strict) records
that call on each node: `meta["torch_fn"]` = (a per-function call id, "<type of the function>.<its name>", e.g.
"method_descriptor.add" for `a + b`), and `meta["stack_trace"]`, whose last frame is the innermost `forward` on
the stack (a helper called from a forward is recorded at the forward's line). At run time a torch-function mode
sees the same function object for the same call (`a + b` and `a.add(b)` are `TensorBase.add`), and the
innermost `forward` frame gives the same file and line, so the call is identified by the function, the line and
its order among that function's calls from that line during one call of the enclosing module. That order does not
depend on other code paths in the module (a KV cache's, a mask's), only on how often that line runs.
"""
from __future__ import annotations

import re
import sys

import torch
from torch import fx

from surgery.analyze.roles import op_name, stack_entries

_FRAME = re.compile(r'File "(.+)", line (\d+), in (\S+)')


def torch_fn_key(func) -> str:
    """A torch function's name as torch.export writes it in `meta["torch_fn"][1]`."""
    return f"{type(func).__name__}.{getattr(func, '__name__', '')}"


def node_line(node: fx.Node) -> tuple[str, int] | None:
    """(file, line) of the innermost `forward` frame recorded for the node, or None (no stack trace, or its
    innermost frame is not a forward, which run time could not identify the same way)."""
    trace = node.meta.get("stack_trace")
    if not trace:
        return None
    frames = _FRAME.findall(trace)
    if not frames or frames[-1][2] != "forward":
        return None
    return frames[-1][0], int(frames[-1][1])


def _skipped_files() -> frozenset:
    """Files torch.export leaves out of recorded stack traces (its `uninteresting_files`)."""
    skipped = getattr(_skipped_files, "cache", None)
    if skipped is None:
        try:
            from torch.fx.experimental.symbolic_shapes import uninteresting_files
            skipped = frozenset(uninteresting_files())
        except Exception:  # noqa: BLE001 - a torch without it records no such files either
            skipped = frozenset()
        _skipped_files.cache = skipped
    return skipped


# torch.compile runs the rest of a function after a graph break as `torch_dynamo_resume_in_<name>_at_<line>`
_RESUMED_FORWARD = "torch_dynamo_resume_in_forward_at_"


@torch.compiler.disable     # Dynamo cannot trace frame inspection: it runs here, on the real frames
def forward_line() -> tuple[str, int] | None:
    """(file, line) the innermost running `forward` is at: where the current torch-level call comes from."""
    skipped = _skipped_files()
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if (code.co_name == "forward" or code.co_name.startswith(_RESUMED_FORWARD)) and code.co_filename not in skipped:
            return code.co_filename, frame.f_lineno
        frame = frame.f_back
    return None


def torch_call_site(value: fx.Node) -> dict | None:
    """Where the torch-level call producing `value` runs: {module, call, calls, op, index, where, shape}, or
    None when the value is not one such call's whole tensor result (in-place ops, tuple results, a node in the
    middle of a decomposed call) or the graph lacks the metadata."""
    fn = value.meta.get("torch_fn")
    where = node_line(value)
    val = value.meta.get("val")
    entries = stack_entries(value)
    if not fn or where is None or not isinstance(val, torch.Tensor) or not entries or value.op != "call_function":
        return None
    name = fn[1].rpartition(".")[2]
    if op_name(value).endswith("_") or op_name(value) == "getitem" or name.startswith("__i") or \
            (name.endswith("_") and not name.endswith("__")):
        return None
    graph = value.graph
    group = [n for n in graph.nodes if n.meta.get("torch_fn") == fn]
    if group[-1] is not value or any(u not in group for n in group[:-1] for u in n.users):
        return None
    module, call = entries[-1]
    ids: list[str] = []
    for n in graph.nodes:
        t = n.meta.get("torch_fn")
        if t and t[1] == fn[1] and t[0] not in ids and (module, call) in stack_entries(n) and node_line(n) == where:
            ids.append(t[0])
    calls = 1 + max((c for n in graph.nodes for m, c in stack_entries(n) if m == module), default=0)
    return {"module": module, "call": call, "calls": calls, "op": fn[1], "index": ids.index(fn[0]),
            "where": where, "shape": (val.dim(), int(val.shape[-1]) if val.dim() else None)}
