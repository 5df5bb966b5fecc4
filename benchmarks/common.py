"""Timing and memory helpers shared by the benchmark groups.

Timing. `interleaved` runs the variants of one comparison in turn, round after round (the first one alternating),
after warm-up rounds, and keeps every round's seconds. A variant's figure is the median over rounds; a
comparison is the median of the per-round ratios A_i / B_i (paired), so a burst of load from other processes
slows both sides of a round and cancels out of that round's ratio. The clock: on CPU the process's CPU time
(time.process_time), which leaves out the time the process waited for a core while other jobs ran; with one
intra-op thread it is what the wall time would be on an idle machine, and on a loaded 2-core machine its
ratios scatter about half as much as wall-clock ratios (an A/A test: IQR ±4% against ±7%). Wall seconds are
kept too (`Timing.wall`). On CUDA the clock is the wall time, with a synchronize before it stops.

Memory. Peak memory is measured in a fresh interpreter per variant (`in_subprocess`), so memory one variant
freed cannot hide another's. On CPU it is the peak resident set size (VmHWM, reset through
/proc/self/clear_refs) above the RSS just before the measured region: it sees every allocation, torch's CPU
allocator and Python's alike (tracemalloc sees only Python's), but it moves with page-level and malloc-arena
noise of a few MiB. So on CPU the train-step comparison also reports `allocator_peak_mib`: the peak of the
bytes torch's CPU allocator holds during one steady-state step, from torch.profiler's memory events: exact and
repeatable, tensors only. On CUDA it is `torch.cuda.max_memory_allocated` above the allocation before the
region.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "tests") not in sys.path:
    sys.path.append(str(ROOT / "tests"))     # tests/models.py and tests/reference.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

MIB = 1024 * 1024


@dataclass
class Timing:
    """Seconds per round of each variant of one interleaved comparison, on the chosen clock (`clock`), and wall
    seconds."""

    seconds: dict[str, list[float]] = field(default_factory=dict)
    wall: dict[str, list[float]] = field(default_factory=dict)
    clock: str = "wall"

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def ratio(self, a: str, b: str) -> float:
        """Median over rounds of a's time / b's time in the same round."""
        return statistics.median(x / y for x, y in zip(self.seconds[a], self.seconds[b]))

    def spread(self, a: str, b: str) -> tuple[float, float]:
        """The interquartile range of the per-round ratios: how much to trust `ratio`."""
        ratios = sorted(x / y for x, y in zip(self.seconds[a], self.seconds[b]))
        if len(ratios) < 4:
            return ratios[0], ratios[-1]
        q = statistics.quantiles(ratios, n=4)
        return q[0], q[2]

    def medians(self) -> dict[str, float]:
        return {k: self.median(k) for k in self.seconds}

    def wall_medians(self) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in self.wall.items()}

    def summary(self, a: str, b: str) -> dict:
        """What a comparison of a against b reports: medians, the paired ratio and its IQR, the clock."""
        return {"seconds": self.medians(), "wall_seconds": self.wall_medians(), "clock": self.clock,
                "ratio": self.ratio(a, b), "ratio_iqr": self.spread(a, b), "rounds": len(self.seconds[a])}


def synchronizer(device: torch.device | str) -> Callable[[], None]:
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def interleaved(fns: dict[str, Callable[[], object]], *, warmup: int, repeats: int, device="cpu") -> Timing:
    """Run every function once per round, `warmup` untimed rounds then `repeats` timed ones; the order of the
    variants alternates between rounds (forward, then reversed). CPU: process CPU time; CUDA: synchronized wall."""
    device = torch.device(device)
    sync = synchronizer(device)
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    timing = Timing({k: [] for k in fns}, {k: [] for k in fns}, "wall" if device.type == "cuda" else "cpu")
    names = list(fns)
    for i in range(warmup + repeats):
        for k in (names if i % 2 == 0 else names[::-1]):
            sync()
            wall, start = time.perf_counter(), clock()
            fns[k]()
            sync()
            if i >= warmup:
                timing.seconds[k].append(clock() - start)
                timing.wall[k].append(time.perf_counter() - wall)
    return timing


@contextmanager
def _quiet_stderr():
    """The profiler's C++ side logs two lines per session to file descriptor 2; keep the run's output readable."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def op_counts(fn: Callable[[], object]) -> Counter:
    """How many times each aten op runs in one call of `fn` (torch.profiler): a noise-free comparison."""
    from torch.profiler import ProfilerActivity, profile
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return Counter({e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::")})


def python_calls(fn: Callable[[], object]) -> int:
    """How many Python-level calls (Python functions and builtins called from Python) one call of `fn` makes,
    counted with sys.setprofile: the interpreter work of a step, deterministic and independent of machine load
    (the load-independent figure for per-call overhead on small, overhead-bound models)."""
    count = 0

    def profiler(frame, event, arg):
        nonlocal count
        if event == "call" or event == "c_call":
            count += 1

    previous = sys.getprofile()
    sys.setprofile(profiler)
    try:
        fn()
    finally:
        sys.setprofile(previous)
    return count - 1     # less the call of fn itself


def op_difference(a: Counter, b: Counter) -> dict:
    """{"a_ops": n, "b_ops": m, "diff": {op: count in a - count in b}} for the ops whose counts differ."""
    diff = {op: a[op] - b[op] for op in sorted(set(a) | set(b)) if a[op] != b[op]}
    return {"a_ops": sum(a.values()), "b_ops": sum(b.values()), "diff": diff}


@contextmanager
def stopwatch():
    """Wall and process CPU seconds of the block: `with stopwatch() as t: ...; t["wall"], t["cpu"]`."""
    result: dict[str, float] = {}
    wall, cpu = time.perf_counter(), time.process_time()
    yield result
    result["wall"] = time.perf_counter() - wall
    result["cpu"] = time.process_time() - cpu


# ------------------------------------------------------------------------------------------------- memory

def _status_kib(field_name: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field_name}:\s+(\d+)", text).group(1))


def rss_mib() -> float:
    return _status_kib("VmRSS") / 1024


@contextmanager
def peak_memory(device: torch.device | str = "cpu"):
    """Peak memory of the block above the memory before it, in MiB: `with peak_memory() as m: ...; m["peak_mib"]`.

    CPU: VmHWM after the block minus VmRSS before it, with the high-water mark reset at entry (so the figure is
    about this block, not the imports before it); `m["process_peak_mib"]` is the process's whole peak RSS.
    CUDA: torch.cuda.max_memory_allocated above the memory allocated at entry.
    """
    device = torch.device(device)
    result: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result["peak_mib"] = (torch.cuda.max_memory_allocated(device) - before) / MIB
        result["measure"] = "torch.cuda.max_memory_allocated above the allocation before the step"
        return
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    yield result
    peak = _status_kib("VmHWM")
    result["peak_mib"] = (peak - before) / 1024
    result["process_peak_mib"] = peak / 1024
    result["measure"] = "peak RSS (VmHWM) above the RSS before the step, fresh process per variant"


def allocator_peak_mib(fn: Callable[[], object]) -> float:
    """Peak bytes held by torch's CPU allocator during one call of `fn`, above what it held before (MiB).

    torch.profiler(profile_memory=True) reports every CPU allocation with the running total of the bytes
    allocated since profiling began; the maximum of that total is the call's peak. Exact and repeatable (no
    allocator or page-level noise), but it sees tensors only, not Python objects."""
    import tempfile
    from torch.profiler import ProfilerActivity, profile
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    return max(totals, default=0) / MIB


def in_subprocess(target: str, timeout: float | None = None, **kwargs) -> dict:
    """Call `module:function(**kwargs)` in a fresh interpreter and return the dict it returns (sent as JSON)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    # an installed package runs from compiled bytecode: a child that compiles every module it imports (where
    # PYTHONDONTWRITEBYTECODE is set, as in some sandboxes) would time the compiler
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    done = subprocess.run([sys.executable, "-m", "benchmarks.common", target, json.dumps(kwargs)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{target} failed in its subprocess:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child(target: str, kwargs_json: str) -> None:
    import warnings
    warnings.filterwarnings("ignore")
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    module, _, function = target.partition(":")
    result = getattr(importlib.import_module(module), function)(**json.loads(kwargs_json))
    sys.stdout.write("\n" + json.dumps(result) + "\n")


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
