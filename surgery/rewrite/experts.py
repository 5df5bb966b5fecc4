"""MoE experts on activations: an adapter added to the result of the model's own grouped matmul.

Experts stored as one 3-D parameter (experts, out, in) are read by a grouped matmul over the tokens sorted by
expert: `torch._grouped_mm(x, W.transpose(-2, -1), offs=offs)` (or `F.grouped_mm`, or transformers'
`grouped_mm_fallback` op), row block e of x (rows offs[e-1]:offs[e]) going through expert e. The analysis finds
these ops (surgery/analyze/roles.py, `LinearInfo.experts`). Adapters that fold into the weight are realized on
that parameter (host.py's parametrization: the grouped matmul reads W_e + ΔW_e). An adapter that needs the op's
input (LoRA with dropout: s·B_e·A_e·dropout(x)) is realized here instead: while one call of the experts module
runs, a torch-function mode sees its grouped matmuls in call order, and the n-th one's result y becomes
`adapter.grouped(x, y, offs)`. The routing, the sort and the grouped matmul stay the model's own.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from surgery.analyze.roles import Analysis, LinearInfo, op_name, stack_entries
from surgery.errors import RewriteError
from surgery.rewrite import compose

GROUPED_OPS = ("grouped_mm_fallback", "_grouped_mm", "grouped_mm")   # as roles.py names them in the graph
_TORCH_GROUPED = tuple(f for f in (getattr(torch, "_grouped_mm", None),
                                   getattr(torch.nn.functional, "grouped_mm", None)) if f is not None)


def grouped_functions(info: LinearInfo) -> tuple:
    """The torch functions a grouped matmul of the model may be called as: torch._grouped_mm, F.grouped_mm, and
    the op the trace recorded (transformers' grouped_mm_fallback custom op, as its overload and its packet), as
    picklable references. Compared by identity at run time, so torch.compile traces the check."""
    target = info.node.target
    ops = (target, getattr(target, "_overloadpacket", None))
    found = _TORCH_GROUPED + tuple(f for f in ops if f is not None and not any(f is g for g in _TORCH_GROUPED))
    return tuple(_op_ref(f) for f in found)      # picklable (the WeightSite keeps them); attach resolves them


def grouped_index(analysis: Analysis, info: LinearInfo) -> int:
    """Which grouped matmul of its module's call the op is (0-based, in graph order = call order)."""
    entries = stack_entries(info.node)
    scope = entries[-1] if entries else None
    nodes = [n for n in analysis.traced.graph.nodes if n.op == "call_function" and op_name(n) in GROUPED_OPS
             and (not entries or scope in stack_entries(n))]
    return nodes.index(info.node)


class _GroupedMode(torch.overrides.TorchFunctionMode):
    """During one call of the experts module: the `index`-th grouped matmul's result goes through the adapters."""

    def __init__(self, table: "GroupedSites"):
        super().__init__()
        self.table, self.count = table, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if any(func is f for f in self.table.functions):
            index, self.count = self.count, self.count + 1
            x = args[0] if args else kwargs.get("input", kwargs.get("mat_a"))
            offs = kwargs.get("offs", args[2] if len(args) > 2 else None)
            for gate, adapter in list(self.table.entries.get(index, ())):
                if gate():
                    out = _run(adapter, gate, x, out, offs)
        return out


def _run(adapter: nn.Module, gate, x: torch.Tensor, y: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    runtime = getattr(gate, "runtime", None)
    composition = runtime.composition if runtime is not None else None
    if composition is None or (isinstance(composition, compose.Stack)
                               and all(isinstance(c, str) for c in composition.children)):
        return adapter.grouped(x, y, offs)     # active adapters one after another, as a Stack of names
    weight = compose.average_weight(composition, gate.name)
    if weight is None:
        raise RewriteError(f"adapter {gate.name!r} acts on MoE experts inside their grouped matmul, where tokens are "
                           f"sorted by expert, not by batch row: only Stack and Average compositions of adapter "
                           f"names reach it")
    return y + weight * (adapter.grouped(x, y, offs) - y)


class GroupedSites:
    """The grouped-matmul adapters of one experts module: a mode entered by a pre-hook and left by an
    always-called hook (per thread: modes live in the runtime's thread state)."""

    def __init__(self, module: nn.Module, runtime, functions: tuple):
        self.entries: dict[int, list] = {}
        self.runtime = runtime
        self.functions = functions
        self.handles = [module.register_forward_pre_hook(self._enter),
                        module.register_forward_hook(self._exit, always_call=True)]

    def __getstate__(self):   # torch.ops overloads do not pickle: they are kept by name
        return {**self.__dict__, "functions": tuple(_op_ref(f) for f in self.functions)}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.functions = tuple(_op_from(ref) for ref in self.functions)

    def _modes(self) -> list:
        return self.runtime.modes.setdefault(("grouped", id(self)), [])

    def _enter(self, module, args):
        mode = _GroupedMode(self)
        mode.__enter__()
        self._modes().append(mode)

    def _exit(self, module, args, out):
        modes = self._modes()
        if not modes:
            return
        mode = modes.pop()
        mode.__exit__(None, None, None)
        live = [i for i, entries in self.entries.items() if any(gate() for gate, _ in entries)]
        if live and mode.count <= max(live):
            # another experts implementation ran (transformers' batched_mm or eager loop): the adapters did not
            raise RewriteError(f"the experts module ran {mode.count} grouped matmul(s), and its adapters act after "
                               f"grouped matmul {max(live)}: it computed its experts another way (e.g. "
                               f"config._experts_implementation changed since the adapters were applied), without them")


def _op_ref(func):
    """A picklable reference to a torch function: torch.ops overloads and packets by their qualified name."""
    if isinstance(func, torch._ops.OpOverload):
        return ("torch.ops", func._overloadpacket._qualified_op_name, func._overloadname)
    if isinstance(func, torch._ops.OpOverloadPacket):
        return ("torch.ops", func._qualified_op_name, None)
    return func


def _op_from(ref):
    if not (isinstance(ref, tuple) and ref and ref[0] == "torch.ops"):
        return ref
    namespace, _, name = ref[1].partition("::")
    packet = getattr(getattr(torch.ops, namespace), name)
    return packet if ref[2] is None else getattr(packet, ref[2])


def attach_grouped(owner: nn.Module, index: int, functions: tuple, gate, adapter: nn.Module) -> Callable[[], None]:
    """Add `adapter.grouped(x, y, offs)` after the `index`-th grouped matmul (a call of one of `functions`, as
    `grouped_functions` gives them) of each call of `owner`; return the undo (a partial of a module-level
    function: the model deep-copies and pickles)."""
    if not callable(getattr(adapter, "grouped", None)):
        raise RewriteError(f"{type(adapter).__name__} has no form inside a grouped matmul; adapt the experts on the "
                           f"weight (realize: weight)")
    table = owner.__dict__.get("_surgery_grouped")
    if table is None:
        table = owner.__dict__["_surgery_grouped"] = GroupedSites(owner, gate.runtime,
                                                                  tuple(_op_from(f) for f in functions))
    entry = (gate, adapter)
    table.entries.setdefault(index, []).append(entry)
    return functools.partial(_detach_grouped, owner, table, index, entry)


def _detach_grouped(owner: nn.Module, table: GroupedSites, index: int, entry: tuple) -> None:
    entries = table.entries.get(index, [])
    if entry in entries:
        entries.remove(entry)
    if not any(table.entries.values()) and owner.__dict__.get("_surgery_grouped") is table:
        for handle in table.handles:
            handle.remove()
        del owner.__dict__["_surgery_grouped"]
