"""Mixed-adapter batches: 16 rows whose rows name 4 different LoRA adapters (routed 4/4/4/4, `surgery.MixedBatch`)
in one call, against 4 calls of 4 rows each with one adapter active (goal ≤ 0.6x), and against PEFT's mixed batch
(`adapter_names=[...]`) with the same 4 adapters in the same run (goal ≤ 1.0x). Two kinds of call:

- `generate`: greedy generate() with the KV cache, prompts of `--seq` tokens, `--new-tokens` new tokens (serving);
- `forward`: one no-grad forward of `--seq` tokens per row (no cache). On a CPU this is compute-bound from a few
  tokens on: 16 rows cost what 4x4 rows cost, so no routing can reach 0.6x.

Each mode also reports its `floor`: the base model's (adapters disabled) 16-row call over its 4 calls of 4 rows,
the ratio a routing of zero cost would reach.

    python benchmarks/mixed_batch.py [--seq 64] [--new-tokens 32] [--repeats 8] [--out mixed_batch.json]

Model: the LLaMA-shaped decoder of lora_vs_peft.py (hidden 512, 2 layers, 8 heads, 4 KV heads, FFN 1376); LoRA
r=8 alpha=8 on q and v, four adapters with random non-zero weights made in PEFT and read with surgery.from_peft,
so both sides hold the same weights (checked first: surgery's mixed logits equal its per-adapter forwards and
PEFT's mixed batch within 1e-5, and the three generate() the same tokens). Interleaved rounds, process CPU time
with one intra-op thread, median of per-round ratios (benchmarks/common.py).
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


def run(seq: int = 64, new_tokens: int = 32, warmup: int = 2, repeats: int = 8,
        modes: tuple[str, ...] = ("generate", "forward")) -> dict:
    torch.set_num_threads(1)
    ours, peft_model = models()
    rows = [name for name in ADAPTERS for _ in range(4)]          # 16 rows, 4/4/4/4
    batch = inputs("llama", ours, (16, seq))
    quarters = [{k: v[4 * i:4 * i + 4] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                for i in range(4)]
    mixed_block = surgery.MixedBatch(*rows)
    result = {"batch": [16, seq], "routing": "4/4/4/4", "rounds": repeats}

    def floor(call):
        """The base model's 16-row call over its 4 calls of 4 rows: what a routing of zero cost would reach."""
        @torch.no_grad()
        def base16():
            with surgery.disable(ours):
                return call(ours, batch)

        @torch.no_grad()
        def base4x4():
            with surgery.disable(ours):
                return [call(ours, part) for part in quarters]
        timing = interleaved({"base16": base16, "base4x4": base4x4}, warmup=warmup, repeats=repeats)
        return {"floor": timing.ratio("base16", "base4x4"), "floor_seconds": timing.medians()}

    def compare(call, check):
        @torch.no_grad()
        def mixed():
            surgery.set_active(ours, mixed_block)
            return call(ours, batch)

        @torch.no_grad()
        def separate():
            outs = []
            for name, part in zip(ADAPTERS, quarters):
                surgery.set_active(ours, name)
                outs.append(call(ours, part))
            return torch.cat(outs)

        @torch.no_grad()
        def peft_mixed():
            return call(peft_model, dict(batch, adapter_names=rows))

        ours_mixed, ours_separate, theirs = mixed(), separate(), peft_mixed()
        check(ours_mixed, ours_separate)
        check(ours_mixed, theirs)
        variants = {"mixed": mixed, "separate": separate, "peft_mixed": peft_mixed}
        return interleaved(variants, warmup=warmup, repeats=repeats), ours_mixed, theirs

    def figures(timing):
        return {"seconds": timing.medians(), "clock": timing.clock,
                "mixed_vs_separate": timing.ratio("mixed", "separate"),
                "mixed_vs_separate_iqr": timing.spread("mixed", "separate"),
                "mixed_vs_peft_mixed": timing.ratio("mixed", "peft_mixed"),
                "mixed_vs_peft_mixed_iqr": timing.spread("mixed", "peft_mixed")}

    if "generate" in modes:
        options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

        def generate(model, kwargs):
            return model.generate(**{k: v for k, v in kwargs.items() if k != "use_cache"}, **options)

        def same_tokens(a, b):
            assert torch.equal(a, b), "the variants generated different tokens"
        timing, _, _ = compare(generate, same_tokens)
        result["generate"] = {"new_tokens": new_tokens, **figures(timing), **floor(generate)}
    if "forward" in modes:
        def forward(model, kwargs):
            return model(**kwargs).logits

        def close(a, b):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        timing, ours_mixed, theirs = compare(forward, close)
        result["forward"] = {**figures(timing), "max_abs_diff_vs_peft": float((ours_mixed - theirs).abs().max()),
                             **floor(forward)}
    result["goals"] = {f"{mode}.{k}": {"goal": g, "met": result[mode][k] <= g}
                       for mode in modes for k, g in GOALS.items()}
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--modes", default="generate,forward")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = run(seq=args.seq, new_tokens=args.new_tokens, repeats=args.repeats, modes=tuple(args.modes.split(",")))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
