"""A pytest plugin that records each test's CPU seconds (this process and the child processes it waited for,
setup + call + teardown) and wall seconds, one JSON line per test, for choosing what to mark slow:

    PYTHONPATH=tests CPU_TIMES=cpu.jsonl python -m pytest -q -p cpu_times -m "not slow"

tests/conftest.py's SLOW_TESTS lists the tests that took too long for the quick subset.
"""
from __future__ import annotations

import json
import os
import resource
import time

import pytest

_out = None


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    global _out
    if _out is None:
        _out = open(os.environ.get("CPU_TIMES", "cpu_times.jsonl"), "a")
    cpu, wall = _cpu_seconds(), time.perf_counter()
    yield
    _out.write(json.dumps({"id": item.nodeid, "cpu": round(_cpu_seconds() - cpu, 3),
                           "wall": round(time.perf_counter() - wall, 3),
                           "slow": item.get_closest_marker("slow") is not None}) + "\n")
    _out.flush()
