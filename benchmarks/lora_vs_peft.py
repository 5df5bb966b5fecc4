"""Surgery LoRA vs PEFT LoRA on the same model: train step time, peak training memory, and merged inference vs
the base model, as ratios.

    python benchmarks/lora_vs_peft.py [--models minilm,llama] [--device cpu] [--out lora_vs_peft.json]

Models: the real all-MiniLM-L6-v2 (BERT, hidden 384, 6 layers) and a LLaMA-shaped decoder from a config
(hidden 512, 2 layers, 8 heads, 4 KV heads, FFN 1376). Both methods adapt q and v with r = 8, alpha = 8 (the
same modules: checked), and train with AdamW on the same batch, same dtype (float32); the models keep their
own dropout, in train mode. Time: surgery and PEFT steps interleaved (alternating which goes first), the
median of the per-step ratios after warm-up (benchmarks/common.py). Memory: peak memory of the training steps
above the memory before them, in a fresh process per method (benchmarks/common.py: RSS on CPU,
max_memory_allocated on CUDA). Merged inference: benchmarks/inference_merge.py.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
warnings.filterwarnings("ignore")

import surgery  # noqa: E402
from benchmarks.common import (allocator_peak_mib, in_subprocess, interleaved, op_counts,  # noqa: E402
                               op_difference, peak_memory)

SHAPES = {"minilm": (8, 128), "llama": (4, 128)}       # (batch, sequence) per model
PEFT_TARGETS = {"minilm": ["query", "value"], "llama": ["q_proj", "v_proj"]}
LLAMA_CONFIG = dict(vocab_size=1000, hidden_size=512, intermediate_size=1376, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                    bos_token_id=0, eos_token_id=0, pad_token_id=0)


def build(name: str, device="cpu") -> torch.nn.Module:
    """The real MiniLM, or the LLaMA-shaped decoder from LLAMA_CONFIG (seeded), on `device`."""
    torch.manual_seed(0)
    if name == "minilm":
        from models import make_minilm
        model = make_minilm()
    else:
        from transformers import LlamaConfig, LlamaForCausalLM
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_CONFIG))
    return model.to(device)


def inputs(name: str, model, shape: tuple[int, int] | None = None) -> dict:
    batch, seq = shape or SHAPES[name]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, min(model.config.vocab_size, 1000), (batch, seq), generator=g)
    ids = ids.to(next(model.parameters()).device)
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if name == "llama":
        kwargs["use_cache"] = False
    return kwargs


def output(out) -> torch.Tensor:
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def with_lora(name: str, base, method: str):
    """A copy of `base` with LoRA q,v r=8 alpha=8 by surgery (specs/lora.yaml) or by PEFT."""
    model = copy.deepcopy(base)
    if method == "surgery":
        return surgery.apply(model, "specs/lora.yaml")
    import peft
    return peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0,
                                                      target_modules=PEFT_TARGETS[name]))


def adapted_paths(model, method: str) -> set[str]:
    if method == "surgery":
        return {s.owner_path for s in model.surgery_adapters.records["default"].weight_sites}
    return {n.removeprefix("base_model.model.") for n, m in model.named_modules()
            if hasattr(m, "lora_A") and len(m.lora_A)}


def check_same_adaptation(surgery_model, peft_model) -> tuple[int, int]:
    """Both methods adapt the same modules with the same trainable count: (modules, trainable)."""
    paths = adapted_paths(surgery_model, "surgery")
    assert paths == adapted_paths(peft_model, "peft"), "the two methods must adapt the same modules"
    counts = (surgery.trainable_parameters(surgery_model)[0],
              sum(p.numel() for p in peft_model.parameters() if p.requires_grad))
    assert counts[0] == counts[1], counts
    return len(paths), counts[0]


def check_same_outputs(surgery_model, peft_model, batch, scale: float = 0.02) -> float:
    """Both compute the same function: surgery's LoRA weights, perturbed so that B is not zero, are copied into
    PEFT's modules of the same path; the outputs must agree (relative max error below 1e-5, returned). Run
    before any timing: a comparison of two different computations means nothing. The weights are restored
    (B = 0) afterwards, so what is timed starts from each library's own init."""
    g = torch.Generator().manual_seed(2)
    saved = {}
    peft_modules = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
                    if hasattr(m, "lora_A") and len(m.lora_A)}
    with torch.no_grad():
        for site in surgery_model.surgery_adapters.records["default"].weight_sites:
            lora, target = site.adapter, peft_modules[site.owner_path]
            for p in (lora.lora_A, lora.lora_B):
                saved[p] = p.detach().clone()
                p.add_(torch.randn(p.shape, generator=g).to(p) * scale)
            target.lora_A["default"].weight.copy_(lora.lora_A)
            target.lora_B["default"].weight.copy_(lora.lora_B)
            assert target.scaling["default"] == lora.scaling, (site.owner_path, target.scaling, lora.scaling)
        modes = (surgery_model.training, peft_model.training)
        surgery_model.eval(), peft_model.eval()
        a, b = output(surgery_model(**batch)), output(peft_model(**batch))
        surgery_model.train(modes[0]), peft_model.train(modes[1])
        error = float((a - b).abs().max() / b.abs().max())
        assert error < 1e-5, f"surgery's and PEFT's LoRA outputs differ by {error:.2e} for the same weights"
        for p, value in saved.items():
            p.copy_(value)
        for target in peft_modules.values():
            torch.nn.init.zeros_(target.lora_B["default"].weight)
    return error


def trainer(model, batch):
    """One training step: zero grads, forward, a scalar loss of the output, backward, AdamW step."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = output(model(**batch)).float().pow(2).mean()
        loss.backward()
        optimizer.step()
    return step


def train_step(name: str, *, warmup: int = 3, repeats: int = 12, device="cpu") -> dict:
    """Surgery vs PEFT train steps, interleaved."""
    base = build(name, device).eval()
    surgery_model, peft_model = with_lora(name, base, "surgery"), with_lora(name, base, "peft")
    modules, trainable = check_same_adaptation(surgery_model, peft_model)
    batch = inputs(name, base)
    error = check_same_outputs(surgery_model, peft_model, batch)
    steps = {"surgery": trainer(surgery_model, batch), "peft": trainer(peft_model, batch)}
    timing = interleaved(steps, warmup=warmup, repeats=repeats, device=device)
    ops = op_difference(op_counts(steps["surgery"]), op_counts(steps["peft"]))
    return {"model": name, "batch": list(SHAPES[name]), "adapted_modules": modules, "trainable": trainable,
            "outputs_rel_error": error, **timing.summary("surgery", "peft"), "ops_per_step": ops}


def train_memory(name: str, method: str, steps: int = 3, device: str = "cpu") -> dict:
    """Peak memory of `steps` train steps of one method (call in a fresh process: `train_memory_both`)."""
    base = build(name, device)
    model = with_lora(name, base, method)
    del base
    step = trainer(model, inputs(name, model))
    with peak_memory(device) as memory:
        for _ in range(steps):
            step()
    if torch.device(device).type == "cpu":
        memory["allocator_peak_mib"] = allocator_peak_mib(step)      # one more, steady-state step
    return memory


def train_memory_both(name: str, steps: int = 3, device: str = "cpu") -> dict:
    """Peak memory of train steps, surgery vs PEFT, each in a fresh process (benchmarks/common.py), after checking
    here that the two compute the same function."""
    base = build(name, device)
    surgery_model, peft_model = with_lora(name, base, "surgery"), with_lora(name, base, "peft")
    check_same_adaptation(surgery_model, peft_model)
    error = check_same_outputs(surgery_model, peft_model, inputs(name, base))
    del base, surgery_model, peft_model
    memory = {m: in_subprocess("benchmarks.lora_vs_peft:train_memory", name=name, method=m, steps=steps,
                               device=device) for m in ("surgery", "peft")}
    result = {"model": name, "steps": steps, "measure": memory["peft"]["measure"], "outputs_rel_error": error,
              "peak_mib": {m: v["peak_mib"] for m, v in memory.items()},
              "ratio": memory["surgery"]["peak_mib"] / memory["peft"]["peak_mib"]}
    if "allocator_peak_mib" in memory["peft"]:
        result["allocator_peak_mib"] = {m: v["allocator_peak_mib"] for m, v in memory.items()}
        result["allocator_ratio"] = memory["surgery"]["allocator_peak_mib"] / memory["peft"]["allocator_peak_mib"]
        result["process_peak_rss_mib"] = {m: v["process_peak_mib"] for m, v in memory.items()}
    return result


def unmerged_inference(name: str, *, warmup: int = 3, repeats: int = 20, device="cpu") -> dict:
    """Forward (no_grad, eval) of surgery's and PEFT's unmerged LoRA models against the base, interleaved."""
    base = build(name, device).eval()
    surgery_model = with_lora(name, base, "surgery").eval()
    peft_model = with_lora(name, base, "peft").eval()
    batch = inputs(name, base)
    check_same_outputs(surgery_model, peft_model, batch)
    with torch.no_grad():
        timing = interleaved({"base": lambda: base(**batch), "surgery": lambda: surgery_model(**batch),
                              "peft": lambda: peft_model(**batch)}, warmup=warmup, repeats=repeats, device=device)
    return {"model": name, "seconds": timing.medians(), "surgery_vs_base": timing.ratio("surgery", "base"),
            "peft_vs_base": timing.ratio("peft", "base"), "surgery_vs_peft": timing.ratio("surgery", "peft")}


def bench(name: str, args) -> dict:
    from benchmarks.inference_merge import merged_inference
    return {"model": name,
            "train": train_step(name, warmup=args.warmup, repeats=args.repeats, device=args.device),
            "memory": train_memory_both(name, args.memory_steps, args.device),
            "unmerged": unmerged_inference(name, warmup=args.warmup, repeats=args.infer_repeats, device=args.device),
            "merged": merged_inference(name, "lora", warmup=args.warmup, repeats=args.infer_repeats,
                                       device=args.device)}


def table(results: list[dict]) -> str:
    rows = [("model", "train step surgery / PEFT", "peak train memory surgery / PEFT", "merged / base forward",
             "unmerged fwd / base (surgery, PEFT)")]
    for r in results:
        t, m, u = r["train"], r["memory"], r["unmerged"]
        rows.append((r["model"],
                     f"{t['seconds']['surgery'] * 1e3:.1f} / {t['seconds']['peft'] * 1e3:.1f} ms = {t['ratio']:.3f}x",
                     f"{m['peak_mib']['surgery']:.1f} / {m['peak_mib']['peft']:.1f} MiB = {m['ratio']:.3f}x",
                     f"{r['merged']['merged_vs_base']:.3f}x",
                     f"{u['surgery_vs_base']:.3f}x, {u['peft_vs_base']:.3f}x"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="minilm,llama")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=12, help="timed train steps per method")
    parser.add_argument("--infer-repeats", type=int, default=20, help="timed forwards per model")
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (see benchmarks/run.py)")
    parser.add_argument("--out", default="lora_vs_peft.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["BENCH_THREADS"] = str(args.threads)
    started = time.perf_counter()
    results = [bench(name, args) for name in args.models.split(",")]
    print(table(results))
    summary = {"torch": torch.__version__, "threads": args.threads, "device": args.device,
               "seconds": round(time.perf_counter() - started, 1), "results": results}
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out} ({summary['seconds']} s)")


if __name__ == "__main__":
    main()
