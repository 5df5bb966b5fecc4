"""Parameterized hypercomplex multiplication (PHM) layers, the projections of Compacter (Mahabadi et al. 2021).

The weight is a sum of Kronecker products, H = Σᵢ kron(Cᵢ, Wᵢ) with n rule matrices Cᵢ (n×n) and n blocks Wᵢ
((in/n)×(out/n), or the rank-k product Lᵢ Rᵢ), as AdapterHub's PHMLayer; y = x·H + b. With factorized blocks,
H = U·V where U = [kron(C₁, L₁) … kron(Cₙ, Lₙ)] is in×n²k and V stacks kron(I, Rᵢ) (n²k×out), so the forward runs
as two thin products that never build the in×out matrix whenever that takes fewer multiply-adds.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from surgery.modules.registry import Options
from surgery.modules.options import PHMOptions  # noqa: F401  (defined without torch: spec validation)


class PHMRule(nn.Module):
    """The n rule matrices C (n×n×n), or their rank-1 factors C = bmm(left, right) when factorized.

    A shared rule (one per adapter set, as AdapterHub's `shared_parameters`) is drawn from N(0, phm_init_range) or
    U(-1, 1); a rule of its own from N(0, 0.01) or U(-0.01, 0.01), as AdapterHub does. A rule that does not learn is
    a buffer, so that making the adapter trainable does not make it learn.
    """

    def __init__(self, n: int, *, factorized: bool, c_init: str, init_range: float, learn: bool, shared: bool):
        super().__init__()
        self.n, self.factorized = n, factorized
        shapes = {"left": (n, n, 1), "right": (n, 1, n)} if factorized else {"rule": (n, n, n)}
        for name, shape in shapes.items():
            tensor = torch.empty(shape)
            if learn:
                self.register_parameter(name, nn.Parameter(tensor))
            else:
                self.register_buffer(name, tensor)
        self.c_init, self.init_range, self.shared = c_init, init_range, shared
        self.reset_parameters()

    def tensors(self) -> list[torch.Tensor]:
        return [self.left, self.right] if self.factorized else [self.rule]

    @torch.no_grad()
    def reset_parameters(self):
        for tensor in self.tensors():
            if self.c_init == "normal":
                tensor.normal_(0.0, self.init_range if self.shared else 0.01)
            else:
                bound = 1.0 if self.shared else 0.01
                tensor.uniform_(-bound, bound)

    def forward(self) -> torch.Tensor:
        return torch.bmm(self.left, self.right) if self.factorized else self.rule


class PHMLayer(nn.Module):
    """y = x·Σᵢ kron(Cᵢ, Wᵢ) + b, a drop-in for nn.Linear(in_features, out_features).

    `rule` is a PHMRule shared with other layers (held without registering it, so it is saved and counted once,
    by its owner); without one the layer owns its rule.
    """

    def __init__(self, in_features: int, out_features: int, options: PHMOptions, rule: PHMRule | None = None):
        super().__init__()
        n = options.phm_dim
        for what, size in (("in_features", in_features), ("out_features", out_features)):
            if size % n:
                raise ValueError(f"PHM layer {in_features}->{out_features}: {what}={size} is not divisible by "
                                 f"phm_dim={n}; choose a bottleneck_size (or reduction_factor) giving a multiple of {n}")
        self.in_features, self.out_features, self.n = in_features, out_features, n
        self.rank = options.phm_rank
        self.factorized_W = options.factorized_phm_W
        p, q = in_features // n, out_features // n
        if self.factorized_W:
            self.W_left = nn.Parameter(torch.empty(n, p, self.rank))
            self.W_right = nn.Parameter(torch.empty(n, self.rank, q))
        else:
            self.W = nn.Parameter(torch.empty(n, p, q))
        self.b = nn.Parameter(torch.zeros(out_features)) if options.phm_bias else None
        if rule is None:
            self.rule = PHMRule(n, factorized=options.factorized_phm_rule, c_init=options.phm_c_init,
                                init_range=options.phm_init_range, learn=options.learn_phm, shared=False)
            self._shared_rule = None
        else:
            if rule.n != n:
                raise ValueError(f"the shared PHM rule has phm_dim {rule.n}, this layer {n}")
            self._shared_rule = [rule]   # a list: not a submodule, its owner saves it
        self.w_init, self.init_range = options.hypercomplex_nonlinearity, options.phm_init_range
        self.reset_parameters()

    @property
    def phm_rule(self) -> PHMRule:
        return self._shared_rule[0] if self._shared_rule is not None else self.rule

    def blocks(self) -> list[nn.Parameter]:
        return [self.W_left, self.W_right] if self.factorized_W else [self.W]

    @torch.no_grad()
    def reset_parameters(self):
        """The init `hypercomplex_nonlinearity` names, per block. (AdapterHub 1.3 applies xavier_normal for any
        value because it tests the string's truth first; this follows the option.)"""
        for tensor in self.blocks():
            if tensor.is_meta:   # no values to draw (a meta model; surgery.materialize initializes it again)
                continue
            for block in tensor:
                if self.w_init in ("glorot-normal", "phm"):
                    nn.init.xavier_normal_(block)
                elif self.w_init == "glorot-uniform":
                    nn.init.xavier_uniform_(block)
                else:
                    block.normal_(0.0, self.init_range)
        if self.b is not None:
            self.b.zero_()

    @torch.no_grad()
    def zero_output(self):
        """Make the layer output zero (identity-at-init adapters) while its input side still gets gradients."""
        (self.W_right if self.factorized_W else self.W).zero_()
        if self.b is not None:
            self.b.zero_()

    def dense_weight(self) -> torch.Tensor:
        """H = Σᵢ kron(Cᵢ, Wᵢ) as an in×out matrix (the reference, and the path when it is the cheaper one)."""
        C = self.phm_rule()
        W = torch.bmm(self.W_left, self.W_right) if self.factorized_W else self.W
        n, p, q = self.n, self.in_features // self.n, self.out_features // self.n
        return torch.einsum("iac,ibe->abce", C, W).reshape(n * p, n * q)

    def _costs(self, tokens: int) -> dict[str, int]:
        """Multiply-adds of each way to compute the forward for `tokens` rows (building the factors included)."""
        n, k, i, o = self.n, self.rank, self.in_features, self.out_features
        costs = {"dense": tokens * i * o + n * i * o}
        if self.factorized_W:
            costs["out_side"] = tokens * (n * k * i + n * n * k * o) + n * n * k * o
            costs["in_side"] = tokens * (n * n * k * i + n * k * o) + n * n * k * i
        return costs

    def path(self, tokens: int) -> str:
        """The rule folded into the output side when that saves work over the dense product: its last step is one
        GEMM writing the output with the bias fused, which measures faster than the in-side variant even where
        that one counts fewer multiply-adds (it writes an output-sized intermediate and adds the bias apart)."""
        costs = self._costs(tokens)
        for path in ("out_side", "in_side"):
            if path in costs and costs[path] < costs["dense"]:
                return path
        return "dense"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        path = self.path(x2.shape[0])
        n, k, p, q = self.n, self.rank, self.in_features // self.n, self.out_features // self.n
        if path == "dense":
            y = x2 @ self.dense_weight()
        elif path == "out_side":
            # t[(a), (i,k)] = x_a · L_i ; y = t · K with K[(a,i,k), (c,e)] = C_i[a,c] R_i[k,e]
            left = self.W_left.permute(1, 0, 2).reshape(p, n * k)
            t = (x2.reshape(-1, p) @ left).reshape(-1, n * n * k)
            K = torch.einsum("iac,ike->aikce", self.phm_rule(), self.W_right).reshape(n * n * k, n * q)
            y = torch.addmm(self.b, t, K) if self.b is not None else t @ K
            return y.reshape(*shape[:-1], self.out_features)
        else:
            # t = x · U with U[(a,b), (c,i,k)] = C_i[a,c] L_i[b,k] ; y_c = t_c · [R_1; …; R_n]
            U = torch.einsum("iac,ibk->abcik", self.phm_rule(), self.W_left).reshape(n * p, n * n * k)
            t = (x2 @ U).reshape(-1, n * k)
            y = (t @ self.W_right.reshape(n * k, q)).reshape(-1, n * q)
        if self.b is not None:
            y = y + self.b
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, phm_dim={self.n}, "
                f"rank={self.rank if self.factorized_W else 'full'}, shared_rule={self._shared_rule is not None}")
