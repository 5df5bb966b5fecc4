"""The output columns of a packed projection that one q/k/v site covers.

A packed projection (GPT-2's `c_attn`, BLOOM's and GPT-NeoX's `query_key_value`, Falcon's grouped
`query_key_value`) computes q, k and v in one output; each attention operand reads some of its columns
(equivalently, rows of the weight in (out, in) layout). They are one contiguous range, `(start, stop)`, when the
projection stacks q, k and v (GPT-2: [q | k | v]), or a `Columns` index set when it interleaves them head by head
(BLOOM: [q_0, k_0, v_0, q_1, k_1, v_1, ...], each head_dim wide; Falcon's new decoder architecture: per KV group
[q_g0 .. q_g(n-1), k_g, v_g]). A site's `rows` is either form, or None for the whole output.

The helpers below take any of the three forms and act on one dimension of a tensor: `take` the covered part,
`put` a new part in its place (out of place, differentiable: the weight path), `put_` the same in place (merge),
and `width`. The part's order is the columns' ascending order, the same in every helper, so an adapter built on
`take(W, rows)` maps its i-th output to column `index[i]`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

class Columns:
    """A sorted set of output columns (weight rows, in (out, in) layout) that is not one contiguous range.

    `index`: the column numbers, ascending, without repeats. Hashable and comparable by value; the index tensor
    is built once per device."""

    def __init__(self, index):
        index = tuple(sorted({int(i) for i in index}))
        if not index or index[0] < 0:
            raise ValueError(f"Columns needs non-negative column numbers, got {index[:8]}")
        self.index = index
        self._tensors: dict = {}

    def tensor(self, device=None) -> torch.Tensor:
        device = torch.device(device) if device is not None else torch.device("cpu")
        key = str(device)
        if key not in self._tensors:
            self._tensors[key] = torch.tensor(self.index, dtype=torch.long, device=device)
        return self._tensors[key]

    def __len__(self) -> int:
        return len(self.index)

    def __eq__(self, other) -> bool:
        return isinstance(other, Columns) and other.index == self.index

    def __hash__(self) -> int:
        return hash(("Columns", self.index))

    def __getstate__(self):
        return {"index": self.index}

    def __setstate__(self, state):
        self.index, self._tensors = state["index"], {}

    def __deepcopy__(self, memo):
        return self     # immutable

    def runs(self) -> list[tuple[int, int]]:
        """The index as maximal contiguous (start, stop) runs (e.g. one per head)."""
        out, start = [], self.index[0]
        for prev, cur in zip(self.index, self.index[1:]):
            if cur != prev + 1:
                out.append((start, prev + 1))
                start = cur
        out.append((start, self.index[-1] + 1))
        return out

    def __repr__(self) -> str:
        runs = self.runs()
        shown = ", ".join(f"{a}:{b}" for a, b in runs[:4]) + (", ..." if len(runs) > 4 else "")
        return f"Columns({len(self.index)} in {len(runs)} runs: {shown})"


def columns(index) -> "tuple[int, int] | Columns":
    """An index list as the simplest form: (start, stop) when it is one contiguous range, else Columns."""
    index = sorted({int(i) for i in index})
    if index and index[-1] - index[0] + 1 == len(index):
        return (index[0], index[-1] + 1)
    return Columns(index)


def width(rows, full: int | None = None) -> int | None:
    """How many columns `rows` covers (`full` when rows is None)."""
    if rows is None:
        return full
    if isinstance(rows, Columns):
        return len(rows)
    return rows[1] - rows[0]


def indices(rows, full: int) -> list[int]:
    """The covered column numbers, ascending."""
    if rows is None:
        return list(range(full))
    if isinstance(rows, Columns):
        return list(rows.index)
    return list(range(rows[0], rows[1]))


def take(tensor: torch.Tensor, rows, dim: int = 0) -> torch.Tensor:
    """The covered part of `tensor` along `dim`: a view for a range, a copy (index_select) for Columns."""
    if rows is None:
        return tensor
    if isinstance(rows, Columns):
        return tensor.index_select(dim, rows.tensor(tensor.device))
    return tensor.narrow(dim, rows[0], rows[1] - rows[0])


def put(tensor: torch.Tensor, rows, part: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """`tensor` with its covered part along `dim` replaced by `part` (out of place; gradients reach both)."""
    if rows is None:
        return part
    dim = dim % tensor.dim()
    part = part.to(tensor.dtype)
    if isinstance(rows, Columns):
        return tensor.index_copy(dim, rows.tensor(tensor.device), part)
    a, b = rows
    return torch.cat([tensor.narrow(dim, 0, a), part, tensor.narrow(dim, b, tensor.shape[dim] - b)], dim=dim)


def add(tensor: torch.Tensor, rows, part: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """`tensor` plus `part` added into its covered part along `dim` (out of place)."""
    if rows is None:
        return tensor + part
    dim = dim % tensor.dim()
    if isinstance(rows, Columns):
        return tensor.index_add(dim, rows.tensor(tensor.device), part.to(tensor.dtype))
    a, b = rows
    pad = [0, 0] * (tensor.dim() - 1 - dim) + [a, tensor.shape[dim] - b]
    return tensor + F.pad(part, pad)


def put_(tensor: torch.Tensor, rows, part: torch.Tensor, dim: int = 0) -> None:
    """Write `part` into the covered part of `tensor` along `dim`, in place (merge and unmerge)."""
    if rows is None:
        tensor.copy_(part)
    elif isinstance(rows, Columns):
        tensor.index_copy_(dim, rows.tensor(tensor.device), part.to(tensor.dtype))
    else:
        tensor.narrow(dim, rows[0], rows[1] - rows[0]).copy_(part)


class LiveRows:
    """The covered rows of a live parameter, read when called: what an adapter that needs the base weight on the
    activation path (DoRA, OFT on a packed site) holds for an index set, which no view of the parameter can be.
    Reads follow the parameter (merges into it, `load_state_dict`, `.to()`); nothing is copied while idle."""

    def __init__(self, param: torch.Tensor, rows, transposed: bool = False):
        self._param = [param]     # a list: not registered as a parameter of whatever module holds this
        self.rows, self.transposed = rows, transposed

    def __call__(self) -> torch.Tensor:
        param = self._param[0]
        return take(param.t() if self.transposed else param, self.rows)


def live(weight):
    """`weight` as a tensor: a LiveRows read now, anything else as it is."""
    return weight() if isinstance(weight, LiveRows) else weight
