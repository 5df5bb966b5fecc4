"""Which parameters of a traced graph can get a gradient: those with a path of floating-point values to the
graph's output. A parameter read only to select (a MoE router's score-correction bias added before a top-k whose
indices alone are used: DeepSeek-V3, Ernie 4.5 MoE) reaches the output through integer indices, never through a
value a gradient flows along, so training it would change nothing."""
from __future__ import annotations

import torch
from torch import fx

from surgery.trace.export import Traced

STOPS = {"detach", "argmax", "argmin", "argsort"}


def _floating(node: fx.Node) -> bool:
    val = node.meta.get("val")
    vals = val if isinstance(val, (tuple, list)) else (val,)
    return any(isinstance(v, torch.Tensor) and v.is_floating_point() for v in vals)


def without_gradient(traced: Traced) -> set[str]:
    """Qualified names of the parameters the graph reads with no floating-point path to the output (see the
    module docstring). One pass over the graph in reverse: a node reaches the output when one of its users is the
    output, or is a floating-point value (not a stop) that reaches it."""
    reaches: set[fx.Node] = set()
    for node in reversed(traced.graph.nodes):
        for user in node.users:
            if user.op == "output" or (user in reaches and _passes(user)):
                reaches.add(node)
                break
    return {traced.params[node.name] for node in traced.graph.nodes
            # an unread placeholder (a tied weight read through its other name) is not this function's question
            if node.op == "placeholder" and node.name in traced.params and node.users and node not in reaches}


def _passes(node: fx.Node) -> bool:
    """Whether a gradient flows on through the value `node` makes."""
    name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
    return name not in STOPS and _floating(node)
