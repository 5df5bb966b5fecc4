"""Truncate and unroll (surgery/trace/unroll.py): the trace exports one layer per kind and copies the rest, and
what surgery finds on it is exactly what a full export gives.

The matrix: every architecture of tests/architectures.py, built with 4 layers per stack, traced both ways; the
graphs (node names, ops, arguments, module stacks, shapes, boundaries), the parameter tables, every site of the
analysis and the plans of several specs must be equal. Then specs applied through both paths with the same
adapter values give equal outputs, and the cases that must fall back to the full export do.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import fx, nn

import architectures as A
import surgery
import surgery.api as api
from surgery.analyze import analyze
from surgery.errors import SurgeryError
from surgery.match import match_spec
from surgery.spec import spec_from
from surgery.trace import export as trace_export
from surgery.trace import trace, unroll

LAYERS = 4
# architectures whose layers are not truncated at 4 layers, and why: a shared layer called many times (ALBERT),
# kinds that alternate (Gemma 2's sliding/global layers, GPT-Neo's global/local: a prefix holding each kind twice
# is all 4; test_alternating_layers_unroll has 6), no layer container (UNet)
FULL = {"albert", "gemma2", "gpt_neo", "gpt_oss", "unet", "funnel", "flux", "minimax"}   # nothing to save: the prefix is the whole stack
QUICK = {"llama", "t5", "falcon", "bert", "mixtral", "whisper"}
SPECS = ["lora", "houlsby", "prefix", "prompt", "ia3", "top_layers", "lora_task_head", "pfeiffer", "ln_tuning",
         "unipelt"]


def build(arch: str, layers: int = LAYERS):
    """`arch` from tests/architectures.py with `layers` layers per stack."""
    saved = A.LAYERS, A.TorchEncoder.__init__.__defaults__
    A.LAYERS = layers
    A.TorchEncoder.__init__.__defaults__ = (A.VOCAB, A.HIDDEN, layers)
    try:
        if arch == "gpt_neo":
            return A._decoder("GPTNeoConfig", "GPTNeoForCausalLM", "transformer.h", num_layers=layers,
                              attention_types=[[["global", "local"], layers // 2]], window_size=4)
        return A.ARCHITECTURES[arch]()
    finally:
        A.LAYERS, A.TorchEncoder.__init__.__defaults__ = saved


def _traced_both(model, inputs):
    used = {}
    original = trace_export._unrolled

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        used["unrolled"] = result is not None
        return result
    full = trace(model, inputs, full=True)
    trace_export._unrolled = spy
    try:
        fast = trace(model, inputs)
    finally:
        trace_export._unrolled = original
    return full, fast, used.get("unrolled", False)


def _graph_rows(traced):
    def names(a):
        return fx.map_arg(a, lambda n: "%" + n.name)
    return [(n.op, n.name, str(n.target), repr(names(n.args)), repr(names(n.kwargs)),
             repr(n.meta.get("nn_module_stack")), repr(unroll._val_key(n.meta.get("val"))),
             repr(traced.boundaries.get(n, []))) for n in traced.graph.nodes]


def _named(value):
    """Site extras and linear infos with graph nodes by name, so two graphs compare."""
    if isinstance(value, fx.Node):
        return "%" + value.name
    if isinstance(value, dict):
        return {k: _named(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_named(v) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        return (type(value).__name__, {k: _named(getattr(value, k)) for k in value.__dataclass_fields__})
    return value


def _site_rows(analysis):
    return [(s.node.name, s.role, s.layer, s.module, s.op, s.stack, repr(_named(s.extra)), repr(_named(s.linear)))
            for s in analysis.sites]


def _plan_rows(spec, analysis):
    try:
        matches = match_spec(spec_from(spec), analysis)
    except SurgeryError as exc:
        return ("refused", str(exc))
    return [(m.rule, m.node, m.module, m.role, m.layer, m.site.stack, repr(_named(m.site.extra)),
             m.source.node.name if m.source is not None else None, repr(_named(m.bindings)))
            for matches_ in matches for m in matches_]


ARCHS = [pytest.param(a, marks=() if a in QUICK else pytest.mark.slow) for a in A.ARCHITECTURES]


def _check_equal(arch, layers=LAYERS, expect_unrolled=None):
    model, _, facts = build(arch, layers)
    inputs = facts["apply_inputs"]
    full, fast, unrolled = _traced_both(model, inputs)
    expected = (arch not in FULL) if expect_unrolled is None else expect_unrolled
    assert unrolled == expected, f"{arch}: unrolled={unrolled}"
    assert _graph_rows(fast) == _graph_rows(full)
    assert list(fast.params.items()) == list(full.params.items())
    assert list(fast.buffers.items()) == list(full.buffers.items())
    assert fast.calls == full.calls and fast.module_types == full.module_types
    assert fast.constants.keys() == full.constants.keys()
    assert all(torch.equal(fast.constants[k], full.constants[k]) for k in full.constants)
    a_full, a_fast = analyze(full), analyze(fast)
    assert a_fast.blocks == a_full.blocks and a_fast.stacks == a_full.stacks
    assert a_fast.block_calls == a_full.block_calls and a_fast.hidden_size == a_full.hidden_size
    assert len(a_full.blocks) >= (LAYERS if arch not in ("unet",) else 1)
    assert _site_rows(a_fast) == _site_rows(a_full)
    for spec in SPECS:
        assert _plan_rows(spec, a_fast) == _plan_rows(spec, a_full), f"{arch}: plan of {spec}"


@pytest.mark.parametrize("arch", ARCHS)
def test_unrolled_trace_is_the_full_trace(arch):
    _check_equal(arch)


@pytest.mark.parametrize("arch", ["gemma2", pytest.param("gpt_neo", marks=pytest.mark.slow),
                                  pytest.param("gpt_oss", marks=pytest.mark.slow)])
def test_alternating_layers_unroll(arch):
    """Sliding-window and global layers in turn: kinds of period 2, a prefix of 4 of 6 layers."""
    assert [(s.keep, s.period) for s in unroll.find_stacks(build(arch, 6)[0])] == [(4, 2)]
    _check_equal(arch, 6, expect_unrolled=True)


def test_prefix_plans():
    """(keep, start, period) for kinds of layers: the shortest prefix holding each kind of the repeating tail
    twice and ending in the stack's last kind; None where nothing would be saved."""
    plan = unroll._plan_prefix
    assert plan(list("AAAAAAAA")) == (2, 0, 1)
    assert plan(list("ABBBBBBB")) == (3, 1, 1)                  # T5: block 0 holds the position bias
    assert plan(list("DDDMMMMMMM")) == (5, 3, 1)                # first 3 dense, then MoE
    assert plan(list("ABABABABA")) == (5, 0, 2)                 # ends in the prefix's last kind
    assert plan(list("LLLLLG" * 4 + "LL")) == (14, 0, 6)        # Gemma 3's 5 local : 1 global
    assert plan(list("AAAAAB")) is None                         # a kind only at the end
    assert plan(list("ABAB")) is None


def _seeded(model):
    """Every adapter parameter set from a generator seeded by its name: both paths get the same values."""
    with torch.no_grad():
        for name, p in sorted(model.surgery_adapters.named_parameters()):
            g = torch.Generator().manual_seed(sum(map(ord, name)) % (2 ** 31))
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.05)


@pytest.mark.parametrize("arch", ["llama", "t5", pytest.param("bert", marks=pytest.mark.slow),
                                  pytest.param("mixtral", marks=pytest.mark.slow)])
@pytest.mark.parametrize("spec", ["lora", "houlsby"])
def test_applied_outputs_equal_through_both_traces(arch, spec, monkeypatch):
    model, inputs, facts = build(arch)
    outputs, names = [], []
    for full in ("1", "0"):
        monkeypatch.setattr(api, "_STRUCTURE_CACHE", type(api._STRUCTURE_CACHE)())   # trace each time
        monkeypatch.setenv(trace_export.FULL_TRACE_ENV, full)
        m = copy.deepcopy(model)
        surgery.apply(m, spec, example_inputs=facts["apply_inputs"])
        _seeded(m)
        names.append(sorted(n for n, _ in m.surgery_adapters.named_parameters()))
        with torch.no_grad():
            outputs.append(A.main_output(m, inputs))
    assert names[0] == names[1] and names[0]
    assert torch.equal(outputs[0], outputs[1])
    with torch.no_grad():
        assert not torch.allclose(outputs[1], A.main_output(model, inputs))   # the adapters did something


# ------------------------------------------------------------------ what is traced, and what falls back

RUNS: list[int] = []     # which layers' forwards ran (export restores a module's own attributes)


class Layer(nn.Module):
    def __init__(self, d=16, index=0, scale=None, last=False):
        super().__init__()
        self.index, self.last = index, last
        self.scale = scale
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, d))

    def forward(self, x):
        RUNS.append(self.index)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x = x + self.ff(x)
        if self.scale is not None:
            x = x * self.scale
        return x * 2 if self.last else x


class Stack(nn.Module):
    def __init__(self, n=6, between=False, **layer):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.layers = nn.ModuleList(Layer(index=i, **{k: v(i, n) for k, v in layer.items()}) for i in range(n))
        self.head = nn.Linear(16, 50)
        self.between = between

    def forward(self, ids):
        x = self.embed(ids)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if self.between:
                x = x * (i + 1)
        return self.head(x)


IDS = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))


def _same_plan(model):
    full, fast, unrolled = _traced_both(model, (IDS,))
    assert _graph_rows(fast) == _graph_rows(full)
    assert _site_rows(analyze(fast)) == _site_rows(analyze(full))
    return unrolled


def test_trace_runs_one_layer_per_kind():
    """A 6-layer stack of one kind: the export runs 2 layers, and the graph has all 6."""
    torch.manual_seed(0)
    model = Stack().eval()
    RUNS.clear()
    traced = trace(model, (IDS,))
    assert RUNS == [0, 1]
    assert len(analyze(traced).blocks) == 6
    assert _same_plan(model)


def test_layers_that_differ_are_traced():
    """Where a layer differs in a way only its trace shows (a per-layer constant), in its plain attributes (the
    last layer), or where ops run between the layers, the whole model is exported: never a wrong graph."""
    torch.manual_seed(0)
    assert not _same_plan(Stack(scale=lambda i, n: float(i + 1)).eval())     # index-valued: trace differs
    assert unroll.find_stacks(Stack(last=lambda i, n: i == n - 1)) == []     # a kind only at the end
    assert not _same_plan(Stack(last=lambda i, n: i == n - 1).eval())
    assert not _same_plan(Stack(between=True).eval())                      # ops between the layers
    last_tensor = dict(scale=lambda i, n: torch.tensor([2.0 if i == n - 1 else 1.0]))   # lifted constants
    assert unroll.find_stacks(Stack(**last_tensor)) == []
    assert not _same_plan(Stack(**last_tensor).eval())


def test_shared_or_hooked_layers_are_not_truncated():
    torch.manual_seed(0)
    model = Stack().eval()
    model.layers[3] = model.layers[1]                                     # one layer object twice
    assert unroll.find_stacks(model) == []
    model = Stack().eval()
    model.alias = model.layers                                            # the container reachable twice
    assert unroll.find_stacks(model) == []
    model = Stack().eval()
    model.layers[4].ff[0].register_forward_hook(lambda m, i, o: o * 3)
    assert unroll.find_stacks(model) == []
    assert not _same_plan(model)


def test_container_restored_on_errors(monkeypatch):
    """The user's own ModuleList is back after the truncated export, whether it failed (the full export runs)
    or was interrupted."""
    torch.manual_seed(0)
    model = Stack().eval()
    layers = model.layers
    real = torch.export.export
    calls = []

    def failing(m, *args, **kwargs):
        calls.append(len(m.layers._modules))     # the layers that run (len() is the whole stack's)
        if len(m.layers._modules) < 6:
            raise RuntimeError("needs every layer")
        return real(m, *args, **kwargs)
    monkeypatch.setattr(torch.export, "export", failing)
    traced = trace(model, (IDS,))
    assert calls == [2, 6] and model.layers is layers and len(analyze(traced).blocks) == 6

    def interrupted(m, *args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(torch.export, "export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trace(model, (IDS,))
    assert model.layers is layers and list(model.layers._modules) == [str(i) for i in range(6)]


def test_full_trace_forced(monkeypatch):
    torch.manual_seed(0)
    model = Stack().eval()
    monkeypatch.setenv(trace_export.FULL_TRACE_ENV, "1")
    RUNS.clear()
    trace(model, (IDS,))
    assert RUNS == list(range(6))


def test_a_copy_read_before_its_definition_is_refused():
    """The unrolled graph's order check (in place of Graph.lint): a node reading a later node, or a node of
    another graph, refuses the unroll (the caller then exports the whole model)."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    later = graph.call_function(torch.neg, (x,))
    with graph.inserting_before(later):
        early = graph.call_function(torch.relu, (x,))
    graph.output(early)
    unroll._check_order(graph)               # well formed
    early.args = (later,)                   # reads a node defined after it
    with pytest.raises(unroll.Refused, match="before it is defined"):
        unroll._check_order(graph)
    other = fx.Graph()
    foreign = other.placeholder("y")
    early.args = (foreign,)
    with pytest.raises(unroll.Refused):
        unroll._check_order(graph)


class _AsksLayers(nn.Module):
    """A parent loop that asks each layer for attributes it may lack (`hasattr`) and reads a class constant."""

    class Layer(nn.Module):
        scale = 2.0

        def __init__(self, d=16):
            super().__init__()
            self.f = nn.Linear(d, d)

        def forward(self, x, scale, sliding):
            return x + self.f(x) * (scale / 2 if sliding else scale)

    def __init__(self, n=6):
        super().__init__()
        self.layers = nn.ModuleList(self.Layer() for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x, layer.scale, hasattr(layer, "is_sliding"))
        return x


def test_a_parent_asking_layers_for_attributes_still_unrolls():
    """`hasattr(layer, name)` on a layer after the prefix answers as the layer would (False), and a plain class
    attribute is read: the stack still unrolls, to the full export's graph."""
    torch.manual_seed(0)
    full, fast, unrolled = _traced_both(_AsksLayers().eval(), (torch.randn(2, 5, 16),))
    assert unrolled
    assert _graph_rows(fast) == _graph_rows(full)


class _SharesState(nn.Module):
    """A parent that sets a dict its layers hold before each call (and a list it appends to)."""

    class Layer(nn.Module):
        def __init__(self, state, d=16):
            super().__init__()
            self.state, self.f = state, nn.Linear(d, d)

        def forward(self, x):
            return x + self.f(x) * (2.0 if self.state["current"] == 4 else 1.0)

    def __init__(self, n=6):
        super().__init__()
        self.state, self.seen = {"current": None}, []
        self.layers = nn.ModuleList(self.Layer(self.state) for _ in range(n))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            self.state["current"] = i
            self.seen.append(i)
            x = layer(x)
        self.state["current"] = None
        return x


def test_tracing_keeps_what_the_modules_share():
    """torch.export puts copies of the dicts and lists modules hold back after tracing: the parent's state and
    its layers' were then separate objects, and the traced model computed something else afterwards. Tracing
    (every apply) gives each module its own object back, with its contents before the trace."""
    torch.manual_seed(0)
    model = _SharesState().eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        before = model(x)
    model.seen.clear()
    full, fast, _ = _traced_both(model, (x,))
    assert all(layer.state is model.state for layer in model.layers)
    assert model.state == {"current": None} and model.seen == []
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert _graph_rows(fast) == _graph_rows(full)
