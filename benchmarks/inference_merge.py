"""Inference cost of weight adapters: the base model, the adapted model unmerged, and merged (surgery.merge),
for LoRA (specs/lora.yaml) and IA3 (specs/ia3.yaml).

    python benchmarks/inference_merge.py [--models minilm,llama] [--methods lora,ia3] [--device cpu]

Two adapted copies of the base carry the same adapter weights (perturbed from their identity init, so merging
has something to fold); one is merged. Before timing, merged outputs are checked against unmerged ones; after,
`surgery.unmerge` must give back the base weights bit for bit. The three forwards (no_grad, eval) run
interleaved; figures are medians and per-round ratios (benchmarks/common.py).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import surgery  # noqa: E402
from benchmarks.common import interleaved, op_counts, op_difference, synchronizer  # noqa: E402
from benchmarks.lora_vs_peft import build, inputs, output  # noqa: E402

SPECS = {"lora": "specs/lora.yaml", "ia3": "specs/ia3.yaml"}
SHAPE = (4, 64)      # (batch, sequence): small, so per-call overhead (hooks left behind) would show


def _perturb(module: torch.nn.Module, scale: float = 0.02) -> None:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p) * scale)


def merged_inference(name: str, method: str, *, warmup: int = 3, repeats: int = 30, device="cpu",
                     shape: tuple[int, int] = SHAPE) -> dict:
    base = build(name, device).eval()
    originals = {k: v.detach().clone() for k, v in base.state_dict().items()}
    unmerged = surgery.apply(copy.deepcopy(base), SPECS[method]).eval()
    _perturb(unmerged.surgery_adapters)
    merged = surgery.apply(copy.deepcopy(base), SPECS[method]).eval()
    merged.surgery_adapters.load_state_dict(unmerged.surgery_adapters.state_dict())
    batch = inputs(name, base, shape)
    sync = synchronizer(device)
    with torch.no_grad():
        expected = output(unmerged(**batch))
        sync()
        start = time.perf_counter()
        report = surgery.merge(merged)
        sync()
        merge_s = time.perf_counter() - start
        got = output(merged(**batch))
        merge_error = float((got - expected).abs().max() / expected.abs().max())
        assert merge_error < 1e-4, f"{name} {method}: merged output differs from unmerged by {merge_error:.2e}"
        timing = interleaved({"base": lambda: base(**batch), "unmerged": lambda: unmerged(**batch),
                              "merged": lambda: merged(**batch)}, warmup=warmup, repeats=repeats, device=device)
        ops = op_difference(op_counts(lambda: merged(**batch)), op_counts(lambda: base(**batch)))
        surgery.unmerge(merged)
    restored = merged.state_dict()
    assert all(torch.equal(restored[k], v) for k, v in originals.items()), "unmerge must restore the base exactly"
    return {"model": name, "method": method, "batch": list(shape), "merged_sites": len(report.merged),
            "not_merged": len(report.not_merged), "merge_s": merge_s, "merged_vs_unmerged_rel_error": merge_error,
            "seconds": timing.medians(), "wall_seconds": timing.wall_medians(), "clock": timing.clock,
            "merged_vs_base": timing.ratio("merged", "base"), "merged_vs_base_iqr": timing.spread("merged", "base"),
            "unmerged_vs_base": timing.ratio("unmerged", "base"), "rounds": repeats,
            "merged_vs_base_ops": ops}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="minilm,llama")
    parser.add_argument("--methods", default="lora,ia3")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (see benchmarks/run.py)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [merged_inference(m, k, warmup=args.warmup, repeats=args.repeats, device=args.device)
            for m in args.models.split(",") for k in args.methods.split(",")]
    for r in rows:
        s = r["seconds"]
        print(f"{r['model']:7} {r['method']:5} base {s['base'] * 1e3:7.1f} ms  unmerged {r['unmerged_vs_base']:.3f}x  "
              f"merged {r['merged_vs_base']:.3f}x  ({r['merged_sites']} sites merged in {r['merge_s'] * 1e3:.0f} ms)")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
