"""Matcher time per pattern on a 200-layer LLaMA-shaped graph built on the meta device.

    python benchmarks/matcher.py [--layers 200] [--repeats 5]

The model is traced and analyzed once (`surgery.api._analysis` caches the analysis on the model; tracing 200
layers is most of this benchmark's time); then `surgery.match.match_rule` is timed for every rule of several
shipped specs (role patterns, `from` sources, `match: {}` over every node) and of patterns written here for
layer slices, module globs and op patterns with input sub-patterns. Each figure is the median process CPU time
of `repeats` calls after one warm-up call, with the garbage collector off during the timed calls (as timeit
does); the first call of all also builds the node -> sites index and is reported on its own.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import surgery  # noqa: E402
from benchmarks.common import ROOT, stopwatch  # noqa: E402
from surgery.errors import MatchError  # noqa: E402
from surgery.match.pattern import match_rule  # noqa: E402

SPEC_FILES = ["lora", "ia3", "houlsby", "parallel", "unipelt", "loreft", "ln_tuning", "bitfit", "top_layers"]


def _patterns(layers: int) -> list[tuple[str, dict]]:
    """(what it exercises, rule), written against LLaMA's module names and roles."""
    spread = sorted({0, layers // 4, layers // 2, layers - 1})
    return [
        ("layer slice", {"match": {"role": ["attention.q", "attention.v"], "layers": "-8:"}, "action": "wrap",
                         "module": {"kind": "lora"}, "expect": "every_layer"}),
        ("layer list", {"match": {"role": "ffn.out", "layers": spread}, "action": "wrap",
                        "module": {"kind": "lora"}, "expect": len(spread)}),
        ("module glob", {"match": {"module": "model.layers.*.mlp.down_proj", "op": "linear"}, "action": "wrap",
                         "module": {"kind": "lora"}}),
        ("module glob ?_proj", {"match": {"module": "*.self_attn.[qkv]_proj", "op": "linear"}, "action": "wrap",
                                "module": {"kind": "lora"}}),
        ("module glob, no op", {"match": {"module": "*.mlp.*"}, "action": "wrap", "module": {"kind": "lora"},
                                "expect": "any"}),
        ("op + inputs", {"match": {"op": "add", "inputs": [{"role": "attention.residual"}, {"role": "attention.output"}]},
                         "action": "insert_after", "module": {"kind": "bottleneck"}, "expect": "any"}),
        ("op + inputs, op sub-pattern", {"match": {"op": "mul", "inputs": [{"op": "silu"}, {"role": "ffn.in"}]},
                                         "action": "insert_after", "module": {"kind": "bottleneck"},
                                         "expect": "every_layer"}),
        ("op + inputs through + bind", {"match": {"op": "scaled_dot_product_attention",
                                                  "inputs": [{"op": "add", "bind": "q"}, {"op": "add", "through": True},
                                                             {"role": "attention.v", "through": True}]},
                                        "action": "insert_after", "module": {"kind": "bottleneck"},
                                        "expect": "every_layer"}),
    ]


def llama_meta(layers: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1376, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def _rules(layers: int):
    for name in SPEC_FILES:
        spec = surgery.load_spec(ROOT / "specs" / f"{name}.yaml")
        for i, rule in enumerate(spec.rules):
            yield f"{name}.yaml: {rule.name or i}", rule, i, spec.name
    for label, rule in _patterns(layers):
        yield label, surgery.Spec.model_validate({"rules": [rule]}).rules[0], 0, None


def time_rule(rule, index, analysis, spec_name, repeats: int) -> tuple[list, list[float]]:
    """Seconds per match_rule call, with the garbage collector off as timeit has it: a collection walks the
    whole heap (here mostly the traced 200-layer graph), which is the trace's cost, not the matcher's."""
    matches = match_rule(rule, index, analysis, spec_name)      # warm-up
    seconds = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            start = time.process_time()
            match_rule(rule, index, analysis, spec_name)
            seconds.append(time.process_time() - start)
    finally:
        gc.enable()
    return matches, seconds


def bench(layers: int = 200, repeats: int = 5) -> dict:
    model = llama_meta(layers)
    with stopwatch() as trace_time:
        analysis = surgery.api._analysis(model, None)
    rows, first = [], None
    for label, rule, index, spec_name in _rules(layers):
        if first is None:
            start = time.perf_counter()
            match_rule(rule, index, analysis, spec_name)
            first = time.perf_counter() - start
        try:
            matches, seconds = time_rule(rule, index, analysis, spec_name, repeats)
        except MatchError as exc:
            rows.append({"pattern": label, "error": str(exc).splitlines()[0]})
            continue
        rows.append({"pattern": label, "match": rule.match.model_dump(exclude_none=True, exclude_defaults=True),
                     "sites": len(matches), "layers_hit": len({m.layer for m in matches}),
                     "median_ms": statistics.median(seconds) * 1e3, "max_ms": max(seconds) * 1e3})
    timed = [r["median_ms"] for r in rows if "median_ms" in r]
    return {"layers": layers, "graph_nodes": len(analysis.traced.graph.nodes), "sites": len(analysis.sites),
            "trace_analyze_s": trace_time, "first_call_ms": first * 1e3, "rows": rows,
            "worst_median_ms": max(timed), "repeats": repeats}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    result = bench(args.layers, args.repeats)
    print(f"{result['layers']} layers, {result['graph_nodes']} graph nodes, {result['sites']} sites; trace + analyze "
          f"{result['trace_analyze_s']['wall']:.1f} s wall ({result['trace_analyze_s']['cpu']:.1f} s CPU)")
    for r in result["rows"]:
        if "error" in r:
            print(f"  {r['pattern']:38} error: {r['error']}")
        else:
            print(f"  {r['pattern']:38} {r['sites']:5} sites {r['median_ms']:9.2f} ms")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
