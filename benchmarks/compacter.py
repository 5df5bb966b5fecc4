"""Compacter's PHM projections: surgery's PHMLayer (thin factor products, W never built) against the dense
reference that builds H = Σᵢ kron(Cᵢ, Wᵢ) and multiplies by it (what AdapterHub's PHMLayer does every call),
and against a plain nn.Linear holding H precomputed (the frozen-weights lower bound). Hidden 768, Compacter's
defaults: bottleneck 768/32 = 24, phm_dim 4, rank-1 blocks, one shared rule.

    python benchmarks/compacter.py [--device cuda] [--tokens 1024 8192] [--dtype float32] [--threads 1]

Prints one row per (part, tokens, pass): best-of-N milliseconds per call and the ratio surgery / dense reference (< 1: faster).
Outputs of the three are checked equal (float32: 1e-5 relative) before timing.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from surgery.modules.phm import PHMLayer, PHMOptions, PHMRule


def kronecker_sum(rule: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """AdapterHub's kronecker_product(rule, W).sum(0): batched Kronecker products by broadcasting, summed."""
    res = rule.unsqueeze(-1).unsqueeze(-3) * W.unsqueeze(-2).unsqueeze(-4)
    n, a, p, c, q = res.shape
    return res.reshape(n, a * p, c * q).sum(0)


def dense_reference(layer: PHMLayer, x: torch.Tensor) -> torch.Tensor:
    W = torch.bmm(layer.W_left, layer.W_right) if layer.factorized_W else layer.W
    return x @ kronecker_sum(layer.phm_rule(), W) + layer.b


class Adapter(torch.nn.Module):
    """The Compacter bottleneck z + up(gelu(down(z))) with a chosen way to run the PHM projections."""

    def __init__(self, down, up, how):
        super().__init__()
        self.down, self.up, self.how = down, up, how

    def forward(self, z):
        if self.how == "surgery":
            return z + self.up(F.gelu(self.down(z)))
        if self.how == "dense reference":
            return z + dense_reference(self.up, F.gelu(dense_reference(self.down, z)))
        return z + self.up_linear(F.gelu(self.down_linear(z)))

    def freeze_dense(self):
        with torch.no_grad():
            self.down_linear = torch.nn.Linear(self.down.in_features, self.down.out_features).to(self.down.b)
            self.down_linear.weight.copy_(self.down.dense_weight().t())
            self.down_linear.bias.copy_(self.down.b)
            self.up_linear = torch.nn.Linear(self.up.in_features, self.up.out_features).to(self.up.b)
            self.up_linear.weight.copy_(self.up.dense_weight().t())
            self.up_linear.bias.copy_(self.up.b)


def build(hidden: int, device, dtype):
    torch.manual_seed(0)
    options = PHMOptions()
    rule = PHMRule(options.phm_dim, factorized=False, c_init="normal", init_range=0.1, learn=True, shared=True)
    down = PHMLayer(hidden, hidden // 32, options, rule=rule)
    up = PHMLayer(hidden // 32, hidden, options, rule=rule)
    for m in (rule, down, up):
        m.to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in list(down.parameters()) + list(up.parameters()):
            p.normal_(0, 0.1)
    return rule, down, up


def time_all(fns: dict, x, backward: bool, device, repeats: int) -> dict:
    """Best-of-`repeats` milliseconds per call for each function, the functions interleaved round by round so that
    a busy machine slows them alike (the minimum is the least disturbed run)."""
    def step(fn):
        out = fn(x)
        if backward:
            out.sum().backward()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    calls = {}
    for name, fn in fns.items():        # warm up, and size each round to about 20 ms
        for _ in range(3):
            step(fn)
        sync()
        start = time.perf_counter()
        step(fn)
        sync()
        calls[name] = max(1, int(0.02 / max(time.perf_counter() - start, 1e-6)))
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            for _ in range(calls[name]):
                step(fn)
            sync()
            best[name] = min(best[name], (time.perf_counter() - start) / calls[name] * 1e3)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (1 by default: on a shared machine more threads time the contention)")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    rule, down, up = build(args.hidden, device, dtype)
    adapters = {how: Adapter(down, up, how) for how in ("surgery", "dense reference", "precomputed Linear")}
    adapters["precomputed Linear"].freeze_dense()
    parts = {
        f"down {args.hidden}->{args.hidden // 32}": (lambda how: {"surgery": down, "dense reference":
                                                                  lambda x: dense_reference(down, x),
                                                                  "precomputed Linear": adapters["precomputed Linear"].down_linear}[how], args.hidden),
        f"up {args.hidden // 32}->{args.hidden}": (lambda how: {"surgery": up, "dense reference":
                                                                lambda x: dense_reference(up, x),
                                                                "precomputed Linear": adapters["precomputed Linear"].up_linear}[how], args.hidden // 32),
        "whole adapter": (lambda how: adapters[how], args.hidden),
    }
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"{args.dtype}, hidden {args.hidden}, bottleneck {args.hidden // 32}, phm_dim 4, rank 1")
    for layer, what in ((down, "down"), (up, "up")):
        costs = layer._costs(1)
        print(f"multiply-adds per token, {what}: surgery ({layer.path(1)}) {costs[layer.path(1)]:,} vs dense "
              f"{layer.in_features * layer.out_features:,}")
    header = f"{'part':<18}{'tokens':>8}  {'pass':<9}{'surgery ms':>12}{'dense ref ms':>14}{'Linear(H) ms':>14}{'surgery/dense':>15}"
    print(header)
    print("-" * len(header))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for tokens in args.tokens:
        for name, (make, width) in parts.items():
            x = torch.randn(tokens, width, device=device, dtype=dtype)
            with torch.no_grad():
                ref = make("dense reference")(x)
                for how in ("surgery", "precomputed Linear"):
                    torch.testing.assert_close(make(how)(x), ref, atol=tol * ref.abs().max().item(), rtol=tol)
                path = down.path(tokens) if name.startswith("down") else up.path(tokens) if name.startswith("up") else "-"
            for backward in (False, True):
                xs = x.detach().requires_grad_(backward)
                fns = {how: make(how) for how in ("surgery", "dense reference", "precomputed Linear")}
                with torch.set_grad_enabled(backward):
                    row = time_all(fns, xs, backward, device, args.repeats)
                pas = "fwd+bwd" if backward else "forward"
                print(f"{name:<18}{tokens:>8}  {pas:<9}{row['surgery']:>12.3f}{row['dense reference']:>14.3f}"
                      f"{row['precomputed Linear']:>14.3f}{row['surgery'] / row['dense reference']:>15.2f}"
                      + (f"   (path: {path})" if path != "-" and not backward else ""), flush=True)

if __name__ == "__main__":
    main()
