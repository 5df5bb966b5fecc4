"""Mixed-adapter batches (`compose.MixedBatch`, PEFT's `adapter_names=[...]`) where a rewrite does not act at one
hooked value: attention adapters (prefix tuning, LLaMA-Adapter) and prompts.

Attention adapters: the rows are grouped by adapter once per call (`MixedBatch.groups`, cached on the block),
and each group runs the model's own attention on its rows with its adapter's prefix (rows naming no attention
adapter here, "__base__" among them, run the plain attention). Attention is computed per row anyway, so the
grouping costs no extra arithmetic, and each row gets exactly the keys, values, mask and scores it gets alone
(masking absent prefix columns instead would also be exact in exact arithmetic, but changes the summation
order of the softmax; grouping keeps every row bit for bit what the row alone computes).

Prompts (`prepend`): rows whose prompts differ in length (a row with no prompt has length 0) are aligned on the
right: each row gets max_len - len(row) padding positions before its prompt, hidden by the attention mask, and
explicit position ids that give its prompt and tokens the positions they have alone. A model whose forward takes
no attention mask (or, with padding, no position ids) cannot hide or re-number them, and a mix of lengths is
refused there; rows with prompts of one length need neither.
"""
from __future__ import annotations

from typing import Callable

import torch

from surgery.errors import RewriteError
from surgery.rewrite.compose import BatchSplit, MixedBatch


def row_block(composition) -> MixedBatch | None:
    """The composition as one adapter per row, where it hands adapters batch rows: a MixedBatch itself, or a
    BatchSplit of adapter names as the MixedBatch naming each row's adapter (`BatchSplit("a", "b",
    batch_sizes=[1, 2])` = `MixedBatch("a", "b", "b")`, cached on the block); else None. A BatchSplit of nested
    blocks is refused (RewriteError): attention and prompt adapters route rows to adapter names only."""
    if isinstance(composition, MixedBatch):
        return composition
    if not isinstance(composition, BatchSplit):
        return None
    if not all(isinstance(c, str) for c in composition.children):
        raise RewriteError(f"BatchSplit over attention or prompt adapters (prefix tuning, LLaMA-Adapter, prompt "
                           f"tuning) routes rows to adapter names only, not to nested blocks: "
                           f"{composition.children!r}")
    rows = composition.__dict__.get("_rows")
    if rows is None:
        names = [n for n, size in zip(composition.children, composition.batch_sizes) for _ in range(size)]
        rows = MixedBatch(*names) if names else None
        object.__setattr__(composition, "_rows", rows)
    return rows


def block_of(entries) -> MixedBatch | None:
    """The active composition as one adapter per row (`row_block`) when the live entries' gates say one is
    active, else None."""
    for _, gate in entries:
        runtime = getattr(gate, "runtime", None)
        if runtime is not None and not runtime.disabled:
            return row_block(runtime.composition)
        return None
    return None


def check_rows(block: MixedBatch, batch: int) -> None:
    if batch != len(block.children):
        raise RewriteError(f"MixedBatch names {len(block.children)} rows but the batch has {batch} (beam search and "
                           f"num_return_sequences expand the batch: name the expanded rows; a BatchSplit's "
                           f"batch_sizes count the expanded rows likewise)")


def take(value, rows, batch: int):
    """`value`'s rows when it is a score- or mask-shaped tensor with a batch dimension ([batch, heads, q, k]),
    else `value` (a mask broadcast over the batch, a scale, a sliding window...)."""
    if isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[0] == batch and batch > 1:
        return value[rows]
    return value


def rest_rows(block: MixedBatch, names: set[str], device) -> torch.Tensor | slice | None:
    """The rows naming none of `names` ("__base__" and adapters with nothing here), or None when there are none."""
    rows = [i for i, n in enumerate(block.children) if n not in names]
    if not rows:
        return None
    if rows == list(range(rows[0], rows[-1] + 1)):
        return slice(rows[0], rows[-1] + 1)
    return torch.tensor(rows, dtype=torch.long, device=device)


def place(parts: list, batch: int) -> torch.Tensor:
    """One tensor of `batch` rows from (rows, part) pairs covering every row once."""
    if len(parts) == 1:
        return parts[0][1]
    first = parts[0][1]
    out = first.new_empty((batch,) + tuple(first.shape[1:]))
    for rows, part in parts:
        out[rows] = part
    return out


def attention(entries: list, make_attend: Callable, query, key, value, chain: Callable):
    """The attention output for live `entries` [(adapter, gate), ...] at one op. `make_attend(rows)` gives the
    model's attention restricted to `rows` (None: every row); `chain(adapters, attend)` composes adapters."""
    block = block_of(entries)
    if block is None:
        return chain([a for a, _ in entries], make_attend(None))(query, key, value)
    batch = query.shape[0]
    check_rows(block, batch)
    by_name: dict[str, list] = {}
    for adapter, gate in entries:
        by_name.setdefault(gate.name, []).append(adapter)
    call = entries[0][1].runtime.call
    previous = call.get(ONLY)
    parts = []
    try:
        for name, rows in block.groups(query.device):
            if name in by_name:
                # modules the adapter calls itself (LLaMA-Adapter projects its prompt with the layer's k/v
                # projections) run as in that adapter's alone-run: only its own rewrites, on no particular rows
                call[ONLY] = name
                attend = chain(by_name[name], make_attend(rows))
                parts.append((rows, attend(query[rows], key[rows], value[rows])))
    finally:
        call[ONLY] = previous
    rest = rest_rows(block, set(by_name), query.device)
    if rest is not None:
        parts.append((rest, make_attend(rest)(query[rest], key[rest], value[rest])))
    return place(parts, batch)


ONLY = "mixed_only"   # runtime.call key: the one adapter whose rewrites run (inside an adapter's own module calls)


def composition(runtime):
    """What a hooked site combines now: the runtime's composition, or, inside an attention adapter's own calls
    of host modules under a MixedBatch, that adapter alone."""
    block = runtime.composition
    if isinstance(block, (MixedBatch, BatchSplit)) and runtime.call.get(ONLY) is not None:
        return runtime.call[ONLY]
    return block


# ---------------------------------------------------------------- prompts

PROMPTS_ATTR = "_surgery_prompts"     # on the module whose pre-hook adds the prompts: [(gate, PromptTuning), ...]


def prompt_lengths(host, block: MixedBatch) -> tuple[dict, list[int]]:
    """(adapter name -> its prompt module at `host`, each row's prompt length)."""
    modules = {}
    for gate, module in host.__dict__.get(PROMPTS_ATTR, ()):
        modules.setdefault(gate.name, module)
    return modules, [modules[n].length if n in modules else 0 for n in block.children]


def refuse_padding(host, lengths: list[int], why: str) -> None:
    raise RewriteError(f"MixedBatch: the rows' prompts differ in length ({sorted(set(lengths))}; 0 = no prompt), so "
                       f"shorter ones need padding positions, but {type(host).__name__}'s forward {why}; rows of "
                       f"one prompt length can share a batch, run the others separately")


def prompted_embeds(modules: dict, block: MixedBatch, lengths: list[int], embeds: torch.Tensor) -> torch.Tensor:
    """[batch, max_len + seq, dim]: each row's prompt (its adapter's module applied to its rows) right-aligned
    before its embeddings, zeros in the padding positions."""
    width = max(lengths)
    batch, seq = embeds.shape[:2]
    check_rows(block, batch)
    parts = []
    for name, rows in block.groups(embeds.device):
        if name in modules:
            parts.append((rows, modules[name](embeds[rows]), modules[name].length))
    rest = rest_rows(block, set(modules), embeds.device)
    if rest is not None:
        parts.append((rest, embeds[rest], 0))
    if all(n == width for _, _, n in parts):
        return place([(r, p) for r, p, _ in parts], batch)
    out = embeds.new_zeros(batch, width + seq, *embeds.shape[2:])
    for rows, part, n in parts:
        if isinstance(rows, slice):
            out[rows, width - n:] = part
        else:
            out[rows.view(-1, 1), torch.arange(width - n, width + seq, device=embeds.device)] = part
    return out


def prefix_mask(lengths: list[int], like: torch.Tensor) -> torch.Tensor:
    """[batch, max_len]: 1 where a row has a prompt position, 0 in its padding."""
    width = max(lengths)
    n = torch.tensor(lengths, device=like.device)[:, None]
    return (torch.arange(width, device=like.device)[None, :] >= width - n).to(like.dtype)


def prefix_positions(lengths: list[int], device) -> torch.Tensor:
    """[batch, max_len]: the prompt positions 0..len-1 right-aligned, 0 in the padding."""
    width = max(lengths)
    n = torch.tensor(lengths, device=device)[:, None]
    return (torch.arange(width, device=device)[None, :] - (width - n)).clamp(min=0)
