"""Houlsby train step: surgery (specs/houlsby.yaml on MiniGPT) against the hand-written eager model
(tests/reference.py: HoulsbyMiniGPT, the adapters written into the blocks by hand).

    python benchmarks/houlsby_vs_reference.py [--sizes small,medium] [--device cpu]

The reference runs on its own copy of the base model (no surgery hooks on it at all) with the surgery model's
adapter weights, perturbed from init so both compute something; their outputs are checked equal before timing.
Both train only the adapters, with AdamW on the same batch. Steps interleaved; the figure is the median of the
per-step ratios (benchmarks/common.py). `small` (hidden 64, 2 layers, 8 x 32 tokens) is dominated by
per-call Python overhead, which is what the hooks add; `medium` (hidden 256, 4 layers, 8 x 128) by compute.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import surgery  # noqa: E402
from benchmarks.common import interleaved, op_counts, op_difference, python_calls  # noqa: E402
from reference import HoulsbyMiniGPT  # noqa: E402  (tests/, put on sys.path by benchmarks.common)
from surgery.example_models import minigpt  # noqa: E402

SIZES = {"small": dict(hidden_dim=64, n_layers=2, n_heads=4, batch=8, seq=32),
         "medium": dict(hidden_dim=256, n_layers=4, n_heads=8, batch=8, seq=128)}
VOCAB = 1000


def build_pair(size: str, device="cpu"):
    """(surgery model, hand-written reference, token ids), same base weights and adapter weights."""
    cfg = SIZES[size]
    base = minigpt(vocab_size=VOCAB, hidden_dim=cfg["hidden_dim"], n_layers=cfg["n_layers"],
                   n_heads=cfg["n_heads"], seq_len=cfg["seq"], dropout=0.0).to(device)
    clean = copy.deepcopy(base)
    example = tuple(t.to(device) for t in base.example_inputs())
    model = surgery.apply(base, "specs/houlsby.yaml", example_inputs=example)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.surgery_adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p) * 0.05)
    reference = HoulsbyMiniGPT.from_surgery(model)
    reference.base = clean.requires_grad_(False)     # its own base: the reference never passes surgery's hooks
    reference.to(device)                              # from_surgery builds its adapters on the CPU
    ids = torch.randint(0, VOCAB, (cfg["batch"], cfg["seq"]), generator=g).to(device)
    return model, reference, ids


def trainer(model, ids):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(ids).float().pow(2).mean().backward()
        optimizer.step()
    return step


def houlsby_train_step(size: str, *, warmup: int = 3, repeats: int = 12, device="cpu") -> dict:
    model, reference, ids = build_pair(size, device)
    model.eval()
    reference.eval()
    with torch.no_grad():
        ours, theirs = model(ids), reference(ids)
    error = float((ours - theirs).abs().max())
    assert error < 1e-4, f"surgery and the hand-written Houlsby model differ by {error:.2e}"
    trainable = (surgery.trainable_parameters(model)[0],
                 sum(p.numel() for p in reference.parameters() if p.requires_grad))
    assert trainable[0] == trainable[1], trainable
    steps = {"surgery": trainer(model, ids), "reference": trainer(reference, ids)}
    timing = interleaved(steps, warmup=warmup, repeats=repeats, device=device)
    ops = op_difference(op_counts(steps["surgery"]), op_counts(steps["reference"]))
    calls = {k: python_calls(fn) for k, fn in steps.items()}
    return {"size": size, **SIZES[size], "trainable": trainable[0], "max_abs_difference": error,
            **timing.summary("surgery", "reference"), "ops_per_step": ops, "python_calls_per_step": calls}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="small,medium")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (see benchmarks/run.py)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [houlsby_train_step(s, warmup=args.warmup, repeats=args.repeats, device=args.device)
            for s in args.sizes.split(",")]
    for r in rows:
        s = r["seconds"]
        print(f"{r['size']:7} surgery {s['surgery'] * 1e3:8.2f} ms  reference {s['reference'] * 1e3:8.2f} ms  "
              f"ratio {r['ratio']:.3f}x (IQR {r['ratio_iqr'][0]:.3f}-{r['ratio_iqr'][1]:.3f})  Python calls per step "
              f"{r['python_calls_per_step']['surgery']} vs {r['python_calls_per_step']['reference']}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
