"""Houlsby on the small MiniGPT against the hand-written model, measured to tell apart changes of about 1%
on a loaded machine: several surgery/reference pairs built in one process (a single pair's ratio carries a
build-to-build bias of about ±1%), every model once per round in rotating order, thread CPU time, the pooled
median of the per-round surgery/reference ratios; and the load-independent figures: bytecodes executed and
Python calls per no-grad forward and per train step.

    python benchmarks/houlsby_pairs.py [--pairs 3] [--rounds 600] [--by-function]

To compare two versions of the code, run it from each checkout in alternating processes.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.houlsby_vs_reference import build_pair, trainer  # noqa: E402


def executed(fn, by_function: bool = False) -> tuple[int, int, Counter]:
    """(bytecodes executed, Python calls, bytecodes per function) in one call of fn (sys.settrace opcodes)."""
    per, calls = Counter(), 0

    def tracer(frame, event, arg):
        frame.f_trace_opcodes = True
        if event == "opcode":
            code = frame.f_code
            per[f"{Path(code.co_filename).name}:{code.co_firstlineno}({code.co_name})" if by_function else ""] += 1
        return tracer

    def profiler(frame, event, arg):
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(profiler)
    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
        sys.setprofile(None)
    return sum(per.values()), calls, per


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=600)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--by-function", action="store_true", help="bytecodes per function, surgery - reference")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    steps, forwards, root_hooks = {}, {}, 0
    for k in range(args.pairs):
        model, reference, ids = build_pair("small")
        root_hooks = len(model._forward_pre_hooks)   # surgery's root pre-hooks: none unless something needs one
        for name, m in ((f"S{k}", model), (f"R{k}", reference)):
            steps[name], forwards[name] = trainer(m, ids), (lambda m=m, ids=ids: m(ids))
    for name in ("S0", "R0"):
        steps[name]()
    with torch.no_grad():
        fwd = {name: executed(forwards[name], args.by_function) for name in ("S0", "R0")}
    step = {name: executed(steps[name]) for name in ("S0", "R0")}
    print(f"per no-grad forward: bytecodes {fwd['S0'][0]} vs {fwd['R0'][0]}, Python calls {fwd['S0'][1]} vs "
          f"{fwd['R0'][1]}; per train step: bytecodes {step['S0'][0]} vs {step['R0'][0]}, Python calls "
          f"{step['S0'][1]} vs {step['R0'][1]} (surgery vs hand-written); root pre-hooks {root_hooks}")
    if args.by_function:
        a, b = fwd["S0"][2], fwd["R0"][2]
        for key in sorted(set(a) | set(b), key=lambda k: b[k] - a[k]):
            if a[key] != b[key]:
                print(f"  {a[key] - b[key]:+6d} {key}")
    names, seconds = list(steps), {name: [] for name in steps}
    for i in range(args.warmup + args.rounds):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in (order if i % 2 == 0 else order[::-1]):
            start = time.thread_time()
            steps[name]()
            if i >= args.warmup:
                seconds[name].append(time.thread_time() - start)

    def ratios(a, b):
        return [x / y for x, y in zip(seconds[a], seconds[b])]
    pooled = [r for k in range(args.pairs) for r in ratios(f"S{k}", f"R{k}")]
    q = statistics.quantiles(pooled, n=4)
    per_pair = ", ".join(f"{statistics.median(ratios(f'S{k}', f'R{k}')):.4f}" for k in range(args.pairs))
    aa = f"; A/A R1/R0 {statistics.median(ratios('R1', 'R0')):.4f}" if args.pairs > 1 else ""
    print(f"train step, {args.rounds} rounds: surgery/hand-written {statistics.median(pooled):.4f}x "
          f"(IQR {q[0]:.3f}-{q[2]:.3f}); per pair {per_pair}{aa}")


if __name__ == "__main__":
    main()
