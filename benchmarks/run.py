"""Every benchmark group in one run, one table, one JSON file.

    python -m benchmarks [--device cpu|cuda] [--groups apply,lora_train,...] [--out benchmarks.json]

Groups (each module also runs alone: `python benchmarks/<module>.py --help`):
  apply          trace + analyze + match + rewrite on the real MiniLM, a LLaMA-shaped model (hidden 512) and a
                 LLaMA-7B-shaped model on the meta device with its peak RSS (apply_time.py; always on CPU)
  lora_train     train step, LoRA q,v r=8: surgery vs PEFT, same model, inputs and dtype (lora_vs_peft.py)
  houlsby_train  train step, Houlsby: surgery vs the hand-written eager model of tests/reference.py
  inference      forward of the base, the unmerged and the merged model, LoRA and IA3 (inference_merge.py)
  memory         peak memory of train steps, surgery vs PEFT, a fresh process per method (lora_vs_peft.py)
  matcher        match_rule time per pattern on a 200-layer LLaMA-shaped graph on meta (matcher.py)
  decode         time per generated token with the KV cache, base and a few specs (decode.py, run as a script)
  mixed_batch    4 LoRA adapters over 16 rows routed 4/4/4/4 in one call vs 4 calls of 4 rows, and vs PEFT's
                 adapter_names=[...]: generate() with the KV cache and a full forward (mixed_batch.py)
  meta_apply     apply of specs/lora.yaml on the LLaMA-7B, LLaMA-70B and Mixtral-8x7B shapes on meta vs PEFT's
                 get_peft_model, a fresh process each, peak RSS; the 7B apply with the trace read from the
                 on-disk cache; every shipped spec on the 7B shape (meta_apply.py; always on CPU)

Comparisons are interleaved and reported as the median of per-round ratios (benchmarks/common.py). Threads:
one intra-op thread by default on CPU. On a 2-core machine shared with other jobs, two threads wait on each
other at every op's barrier: a forward then takes 3-7x longer and varies 3x from run to run, which swamps the
ratios; with one thread the ratios are stable. `--threads 2` on an idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GROUPS = ("apply", "lora_train", "houlsby_train", "inference", "memory", "matcher", "decode", "mixed_batch",
          "meta_apply")
GOALS = {"train_vs_peft": 1.00, "houlsby_vs_reference": 1.05, "merged_vs_base": 1.02, "minilm_apply_s": 3.0,
         "apply_7b_s": 10.0, "apply_7b_rss_mib": 1024.0, "matcher_ms": 50.0, "mixed_vs_separate": 0.6,
         "mixed_vs_peft_mixed": 1.0,
         # issue 20: apply on meta shapes against PEFT's get_peft_model in the same run
         "meta_7b_vs_peft": 2.0, "meta_7b_rss_mib": 600.0, "meta_depth_vs_7b": 1.3, "meta_sweep_vs_peft": 3.0}


def _verdict(value: float, goal: float, iqr=None) -> str:
    """met: the median is within the goal. A ratio above it whose interquartile range still reaches the goal is
    "within noise" (this run cannot tell); above it with the whole IQR: MISSED."""
    if value <= goal:
        return "met"
    if iqr is not None and iqr[0] <= goal:
        return "within noise"
    return "MISSED"


def _all_goals(*figures: tuple[str, str]) -> str:
    """One verdict for a row with several goal figures: the worst of them, naming the figures that fall short
    (a row reads "met" only when every figure in it is)."""
    for level in ("MISSED", "within noise"):
        short = [name for name, verdict in figures if verdict == level]
        if short:
            return f"{level} ({', '.join(short)})" if len(figures) > 1 else level
    return "met"


def _ratio_cell(seconds: dict, a: str, b: str, ratio: float, iqr) -> str:
    return (f"{seconds[a] * 1e3:.1f} / {seconds[b] * 1e3:.1f} ms = {ratio:.3f}x "
            f"[IQR {iqr[0]:.2f}-{iqr[1]:.2f}]")


def _ops_cell(ops: dict) -> str:
    """Aten op counts of one call each: equal, or the ops where they differ."""
    if not ops["diff"]:
        return f"same {ops['a_ops']} aten ops"
    diff = ", ".join(f"{op.removeprefix('aten::')} {n:+d}" for op, n in ops["diff"].items())
    return f"aten ops {ops['a_ops']} vs {ops['b_ops']}: {diff}"


# ------------------------------------------------------------------------------------------------- groups
# Each returns (raw results for the JSON, table rows: (group, case, figure, goal, verdict)).

def group_apply(args):
    from benchmarks.apply_time import apply_time, apply_time_7b
    results = [apply_time("minilm", repeats=args.apply_repeats), apply_time("llama512", repeats=args.apply_repeats),
               apply_time_7b(repeats=args.apply_7b_repeats)]
    rows = []
    for r, goal in zip(results, (GOALS["minilm_apply_s"], None, GOALS["apply_7b_s"])):
        cpu, s = r["total"]["cpu"], r["stages"]
        figure = (f"{cpu:.2f} s CPU ({r['total']['wall']:.2f} s wall); trace {s['trace']['cpu']:.2f}, "
                  f"analyze {s['analyze']['cpu']:.2f}, match+rewrite {s['match_rewrite']['cpu']:.2f}")
        rows.append(("apply", f"{r['model']}, houlsby ({r['sites']} sites)", figure,
                     f"<= {goal:.0f} s" if goal else "", _verdict(cpu, goal) if goal else ""))
    big = results[-1]
    rows.append(("apply", "LLaMA-7B shape (meta): peak RSS of the process",
                 f"{big['process_peak_rss_mib']:.0f} MiB (rise during apply {big['rss_rise_mib']:.0f} MiB)",
                 "<= 1 GiB", _verdict(big["process_peak_rss_mib"], GOALS["apply_7b_rss_mib"])))
    return results, rows


def group_lora_train(args):
    from benchmarks.lora_vs_peft import SHAPES, train_step
    results = [train_step(m, warmup=args.warmup, repeats=args.train_repeats * rounds, device=args.device)
               for m, rounds in (("minilm", 1), ("llama", 2))]      # the LLaMA step is 4x cheaper: more rounds
    rows = [("train step LoRA q,v r=8", f"{r['model']} {SHAPES[r['model']][0]}x{SHAPES[r['model']][1]}: surgery / PEFT",
             _ratio_cell(r["seconds"], "surgery", "peft", r["ratio"], r["ratio_iqr"]) + "; " + _ops_cell(r["ops_per_step"]),
             "<= 1.00x", _verdict(r["ratio"], GOALS["train_vs_peft"], r["ratio_iqr"])) for r in results]
    return results, rows


def group_houlsby_train(args):
    from benchmarks.houlsby_vs_reference import houlsby_train_step
    results = [houlsby_train_step("small", warmup=args.warmup, repeats=args.train_repeats * 10, device=args.device),
               houlsby_train_step("medium", warmup=args.warmup, repeats=args.train_repeats, device=args.device)]
    rows = [("train step Houlsby", f"MiniGPT {r['size']} (hidden {r['hidden_dim']}, {r['n_layers']} layers, "
             f"{r['batch']}x{r['seq']}): surgery / hand-written",
             _ratio_cell(r["seconds"], "surgery", "reference", r["ratio"], r["ratio_iqr"]) + "; "
             + _ops_cell(r["ops_per_step"]) + "; Python calls {surgery} vs {reference}".format(**r["python_calls_per_step"]),
             "<= 1.05x", _verdict(r["ratio"], GOALS["houlsby_vs_reference"], r["ratio_iqr"])) for r in results]
    return results, rows


def group_inference(args):
    from benchmarks.inference_merge import merged_inference
    results = [merged_inference(m, k, warmup=args.warmup, repeats=args.infer_repeats, device=args.device)
               for m in ("minilm", "llama") for k in ("lora", "ia3")]
    rows = []
    for r in results:
        s = r["seconds"]
        shape = "x".join(map(str, r["batch"]))
        rows.append(("inference", f"{r['model']} {shape} {r['method']}: merged / base",
                     _ratio_cell(s, "merged", "base", r["merged_vs_base"], r["merged_vs_base_iqr"]) + "; "
                     + _ops_cell(r["merged_vs_base_ops"]),
                     "<= 1.02x", _verdict(r["merged_vs_base"], GOALS["merged_vs_base"], r["merged_vs_base_iqr"])))
        rows.append(("inference", f"{r['model']} {shape} {r['method']}: unmerged / base",
                     f"{s['unmerged'] * 1e3:.1f} / {s['base'] * 1e3:.1f} ms = {r['unmerged_vs_base']:.3f}x",
                     "", ""))
    return results, rows


def group_memory(args):
    from benchmarks.lora_vs_peft import train_memory_both
    results = [train_memory_both(m, steps=args.memory_steps, device=args.device) for m in ("minilm", "llama")]
    rows = []
    for r in results:
        rss = (f"RSS rise over {r['steps']} steps {r['peak_mib']['surgery']:.1f} / {r['peak_mib']['peft']:.1f} MiB "
               f"= {r['ratio']:.3f}x")
        if "allocator_ratio" in r:
            a = r["allocator_peak_mib"]
            rows.append(("peak train memory", f"{r['model']} LoRA q,v: surgery / PEFT",
                         f"torch allocator peak of a step {a['surgery']:.2f} / {a['peft']:.2f} MiB = "
                         f"{r['allocator_ratio']:.3f}x; {rss}", "<= 1.00x (both)",
                         _all_goals(("allocator", _verdict(r["allocator_ratio"], 1.0)),
                                    ("RSS", _verdict(r["ratio"], 1.0)))))
        else:
            rows.append(("peak train memory", f"{r['model']} LoRA q,v: surgery / PEFT",
                         f"max_memory_allocated {r['peak_mib']['surgery']:.1f} / {r['peak_mib']['peft']:.1f} MiB "
                         f"= {r['ratio']:.3f}x", "<= 1.00x", _verdict(r["ratio"], 1.0)))
    return results, rows


def group_matcher(args):
    from benchmarks.matcher import bench
    result = bench(args.matcher_layers, args.matcher_repeats)
    timed = [r for r in result["rows"] if "median_ms" in r]
    worst = max(timed, key=lambda r: r["median_ms"])
    rows = [("matcher", f"{result['layers']} layers ({result['graph_nodes']} nodes): {len(timed)} patterns, worst",
             f"{worst['median_ms']:.2f} ms ({worst['pattern']}, {worst['sites']} sites); first call "
             f"{result['first_call_ms']:.1f} ms", "<= 50 ms", _verdict(worst["median_ms"], GOALS["matcher_ms"]))]
    rows += [("matcher", f"  {r['pattern']}", f"{r['median_ms']:.2f} ms, {r['sites']} sites" if "median_ms" in r
              else f"error: {r['error']}", "", "") for r in result["rows"]]
    return result, rows


def group_decode(args):
    """benchmarks/decode.py (its own script) in a subprocess, a few specs; its printed rows parsed."""
    import re
    import subprocess
    command = [sys.executable, str(Path(__file__).with_name("decode.py")), "--specs", *args.decode_specs.split(","),
               "--new-tokens", "32", "--rounds", "6", "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    pattern = re.compile(r"^(\S+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x\s+(flat|GROWS)(.*)$")
    parsed = [m.groups() for m in map(pattern.match, done.stdout.splitlines()) if m]
    if not parsed:
        raise RuntimeError(f"decode.py printed no rows (exit {done.returncode}): {done.stderr[-2000:]}")
    results = {"command": " ".join(command[1:]), "output": done.stdout, "rows": [
        {"variant": v, "first_ms": float(a), "last_ms": float(b), "last_vs_first": float(r), "vs_base": float(x),
         "note": note.strip("; ")} for v, a, b, r, x, _, note in parsed]}
    rows = [("decode with KV cache", f"LLaMA hidden 256, 4 layers: {r['variant']} (first / last 8 tokens)",
             f"{r['first_ms']:.2f} / {r['last_ms']:.2f} ms per token = {r['last_vs_first']:.3f}x; "
             f"{r['vs_base']:.2f}x base" + (f"; {r['note']}" if r["note"] else ""), "last/first < 1.3",
             "met" if r["last_vs_first"] < 1.3 else "MISSED") for r in results["rows"]]
    return results, rows


def group_mixed_batch(args):
    """benchmarks/mixed_batch.py: generate() with prompts of 64 and 128 tokens (32 new), a forward of 64 tokens."""
    from benchmarks import mixed_batch
    results = [mixed_batch.run(seq=64, new_tokens=32, repeats=args.mixed_repeats),
               mixed_batch.run(seq=128, new_tokens=32, repeats=args.mixed_repeats, modes=("generate",))]
    rows = []
    for r in results:
        for mode in ("generate", "forward"):
            if mode not in r:
                continue
            f = r[mode]
            what = f"{r['batch'][1]}+{f['new_tokens']} tokens, KV cache" if mode == "generate" else \
                f"forward of {r['batch'][1]} tokens"
            note = f"; floor (base: 16 rows / 4x4 rows) {f['floor']:.2f}x"
            rows.append(("mixed batch 4 LoRA x 4 rows", f"LLaMA 512: {mode}, {what}: mixed / 4 calls of 4 rows",
                         _ratio_cell(f["seconds"], "mixed", "separate", f["mixed_vs_separate"],
                                     f["mixed_vs_separate_iqr"]) + note, "<= 0.6x",
                         _verdict(f["mixed_vs_separate"], GOALS["mixed_vs_separate"], f["mixed_vs_separate_iqr"])))
            rows.append(("mixed batch 4 LoRA x 4 rows", f"LLaMA 512: {mode}, {what}: mixed / PEFT adapter_names",
                         _ratio_cell(f["seconds"], "mixed", "peft_mixed", f["mixed_vs_peft_mixed"],
                                     f["mixed_vs_peft_mixed_iqr"]), "<= 1.00x",
                         _verdict(f["mixed_vs_peft_mixed"], GOALS["mixed_vs_peft_mixed"],
                                  f["mixed_vs_peft_mixed_iqr"])))
    return results, rows


def group_meta_apply(args):
    from benchmarks.meta_apply import bench
    result = bench(repeats=args.meta_repeats, with_sweep=True)
    return result, meta_apply_rows(result)


def meta_apply_rows(result: dict) -> list[tuple]:
    """The table rows of a meta_apply result (benchmarks/meta_apply.py: bench)."""
    shapes = {r["shape"]: r for r in result["shapes"]}
    seven = shapes["llama7b"]
    rows = []
    for r in result["shapes"]:
        figure = (f"first apply in a process {r['surgery_cpu']:.2f} / {r['peft_cpu']:.2f} s CPU = {r['ratio']:.1f}x, "
                  f"second {r['next_surgery_cpu']:.2f} / {r['next_peft_cpu']:.2f} s = {r['next_ratio']:.1f}x; "
                  f"peak RSS {r['surgery_peak_rss_mib']:.0f} / {r['peft_peak_rss_mib']:.0f} MiB")
        if r is seven:
            goal = f"<= {GOALS['meta_7b_vs_peft']:.0f}x, <= {GOALS['meta_7b_rss_mib']:.0f} MiB"
            verdict = _all_goals(("time", _verdict(r["ratio"], GOALS["meta_7b_vs_peft"])),
                                 ("RSS", _verdict(r["surgery_peak_rss_mib"], GOALS["meta_7b_rss_mib"])))
        else:
            depth = r["surgery_cpu"] / seven["surgery_cpu"]
            figure += (f"; {depth:.2f}x the 7B apply (second: "
                       f"{r['next_surgery_cpu'] / seven['next_surgery_cpu']:.2f}x)")
            goal, verdict = f"<= {GOALS['meta_depth_vs_7b']}x 7B", _verdict(depth, GOALS["meta_depth_vs_7b"])
        rows.append(("apply on meta", f"{r['label']}, lora q,v ({r['sites']} sites): surgery / PEFT", figure, goal,
                     verdict))
    if "warm" in result:
        w = result["warm"]
        rows.append(("apply on meta", "LLaMA-7B shape, trace read from the on-disk cache (new process)",
                     f"{w['warm_cpu']:.2f} s CPU (cold {w['cold_cpu']:.2f} s); {w['warm_cpu'] / seven['peft_cpu']:.1f}x "
                     f"PEFT", "", ""))
    sweep = result.get("sweep")
    if sweep:
        slow, one = sweep["slowest"], sweep["one_process"]
        one_slow = one["slowest"]
        rows.append(("apply on meta", f"LLaMA-7B shape, every shipped spec ({len(sweep['rows'])}), one process, slowest",
                     f"{one_slow['cpu_seconds']:.3f} s CPU ({one_slow['spec']}) = {one_slow['vs_peft_lora']:.1f}x "
                     f"PEFT LoRA (meta_sweep.py; the trace, {one['trace_cpu']:.2f} s, before the first)",
                     f"<= {GOALS['meta_sweep_vs_peft']:.0f}x", _verdict(one_slow["vs_peft_lora"], GOALS["meta_sweep_vs_peft"])))
        rows.append(("apply on meta", "  each spec in a fresh process (trace included), slowest",
                     f"{slow['cpu']:.2f} s CPU ({slow['spec']}) = {slow['vs_peft_lora']:.1f}x PEFT LoRA", "", ""))
        fresh = {r["spec"]: r for r in sweep["rows"]}
        for r in one["rows"]:
            f = fresh.get(r["spec"], {})
            figure = (f"{r['cpu_seconds']:.3f} s CPU = {r['vs_peft_lora']:.1f}x PEFT LoRA; fresh process "
                      f"{f['cpu']:.2f} s = {f['vs_peft_lora']:.1f}x" if "cpu_seconds" in r and "cpu" in f
                      else f"error: {r.get('error') or f.get('error')}")
            rows.append(("apply on meta", f"  {r['spec']}", figure, "", ""))
    return rows


# ------------------------------------------------------------------------------------------------- main

def machine(args) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
            "python": platform.python_version(), "device": args.device, "load_average_start": os.getloadavg()}
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    try:
        import peft
        import transformers
        info.update(transformers=transformers.__version__, peft=peft.__version__)
    except ImportError:
        pass
    return info


def format_table(rows: list[tuple]) -> str:
    header = ("group", "case", "figure", "goal", "")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (train, inference and memory groups)")
    parser.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated subset of {', '.join(GROUPS)}")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: 1 on CPU)")
    parser.add_argument("--out", default=None, help="write every result, the table and the machine as JSON here")
    parser.add_argument("--merge", action="store_true",
                        help="with --out: replace only the groups run in an existing results file, keep the others "
                             "(then `python -m benchmarks.readme` rewrites README's table from it)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--train-repeats", type=int, default=12, help="timed train steps per variant")
    parser.add_argument("--infer-repeats", type=int, default=40, help="timed forwards per variant")
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--apply-repeats", type=int, default=3)
    parser.add_argument("--apply-7b-repeats", type=int, default=2, help="fresh processes; the peak RSS is their max")
    parser.add_argument("--matcher-layers", type=int, default=200)
    parser.add_argument("--matcher-repeats", type=int, default=5)
    parser.add_argument("--decode-specs", default="lora,houlsby,ia3,prefix", help="specs for the decode group")
    parser.add_argument("--mixed-repeats", type=int, default=8, help="timed rounds per mixed_batch comparison")
    parser.add_argument("--meta-repeats", type=int, default=2, help="fresh processes per side and shape (meta_apply)")
    args = parser.parse_args(argv)
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else (os.cpu_count() or 1)
    torch.set_num_threads(args.threads)
    os.environ["BENCH_THREADS"] = str(args.threads)          # for the fresh processes of the memory group
    groups = args.groups.split(",")
    unknown = set(groups) - set(GROUPS)
    if unknown:
        parser.error(f"unknown group(s) {sorted(unknown)}; groups: {', '.join(GROUPS)}")
    report = {"machine": machine(args), "goals": GOALS, "groups": {}, "rows": []}
    started, cpu_started = time.perf_counter(), time.process_time()
    for name in groups:
        group_started = time.perf_counter()
        print(f"[{name}] ...", file=sys.stderr, flush=True)
        try:
            results, rows = globals()[f"group_{name}"](args)
        except Exception as exc:  # noqa: BLE001 - one failing group must not lose the others' figures
            traceback.print_exc()
            results, rows = {"error": f"{type(exc).__name__}: {exc}"}, [(name, "failed", f"{type(exc).__name__}: {exc}", "", "")]
        report["groups"][name] = {"seconds": round(time.perf_counter() - group_started, 1), "results": results,
                                  "rows": [list(r) for r in rows], "machine": report["machine"]}
        report["rows"] += [list(r) for r in rows]
        print(f"[{name}] {report['groups'][name]['seconds']} s", file=sys.stderr, flush=True)
    report["machine"]["load_average_end"] = os.getloadavg()
    report["seconds"] = round(time.perf_counter() - started, 1)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    report["cpu_seconds"] = round(time.process_time() - cpu_started + children.ru_utime + children.ru_stime, 1)
    m = report["machine"]
    print(f"{m['cpu']}, {m['cores']} cores, {m['threads']} thread(s), torch {m['torch']}, device {m['device']}; "
          f"load average {m['load_average_start'][0]:.1f} at start, {m['load_average_end'][0]:.1f} at end; "
          f"{report['seconds']} s wall, {report['cpu_seconds']} s CPU")
    print(format_table([tuple(r) for r in report["rows"]]))
    if args.out:
        out = Path(args.out)
        if args.merge and out.exists():
            report = merge_reports(json.loads(out.read_text()), report)
        out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {args.out}")


def merge_reports(old: dict, new: dict) -> dict:
    """`old` with the groups `new` ran replaced (each group keeps the machine it ran on); rows in GROUPS order."""
    merged = dict(old)
    merged["groups"] = {**old.get("groups", {}), **new["groups"]}
    merged["rows"] = [row for name in GROUPS if name in merged["groups"] for row in merged["groups"][name]["rows"]]
    merged["goals"] = new["goals"]
    return merged


if __name__ == "__main__":
    main()
