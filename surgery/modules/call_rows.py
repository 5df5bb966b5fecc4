"""Which rows of a call's batch the adapters running now see: MixedBatch, BatchSplit and Parallel (surgery/rewrite/
compose.py) hand each adapter its rows, and a module that reads a call-level value with the whole batch's rows
(ReFT reading the root call's attention mask) takes its own. Scoped per thread and per task (a context variable
set around each child's run and reset after it), and per model: a value whose batch is not the one the
composition split is not narrowed."""
from __future__ import annotations

import contextvars

import torch

_ROWS: contextvars.ContextVar = contextvars.ContextVar("surgery_rows", default=None)


class running_rows:
    """While a child runs on `rows` of a value of `batch` rows (nested blocks select within their parent's)."""

    def __init__(self, rows, batch: int):
        self.rows, self.batch = rows, batch

    def __enter__(self):
        self.outer = _ROWS.get()
        self.token = _ROWS.set(self)

    def __exit__(self, *exc):
        _ROWS.reset(self.token)

    def index(self, device) -> torch.Tensor:
        """The rows as indices into the outermost batch."""
        own = torch.arange(self.batch, device=device)[self.rows]
        return own if self.outer is None else self.outer.index(device)[own]

    def outermost_batch(self) -> int:
        return self.batch if self.outer is None else self.outer.outermost_batch()


def rows_of_call(batch: int, device) -> torch.Tensor | None:
    """The rows of a call-level value with `batch` rows (the root call's attention mask) that the adapter
    running now sees, when a composition handed it part of the batch; None outside such a part, or when the
    batch is not the one the composition split."""
    current = _ROWS.get()
    if current is None or current.outermost_batch() != batch:
        return None
    return current.index(device)
