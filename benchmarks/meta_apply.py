"""Apply on big model shapes built on the meta device, side by side with PEFT (issue 20's figures).

    python benchmarks/meta_apply.py [--shapes llama7b,llama70b,mixtral] [--repeats 2] [--sweep] [--out f.json]

Shapes (transformers configs, weights on the meta device, so no memory for them): the LLaMA-7B shape (hidden 4096,
32 layers, FFN 11008, 32 heads), the LLaMA-70B shape (hidden 8192, 80 layers, FFN 28672, 64 heads, 8 KV heads)
and the Mixtral-8x7B shape (hidden 4096, 32 layers, 8 experts of FFN 14336, top 2, 8 KV heads).

Each figure is one call in a fresh interpreter with one intra-op thread (benchmarks/common.py: in_subprocess), so
nothing is cached from an earlier run: `surgery.apply(model, "specs/lora.yaml")` (trace, analysis, match, rewrite)
against PEFT's `get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]))` on the
same shape (the same sites: checked by count). Time is the process CPU time of that call alone: the imports
(`surgery.api`, `peft`), the model's construction and a full garbage collection are before it; what a first call
imports by itself (torch its export machinery on the process's first torch.export, about 0.15 s) is inside. `next`:
the same, after one apply of the same method to a small model in that process (the second apply in a process). The
median over `--repeats` processes per side, surgery and PEFT alternating; peak RSS is the process's high-water mark
(VmHWM) after the call, and its rise above the RSS before the call. The on-disk trace cache is off for these
(SURGERY_CACHE=0); `warm` is the 7B apply in a process that finds the model's trace in the cache
(surgery/trace/cache.py) written by the process before it.

`--sweep`: every shipped spec on the 7B shape, each in its own fresh process (trace included), against PEFT's
LoRA time of the same run (what `benchmarks/meta_sweep.py` lists in one process, where only the first spec
pays the trace).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {
    "llama7b": ("LLaMA-7B shape (32 layers)", "llama",
                dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000)),
    "llama70b": ("LLaMA-70B shape (80 layers, 8 KV heads)", "llama",
                 dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, vocab_size=32000)),
    "mixtral": ("Mixtral-8x7B shape (32 layers, 8 experts)", "mixtral",
                dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000)),
}
PEFT_TARGETS = ["q_proj", "v_proj"]


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build(shape: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM
    _, family, config = SHAPES[shape]
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if family == "llama" else (MixtralConfig, MixtralForCausalLM)
    with torch.device("meta"):
        return model_cls(config_cls(**config))


def _small_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                            num_attention_heads=4, vocab_size=128))


def apply_child(shape: str, method: str, spec: str = "specs/lora.yaml", cache_dir: str | None = None,
                after_one: bool = False) -> dict:
    """In a fresh process: build `shape` on meta, then time one apply by `method` (surgery or peft).
    `after_one`: first apply the same method once to a small LLaMA (4 layers, hidden 64) in this process, so
    the timed call is a process's second apply: without the one-time work of the first (torch importing its
    export machinery on its first torch.export, about 0.15 s here; each library's own lazy imports)."""
    import warnings
    warnings.filterwarnings("ignore")
    if cache_dir:
        os.environ.update(SURGERY_CACHE="1", SURGERY_CACHE_DIR=cache_dir)
    else:
        os.environ["SURGERY_CACHE"] = "0"
    import logging
    import surgery
    import surgery.api  # noqa: F401 - `surgery.apply` imports its module on first use: an import, outside the clock
    import peft     # in both arms: the same objects in the process (a full collection's cost and threshold)
    if after_one:
        if method == "surgery":
            surgery.apply(_small_llama(), spec)
        else:
            peft.get_peft_model(_small_llama(), peft.LoraConfig(r=8, lora_alpha=8, target_modules=PEFT_TARGETS))
    model = build(shape)
    messages = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())
    logger = logging.getLogger("surgery")
    logger.addHandler(Collect())
    logger.setLevel(logging.INFO)
    # a full collection first, in both arms: otherwise one pass of Python's collector over everything torch and
    # transformers made at import (0.25-0.3 s) lands in whichever timed call happens to cross its threshold
    import gc
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss_mib("VmRSS")
    wall, cpu = time.perf_counter(), time.process_time()
    if method == "surgery":
        surgery.apply(model, spec)
        cpu_s, wall_s = time.process_time() - cpu, time.perf_counter() - wall
        sites = len(model.surgery_adapters.records["default"].weight_sites) or None
        trainable = surgery.trainable_parameters(model)[0]
    else:
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0,
                                                           target_modules=PEFT_TARGETS))
        cpu_s, wall_s = time.process_time() - cpu, time.perf_counter() - wall
        sites = sum(1 for n, _ in model.named_modules() if n.endswith("lora_A.default"))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    peak = _rss_mib("VmHWM")
    return {"shape": shape, "method": method, "spec": spec, "cpu": cpu_s, "wall": wall_s, "sites": sites,
            "trainable": trainable, "peak_rss_mib": peak, "rss_rise_mib": peak - before,
            "traced": any("torch.export" in m for m in messages),
            "from_cache": any("read from the cache" in m for m in messages)}


def _run(**kwargs) -> dict:
    from benchmarks.common import in_subprocess
    return in_subprocess("benchmarks.meta_apply:apply_child", timeout=1800, **kwargs)


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def compare(shape: str, repeats: int = 2) -> dict:
    """surgery vs PEFT LoRA q,v on `shape`, `repeats` fresh processes each, alternating: the first apply in a
    process, and (`next_*`) the second (after one on a small model, see apply_child)."""
    runs = {"surgery": [], "peft": [], "surgery_next": [], "peft_next": []}
    for i in range(repeats):
        for method in (("surgery", "peft") if i % 2 == 0 else ("peft", "surgery")):
            runs[method].append(_run(shape=shape, method=method))
            runs[method + "_next"].append(_run(shape=shape, method=method, after_one=True))
    s, p = runs["surgery"], runs["peft"]
    if s[0]["sites"] != p[0]["sites"] or s[0]["trainable"] != p[0]["trainable"]:
        raise AssertionError(f"{shape}: surgery and PEFT adapt different sites: {s[0]} vs {p[0]}")
    sn, pn = runs["surgery_next"], runs["peft_next"]
    return {"shape": shape, "label": SHAPES[shape][0], "sites": s[0]["sites"], "trainable": s[0]["trainable"],
            "surgery_cpu": _median(s, "cpu"), "peft_cpu": _median(p, "cpu"),
            "surgery_wall": _median(s, "wall"), "peft_wall": _median(p, "wall"),
            "ratio": _median(s, "cpu") / _median(p, "cpu"),
            "next_surgery_cpu": _median(sn, "cpu"), "next_peft_cpu": _median(pn, "cpu"),
            "next_ratio": _median(sn, "cpu") / _median(pn, "cpu"),
            "surgery_peak_rss_mib": max(r["peak_rss_mib"] for r in s),
            "surgery_rss_rise_mib": max(r["rss_rise_mib"] for r in s),
            "peft_peak_rss_mib": max(r["peak_rss_mib"] for r in p), "runs": runs}


def warm(shape: str = "llama7b") -> dict:
    """The apply in a new process that finds the trace in the on-disk cache (a first process writes it)."""
    with tempfile.TemporaryDirectory() as directory:
        cold = _run(shape=shape, method="surgery", cache_dir=directory)
        hot = _run(shape=shape, method="surgery", cache_dir=directory)
    assert cold["traced"] and hot["from_cache"] and not hot["traced"], (cold, hot)
    return {"shape": shape, "cold_cpu": cold["cpu"], "warm_cpu": hot["cpu"], "warm_peak_rss_mib": hot["peak_rss_mib"]}


def sweep(peft_cpu: float | None = None) -> dict:
    """Every shipped spec on the 7B shape, each in a fresh process (trace included), vs PEFT's LoRA time."""
    if peft_cpu is None:
        peft_cpu = _run(shape="llama7b", method="peft")["cpu"]
    rows = []
    for path in sorted((ROOT / "specs").glob("*.yaml")):
        try:
            r = _run(shape="llama7b", method="surgery", spec=str(path.relative_to(ROOT)))
            rows.append({"spec": path.name, "cpu": r["cpu"], "wall": r["wall"], "vs_peft_lora": r["cpu"] / peft_cpu,
                         "peak_rss_mib": r["peak_rss_mib"], "trainable": r["trainable"]})
        except RuntimeError as exc:   # a spec that does not apply to a LLaMA (e.g. diffusion_lora): say so
            last = [line for line in str(exc).splitlines() if line.strip()][-1]
            rows.append({"spec": path.name, "error": last[:200]})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    timed = [r for r in rows if "cpu" in r]
    slowest = max(timed, key=lambda r: r["cpu"])
    one = _run_sweep_child()
    for r in one["rows"]:
        if "cpu_seconds" in r:
            r["vs_peft_lora"] = r["cpu_seconds"] / peft_cpu
    one["slowest"] = max((r for r in one["rows"] if "cpu_seconds" in r), key=lambda r: r["cpu_seconds"])
    return {"peft_lora_cpu": peft_cpu, "rows": rows, "slowest": slowest, "one_process": one}


def sweep_child() -> dict:
    """benchmarks/meta_sweep.py's sweep in this (fresh) process, with the trace paid before the first spec:
    each row is what that spec's apply costs once the model's analysis exists."""
    os.environ["SURGERY_CACHE"] = "0"
    import surgery
    from benchmarks.meta_sweep import apply_row, meta_llama_7b
    model = meta_llama_7b()
    cpu = time.process_time()
    surgery.plan(model, ROOT / "specs" / "lora.yaml")
    trace_cpu = time.process_time() - cpu
    return {"trace_cpu": trace_cpu, "rows": [apply_row(model, path) for path in sorted((ROOT / "specs").glob("*.yaml"))]}


def _run_sweep_child() -> dict:
    from benchmarks.common import in_subprocess
    return in_subprocess("benchmarks.meta_apply:sweep_child", timeout=1800)


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def bench(shapes=("llama7b", "llama70b", "mixtral"), repeats: int = 2, with_sweep: bool = False,
          with_warm: bool = True) -> dict:
    os.environ.setdefault("BENCH_THREADS", "1")
    result = {"commit": commit(), "shapes": [compare(s, repeats) for s in shapes]}
    if with_warm:
        result["warm"] = warm()
    if with_sweep:
        seven = next((r for r in result["shapes"] if r["shape"] == "llama7b"), None)
        result["sweep"] = sweep(seven["peft_cpu"] if seven else None)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per side and shape")
    parser.add_argument("--sweep", action="store_true", help="also every shipped spec on the 7B shape")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    result = bench(args.shapes.split(","), args.repeats, args.sweep)
    for r in result["shapes"]:
        print(f"{r['label']:<44} surgery {r['surgery_cpu']:6.2f} s  PEFT {r['peft_cpu']:5.2f} s  "
              f"= {r['ratio']:5.1f}x  ({r['sites']} sites; peak RSS {r['surgery_peak_rss_mib']:.0f} / "
              f"{r['peft_peak_rss_mib']:.0f} MiB)")
        print(f"{'  the second apply in a process':<44} surgery {r['next_surgery_cpu']:6.2f} s  PEFT "
              f"{r['next_peft_cpu']:5.2f} s  = {r['next_ratio']:5.1f}x")
    if "warm" in result:
        w = result["warm"]
        print(f"7B, trace read from the on-disk cache: {w['warm_cpu']:.2f} s (cold {w['cold_cpu']:.2f} s)")
    if "sweep" in result:
        one = result["sweep"]["one_process"]
        print(f"every shipped spec on the 7B shape, one process (trace {one['trace_cpu']:.2f} s first), "
              f"and each in a fresh process (trace included):")
        fresh = {r["spec"]: r for r in result["sweep"]["rows"]}
        for r in one["rows"]:
            f = fresh.get(r["spec"], {})
            print(f"  {r['spec']:<22} " + (f"{r['cpu_seconds']:6.3f} s = {r['vs_peft_lora']:4.1f}x PEFT LoRA; fresh "
                                            f"{f['cpu']:5.2f} s = {f['vs_peft_lora']:4.1f}x"
                                            if "cpu_seconds" in r and "cpu" in f
                                            else f"error: {r.get('error') or f.get('error')}"))
    print(f"commit {result['commit']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
