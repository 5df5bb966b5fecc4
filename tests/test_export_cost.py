"""What the export (surgery/trace/export.py) costs, asserted as work done, never as time (issue 20: apply on a
7B shape within 2x of PEFT, of which the two-layer export is most).

torch.export regenerates the Python code of the whole graph after each of its passes (the runtime-assertion
pass, placeholder naming, the set-grad and autocast passes, each graph module made): a sixth of the export of a
two-layer LLaMA, for code surgery never runs or reads. The export runs with lazy graph modules, so that code is
generated once, for the ExportedProgram's own module; the graph is the same.

The timed figures: `python benchmarks/depth.py --models llama7b --repeats 3`.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import fx

from models import make_llama
from surgery.example_models import minigpt
from surgery.trace import export as trace_export
from surgery.trace import trace
from test_unroll import _graph_rows, build


@contextlib.contextmanager
def _count_codegen():
    """Counts the graphs whose Python code is generated in the block."""
    count = [0]
    original = fx.Graph.python_code

    def spy(self, *args, **kwargs):
        count[0] += 1
        return original(self, *args, **kwargs)
    fx.Graph.python_code = spy
    try:
        yield count
    finally:
        fx.Graph.python_code = original


def test_export_generates_the_code_of_its_graph_once():
    model = minigpt()
    with _count_codegen() as count:
        trace(model, full=True)
    assert count[0] == 1     # the ExportedProgram's module; six before (one per pass and graph module)


def test_lazy_graph_modules_end_with_the_export():
    """The switch is torch's, process-wide while it is on: off again after the export, also when it fails."""
    lazy = pytest.importorskip("torch.fx._lazy_graph_module")
    trace(minigpt(), full=True)
    gm = fx.symbolic_trace(torch.nn.Linear(2, 2))
    assert not isinstance(gm, lazy._LazyGraphModule) and "def forward" in gm.code

    class Refuses(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:      # data-dependent control flow: torch.export refuses
                return x
            return -x
    with pytest.raises(Exception):
        trace_export._export_marked(Refuses(), (torch.randn(3),), {}, "test")
    assert not isinstance(fx.symbolic_trace(torch.nn.Linear(2, 2)), lazy._LazyGraphModule)


def _models():
    yield "minigpt", minigpt(), None
    yield "llama", make_llama(layers=3, hidden=32, heads=4, kv_heads=2), None
    model, _, facts = build("t5", 4)
    yield "t5", model, facts["apply_inputs"]


@pytest.mark.parametrize("full", [pytest.param(True, marks=pytest.mark.slow), False], ids=["full", "unrolled"])
def test_graph_and_boundaries_are_those_of_an_eager_export(monkeypatch, full):
    """Node names, ops, arguments, module stacks, shapes and every boundary the analysis sees: equal with and
    without lazy graph modules, on MiniGPT, a LLaMA and a T5 (the unrolled trace and the full export)."""
    for name, model, inputs in _models():
        lazy = trace(model, inputs, full=full)
        with monkeypatch.context() as m:
            m.setattr(trace_export, "_lazy_graph_modules", contextlib.nullcontext)
            with _count_codegen() as count:
                eager = trace(model, inputs, full=full)
            assert count[0] > 1, name       # the comparison is with the eager export
        assert _graph_rows(lazy) == _graph_rows(eager), name
        assert lazy.params == eager.params and lazy.buffers == eager.buffers, name
        assert lazy.calls == eager.calls, name
        assert sum(len(b) for b in lazy.boundaries.values()) > 10, name
