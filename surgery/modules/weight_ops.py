"""The weight-bearing op kinds a `wrap` module may adapt besides linears: convolutions and embedding lookups.

The analysis (surgery/analyze/roles.py) describes each wrapped op by a kind and its arguments, passed to modules
as `SiteContext.op_kind` / `op_args`:

- "linear": y = x Wᵀ + b, W (out, in); features on the last axis.
- "conv": y = convNd(x, W, b, stride, padding, dilation, groups), W (out, in/groups, *kernel); channels on axis
  -(dims+1) of x and y (batched (N, C, ...) or unbatched (C, ...) inputs alike).
- "embedding": y = W[ids], W (num_embeddings, dim) held by the host; modules see it in (out, in) = (dim,
  num_embeddings) layout, like a linear on one-hot ids.

These helpers compute the base op and broadcast per-channel vectors for each kind, so a module's math is written
once (LoRA, DoRA and IA3 use them; their definitions follow PEFT's `lora.Conv*d`, `lora.Embedding`, `ia3.Conv*d`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def channels(vector: torch.Tensor, kind: str, op_args: dict) -> torch.Tensor:
    """`vector` (C,) shaped to broadcast over the channel axis of the op's input or output."""
    if kind == "conv":
        return vector.view(-1, *([1] * op_args["dims"]))
    return vector


def base_op(x: torch.Tensor, weight: torch.Tensor, kind: str, op_args: dict) -> torch.Tensor:
    """The op without bias, `weight` in (out, in) layout (for conv the module's own (out, in/groups, *kernel))."""
    if kind == "conv":
        return CONV_FN[op_args["dims"]](x, weight, None, op_args["stride"], op_args["padding"], op_args["dilation"],
                                        op_args["groups"])
    if kind == "embedding":
        return F.embedding(x, weight.t(), op_args.get("padding_idx"))
    return F.linear(x, weight)


def conv_same_geometry(x: torch.Tensor, weight: torch.Tensor, op_args: dict) -> torch.Tensor:
    """A convolution with the base op's kernel geometry (stride, padding, dilation) but no groups: LoRA's A."""
    return CONV_FN[op_args["dims"]](x, weight, None, op_args["stride"], op_args["padding"], op_args["dilation"], 1)


def pointwise(x: torch.Tensor, weight: torch.Tensor, op_args: dict) -> torch.Tensor:
    """A 1×…×1 convolution with the base op's groups: LoRA's B."""
    return CONV_FN[op_args["dims"]](x, weight, None, 1, 0, 1, op_args["groups"])


def grouped_to_dense(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped kernel (out, in/g, ...) as the dense (out, in, ...) kernel with zeros across groups."""
    if groups == 1:
        return weight
    out, per_in = weight.shape[:2]
    dense = weight.new_zeros(out, per_in * groups, *weight.shape[2:])
    per_out = out // groups
    for g in range(groups):
        dense[g * per_out:(g + 1) * per_out, g * per_in:(g + 1) * per_in] = weight[g * per_out:(g + 1) * per_out]
    return dense
