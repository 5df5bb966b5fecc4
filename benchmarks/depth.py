"""Apply time against depth: `surgery.apply(model, "specs/lora.yaml")` on LLaMA-7B, LLaMA-70B and Mixtral-8x7B
shapes built on the meta device, side by side with PEFT's `get_peft_model` (LoRA on q_proj and v_proj) in the
same process, with the full export (`SURGERY_FULL_TRACE=1`, every layer traced) as the before figure.

    python benchmarks/depth.py [--models llama7b llama70b mixtral] [--json out.json]

Each model runs in a fresh interpreter with one intra-op thread (with bytecode caching on, as an installed package
runs): PEFT first, then surgery (which pays the process's first torch.export: torch imports its export machinery
then, about 0.15 s), then surgery again on a fresh model of the same shape (`second`: the process cache cleared, so
it traces again), then, on another fresh model, surgery with the full export; a full
garbage collection before each (otherwise one collection of the objects torch and transformers made at import,
about 0.3 s, lands in whichever step happens to trigger it). Times are process CPU seconds (on a machine shared
with other jobs the CPU time is what the wall time would be on an idle one), the median of `--repeats` fresh
processes. Peak RSS is the process's high-water mark (VmHWM) after surgery's apply, before the full-export run.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SHAPES = {
    "llama7b": ("LLaMA-7B", "LlamaConfig", "LlamaForCausalLM",
                dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000)),
    "llama70b": ("LLaMA-70B", "LlamaConfig", "LlamaForCausalLM",
                 dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, vocab_size=32000)),
    "mixtral": ("Mixtral-8x7B", "MixtralConfig", "MixtralForCausalLM",
                dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000)),
}


def build(name: str):
    import torch
    import transformers
    _, config_name, model_name, config = SHAPES[name]
    with torch.device("meta"):
        return getattr(transformers, model_name)(getattr(transformers, config_name)(**config))


def _rss_peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(name: str) -> dict:
    """One model shape in this (fresh) process."""
    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(ROOT))
    os.environ["SURGERY_CACHE"] = "0"     # every apply traces (the on-disk cache would answer the later ones)
    import torch
    torch.set_num_threads(1)
    from peft import LoraConfig, get_peft_model
    import surgery
    import surgery.api  # noqa: F401 - `surgery.apply` imports its module on first use: an import, outside the clock

    model = build(name)
    gc.collect()
    cpu = time.process_time()
    get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    peft = time.process_time() - cpu
    model = build(name)
    gc.collect()
    cpu = time.process_time()
    surgery.apply(model, ROOT / "specs" / "lora.yaml")
    ours = time.process_time() - cpu
    rss = _rss_peak_mib()
    sites = len(surgery.plan(model, ROOT / "specs" / "lora.yaml"))
    model = build(name)
    surgery.api._STRUCTURE_CACHE.clear()     # the process cache would answer for a model of the same shape
    gc.collect()
    cpu = time.process_time()
    surgery.apply(model, ROOT / "specs" / "lora.yaml")
    second = time.process_time() - cpu
    model = build(name)
    surgery.api._STRUCTURE_CACHE.clear()
    os.environ["SURGERY_FULL_TRACE"] = "1"
    gc.collect()
    cpu = time.process_time()
    surgery.apply(model, ROOT / "specs" / "lora.yaml")
    full = time.process_time() - cpu
    return {"model": SHAPES[name][0], "layers": SHAPES[name][3]["num_hidden_layers"], "sites": sites,
            "peft_cpu_s": peft, "surgery_cpu_s": ours, "second_cpu_s": second, "full_trace_cpu_s": full,
            "peak_rss_mib": rss}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per model (the median is shown)")
    parser.add_argument("--json", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = []
    for name in args.models:
        runs = []
        for _ in range(args.repeats):
            code = f"import json, benchmarks.depth as d; print(json.dumps(d.child({name!r})))"
            out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                                 env={**{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
                                      "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        row = dict(runs[0])
        for key in ("peft_cpu_s", "surgery_cpu_s", "second_cpu_s", "full_trace_cpu_s", "peak_rss_mib"):
            row[key] = statistics.median(r[key] for r in runs)
        row["runs"] = runs
        rows.append(row)
    base = next((r for r in rows if r["model"] == "LLaMA-7B"), None)
    print(f"{'model':14} {'layers':>6} {'sites':>5} {'PEFT (s)':>9} {'surgery (s)':>11} {'x PEFT':>7} "
          f"{'x 7B':>5} {'second (s)':>10} {'x PEFT':>7} {'x 7B':>5} {'full export (s)':>15} {'peak RSS (MiB)':>14}")
    for r in rows:
        vs7b = f"{r['surgery_cpu_s'] / base['surgery_cpu_s']:.2f}" if base else "-"
        second_vs7b = f"{r['second_cpu_s'] / base['second_cpu_s']:.2f}" if base else "-"
        print(f"{r['model']:14} {r['layers']:>6} {r['sites']:>5} {r['peft_cpu_s']:>9.2f} {r['surgery_cpu_s']:>11.2f} "
              f"{r['surgery_cpu_s'] / r['peft_cpu_s']:>7.2f} {vs7b:>5} {r['second_cpu_s']:>10.2f} "
              f"{r['second_cpu_s'] / r['peft_cpu_s']:>7.2f} {second_vs7b:>5} {r['full_trace_cpu_s']:>15.2f} "
              f"{r['peak_rss_mib']:>14.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
