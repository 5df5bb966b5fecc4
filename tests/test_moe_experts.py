"""MoE experts stored as one 3-D parameter read by a grouped matmul (transformers 5's Mixtral and Qwen2-MoE,
`mlp.experts.gate_up_proj` (experts, 2·inter, hidden) and `mlp.experts.down_proj` (experts, hidden, inter)).

Weight adapters act on that parameter, per expert, through a parametrization: the model's own grouped matmul
(its routing untouched) reads W_e + ΔW_e. Checked against hand computations: the same model with the adapted
weights written into the 3-D parameter. And the FFN adapters of a MoE layer sit once after the combined output
(Qwen2-MoE adds a gated shared expert to the routed experts' output).
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch

import surgery
from architectures import mixtral, qwen2_moe
from models import perturb

ARCHS = {"mixtral": mixtral, "qwen2_moe": qwen2_moe}
EXPERTS = 4


def _spec(kind, roles, **options):
    return {"version": 1, "name": kind, "rules": [
        {"name": kind, "match": {"role": roles}, "action": "wrap", "module": {"kind": kind, **options}}]}


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _experts(model):
    return [layer.mlp.experts for layer in model.model.layers]


def _site(model, layer, param, rule=None):
    """The adapter of one expert parameter (of the only rule, or of `rule`)."""
    rules = model.surgery_adapters.adapters["default"]
    (rule,) = rules.values() if rule is None else (rules[rule],)
    return rule[f"model_layers_{layer}_mlp_experts__{param}"]


def _fold_dense_sites(model, by_hand):
    """Write the adapters of the model's 2-D weights (Qwen2-MoE's shared expert, attention) into `by_hand`."""
    from surgery.rewrite.host import store_of
    with torch.no_grad():
        for site in store_of(model).records["default"].weight_sites:
            weight = by_hand.get_parameter(f"{site.owner_path}.{site.weight_name}")
            if weight.dim() == 2:
                weight.copy_(site.adapter.transform_weight(weight))


@pytest.fixture(params=list(ARCHS))
def built(request):
    model, inputs, _ = ARCHS[request.param]()
    return request.param, model, inputs


def test_lora_on_experts_is_each_expert_plus_its_own_low_rank_update(built):
    """W_e + s·B_e·A_e in the 3-D parameter, A (experts, r, in), B (experts, out, r): the forward equals the
    base model with those weights written in; merge equals it; unmerge gives the base weights back bit for bit."""
    _, model, inputs = built
    base = copy.deepcopy(model)
    surgery.apply(model, _spec("lora", ["ffn.out", "ffn.in"], r=4, alpha=8))
    lora = _site(model, 0, "down_proj")
    experts = _experts(base)[0]
    assert lora.lora_A.shape == (EXPERTS, 4, experts.down_proj.shape[2])
    assert lora.lora_B.shape == (EXPERTS, experts.down_proj.shape[1], 4)
    assert torch.equal(_logits(model, inputs), _logits(base, inputs))     # B = 0: identity at init
    perturb(model, scale=0.1)

    by_hand = copy.deepcopy(base)
    with torch.no_grad():
        for layer, expert in enumerate(_experts(by_hand)):
            for param in ("gate_up_proj", "down_proj"):
                site = _site(model, layer, param)
                weight = getattr(expert, param)
                for e in range(EXPERTS):
                    weight[e] += site.scaling * site.lora_B[e] @ site.lora_A[e]
    _fold_dense_sites(model, by_hand)
    adapted = _logits(model, inputs)
    assert (adapted - _logits(base, inputs)).abs().max() > 1e-3
    torch.testing.assert_close(adapted, _logits(by_hand, inputs), rtol=0, atol=1e-5)

    originals = [getattr(e, p).detach().clone() for e in _experts(base) for p in ("gate_up_proj", "down_proj")]
    surgery.merge(model)
    assert not any(hasattr(e, "parametrizations") for e in _experts(model))
    torch.testing.assert_close(_logits(model, inputs), adapted, rtol=0, atol=1e-5)
    surgery.unmerge(model)
    restored = [e.parametrizations[p].original.detach() for e in _experts(model) for p in ("gate_up_proj", "down_proj")]
    assert all(torch.equal(a, b) for a, b in zip(restored, originals))
    torch.testing.assert_close(_logits(model, inputs), adapted, rtol=0, atol=0)


def test_lora_gradients_reach_exactly_the_routed_experts():
    """One token routes to 2 of 4 experts per layer: their A and B get gradients, the others' exactly zero; the
    base parameters stay frozen."""
    model, _, _ = mixtral()
    surgery.apply(model, _spec("lora", ["ffn.out"], r=4, alpha=8))
    perturb(model, scale=0.1)     # B ≠ 0, so A gets a gradient too
    routed = {}
    hooks = [layer.mlp.gate.register_forward_hook(
        lambda mod, args, out, i=i: routed.__setitem__(i, set(out[2].flatten().tolist())))
        for i, layer in enumerate(model.model.layers)]
    inputs = {"input_ids": torch.tensor([[5]])}
    model(**inputs).logits.pow(2).mean().backward()
    for h in hooks:
        h.remove()
    assert len(routed) == 2 and all(len(r) == 2 for r in routed.values())
    for layer, experts in routed.items():
        lora = _site(model, layer, "down_proj")
        for e in range(EXPERTS):
            for grad in (lora.lora_A.grad[e], lora.lora_B.grad[e]):
                assert (grad.abs().max() > 0) == (e in experts), (layer, e)
    assert all(p.grad is None for n, p in model.named_parameters() if "surgery_adapters" not in n)


def test_lora_dropout_on_experts_runs_inside_the_models_grouped_matmul():
    """LoRA with dropout needs the op's input: it is added to the result of the model's own grouped matmul,
    s·B_e·A_e·dropout(x) for each token's expert (no parametrization). In eval it equals the weights written in;
    merge folds it, unmerge restores the bits and the grouped path; in training the dropout acts on the LoRA
    path only and gradients reach the routed experts only."""
    from surgery.rewrite.host import store_of
    model, inputs, _ = mixtral()
    base = copy.deepcopy(model)
    surgery.apply(model, _spec("lora", ["ffn.out", "ffn.in"], r=4, alpha=8, dropout=0.5))
    assert {s.realized for s in store_of(model).records["default"].weight_sites} == {"grouped"}
    assert not any(hasattr(e, "parametrizations") for e in _experts(model))
    assert torch.equal(_logits(model, inputs), _logits(base, inputs))
    perturb(model, scale=0.1)
    by_hand = copy.deepcopy(base)
    with torch.no_grad():
        for layer, expert in enumerate(_experts(by_hand)):
            for param in ("gate_up_proj", "down_proj"):
                site = _site(model, layer, param)
                getattr(expert, param).add_(site.scaling * site.lora_B @ site.lora_A)
    adapted = _logits(model, inputs)
    assert (adapted - _logits(base, inputs)).abs().max() > 1e-3
    torch.testing.assert_close(adapted, _logits(by_hand, inputs), rtol=0, atol=1e-5)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):   # the hooks are the copy's own
        assert torch.equal(_logits(twin, inputs), adapted)
        with surgery.disable(twin):
            assert torch.equal(_logits(twin, inputs), _logits(base, inputs))
        assert torch.equal(_logits(model, inputs), adapted)
    originals = [e.down_proj.detach().clone() for e in _experts(model)]
    surgery.merge(model)
    torch.testing.assert_close(_logits(model, inputs), adapted, rtol=0, atol=1e-5)
    surgery.unmerge(model)
    assert all(torch.equal(e.down_proj, o) for e, o in zip(_experts(model), originals))
    torch.testing.assert_close(_logits(model, inputs), adapted, rtol=0, atol=0)

    model.train()
    torch.manual_seed(0)
    dropped = model(**inputs).logits
    assert (dropped - adapted).abs().max() > 1e-3                    # the LoRA path's dropout acts in training
    with surgery.disable(model):
        torch.testing.assert_close(model(**inputs).logits, _logits(base, inputs), rtol=0, atol=1e-5)
    routed = {}
    hooks = [layer.mlp.gate.register_forward_hook(
        lambda mod, args, out, i=i: routed.__setitem__(i, set(out[2].flatten().tolist())))
        for i, layer in enumerate(model.model.layers)]
    model.zero_grad()
    for site in store_of(model).records["default"].weight_sites:
        site.adapter.dropout.p = 0.0      # every A row sees its input: a zero gradient means an unrouted expert
    model(input_ids=torch.tensor([[5]])).logits.pow(2).mean().backward()
    for h in hooks:
        h.remove()
    for layer, experts in routed.items():
        lora = _site(model, layer, "down_proj")
        for e in range(EXPERTS):
            assert (lora.lora_A.grad[e].abs().max() > 0) == (e in experts), (layer, e)
            assert (lora.lora_B.grad[e].abs().max() > 0) == (e in experts), (layer, e)
    surgery.remove(model)
    assert not any("_surgery_grouped" in e.__dict__ or e._forward_hooks or e._forward_pre_hooks
                   for e in _experts(model))
    torch.testing.assert_close(_logits(model.eval(), inputs), _logits(base, inputs), rtol=0, atol=0)


def test_ia3_on_experts_scales_each_experts_input_columns(built):
    """IA3 on ffn.out scales its input: a vector per expert, (experts, in), ones at init (identity)."""
    _, model, inputs = built
    base = copy.deepcopy(model)
    surgery.apply(model, "ia3")
    ia3 = _site(model, 0, "down_proj", "ia3_ffn")
    assert ia3.ia3_l.shape == (EXPERTS, _experts(base)[0].down_proj.shape[2])
    assert torch.equal(_logits(model, inputs), _logits(base, inputs))
    perturb(model, scale=0.1)
    by_hand = copy.deepcopy(base)
    with torch.no_grad():
        for layer, expert in enumerate(_experts(by_hand)):
            expert.down_proj.mul_(_site(model, layer, "down_proj", "ia3_ffn").ia3_l[:, None, :])
    _fold_dense_sites(model, by_hand)     # k and v (and Qwen2-MoE's shared expert down_proj)
    torch.testing.assert_close(_logits(model, inputs), _logits(by_hand, inputs), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind,options", [("said", {"d": 64}), ("sparse", {"k": 50, "select": "magnitude"})])
def test_said_and_sparse_deltas_span_the_whole_expert_tensor(kind, options):
    """The delta has the 3-D parameter's shape (experts × out × in entries); sparse magnitude picks the largest
    entries across experts; merge equals the unmerged forward."""
    model, inputs, _ = mixtral()
    base = copy.deepcopy(model)
    surgery.apply(model, _spec(kind, ["ffn.out"], **options))
    assert torch.equal(_logits(model, inputs), _logits(base, inputs))
    perturb(model, scale=0.1)
    adapter = _site(model, 0, "down_proj")
    weight = _experts(base)[0].down_proj
    delta = adapter.delta_weight()
    assert delta.shape == weight.shape
    if kind == "sparse":
        chosen = torch.zeros(weight.numel(), dtype=torch.bool)
        chosen[adapter.indices] = True
        assert weight.abs().flatten()[chosen].min() >= weight.abs().flatten()[~chosen].max()
    by_hand = copy.deepcopy(base)
    with torch.no_grad():
        for layer, expert in enumerate(_experts(by_hand)):
            expert.down_proj.add_(_site(model, layer, "down_proj").delta_weight())
    adapted = _logits(model, inputs)
    torch.testing.assert_close(adapted, _logits(by_hand, inputs), rtol=0, atol=1e-5)
    surgery.merge(model)
    torch.testing.assert_close(_logits(model, inputs), adapted, rtol=0, atol=1e-5)


def test_experts_adapters_save_and_load(tmp_path):
    model, inputs, _ = mixtral()
    fresh = copy.deepcopy(model)
    surgery.apply(model, _spec("lora", ["ffn.out", "ffn.in"], r=2, alpha=4))
    perturb(model, scale=0.1)
    expected = _logits(model, inputs)
    surgery.save(model, tmp_path / "moe")
    loaded = surgery.load(fresh, tmp_path / "moe")
    torch.testing.assert_close(_logits(loaded, inputs), expected, rtol=0, atol=0)
    # the base names stay in the model's own state dict (save_pretrained, a base checkpoint)
    keys = set(loaded.state_dict())
    assert "model.layers.0.mlp.experts.down_proj" in keys
    assert not any("parametrizations" in k for k in keys)


def test_adapters_without_a_per_expert_form_are_refused_and_leave_the_model_untouched():
    model, inputs, _ = mixtral()
    before = _logits(model, inputs)
    lora_on_weight = _spec("lora", ["ffn.out"], dropout=0.1)
    lora_on_weight["rules"][0]["realize"] = "weight"
    for spec in (_spec("dora", ["ffn.out"]), lora_on_weight,
                 {"version": 1, "name": "x", "rules": [{"name": "x", "match": {"role": "ffn.out"}, "action": "wrap",
                                                        "realize": "activation", "module": {"kind": "ia3"}}]}):
        with pytest.raises(surgery.RewriteError, match=r"experts|3-D parameter|dropout"):
            surgery.apply(model, spec)
        assert not hasattr(model, "surgery_adapters")
        assert not any(hasattr(e, "parametrizations") for e in _experts(model))
        assert torch.equal(_logits(model, inputs), before)


def _ffn_sites(model, rule):
    return sorted(model.surgery_adapters.adapters["default"][rule].keys())


def test_qwen2_moe_ffn_adapter_sits_once_after_the_combined_moe_output():
    """Qwen2-MoE's FFN is routed experts + a sigmoid-gated shared expert, added; both are ffn.out. Houlsby's FFN
    adapter goes once per layer after their sum (it was inserted twice: also after the shared expert's
    down_proj), and equals bottleneck(moe_output) + moe_output there."""
    model, inputs, _ = qwen2_moe()
    base = copy.deepcopy(model)
    surgery.apply(model, "houlsby")
    assert _ffn_sites(model, "ffn_adapter") == ["model_layers_0_mlp_experts", "model_layers_1_mlp_experts"]
    perturb(model, scale=0.1)
    adapters = model.surgery_adapters.adapters["default"]
    by_hand = copy.deepcopy(base)
    for layer, block in enumerate(by_hand.model.layers):
        ffn = adapters["ffn_adapter"][f"model_layers_{layer}_mlp_experts"]
        attn = adapters["attention_adapter"][f"model_layers_{layer}_self_attn_o_proj"]
        block.mlp.register_forward_hook(lambda mod, args, out, a=ffn: a(out))
        block.self_attn.o_proj.register_forward_hook(lambda mod, args, out, a=attn: a(out))
    torch.testing.assert_close(_logits(model, inputs), _logits(by_hand, inputs), rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec", ["parallel", "mam"])
def test_qwen2_moe_parallel_adapter_adds_to_the_combined_moe_output(spec):
    """Parallel adapters (and MAM's FFN part) on Qwen2-MoE: one per layer, moe(x) + adapter(h) with h the FFN
    sub-layer's residual input (crashed: the shared expert's output is (tokens, hidden), h (batch, seq, hidden))."""
    model, inputs, _ = qwen2_moe()
    surgery.apply(model, spec)
    assert _ffn_sites(model, "ffn_adapter") == ["model_layers_0_mlp_experts", "model_layers_1_mlp_experts"]
    perturb(model, scale=0.1)
    block = model.model.layers[1]
    seen = {}
    hooks = [block.post_attention_layernorm.register_forward_pre_hook(lambda m, a: seen.__setitem__("h", a[0])),
             block.mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0])),
             block.mlp.register_forward_hook(lambda m, a, out: seen.__setitem__("y", out))]
    _logits(model, inputs)
    for h in hooks:
        h.remove()
    with torch.no_grad(), surgery.disable(model):
        plain = block.mlp(seen["x"])
    ffn = model.surgery_adapters.adapters["default"]["ffn_adapter"]["model_layers_1_mlp_experts"]
    with torch.no_grad():
        expected = plain + ffn(seen["h"])
    assert seen["y"].shape == seen["h"].shape
    torch.testing.assert_close(seen["y"], expected, rtol=0, atol=1e-5)


def test_qlora_on_moe_quantizes_the_linears_and_keeps_the_experts_dense():
    """NF4 is a 2-D linear weight the grouped matmul cannot read: quantize_nf4's default selection leaves the
    expert parameters dense (warning), an explicit one naming them is refused; LoRA then applies to both."""
    pytest.importorskip("torchao")
    from surgery.quantize import is_nf4
    model, inputs, _ = mixtral()
    with pytest.raises(surgery.SurgeryError, match="3-D parameter read by a grouped matmul"):
        surgery.quantize_nf4(model, {"role": "ffn.out"})
    assert not any(is_nf4(p) for p in model.parameters())
    with pytest.warns(surgery.SurgeryWarning, match="stay dense"):
        surgery.quantize_nf4(model)
    assert is_nf4(model.model.layers[0].self_attn.q_proj.weight)
    assert not is_nf4(model.model.layers[0].mlp.experts.down_proj)
    quantized = _logits(model, inputs)
    surgery.apply(model, _spec("lora", ["attention.q", "attention.v", "ffn.in", "ffn.out"], r=4, alpha=8))
    assert torch.equal(_logits(model, inputs), quantized)
    perturb(model, scale=0.1)
    assert (_logits(model, inputs) - quantized).abs().max() > 1e-3


def test_to_peft_refuses_expert_parameters_by_name(tmp_path):
    model, _, _ = mixtral()
    surgery.apply(model, _spec("lora", ["ffn.out"], r=2))
    with pytest.raises(surgery.SurgeryError, match="target_parameters"):
        surgery.to_peft(model, tmp_path / "peft")


def test_lora_on_experts_equals_peft_target_parameters_for_the_same_weights():
    """PEFT's LoRA on expert parameters (`target_parameters`, lora.ParamWrapper): A is Linear(in, r·experts)
    (row e·r + i is A_e's row i), B is Linear(r·experts, out) (column i·experts + e is B_e's column i)."""
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.layer import ParamWrapper
    model, inputs, _ = mixtral()
    reference = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=[], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in reference.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    surgery.apply(model, _spec("lora", ["ffn.in", "ffn.out"], r=4, alpha=8))
    wrappers = [m for m in reference.modules() if isinstance(m, ParamWrapper)]
    assert len(wrappers) == 4
    with torch.no_grad():
        for wrapper in wrappers:
            layer = next(i for i, block in enumerate(reference.base_model.model.model.layers)
                         if any(w is wrapper for w in block.modules()))
            ours = _site(model, layer, wrapper.parameter_name)
            a, b = wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight
            ours.lora_A.copy_(a.reshape(EXPERTS, 4, -1))
            ours.lora_B.copy_(b.reshape(b.shape[0], 4, EXPERTS).permute(2, 0, 1))
    with torch.no_grad():
        expected = reference(**inputs).logits
    with surgery.disable(model):
        assert (expected - _logits(model, inputs)).abs().max() > 1e-3     # the LoRA changes the output
    torch.testing.assert_close(_logits(model, inputs), expected, rtol=0, atol=1e-5)


class _FlatFFN(torch.nn.Module):
    """An FFN that works on the tokens flattened, (tokens, hidden), as MoE blocks do."""

    def __init__(self, hidden):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(hidden, 2 * hidden), torch.nn.Linear(2 * hidden, hidden)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.reshape(-1, x.shape[-1]))))


class _FlatBlock(torch.nn.Module):
    def __init__(self, hidden=32, heads=4):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.ln1, self.ln2 = torch.nn.LayerNorm(hidden), torch.nn.LayerNorm(hidden)
        self.ffn = _FlatFFN(hidden)

    def forward(self, x):
        x = self.ln1(x + self.attn(x, x, x, need_weights=False)[0])
        return self.ln2(x + self.ffn(x).view_as(x))


class _FlatModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 32)
        self.blocks = torch.nn.Sequential(_FlatBlock(), _FlatBlock())

    def forward(self, ids):
        return self.blocks(self.embed(ids))


def test_a_parallel_adapter_adds_to_a_branch_that_flattens_its_tokens():
    """The FFN branch is (tokens, hidden), its residual input (batch, seq, hidden): the parallel adapter's output
    is added in the branch's shape (it crashed with a broadcast error)."""
    torch.manual_seed(0)
    model = _FlatModel().eval()
    ids = torch.randint(0, 50, (2, 5))
    surgery.apply(model, "parallel", example_inputs=(ids,))
    perturb(model, scale=0.1)
    seen = {}
    block = model.blocks[1]
    hooks = [block.ln1.register_forward_hook(lambda m, a, out: seen.__setitem__("h", out)),
             block.ffn.register_forward_hook(lambda m, a, out: seen.__setitem__("y", out))]
    with torch.no_grad():
        model(ids)
        for h in hooks:
            h.remove()
        with surgery.disable(model):
            plain = block.ffn(seen["h"])
        adapter = model.surgery_adapters.adapters["default"]["ffn_adapter"]["blocks_1_ffn_fc2"]
        torch.testing.assert_close(seen["y"], plain + adapter(seen["h"]).reshape(plain.shape), rtol=0, atol=1e-5)


def test_memory_budget_counts_every_experts_adapter():
    """The apply's memory estimate builds each site's module as realize does: a LoRA per expert counts
    experts × r × (in + out), not one 2-D LoRA of the same width (a shared expert of Qwen2-MoE has that width)."""
    from surgery.api import _analysis
    from surgery.match import match_spec
    from surgery.rewrite.budget import estimate
    model, inputs, _ = qwen2_moe()
    spec = surgery.load_spec(_spec("lora", ["ffn.in", "ffn.out"], r=2, alpha=2))
    surgery.apply(model, spec)
    held = sum(p.numel() * p.element_size() for p in model.surgery_adapters.parameters())
    surgery.remove(model)
    analysis = _analysis(model, None)
    assert estimate(model, analysis, spec, match_spec(spec, analysis)).total == held


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_two_expert_loras_stack_and_average(dropout):
    """Two LoRA sets on the experts (on the weight, or inside the grouped matmul with dropout): a Stack adds both
    deltas, an Average w_a·Δa + w_b·Δb; a BatchSplit cannot split tokens sorted by expert inside the grouped
    matmul and says so."""
    model, inputs, _ = mixtral()
    base = copy.deepcopy(model)
    for name in ("a", "b"):
        surgery.apply(model, _spec("lora", ["ffn.out"], r=2, alpha=2, dropout=dropout), name=name)
    perturb(model, scale=0.1)
    rules = model.surgery_adapters.adapters

    def by_hand(weights):
        twin = copy.deepcopy(base)
        with torch.no_grad():
            for layer, expert in enumerate(_experts(twin)):
                for name, w in weights.items():
                    lora = rules[name]["lora"][f"model_layers_{layer}_mlp_experts__down_proj"]
                    expert.down_proj.add_(w * lora.scaling * lora.lora_B @ lora.lora_A)
        return _logits(twin, inputs)

    torch.testing.assert_close(_logits(model, inputs), by_hand({"a": 1.0, "b": 1.0}), rtol=0, atol=1e-5)
    surgery.set_active(model, surgery.Average("a", "b", weights=[0.3, 0.7]))
    torch.testing.assert_close(_logits(model, inputs), by_hand({"a": 0.3, "b": 0.7}), rtol=0, atol=1e-5)
    surgery.set_active(model, "b")
    torch.testing.assert_close(_logits(model, inputs), by_hand({"b": 1.0}), rtol=0, atol=1e-5)
    if dropout:
        with pytest.raises(surgery.SurgeryError, match="sorted by expert"):
            surgery.set_active(model, surgery.BatchSplit("a", "b", batch_sizes=[1, 1]))
        model.surgery_adapters.runtime.composition = surgery.BatchSplit("a", "b", batch_sizes=[1, 1])
        with pytest.raises(surgery.RewriteError, match="sorted by expert"):    # and at run time, if set anyway
            _logits(model, inputs)
        surgery.set_active(model, "a")     # the failed call left no mode behind
        torch.testing.assert_close(_logits(model, inputs), by_hand({"a": 1.0}), rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_expert_loras_compile_with_fullgraph(dropout):
    """torch.compile(fullgraph=True) traces the parametrization and the grouped-matmul mode (the op check is
    by identity) and gives the eager output."""
    model, inputs, _ = mixtral()
    surgery.apply(model, _spec("lora", ["ffn.in", "ffn.out"], r=2, alpha=2, dropout=dropout))
    perturb(model, scale=0.1)
    eager = _logits(model, inputs)
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True)(**inputs).logits
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_experts_stored_in_out_transposed_with_biases(dropout):
    """GPT-OSS stores its experts (experts, in, out) (`is_transposed`) with per-expert biases: the LoRA delta is
    added transposed, on the weight or inside the grouped matmul, and the model equals the weights written in."""
    import transformers
    cfg = transformers.GptOssConfig(vocab_size=96, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                    num_experts_per_tok=2, max_position_embeddings=64, sliding_window=8,
                                    layer_types=["sliding_attention", "full_attention"])
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    ids = torch.randint(3, 96, (2, 8))
    base = copy.deepcopy(model)
    spec = _spec("lora", ["ffn.out"], r=2, alpha=4, dropout=dropout)
    spec["rules"][0]["match"]["module"] = "*.mlp.experts"
    surgery.apply(model, spec)
    perturb(model, scale=0.1)
    by_hand = copy.deepcopy(base)
    sites = model.surgery_adapters.adapters["default"]["lora"]
    assert {k for k in sites if k.endswith("down_proj")} == {f"model_layers_{i}_mlp_experts__down_proj" for i in (0, 1)}
    with torch.no_grad():
        for key, lora in sites.items():    # GPT-OSS's gate_up_proj also writes the hidden width: ffn.out too
            layer, param = int(key.split("_")[2]), key.rpartition("__")[2]
            weight = getattr(by_hand.model.layers[layer].mlp.experts, param)    # (experts, in, out)
            assert weight.shape == (EXPERTS, lora.lora_A.shape[2], lora.lora_B.shape[1])
            weight.add_((lora.scaling * lora.lora_B @ lora.lora_A).transpose(-2, -1))
    adapted = _logits(model, {"input_ids": ids})
    assert (adapted - _logits(base, {"input_ids": ids})).abs().max() > 1e-3
    torch.testing.assert_close(adapted, _logits(by_hand, {"input_ids": ids}), rtol=0, atol=1e-5)


def test_adapters_inside_the_grouped_matmul_refuse_to_be_skipped():
    """An experts module that computes its experts without the grouped matmul (the implementation switched to
    transformers' batched_mm after apply) would bypass adapters that live inside it: an error, never a silent
    base output. Adapters on the weight follow any implementation."""
    model, inputs, _ = mixtral()
    surgery.apply(model, _spec("lora", ["ffn.out"], r=2, dropout=0.1), name="inside")
    surgery.apply(model, _spec("lora", ["ffn.in"], r=2), name="weight")
    perturb(model, scale=0.1)
    expected = _logits(model, inputs)
    model.config._experts_implementation = "batched_mm"
    with pytest.raises(surgery.RewriteError, match="computed its experts another way"):
        _logits(model, inputs)
    surgery.set_active(model, "weight")
    on_weight = _logits(model, inputs)
    model.config._experts_implementation = "grouped_mm"
    torch.testing.assert_close(_logits(model, inputs), on_weight, rtol=0, atol=1e-5)
    surgery.set_active(model, ["inside", "weight"])
    torch.testing.assert_close(_logits(model, inputs), expected, rtol=0, atol=1e-5)
