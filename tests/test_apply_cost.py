"""What applying a spec costs per site on a model built on the meta device (issue 20: every shipped spec on the
7B shape about as cheap as PEFT's LoRA). Asserted as work done, never as time: the adapters are built without
running the (Python) meta kernels of value-only ops, no adapter is re-created after building, and a `train`
rule asks the gradient question of its own parameters only.

The timed sweep is `python benchmarks/meta_sweep.py` (one process) and `python benchmarks/meta_apply.py --sweep`.
"""
from __future__ import annotations

import collections
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import surgery
from conftest import SPECS
from models import make_llama
from surgery.rewrite.meta_build import building_on_meta


class Ops(TorchDispatchMode):
    """Counts the aten ops dispatched with a meta tensor among their arguments or results."""

    def __init__(self):
        super().__init__()
        self.meta = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        if any(t.is_meta for t in tensors):
            self.meta[str(func)] += 1
        return out


# ops that only compute values: on the meta device each runs a Python meta kernel (0.05-1.5 ms) for nothing
VALUE_OPS = ("aten.normal_", "aten.normal.", "aten.randn", "aten.rand.", "aten.uniform_", "aten.linalg_vector_norm",
             "aten.pow.", "aten.rsqrt", "aten.erfinv_", "aten.triu_indices")


@pytest.fixture(scope="module")
def meta_llama():
    with torch.device("meta"):
        model = make_llama(layers=2, hidden=64, heads=4, kv_heads=4)
    surgery.plan(model, SPECS / "lora.yaml")
    return model


@pytest.mark.parametrize("spec", ["houlsby", "said", "dora", "oft", "adalora", "unipelt", "lora_task_head"])
def test_adapters_built_on_meta_run_no_value_only_ops(meta_llama, spec):
    """Random fills (normal_ of Houlsby's and AdaLoRA's inits), SAID's Fastfood statistics, DoRA's row norms and
    OFT's index tables computed on meta tensors cost their Python meta kernels and give nothing: none runs."""
    ops = Ops()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ops:
            surgery.apply(meta_llama, SPECS / f"{spec}.yaml")
    try:
        assert all(t.is_meta for t in list(meta_llama.surgery_adapters.parameters())
                   + list(meta_llama.surgery_adapters.buffers()))
    finally:
        surgery.remove(meta_llama)
    ran = {op: n for op, n in ops.meta.items() if op.startswith(VALUE_OPS)}
    assert not ran, ran


def test_adapters_built_on_meta_are_not_recreated(meta_llama, monkeypatch):
    """A module built on the meta device is already there: `to_empty` (which re-creates every tensor) runs only
    for a module holding a tensor made elsewhere."""
    calls = []
    original = nn.Module.to_empty
    monkeypatch.setattr(nn.Module, "to_empty", lambda self, **kw: calls.append(type(self)) or original(self, **kw))
    surgery.apply(meta_llama, SPECS / "qlora.yaml")
    surgery.remove(meta_llama)
    assert calls == []


def test_train_rule_asks_the_gradient_question_of_its_parameters_only(monkeypatch):
    """Which parameters reach the output only through a selection is asked per parameter: of the ones the rule
    trains, not of every parameter of the graph (50 ms on the 7B shape for each train rule)."""
    from surgery.rewrite import actions
    asked = []
    original = actions.without_gradient
    monkeypatch.setattr(actions, "without_gradient", lambda traced: asked.append(set(traced.params.values()))
                        or original(traced))
    model = make_llama(layers=2, hidden=64, heads=4, kv_heads=4)
    surgery.apply(model, SPECS / "ln_tuning.yaml")
    trained = {n for n, p in model.named_parameters() if p.requires_grad and "surgery_adapters" not in n}
    assert asked and all(names <= trained for names in asked), (asked, trained)
    assert trained and all(n.endswith("norm.weight") for n in trained)


def test_phm_blocks_on_meta_are_not_initialized_block_by_block(monkeypatch):
    """Compacter's PHM layers initialize each Kronecker block (xavier per block: 16 calls per adapter); on the
    meta device there is nothing to draw, and the loop was half of Compacter's apply on the 7B shape."""
    from surgery.modules.options import PHMOptions
    from surgery.modules.phm import PHMLayer
    calls = []
    for name in ("xavier_uniform_", "xavier_normal_"):
        original = getattr(nn.init, name)
        monkeypatch.setattr(nn.init, name, lambda t, *a, _f=original, **k: calls.append(t) or _f(t, *a, **k))
    with building_on_meta():
        layer = PHMLayer(64, 8, PHMOptions())
    assert layer.W_left.is_meta and calls == []
    PHMLayer(64, 8, PHMOptions())      # with values: every block is drawn
    assert len(calls) == 2 * 4


# ------------------------------------------------------------------------------------ the meta build mode itself

def _fills(t, g):
    """Initializers as adapters call them; the tensor's version after each."""
    versions = []
    for fill in (lambda: nn.init.normal_(t, std=0.02), lambda: t.normal_(0.0, 0.1, generator=g),
                 lambda: nn.init.trunc_normal_(t, std=1e-2, a=-2e-2, b=2e-2), lambda: nn.init.xavier_normal_(t),
                 lambda: nn.init.kaiming_uniform_(t, a=5 ** 0.5)):
        assert fill() is t
        versions.append(t._version)
    return versions


def test_value_fills_of_meta_tensors_are_answered_without_dispatch():
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    with torch.device("meta"):
        expected = _fills(torch.empty(4, 8), g)
    ops = Ops()
    with building_on_meta(), ops:
        t = torch.empty(4, 8)
        assert _fills(t, g) == expected          # the version counter moves as the ops would have moved it
        drawn = torch.randn(5, generator=g, dtype=torch.float16)
        p = nn.Linear(8, 4)
    assert t.is_meta and drawn.is_meta and drawn.dtype == torch.float16 and drawn.shape == (5,)
    assert p.weight.is_meta
    assert torch.equal(g.get_state(), state)     # a meta fill draws nothing
    ran = {op: n for op, n in ops.meta.items() if op.startswith(VALUE_OPS)}
    assert not ran, ran


def test_fills_that_would_fail_or_have_values_run_as_before():
    g = torch.Generator().manual_seed(0)
    with building_on_meta():
        t = torch.empty(3)
        with pytest.raises(RuntimeError, match="std >= 0"):
            nn.init.normal_(t, std=-1.0)
        leaf = nn.Parameter(torch.empty(3))
        with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
            leaf.normal_()
        with pytest.raises(RuntimeError, match="floating-point"):
            torch.empty(3, dtype=torch.long).normal_()
        real = torch.empty(5, device="cpu").normal_(generator=g)     # a real tensor: the values are drawn
        also_real = torch.randn(5, generator=g, device="cpu")
    g.manual_seed(0)
    assert torch.equal(real, torch.empty(5).normal_(generator=g))
    assert torch.equal(also_real, torch.randn(5, generator=g))


# ------------------------------------------------------------------------------------------ module kinds

def test_each_builtin_kind_is_looked_up_in_its_own_file():
    from surgery.modules import options, registry
    assert set(registry.BUILTIN_KINDS) == set(options.BUILTIN)
    assert set(registry.BUILTIN_KINDS.values()) == set(registry.BUILTIN_MODULES)
    for kind, file in registry.BUILTIN_KINDS.items():
        assert registry.kinds()[kind].__module__ == f"surgery.modules.{file}"


def test_looking_up_a_kind_imports_its_file_only():
    """A new process applying LoRA imports lora.py, not every module file (each costs its import, and its
    compile where no bytecode is cached)."""
    import subprocess
    import sys
    code = ("import sys, surgery; from surgery.modules import registry; registry.module_class('lora'); "
            "print(sorted(m for m in sys.modules if m.startswith('surgery.modules.') and m[16:] in "
            "registry.BUILTIN_MODULES))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(SPECS.parent)).stdout.split("\n")[-2]
    assert out == "['surgery.modules.lora']"
