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
    module docstring)."""
    out: set[str] = set()
    for node in traced.graph.nodes:
        if node.op != "placeholder" or node.name not in traced.params or not node.users:
            continue     # unread here (a tied weight is read through its other name): not this function's question
        seen, frontier, reaches = set(), [node], False
        while frontier and not reaches:
            n = frontier.pop()
            for user in n.users:
                if user in seen:
                    continue
                seen.add(user)
                if user.op == "output":
                    reaches = True
                    break
                name = getattr(user.target, "__name__", str(user.target)).split(".")[0]
                if name in STOPS or not _floating(user):
                    continue
                frontier.append(user)
        if not reaches:
            out.add(traced.params[node.name])
    return out
