"""Apply time (trace + analyze + match + rewrite) of a spec on the real MiniLM, on a LLaMA-shaped model (hidden
512, from a config) and on a LLaMA-7B-shaped model built on the meta device, with the 7B run's peak RSS.

    python benchmarks/apply_time.py [--spec specs/houlsby.yaml] [--repeats 3]

Each figure is the median over fresh models (a new model each run, so no cached analysis), with the stages
timed separately: trace (torch.export), analyze (roles), and match + rewrite (`surgery.apply` reusing that
analysis); the total is their sum. Wall and process CPU seconds are both kept: apply is single-threaded
Python, so on a machine shared with other jobs its CPU time is what the wall time would be on an idle one.
Each 7B run is in a fresh process: peak RSS is that process's high-water mark (VmHWM) and its rise during
apply (the weights are on the meta device, so it measures surgery and torch.export, not the model).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
warnings.filterwarnings("ignore")
os.environ.setdefault("SURGERY_CACHE", "0")   # measure the trace, not a read of the on-disk cache

import surgery  # noqa: E402
from benchmarks.common import in_subprocess, peak_memory, stopwatch  # noqa: E402
from surgery.analyze import analyze  # noqa: E402
from surgery.api import _MODEL_CACHE  # noqa: E402
from surgery.trace import trace  # noqa: E402

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000)


def minilm():
    from models import make_minilm
    return make_minilm().eval()


def llama_512():
    from benchmarks.lora_vs_peft import build
    return build("llama").eval()


def llama_7b_meta():
    from transformers import LlamaConfig, LlamaForCausalLM
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**LLAMA_7B))


MODELS = {"minilm": ("MiniLM (real, 6 layers)", minilm),
          "llama512": ("LLaMA hidden 512, 2 layers", llama_512),
          "llama7b": ("LLaMA-7B shape (meta)", llama_7b_meta)}


def apply_once(model, spec) -> dict:
    """Apply `spec` to a fresh `model` stage by stage: {stage: {"wall": s, "cpu": s}}, and the site count."""
    with stopwatch() as traced_time:
        traced = trace(model, None)
    with stopwatch() as analyzed_time:
        analysis = analyze(traced)
    _MODEL_CACHE[model] = analysis                           # what surgery.apply would have cached
    with stopwatch() as rewrite_time:
        surgery.apply(model, spec)
    stages = {"trace": traced_time, "analyze": analyzed_time, "match_rewrite": rewrite_time}
    total = {k: sum(s[k] for s in stages.values()) for k in ("wall", "cpu")}
    return {"stages": stages, "total": total, "sites": len(surgery.plan(model, spec))}


def _median_runs(runs: list[dict]) -> dict:
    def med(get):
        return statistics.median(get(r) for r in runs)
    return {"total": {k: med(lambda r: r["total"][k]) for k in ("wall", "cpu")},
            "stages": {s: {k: med(lambda r: r["stages"][s][k]) for k in ("wall", "cpu")} for s in runs[0]["stages"]},
            "sites": runs[0]["sites"], "runs": len(runs)}


def apply_time(model: str, spec: str = "specs/houlsby.yaml", repeats: int = 3) -> dict:
    label, factory = MODELS[model]
    runs = [apply_once(factory(), spec) for _ in range(repeats)]
    return {"model": label, "spec": spec, **_median_runs(runs)}


def apply_7b_child(spec: str = "specs/houlsby.yaml") -> dict:
    """One 7B-shaped meta apply in this (fresh) process, with its peak RSS."""
    model = llama_7b_meta()
    with peak_memory("cpu") as memory:
        run = apply_once(model, spec)
    return {**run, "rss_rise_mib": memory["peak_mib"], "process_peak_rss_mib": memory["process_peak_mib"]}


def apply_time_7b(spec: str = "specs/houlsby.yaml", repeats: int = 1) -> dict:
    runs = [in_subprocess("benchmarks.apply_time:apply_7b_child", spec=spec) for _ in range(repeats)]
    return {"model": MODELS["llama7b"][0], "spec": spec, **_median_runs(runs),
            "process_peak_rss_mib": max(r["process_peak_rss_mib"] for r in runs),
            "rss_rise_mib": max(r["rss_rise_mib"] for r in runs)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="specs/houlsby.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = [apply_time(m, args.spec, args.repeats) for m in ("minilm", "llama512")]
    rows.append(apply_time_7b(args.spec, max(1, args.repeats // 2)))
    print(f"{'model':28} {'sites':>5} {'wall (s)':>9} {'CPU (s)':>8}  trace / analyze / match+rewrite CPU (s)")
    for r in rows:
        s = r["stages"]
        print(f"{r['model']:28} {r['sites']:>5} {r['total']['wall']:>9.2f} {r['total']['cpu']:>8.2f}  "
              f"{s['trace']['cpu']:.2f} / {s['analyze']['cpu']:.2f} / {s['match_rewrite']['cpu']:.2f}")
    print(f"7B apply: peak RSS of its process {rows[-1]['process_peak_rss_mib']:.0f} MiB "
          f"(rise during apply {rows[-1]['rss_rise_mib']:.0f} MiB)")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
