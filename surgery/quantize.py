"""4-bit NormalFloat (NF4) base weights for QLoRA (Dettmers et al. 2023), through torchao's NF4 tensor.

`quantize_nf4(model)` replaces the weights of the selected linear layers (default: every linear of the blocks)
by frozen NF4 tensors: block-wise absmax over `block_size` weights, the absmax scales themselves quantized to
int8 per `scaler_block_size` scales (double quantization; torchao always does it). nn.Linear's forward is
unchanged, because torchao dispatches F.linear on an NF4 weight (dequantize, then matmul, autograd to the input),
so adapters realized on activations (LoRA's hooks) wrap an NF4 linear as they wrap any linear.

Order: the graph analysis must see the dense model (an NF4 linear traces as dequantize ops, not as a linear).
`quantize_nf4` analyzes the model before quantizing and the analysis stays cached on the model, so a later
`surgery.apply` (without new example_inputs) matches the same linears; applying the adapters first and
quantizing afterwards works too.

Merging into NF4 is lossy: the merged weight would be rounded to 4 bits again, losing most of a small update, so
`surgery.merge` refuses it with an error naming `surgery.dequantize_nf4`. Merge into a dequantized copy instead:
`dequantize_nf4(model)` (or `dequantize_nf4(model, torch.bfloat16)`, which casts the whole model), then
`surgery.merge(model)`.

MoE experts stored as one 3-D parameter read by a grouped matmul (transformers 5's Mixtral, Qwen2-MoE) are not
quantized: an NF4 tensor is a 2-D linear weight, which the grouped matmul cannot read. The default selection leaves
them dense with a `SurgeryWarning`; a `match` that selects them is an error.
"""
from __future__ import annotations

import importlib
import math
import sys
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from surgery.api import plan
from surgery.errors import SurgeryError, SurgeryWarning
from surgery.progress import quiet_libraries

NF4_MODULE = "torchao.quantization.quantize_.workflows.nf4.nf4_tensor"
BLOCK_LINEARS = ["attention.q", "attention.k", "attention.v", "attention.output",
                 "ffn.in", "ffn.gate", "ffn.out"]


def _torchao_nf4():
    try:
        with quiet_libraries():   # torchao logs the CUDA kernels it cannot load, torch's pytree its registrations
            return importlib.import_module(NF4_MODULE)   # the module directly: walking torchao fails on MPS-only parts
    except ImportError as exc:
        raise SurgeryError(f"NF4 needs torchao (pip install torchao): {exc}") from exc


def is_nf4(tensor: Any) -> bool:
    module = sys.modules.get(NF4_MODULE)
    return module is not None and isinstance(tensor, module.NF4Tensor)


def quantize_nf4(model: nn.Module, match: dict | None = None, *, example_inputs=None, block_size: int = 64,
                 scaler_block_size: int = 256) -> nn.Module:
    """Store the weights of the linears that `match` selects (a spec `match` pattern; default: every linear of
    the blocks) as frozen NF4 tensors, in place. On any error the model is left as it was."""
    nf4 = _torchao_nf4()
    spec = {"name": "nf4", "rules": [{"name": "nf4", "match": match or {"role": BLOCK_LINEARS}, "action": "train"}]}
    owners: dict[int, tuple[str, nn.Linear]] = {}
    experts: list[str] = []
    for m in plan(model, spec, example_inputs=example_inputs):
        info = m.site.linear
        if info is None:
            raise SurgeryError(f"quantize_nf4: {m.module} ({m.node}) is not a weight-bearing op")
        if info.experts:
            if match:
                raise SurgeryError(f"quantize_nf4: {info.weight} holds {info.experts} MoE experts as one 3-D "
                                   f"parameter read by a grouped matmul; torchao's NF4 tensor is a 2-D nn.Linear "
                                   f"weight that the grouped matmul cannot read, so experts stay dense (leave them "
                                   f"out of `match`)")
            experts.append(info.weight)
            continue
        owner = model.get_submodule(info.owner)
        if not isinstance(owner, nn.Linear) or info.weight != f"{info.owner}.weight" or info.rows is not None:
            raise SurgeryError(f"quantize_nf4: {info.owner} is a {type(owner).__name__}, not an nn.Linear that "
                               f"calls F.linear on its whole weight; NF4 weights need that")
        owners[id(owner)] = (info.owner, owner)
    users: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        users.setdefault(id(p), []).append(name)
    for path, owner in owners.values():
        if parametrize.is_parametrized(owner, "weight"):
            raise SurgeryError(f"quantize_nf4: {path}.weight is adapted on the weight (a parametrization); only "
                               f"adapters on activations can wrap an NF4 linear")
        if len(users.get(id(owner.weight), [])) > 1:
            raise SurgeryError(f"quantize_nf4: {path}.weight is shared by {', '.join(users[id(owner.weight)])}; "
                               f"quantizing it would change the other users too")
        if is_nf4(owner.weight):
            raise SurgeryError(f"quantize_nf4: {path}.weight is already NF4")
        if owner.weight.numel() % block_size:
            raise SurgeryError(f"quantize_nf4: {path}.weight has {owner.weight.numel()} entries, not a multiple of "
                               f"block_size {block_size}")
    loftq = _loftq_adapters(model)
    for path, owner in owners.values():
        adapter = loftq.get(id(owner))
        if adapter is not None and (adapter.loftq_quantizer != "torchao" or (block_size, scaler_block_size) != (64, 256)):
            raise SurgeryError(f"quantize_nf4: the LoftQ adapter at {path} corrected the error of "
                               f"{adapter.loftq_quantizer} NF4 with block 64 (and torchao's scaler blocks of 256), "
                               f"not of this quantizer; quantize with the one it was initialized for")
    done: list[tuple[nn.Linear, nn.Parameter]] = []
    try:
        for path, owner in owners.values():
            weight = owner.weight
            scalers = weight.numel() // block_size
            # a LoftQ adapter's last step quantized W - L·R (W for one step): the stored base is that step's Q
            source = loftq[id(owner)].loftq_source() if id(owner) in loftq else weight.detach()
            # torchao needs whole scaler blocks: the largest divisor of the scale count up to scaler_block_size
            quantized = nf4.to_nf4(source.contiguous(), block_size, math.gcd(scalers, scaler_block_size))
            owner.weight = nn.Parameter(quantized, requires_grad=False)
            done.append((owner, weight))
    except Exception as exc:
        for owner, weight in done:
            owner.weight = weight
        raise SurgeryError(f"quantize_nf4 failed, the model is unchanged: {type(exc).__name__}: {exc}") from exc
    if experts:
        warnings.warn(f"quantize_nf4: {len(experts)} MoE expert parameter(s) ({', '.join(experts[:2])}"
                      f"{', ...' if len(experts) > 2 else ''}) are 3-D tensors read by a grouped matmul, which NF4 "
                      f"cannot back: they stay dense (adapters on them still apply)", SurgeryWarning, stacklevel=2)
    return model


def _loftq_adapters(model: nn.Module) -> dict[int, nn.Module]:
    """id(owner module) -> the LoftQ-initialized LoRA adapting its weight (surgery.modules.lora)."""
    from surgery.rewrite.host import store_of
    store = store_of(model)
    out = {}
    for record in (store.records.values() if store is not None else ()):
        for site in record.weight_sites:
            if getattr(site.adapter, "init", None) == "loftq":
                out[id(site.owner)] = site.adapter
    return out


def dequantize_nf4(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every NF4 weight by a dense frozen copy of what it computes with (in `dtype`, default the dtype
    it was quantized from), in place; then `surgery.merge` folds adapters into exactly those values.

    With a `dtype`, the rest of the model follows: every other floating-point parameter and buffer (the
    adapters' too) is cast to it, as `model.to(dtype)` does, so the forward runs in one dtype."""
    if dtype is not None and not dtype.is_floating_point:
        raise SurgeryError(f"dequantize_nf4: dtype must be a floating-point dtype, not {dtype}")
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if is_nf4(p):
                dense = p.get_original_weight()
                setattr(module, name, nn.Parameter(dense.to(dtype or dense.dtype), requires_grad=False))
    if dtype is not None:
        model.to(dtype=dtype)
    return model


def nf4_memory(model: nn.Module) -> dict[str, int]:
    """Bytes of the NF4 weights (codes, quantized scales and their constants) and of the same weights dense in
    the dtype they were quantized from."""
    quantized = dense = count = 0
    seen = set()
    for p in model.parameters():
        if is_nf4(p) and id(p) not in seen:
            seen.add(id(p))
            names, _ = p.__tensor_flatten__()
            quantized += sum(getattr(p, n).numel() * getattr(p, n).element_size() for n in names)
            dense += p.numel() * p.dtype.itemsize
            count += 1
    return {"nf4_bytes": quantized, "dense_bytes": dense, "tensors": count}
