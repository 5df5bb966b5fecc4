"""What a hooked adapter adds per forward on a small model (issue 20): a boundary with one adapter and nothing
to compose calls it directly (no composition machinery), and a bottleneck whose scaling is the constant 1.0
does not multiply by it. Both leave the output bit for bit the same."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import surgery
from models import make_minigpt
from surgery.modules.bottleneck import BottleneckAdapter
from surgery.rewrite import compose


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_a_unit_scaling_is_not_multiplied_and_others_are():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    counts = {}
    for scaling in (1.0, 0.5, "learned"):
        adapter = BottleneckAdapter(16, 4, scaling=scaling, init_weights="mam")
        torch.nn.init.normal_(adapter.up.weight)
        with CountOps() as mode:
            out = adapter(x)
        counts[scaling] = mode.ops.count("mul")
        h = adapter.up(adapter.act(adapter.down(x)))
        expected = x + (h if scaling == 1.0 else h * adapter.scaling)
        assert torch.equal(out, expected), scaling
    assert counts == {1.0: 0, 0.5: 1, "learned": 1}


def test_one_adapter_at_a_boundary_skips_the_composition(monkeypatch):
    model = make_minigpt()
    ids = model.example_inputs()[0]
    surgery.apply(model, "houlsby", example_inputs=(ids,))
    expected = model(ids)
    calls = []
    real = compose.run
    monkeypatch.setattr(compose, "run", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert torch.equal(model(ids), expected)
    assert calls == []                                     # one adapter per site: called directly
    surgery.apply(model, "houlsby", name="second", example_inputs=(ids,))
    surgery.set_active(model, surgery.Average("default", "second", weights=[0.5, 0.5]))
    averaged = model(ids)
    assert calls                                           # two adapters: composed as the runtime says
    surgery.set_active(model, "default")
    assert torch.equal(model(ids), expected)               # a single active name: the same as alone
    assert not torch.equal(averaged, expected)


def test_a_hooked_forward_makes_few_python_calls_beyond_the_hand_written_model():
    """Python calls per no-grad forward (sys.setprofile), Houlsby on MiniGPT against tests/reference.py's
    hand-written model on its own copy of the base: the load-independent figure of the hook overhead
    (issue 20). 118 more calls before the gate was inlined, the plain bottleneck ran in one frame and the
    root hooks were cut down; 81 with two root hooks; 47 now (no root hook: nothing reads the call and the tree
    is as applied), most of them torch's _call_impl path for the 5 hooked modules."""
    import copy
    import sys

    from reference import HoulsbyMiniGPT
    from surgery.example_models import minigpt

    base = minigpt(vocab_size=100, hidden_dim=64, n_layers=2, n_heads=4, seq_len=32, dropout=0.0)
    clean = copy.deepcopy(base)
    ids = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(0))
    model = surgery.apply(base, "houlsby", example_inputs=(ids,))
    reference = HoulsbyMiniGPT.from_surgery(model)
    reference.base = clean.requires_grad_(False)

    def calls(fn):
        count = 0

        def profiler(frame, event, arg):
            nonlocal count
            count += event in ("call", "c_call")
        sys.setprofile(profiler)
        try:
            fn()
        finally:
            sys.setprofile(None)
        return count

    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids))
        extra = calls(lambda: model(ids)) - calls(lambda: reference(ids))
    assert 0 < extra <= 55, extra


def test_the_root_call_is_captured_only_while_an_adapter_reads_it():
    """The root call is recorded only while a hook or module reads it (RuntimeState.need_call): a Houlsby-only
    model has no root pre-hook and records nothing; a ReFT added later (it acts at the first real tokens, found
    from the attention mask) gets the call from its first forward on; removing it takes the root hook off."""
    from models import make_llama, perturb, token_ids

    ids = token_ids(2, 7)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0                                        # row 0 left-padded: its real tokens start at 3
    model = make_llama().eval()
    surgery.apply(model, "houlsby")
    store = model.surgery_adapters
    local = store.runtime._local.__dict__
    assert len(model._forward_pre_hooks) == 0              # nothing reads the call, the tree is as recorded
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert "call" not in local and store.runtime.readers == 0
    surgery.apply(model, "loreft", name="reft")
    perturb(model, 0.5)
    assert store.runtime.readers > 0 and len(model._forward_pre_hooks) == 1
    with torch.no_grad():
        both = model(input_ids=ids, attention_mask=mask).logits
        surgery.set_active(model, "default")
        houlsby = model(input_ids=ids, attention_mask=mask).logits
    assert local["call"]["attention_mask"] is mask
    changed = (both - houlsby).abs().amax(-1) > 1e-5
    # the intervention at row 0's first real tokens (3..5) reaches no earlier position (causal); row 1's at 0..2
    assert not changed[0, :3].any() and changed[0, 3:].all() and changed[1].all()
    surgery.remove(model, "reft")
    assert store.runtime.readers == 0 and len(model._forward_pre_hooks) == 0
    local.clear()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, houlsby, rtol=0, atol=0)
    assert "call" not in local


def test_every_reader_of_the_call_declares_itself_and_its_removal_undoes_it():
    """Which methods read the per-call state: prompts and prefixes (the call's mask and cache), ReFT (its
    mask), a parallel branch (a value captured earlier in the call); weight and hooked-value methods do not.
    After remove, nothing is declared."""
    from models import make_llama

    expected = {"houlsby": False, "lora": False, "ia3": False, "prompt": True, "loreft": True, "parallel": True}
    for spec, reads in expected.items():
        model = make_llama().eval()
        surgery.apply(model, spec)
        assert bool(model.surgery_adapters.runtime.readers) is reads, spec
        surgery.apply(model, "houlsby", name="other")
        surgery.remove(model, "default")
        assert model.surgery_adapters.runtime.readers == 0, spec
