"""Composition blocks (as AdapterHub defines them): how several named adapters combine at one site.

`surgery.set_active(model, Average("a", "b", weights=[0.7, 0.3]))`. A block's children are adapter names or
blocks. At every hooked site the active adapters' functions are combined by the block; with no block, the
active adapters run one after another in the order they were applied (a Stack).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from surgery.errors import RewriteError
from surgery.modules.call_rows import running_rows

Child = Union[str, "Block"]


@dataclass(frozen=True)
class Block:
    children: tuple

    def __init__(self, *children: Child, **options):
        object.__setattr__(self, "children", tuple(children))
        for key, value in options.items():
            object.__setattr__(self, key, value)

    def names(self) -> list[str]:
        out = []
        for child in self.children:
            out += [child] if isinstance(child, str) else child.names()
        return out


class Stack(Block):
    """Adapters in sequence at each site."""


class Average(Block):
    """The weighted mean of the adapters' *contributions*, as AdapterHub's Average: at every site with input
    value v, where child i alone would give f_i(v), the result is v + sum_i w_i (f_i(v) - v). The base output v
    is never scaled: for a wrapped op (LoRA) that is W x + sum_i w_i Δ_i x, for an inserted adapter
    v + sum_i w_i a_i(v). `weights` default to equal; with `normalize_weights` (the default) they are divided
    by their sum, so they sum to 1 and the result is also sum_i w_i f_i(v). A child with nothing at a site
    contributes nothing there."""

    def __init__(self, *children: Child, weights: list[float] | None = None, normalize_weights: bool = True):
        if not children:
            raise ValueError("Average needs at least one adapter")
        if weights is None:
            weights = [1.0 / len(children)] * len(children)
        weights = [float(w) for w in weights]
        if len(weights) != len(children):
            raise ValueError(f"Average of {len(children)} adapters got {len(weights)} weights")
        if normalize_weights:
            total = sum(weights)
            if total == 0:
                raise ValueError(f"Average weights {weights} sum to 0 and cannot be normalized; "
                                 f"pass normalize_weights=False")
            weights = [w / total for w in weights]
        super().__init__(*children, weights=tuple(weights), normalize_weights=bool(normalize_weights))


class BatchSplit(Block):
    """Batch rows split between the adapters: `batch_sizes` rows to each, in order."""

    def __init__(self, *children: Child, batch_sizes: list[int]):
        super().__init__(*children, batch_sizes=tuple(batch_sizes))


class Split(Block):
    """The sequence split between the adapters: the first `splits[0]` positions to the first, and so on."""

    def __init__(self, *children: Child, splits: list[int]):
        super().__init__(*children, splits=tuple(splits))


class Parallel(Block):
    """The batch replicated once per adapter at the model's input; copy i runs through adapter i.
    Outputs have (number of adapters) x batch rows, in the children's order."""


class Fuse(Block):
    """AdapterFusion: attention over the adapters' outputs, through the fusion modules of adapter `name`."""

    def __init__(self, *children: Child, name: str | None = None):
        super().__init__(*children, name=name)


class MixedBatch(Block):
    """One adapter per batch row, as PEFT's `adapter_names=[...]` forward argument: `MixedBatch("a", "b",
    "__base__", "a")` runs row 0 and 3 through adapter a, row 1 through b, row 2 through none. At every hooked
    site the rows of each adapter are gathered, run through it, and put back in place; values captured earlier in
    the call (parallel and sub-layer adapters) are taken at the same rows; an attention op runs each adapter's
    rows with its prefix (rewrite/mixed.py); prompts of different lengths are right-aligned and their padding
    masked. Rewrites that act per row qualify (wrap on activations, insert_after, insert_before, parallel,
    sublayer, attend, prepend); `set_active` refuses the others (train, replace, fusion). The batch must have
    exactly one row per name (no beam search expansion)."""

    BASE = "__base__"
    WHOLE = "__batch__"     # the gate name of functions that run once on the whole batch, before the rows split
    PER_ROW_ACTIONS = ("wrap", "insert_after", "insert_before", "parallel", "sublayer", "attend", "prepend")

    def __init__(self, *adapter_names: str):
        if not adapter_names or not all(isinstance(n, str) for n in adapter_names):
            raise ValueError(f"MixedBatch takes one adapter name (or {self.BASE!r}) per row, got {adapter_names!r}")
        super().__init__(*adapter_names)

    def names(self) -> list[str]:
        return [n for n in dict.fromkeys(self.children) if n != self.BASE]

    def rows_of(self, name: str, device) -> torch.Tensor | slice:
        """Adapter `name`'s rows (a slice when contiguous)."""
        for n, rows in self.groups(device):
            if n == name:
                return rows
        raise KeyError(f"MixedBatch names no row of adapter {name!r}")

    def groups(self, device) -> list[tuple[str, torch.Tensor | slice]]:
        """(adapter, rows) for every adapter, rows as a slice when they are contiguous; cached per device."""
        cache = self.__dict__.setdefault("_groups", {})
        key = device
        if key not in cache:
            out = []
            for name in self.names():
                rows = [i for i, n in enumerate(self.children) if n == name]
                contiguous = rows == list(range(rows[0], rows[-1] + 1))
                out.append((name, slice(rows[0], rows[-1] + 1) if contiguous else
                            torch.tensor(rows, dtype=torch.long, device=device)))
            if all(isinstance(rows, slice) for _, rows in out):     # in row order, for one concatenation
                out.sort(key=lambda item: item[1].start)
            cache[key] = out
        return cache[key]


BLOCKS = {"stack": Stack, "average": Average, "batch_split": BatchSplit, "split": Split, "parallel": Parallel,
          "fuse": Fuse, "mixed_batch": MixedBatch}


def block_from(data) -> Child:
    """From spec data: a name, or {stack: [...]} / {average: [...], weights: [...]} / ... """
    if isinstance(data, (str, Block)):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"a composition is an adapter name or a mapping like {{average: [a, b]}}, not {data!r}")
    kinds = [k for k in data if k in BLOCKS]
    if len(kinds) != 1:
        raise ValueError(f"a composition names exactly one of {', '.join(BLOCKS)}; got {sorted(data)}")
    kind = kinds[0]
    options = {k: v for k, v in data.items() if k != kind}
    if not isinstance(data[kind], list):
        raise ValueError(f"{kind}: a list of adapter names or blocks, not {data[kind]!r}")
    children = [block_from(c) for c in data[kind]]
    try:
        return BLOCKS[kind](*children, **options)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{kind}: {exc}") from None


def run(block: Child | None, by_name: dict[str, list], order: list[str], value: torch.Tensor, args,
        fusions: dict) -> torch.Tensor:
    """Combine the entries at one site. `by_name` maps adapter name -> its functions here (in order)."""
    if block is None:
        for name in order:
            value = run(name, by_name, order, value, args, fusions)
        return value
    if isinstance(block, str):
        for fn in by_name.get(block, ()):
            value = fn(value, args)
        return value
    kids = block.children
    if isinstance(block, Stack):
        for child in kids:
            value = run(child, by_name, order, value, args, fusions)
        return value
    if isinstance(block, Average):
        out = value
        for w, c in zip(block.weights, kids):
            result = run(c, by_name, order, value, args, fusions)
            if result is not value:   # a child with nothing at this site contributes nothing
                out = out + w * (result - value)
        return out
    if isinstance(block, (BatchSplit, Parallel)):
        sizes = list(block.batch_sizes) if isinstance(block, BatchSplit) else [value.shape[0] // len(kids)] * len(kids)
        if sum(sizes) != value.shape[0]:
            raise RewriteError(f"{type(block).__name__} splits {sum(sizes)} rows but the batch has {value.shape[0]}")
        if isinstance(block, BatchSplit):    # functions on the whole batch (prompts dropped) first, as MixedBatch
            for fn in by_name.get(MixedBatch.WHOLE, ()):
                value = fn(value, args)
        parts = torch.split(value, sizes, dim=0)
        outs = []
        for i, (c, p) in enumerate(zip(kids, parts)):
            with running_rows(slice(sum(sizes[:i]), sum(sizes[:i + 1])), value.shape[0]):
                outs.append(run(c, by_name, order, p, _rows(args, sizes, i), fusions))
        return torch.cat(outs, dim=0)
    if isinstance(block, MixedBatch):
        if value.shape[0] != len(block.children):
            raise RewriteError(f"MixedBatch names {len(block.children)} rows but the batch has {value.shape[0]} "
                             f"(beam search and num_return_sequences expand the batch: name the expanded rows; a "
                             f"site whose value flattens batch and positions, as OPT's FFN [batch·seq, hidden], "
                             f"cannot be routed by row)")
        for fn in by_name.get(MixedBatch.WHOLE, ()):
            value = fn(value, args)
        parts = []
        for name, rows in block.groups(value.device):
            with running_rows(rows, value.shape[0]):
                parts.append((rows, run(name, by_name, order, value[rows], _select(args, rows), fusions)))
        if all(isinstance(rows, slice) for rows, _ in parts):     # rows grouped by adapter: one concatenation
            pieces, position = [], 0
            for rows, part in parts:                                  # groups() sorts contiguous groups
                if rows.start > position:
                    pieces.append(value[position:rows.start])
                pieces.append(part)
                position = rows.stop
            if position < value.shape[0]:
                pieces.append(value[position:])
            return torch.cat(pieces, dim=0)
        out = value
        if any(part.shape[1:] != value.shape[1:] for _, part in parts):   # every row grew (prompts of one length)
            out = parts[0][1].new_empty(value.shape[:1] + parts[0][1].shape[1:])
        for rows, part in parts:
            index = torch.arange(rows.start, rows.stop, device=value.device) if isinstance(rows, slice) else rows
            out = out.index_copy(0, index, part)
        return out
    if isinstance(block, Split):
        sizes = list(block.splits) + [value.shape[1] - sum(block.splits)]
        parts = torch.split(value, sizes, dim=1)
        return torch.cat([run(c, by_name, order, p, _positions(args, sizes, i), fusions)
                          for i, (c, p) in enumerate(zip(kids, parts))], dim=1)
    if isinstance(block, Fuse):
        outputs = [run(c, by_name, order, value, args, fusions) for c in kids]
        fusion = fusions.get(block.name)
        if fusion is None:   # no fusion module at this site (an adapter is missing here): average
            return sum(outputs) / len(outputs)
        width = getattr(getattr(fusion, "query", None), "in_features", None)
        if width is not None and width != value.shape[-1]:
            raise RewriteError(f"Fuse {block.name!r}: its fusion modules attend over adapter outputs of the model's "
                               f"width ({width}), but the fused adapters act here on values of width "
                               f"{value.shape[-1]} (adapters on projections, as LoRA's, rather than on the hidden "
                               f"states); fuse bottleneck adapters, or use Average")
        return fusion(value, outputs)
    raise TypeError(f"unknown composition block {block!r}")


def average_weight(block, name: str) -> float | None:
    """Adapter `name`'s weight when the composition is an Average of adapter names (a weight parametrization
    then adds w·(T(W) - W) computed from the base weight), else None."""
    if isinstance(block, Average) and all(isinstance(c, str) for c in block.children) and name in block.children:
        return block.weights[block.children.index(name)]
    return None


def _rows(args, sizes, i):
    if not args:
        return args
    start = sum(sizes[:i])
    return tuple(a[start:start + sizes[i]] if isinstance(a, torch.Tensor) and a.dim() > 1 else a for a in args)


def _positions(args, sizes, i):
    if not args:
        return args
    start = sum(sizes[:i])
    return tuple(a[:, start:start + sizes[i]] if isinstance(a, torch.Tensor) and a.dim() > 2 else a for a in args)


def _select(args, rows):
    if not args:
        return args
    return tuple(a[rows] if isinstance(a, torch.Tensor) and a.dim() > 1 else a for a in args)
