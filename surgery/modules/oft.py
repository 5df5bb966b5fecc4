"""Orthogonal fine-tuning: OFT (Qiu et al. 2023) and BOFT (Liu et al. 2024).

**OFT** ("Controlling Text-to-Image Diffusion by Orthogonal Finetuning", NeurIPS 2023, arXiv:2306.07280):
W' = W·Rᵀ, i.e. the op's input is rotated, x ↦ x·R, by a block-diagonal R whose r blocks of size b (r·b = d_in)
are each the Cayley transform of a skew-symmetric matrix Q, R = (I − Q)(I + Q)⁻¹, orthogonal and the
identity at Q = 0 (the init). As in PEFT (peft/tuners/oft, `OFTConfig`: r=0, oft_block_size=32,
module_dropout=0, block_share=False, use_cayley_neumann=True, num_cayley_neumann_terms=5), the trained tensor
`oft_R` (r, b(b−1)/2) holds the upper triangle of each Q, and by default the transform is PEFT's truncated
Neumann series I + 2Q + 2Q² + … + Qⁿ⁻¹ (k terms; approximately orthogonal) instead of the exact inverse
(`use_cayley_neumann: false`). Give either `r` (blocks) or `block_size`; it must divide d_in (PEFT moves a
non-dividing size to the nearest divisor with a warning; here that is an error naming the divisors).
`block_share` trains one block for all. `module_dropout` (training only) replaces that fraction of the blocks
by the identity (PEFT's multiplicative dropout). Trainable count: r·b(b−1)/2 per site (b(b−1)/2 shared).

**BOFT** ("Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization", ICLR 2024,
arXiv:2311.06243): the rotation is a product of m butterfly factors M = Mₘ₋₁⋯M₀, Mᵢ = Pᵢ·Dᵢ·Pᵢᵀ with Dᵢ
block-diagonal (D blocks of size H, each the exact Cayley transform of ½(Rᵢⱼ − Rᵢⱼᵀ)) and Pᵢ the block-butterfly
permutations of the paper (PEFT's `block_butterfly_perm`), followed by a trained output scale s (d_out):
y = s ⊙ (W·(x·M)) + b, merged W' = (W·Mᵀ) ⊙ s (rows). PEFT (peft/tuners/boft, `BOFTConfig`: boft_block_size=4,
boft_block_num=0, boft_n_butterfly_factor=1, boft_dropout=0; tensors `boft_R` (m, D, H, H), `boft_s` (d_out, 1);
R zero and s one at init, so the op is the base op) uses m = 1 whatever `boft_n_butterfly_factor` says unless
its CUDA extension is built; here m = `n_butterfly_factor` as the paper defines it. Trainable count:
m·D·H² + d_out per site.

Both act on the op's input, so on a packed weight (one slice of GPT-2's c_attn) the activation path computes
W_rows·(x·R − x) from the base weight instead of rotating the shared input. Merge folds R (and s) into W;
unmerge solves with R (exact up to rounding; merge keeps the residual for a bit-exact unmerge).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from surgery.errors import RewriteError
from surgery.modules import columns
from surgery.modules.base import SiteContext, WeightAdapter
from surgery.modules.registry import Options, register
from surgery.modules.options import OFTOptions, BOFTOptions  # noqa: F401  (defined without torch: spec validation)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _block_dropout(blocks: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """PEFT's MultiplicativeDropoutLayer: int(p·D) of the D blocks (chosen at random) become the identity."""
    count = blocks.shape[0]
    if not training or p <= 0 or count == 1:
        return blocks
    replace = int(p * count)
    mask = torch.cat([torch.ones(replace, device=blocks.device), torch.zeros(count - replace, device=blocks.device)])
    mask = mask[torch.randperm(count, device=blocks.device)].view(count, 1, 1).to(blocks.dtype)
    eye = torch.eye(blocks.shape[-1], device=blocks.device, dtype=blocks.dtype).expand_as(blocks)
    return (1 - mask) * blocks + mask * eye


class _Rotation(WeightAdapter):
    """Shared machinery: x ↦ x·M on the input (or W_rows·(x·M − x) for a packed slice), an optional output scale."""

    def _setup_site(self, site: SiteContext | None):
        self.packed = site is not None and site.rows is not None
        self.adapts_input = not self.packed
        self._base = [(site.live_weight or site.weight) if self.packed else None, site.bias if site is not None else None]

    def rotation(self) -> torch.Tensor:    # (d_in, d_in), applied as x @ M
        raise NotImplementedError

    def scale(self) -> torch.Tensor | None:   # (d_out,) or None
        return None

    def adapt_input(self, x):
        return x @ self.rotation().to(x.dtype)

    def forward(self, x, y):
        scale = self.scale()
        if self.packed:
            weight = columns.live(self._base[0]).detach()
            y = y + F.linear(x @ self.rotation().to(x.dtype) - x, weight.to(x.dtype))
        if scale is None:
            return y
        bias = self._base[1]
        if bias is None:
            return y * scale.to(y.dtype)
        bias = bias.detach().to(y.dtype)
        return (y - bias) * scale.to(y.dtype) + bias

    def transform_weight(self, weight):
        out = weight @ self.rotation().to(weight.dtype).t()
        scale = self.scale()
        return out if scale is None else out * scale.to(weight.dtype)[:, None]

    def inverse_weight(self, merged):
        scale = self.scale()
        if scale is not None:
            if not bool((scale != 0).all()):
                return None
            merged = merged / scale.to(merged.dtype)[:, None]
        rotation = self.rotation().to(merged.dtype)
        return torch.linalg.solve(rotation, merged.t()).t()


@register
class OFT(_Rotation):
    Options = OFTOptions

    def __init__(self, in_features: int, r: int = 0, block_size: int = 32, block_share: bool = False,
                 module_dropout: float = 0.0, use_cayley_neumann: bool = True, num_cayley_neumann_terms: int = 5,
                 site: SiteContext | None = None):
        super().__init__()
        if (r == 0) == (block_size == 0):
            raise RewriteError("oft: give exactly one of r (blocks) and block_size (the other 0)")
        size = block_size or r
        if in_features % size:
            raise RewriteError(f"oft: {'block_size' if block_size else 'r'}={size} does not divide the op's input "
                               f"size {in_features}; divisors: {_divisors(in_features)}")
        self.block_size = block_size or in_features // r
        self.r = r or in_features // block_size
        self.in_features, self.block_share = in_features, block_share
        self.module_dropout = module_dropout
        self.use_cayley_neumann, self.num_cayley_neumann_terms = use_cayley_neumann, num_cayley_neumann_terms
        b = self.block_size
        self.oft_R = nn.Parameter(torch.zeros(1 if block_share else self.r, b * (b - 1) // 2))
        # index structure, not values: computed on the CPU (on the meta device triu_indices' kernel costs ~1.5 ms);
        # the module is moved to the model's device after building
        rows, cols = torch.triu_indices(b, b, 1, device="cpu")
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self._setup_site(site)

    def reset_parameters(self):
        nn.init.zeros_(self.oft_R)

    @classmethod
    def build(cls, options: OFTOptions, site: SiteContext, action: str) -> "OFT":
        return cls(site.in_features, r=options.r, block_size=options.block_size, block_share=options.block_share,
                   module_dropout=options.module_dropout, use_cayley_neumann=options.use_cayley_neumann,
                   num_cayley_neumann_terms=options.num_cayley_neumann_terms, site=site)

    def blocks(self) -> torch.Tensor:
        """The (r or 1, b, b) rotation blocks, each applied as x_block @ block."""
        vec, b = self.oft_R, self.block_size
        q = torch.zeros(vec.shape[0], b, b, device=vec.device, dtype=vec.dtype)
        q[:, self.rows, self.cols] = vec
        q = q - q.transpose(-2, -1)
        eye = torch.eye(b, device=vec.device, dtype=vec.dtype).expand_as(q)
        if not self.use_cayley_neumann:
            return torch.linalg.solve(eye + q, eye - q, left=False)
        terms = self.num_cayley_neumann_terms
        rotation = eye.clone()
        if terms > 1:
            rotation = rotation + 2 * q
            if terms > 2:
                power = q @ q
                rotation = rotation + 2 * power
                for _ in range(3, terms - 1):
                    power = power @ q
                    rotation = rotation + 2 * power
                power = power @ q
                rotation = rotation + power
        return rotation

    def rotation(self):
        blocks = _block_dropout(self.blocks(), self.module_dropout, self.training)
        if self.block_share:
            blocks = blocks.expand(self.r, -1, -1)
        return torch.block_diag(*blocks.unbind(0))

    def adapt_input(self, x):
        blocks = _block_dropout(self.blocks(), self.module_dropout, self.training).to(x.dtype)
        if self.block_share:
            blocks = blocks.expand(self.r, -1, -1)
        lead = x.shape[:-1]
        rotated = torch.einsum("...rk,rkc->...rc", x.reshape(*lead, self.r, self.block_size), blocks)
        return rotated.reshape(*lead, self.in_features)


def butterfly_permutation(n: int, blocks: int, half: int, factors: int) -> torch.Tensor:
    """BOFT's block-butterfly permutation of n indices (PEFT's `block_butterfly_perm(n, b, r, n_butterfly_factor)`)."""
    if factors == 0:
        return torch.arange(n)
    if blocks * half * 2 > n:
        raise RewriteError("boft: invalid number of blocks for the butterfly permutation")
    block = n // blocks
    step = block / half
    order = torch.arange(block)
    sorted_order = torch.empty(block, dtype=torch.long)
    sequence = torch.cat((torch.arange(0, step, 2), torch.arange(1, step, 2)))
    for i, pos in enumerate(sequence):
        sorted_order[int(i * half):int(i * half + half)] = order[int(pos * half):int(pos * half + half)]
    indices = torch.arange(n)
    for i in range(0, n, block):
        indices[i:i + block] = indices[i:i + block][sorted_order]
    return indices


@register
class BOFT(_Rotation):
    Options = BOFTOptions

    def __init__(self, in_features: int, out_features: int, block_size: int = 4, block_num: int = 0,
                 n_butterfly_factor: int = 1, dropout: float = 0.0, site: SiteContext | None = None):
        super().__init__()
        if (block_size == 0) == (block_num == 0):
            raise RewriteError("boft: give exactly one of block_size and block_num (the other 0)")
        size = block_size or block_num
        if in_features % size:
            raise RewriteError(f"boft: {'block_size' if block_size else 'block_num'}={size} does not divide the op's "
                               f"input size {in_features}; divisors: {_divisors(in_features)}")
        block_size = block_size or in_features // block_num
        block_num = block_num or in_features // block_size
        factors = n_butterfly_factor - 1
        if factors:
            if block_num % (2 ** factors) or block_num % 2 or block_size % 2:
                raise RewriteError(f"boft: {n_butterfly_factor} butterfly factors need an even block size and a "
                                   f"block count divisible by {2 ** factors} (have {block_num} blocks of "
                                   f"{block_size})")
        self.in_features, self.block_size, self.block_num, self.dropout = in_features, block_size, block_num, dropout
        perms = torch.stack([butterfly_permutation(in_features, block_num // 2 ** i, block_size // 2, factors)
                             for i in range(factors + 1)])
        self.register_buffer("perms", perms, persistent=False)
        self.boft_R = nn.Parameter(torch.zeros(factors + 1, block_num, block_size, block_size))
        self.boft_s = nn.Parameter(torch.ones(out_features, 1))
        self._setup_site(site)

    def reset_parameters(self):
        nn.init.zeros_(self.boft_R)
        nn.init.ones_(self.boft_s)

    @classmethod
    def build(cls, options: BOFTOptions, site: SiteContext, action: str) -> "BOFT":
        return cls(site.in_features, site.out_features, block_size=options.block_size, block_num=options.block_num,
                   n_butterfly_factor=options.n_butterfly_factor, dropout=options.dropout, site=site)

    def rotation(self):
        m, d, h, _ = self.boft_R.shape
        data = self.boft_R.reshape(m * d, h, h)
        skew = 0.5 * (data - data.transpose(1, 2))
        eye = torch.eye(h, device=data.device, dtype=data.dtype).expand_as(skew)
        blocks = torch.linalg.solve(eye + skew, eye - skew, left=False).reshape(m, d, h, h)
        total = None
        for i in range(m):
            diagonal = torch.block_diag(*_block_dropout(blocks[i], self.dropout, self.training).unbind(0))
            idx = self.perms[i]
            factor = diagonal[idx][:, idx]          # P·D·Pᵀ with P[j, idx[j]] = 1
            total = factor if total is None else factor @ total
        return total

    def scale(self):
        return self.boft_s[:, 0]
