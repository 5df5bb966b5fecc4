"""Mixed-adapter batches: one forward of 16 rows whose rows name 4 different LoRA adapters (routed 4/4/4/4,
`surgery.MixedBatch`), against 4 forwards of 4 rows each with one adapter active (goal ≤ 0.6x), and against PEFT's
mixed batch (`adapter_names=[...]`) with the same 4 adapters in the same run (goal ≤ 1.0x).

    python benchmarks/mixed_batch.py [--seq 64] [--repeats 12] [--out mixed_batch.json]

Model: the LLaMA-shaped decoder of lora_vs_peft.py (hidden 512, 2 layers, 8 heads, 4 KV heads, FFN 1376); LoRA
r=8 alpha=8 on q and v, four adapters with random non-zero weights made in PEFT and read with surgery.from_peft,
so both sides hold the same weights (outputs checked: surgery's mixed rows equal its per-adapter forwards and
PEFT's mixed batch within 1e-5). No-grad forwards in eval mode, interleaved rounds, process CPU time with one
intra-op thread, median of per-round ratios (benchmarks/common.py).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
warnings.filterwarnings("ignore")

import surgery  # noqa: E402
from benchmarks.common import interleaved  # noqa: E402
from benchmarks.lora_vs_peft import build, inputs  # noqa: E402

ADAPTERS = ["a0", "a1", "a2", "a3"]
GOALS = {"mixed_vs_separate": 0.6, "mixed_vs_peft_mixed": 1.0}


def models():
    """(surgery model, PEFT model) over copies of one base, with the same four LoRA adapters."""
    import peft
    base = build("llama").eval()
    config = peft.LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    peft_model = peft.get_peft_model(copy.deepcopy(base), config, adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        peft_model.add_adapter(name, config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    ours = copy.deepcopy(base)
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        for name in ADAPTERS:
            directory = Path(tmp) / name if (Path(tmp) / name).is_dir() else Path(tmp)
            surgery.from_peft(ours, directory, name=name)
    return ours, peft_model.eval()


def run(seq: int = 64, warmup: int = 3, repeats: int = 12) -> dict:
    torch.set_num_threads(1)
    ours, peft_model = models()
    rows = [name for name in ADAPTERS for _ in range(4)]          # 16 rows, 4/4/4/4
    batch = inputs("llama", ours, (16, seq))
    mixed_block = surgery.MixedBatch(*rows)

    @torch.no_grad()
    def mixed():
        surgery.set_active(ours, mixed_block)
        return ours(**batch).logits

    @torch.no_grad()
    def separate():
        outs = []
        for i, name in enumerate(ADAPTERS):
            surgery.set_active(ours, name)
            part = {k: v[4 * i:4 * i + 4] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            outs.append(ours(**part).logits)
        return torch.cat(outs)

    @torch.no_grad()
    def peft_mixed():
        return peft_model(**batch, adapter_names=rows).logits

    ours_mixed, ours_separate, theirs = mixed(), separate(), peft_mixed()
    torch.testing.assert_close(ours_mixed, ours_separate, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_mixed, theirs, atol=1e-5, rtol=0)
    timing = interleaved({"mixed": mixed, "separate": separate, "peft_mixed": peft_mixed}, warmup=warmup,
                         repeats=repeats)
    result = {"batch": [16, seq], "routing": "4/4/4/4", "seconds": timing.medians(), "clock": timing.clock,
              "rounds": repeats,
              "mixed_vs_separate": timing.ratio("mixed", "separate"),
              "mixed_vs_separate_iqr": timing.spread("mixed", "separate"),
              "mixed_vs_peft_mixed": timing.ratio("mixed", "peft_mixed"),
              "mixed_vs_peft_mixed_iqr": timing.spread("mixed", "peft_mixed"),
              "max_abs_diff_vs_peft": float((ours_mixed - theirs).abs().max())}
    result["goals"] = {k: {"goal": g, "met": result[k] <= g} for k, g in GOALS.items()}
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = run(seq=args.seq, repeats=args.repeats)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
