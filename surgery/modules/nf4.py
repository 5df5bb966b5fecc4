"""bitsandbytes' 4-bit NormalFloat round trip (Dettmers et al. 2023, QLoRA), the quantizer of PEFT's LoftQ.

PEFT's `loftq_utils.loftq_init` quantizes with `bnb.nn.Params4bit(w, compress_statistics=False, quant_type="nf4")`:
the weight flattened in row-major order, cut into blocks of 64, each block divided by its absolute maximum (kept
in float32: no double quantization) and rounded to the nearest of the 16 NF4 values (ties: bucketize on the
midpoints, as bitsandbytes' CPU kernel). `nf4_round_trip` returns the dequantized weight (code value × absmax),
computed here in plain torch so that neither bitsandbytes nor a GPU is needed.
"""
from __future__ import annotations

import torch

# bitsandbytes' NF4 code (backends/utils.py _NF4_QUANT_TABLE; the QLoRA paper's Appendix E values)
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)


def nf4_round_trip(weight: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    """NF4-quantize and dequantize `weight` (any shape) as bitsandbytes does: float32, same shape. A last partial
    block (numel not a multiple of `block_size`) is its own block, as in bitsandbytes."""
    flat = weight.detach().reshape(-1).to(torch.float32)
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=flat.device)
    bounds = (code[:-1] + code[1:]) / 2
    full = flat.numel() - flat.numel() % block_size
    pieces = [flat[:full].view(-1, block_size)] + ([flat[full:].view(1, -1)] if full < flat.numel() else [])
    out = []
    for blocks in pieces:
        absmax = blocks.abs().amax(dim=-1, keepdim=True)
        scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)), -1, 1)
        out.append((code[torch.bucketize(scaled, bounds)] * absmax).reshape(-1))
    return torch.cat(out).view(weight.shape)
