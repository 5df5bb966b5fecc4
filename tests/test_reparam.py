"""Reparameterization methods (LoRA, IA3, KronA, BitFit, LN tuning) and merge/unmerge, on MiniGPT, BERT, GPT-2
and LLaMA: explicit W + ΔW references, parameter counts by formula, merged == unmerged, exact unmerge, and a
merged export graph that is the base graph."""
import copy
import math

import pytest
import torch
from torch.nn.utils import parametrize

import surgery
from models import (ARCHS, assert_same_state, example_inputs, make_bert, make_gpt2, make_llama, make_minigpt,
                    perturb, run, state, token_ids)

# The factories' shapes (tests/models.py): hidden 64, 2 layers, 4 heads; LLaMA has 2 KV heads and an FFN of 128.
D, LAYERS = 64, 2
KV = {"minigpt": 64, "bert": 64, "gpt2": 64, "llama": 32}
FF = {"minigpt": 256, "bert": 256, "gpt2": 256, "llama": 128}


def divisor_below_sqrt(n):
    return max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)


def krona_count(n_in, n_out):
    a_out, a_in = divisor_below_sqrt(n_out), divisor_below_sqrt(n_in)
    return a_out * a_in + (n_out // a_out) * (n_in // a_in)


def expected_count(method, arch):
    kv, ff = KV[arch], FF[arch]
    per_layer = {
        "lora": 8 * (D + D) + 8 * (D + kv),                      # r·(d_in + d_out) for q and v, r = 8
        "ia3": kv + kv + ff,                                     # k_out + v_out + the FFN output's input
        "krona": krona_count(D, D) + krona_count(D, kv),         # |A| + |B| for q and v
    }[method]
    return LAYERS * per_layer


WRAP_SPECS = {"lora": "specs/lora.yaml", "ia3": "specs/ia3.yaml", "krona": "specs/krona.yaml"}


def _export_graph(model, arch="llama"):
    ids = token_ids()
    args, kwargs = ((ids,), {}) if arch == "minigpt" else ((), {"input_ids": ids})
    if arch in ("gpt2", "llama"):
        kwargs["use_cache"] = False
    with torch.no_grad():
        return torch.export.export(model, args, kwargs, strict=False).graph


def export_ops(arch, model):
    """The call_function ops of the model's torch.export graph. Parameters are placeholders: a merged model
    still holds its (unused) adapter parameters, so those are not compared here; after merge + remove they are
    gone too and the whole graph is the base graph (test_merge_errors_and_merge_then_remove_bakes_in)."""
    return [str(n.target) for n in _export_graph(model, arch).nodes if n.op == "call_function"]


def hooks_and_parametrizations(model):
    """Hooks on the model's submodules (the root keeps surgery's call-capture hook) and parametrized modules."""
    inner = [m for m in model.modules() if m is not model]
    return (sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in inner),
            sum(parametrize.is_parametrized(m) for m in model.modules()))


def base_weights(model):
    return {n: (p, p.detach().clone()) for n, p in model.named_parameters() if not n.startswith("surgery_adapters")}


def assert_weights_restored(weights, *, exact=True):
    for name, (param, before) in weights.items():
        if exact:
            assert torch.equal(param.detach(), before), name
        else:
            torch.testing.assert_close(param.detach(), before, atol=1e-6, rtol=0, msg=name)


@pytest.fixture(scope="module", params=list(ARCHS))
def base(request):
    """One model per architecture, traced once (surgery caches the analysis on it). Tests leave it clean."""
    arch = request.param
    model = ARCHS[arch]().eval()
    surgery.plan(model, "specs/lora.yaml", example_inputs=example_inputs(arch, model))   # traces once
    ids = token_ids(2, 8)
    return {"arch": arch, "model": model, "ids": ids, "out": run(arch, model, ids).detach(),
            "ops": export_ops(arch, model), "hooks": hooks_and_parametrizations(model)}


@pytest.mark.parametrize("method", list(WRAP_SPECS))
def test_wrap_method_merges_and_unmerges_exactly(base, method):
    arch, model, ids = base["arch"], base["model"], base["ids"]
    weights = base_weights(model)
    surgery.apply(model, WRAP_SPECS[method], name=method)
    try:
        assert surgery.trainable_parameters(model)[0] == expected_count(method, arch)
        perturb(model, 0.1, seed=3)
        out = run(arch, model, ids).detach()
        assert (out - base["out"]).abs().max() > 1e-3           # the perturbed adapters are in the forward

        report = surgery.merge(model)
        assert len(report.merged) == (6 if method == "ia3" else 4)
        assert report.not_merged == {} and report.in_place == []
        assert hooks_and_parametrizations(model) == base["hooks"]
        assert any(not torch.equal(p.detach(), w) for p, w in weights.values())   # folded into the base
        torch.testing.assert_close(run(arch, model, ids), out, atol=1e-5, rtol=0)
        assert surgery.trainable_parameters(model)[0] == 0      # folded adapters are frozen while merged

        assert surgery.unmerge(model) == [method]
        assert_weights_restored(weights)                        # bit for bit (exact=True)
        torch.testing.assert_close(run(arch, model, ids), out, atol=1e-6, rtol=0)
        assert surgery.trainable_parameters(model)[0] == expected_count(method, arch)
    finally:
        surgery.remove(model, method)
    torch.testing.assert_close(run(arch, model, ids), base["out"], atol=1e-6, rtol=0)


def test_all_wrap_methods_stacked_merge_to_the_base_graph(base):
    """LoRA, IA3 and KronA at once (LoRA and KronA on the same q and v weights as IA3's v): merged together, the
    export graph has exactly the base graph's ops; unmerged, the weights are the base's bit for bit."""
    arch, model, ids = base["arch"], base["model"], base["ids"]
    weights = base_weights(model)
    for method, spec in WRAP_SPECS.items():
        surgery.apply(model, spec, name=method)
    try:
        perturb(model, 0.1, seed=4)
        out = run(arch, model, ids).detach()
        report = surgery.merge(model)
        assert len(report.merged) == 4 + 6 + 4 and report.not_merged == {}
        torch.testing.assert_close(run(arch, model, ids), out, atol=1e-5, rtol=0)
        merged_ops = export_ops(arch, model)
        assert len(merged_ops) == len(base["ops"])
        assert merged_ops == base["ops"]
        assert surgery.unmerge(model) == list(WRAP_SPECS)
        assert_weights_restored(weights)
        torch.testing.assert_close(run(arch, model, ids), out, atol=1e-6, rtol=0)
    finally:
        for method in WRAP_SPECS:
            surgery.remove(model, method)


def test_selection_methods_train_biases_or_norms(base):
    arch, model, ids = base["arch"], base["model"], base["ids"]
    names = {n for n, _ in model.named_parameters()}
    biases = {n for n in names if "bias" in n.rpartition(".")[2].split("_")}
    norms = {f"{path}.{n}" if path else n for path, m in model.named_modules() if type(m).__name__.endswith("Norm")
             for n, _ in m.named_parameters(recurse=False)}
    params = dict(model.named_parameters())
    for method, selected in (("bitfit", biases), ("ln_tuning", norms)):
        if not selected:   # LLaMA has no biases: BitFit would train nothing, which is an error, not a no-op
            with pytest.raises(surgery.RewriteError, match="no bias parameters"):
                surgery.apply(model, f"specs/{method}.yaml", name=method)
            continue
        surgery.apply(model, f"specs/{method}.yaml", name=method)
        saved = {n: params[n].detach().clone() for n in selected}
        try:
            assert {n for n, p in model.named_parameters() if p.requires_grad} == selected
            assert surgery.trainable_parameters(model)[0] == sum(params[n].numel() for n in selected)
            if selected:   # LLaMA has no biases: BitFit trains nothing there
                with torch.no_grad():
                    for n in selected:
                        params[n].add_(0.1)
                changed = run(arch, model, ids).detach()
                assert (changed - base["out"]).abs().max() > 1e-3
            report = surgery.merge(model, method)
            assert report.merged == [] and report.not_merged == {}
            assert sorted(report.in_place) == sorted(selected)  # already part of the base weights
            assert hooks_and_parametrizations(model) == base["hooks"]
            if selected:
                torch.testing.assert_close(run(arch, model, ids), changed, atol=0, rtol=0)
            assert surgery.unmerge(model, method) == [method]
        finally:
            with torch.no_grad():
                for n, value in saved.items():
                    params[n].copy_(value)
            surgery.remove(model, method)


# ---------------------------------------------------------------------------------- explicit W + ΔW references

def _delta(lora):
    return lora.scaling * (lora.lora_B @ lora.lora_A)


def test_lora_on_multihead_attention_equals_explicit_reference():
    """Packed in_proj q/v rows and the functionally-read out_proj: both must change the output (PEFT applies
    the out_proj delta twice, and out_proj alone is a silent no-op there)."""
    model = make_minigpt().eval()
    reference = copy.deepcopy(model)
    ids = token_ids(3, 9)
    base_out = model(ids).detach()
    spec = {"rules": [
        {"name": "qv", "match": {"role": ["attention.q", "attention.v"]}, "action": "wrap",
         "module": {"kind": "lora", "r": 4, "alpha": 8}},
        {"name": "out", "match": {"role": "attention.output"}, "action": "wrap",
         "module": {"kind": "lora", "r": 2, "alpha": 4, "use_rslora": True}}]}
    surgery.apply(model, spec, example_inputs=model.example_inputs())
    perturb(model, 0.1)
    store = model.surgery_adapters.adapters["default"]
    with torch.no_grad():
        for i, block in enumerate(reference.blocks):
            q, v = store["qv"][f"blocks_{i}_attn__attention_q"], store["qv"][f"blocks_{i}_attn__attention_v"]
            out = store["out"][f"blocks_{i}_attn_out_proj"]
            assert q.scaling == 8 / 4 and out.scaling == 4 / math.sqrt(2)
            block.attn.in_proj_weight[0:D] += (8 / 4) * q.lora_B @ q.lora_A
            block.attn.in_proj_weight[2 * D:3 * D] += (8 / 4) * v.lora_B @ v.lora_A
            block.attn.out_proj.weight += (4 / math.sqrt(2)) * out.lora_B @ out.lora_A
    expected = reference(ids)
    assert (expected - base_out).abs().max() > 1e-2
    torch.testing.assert_close(model(ids), expected, atol=1e-5, rtol=0)
    surgery.merge(model)
    torch.testing.assert_close(model(ids), expected, atol=1e-5, rtol=0)
    for mine, theirs in zip(model.blocks, reference.blocks):
        torch.testing.assert_close(mine.attn.out_proj.weight, theirs.attn.out_proj.weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(mine.attn.in_proj_weight, theirs.attn.in_proj_weight, atol=1e-6, rtol=0)
    surgery.unmerge(model)
    torch.testing.assert_close(model(ids), expected, atol=1e-5, rtol=0)


def test_lora_on_out_proj_alone_is_not_a_no_op():
    model = make_minigpt().eval()
    reference = copy.deepcopy(model)
    ids = token_ids(2, 7)
    base_out = model(ids).detach()
    spec = {"rules": [{"name": "o", "match": {"role": "attention.output"}, "action": "wrap",
                       "module": {"kind": "lora", "r": 4, "alpha": 4}}]}
    surgery.apply(model, spec, example_inputs=model.example_inputs())
    perturb(model, 0.1)
    store = model.surgery_adapters.adapters["default"]["o"]
    with torch.no_grad():
        for i, block in enumerate(reference.blocks):
            lora = store[f"blocks_{i}_attn_out_proj"]
            block.attn.out_proj.weight += lora.lora_B @ lora.lora_A
    out = model(ids)
    assert (out - base_out).abs().max() > 1e-2
    torch.testing.assert_close(out, reference(ids), atol=1e-5, rtol=0)


def test_lora_on_gpt2_conv1d_equals_explicit_reference():
    """Conv1D stores W transposed (in, out) and runs addmm; q/v are column slices of the packed c_attn."""
    model = make_gpt2().eval()
    reference = copy.deepcopy(model)
    ids = token_ids(2, 8)
    spec = {"rules": [
        {"name": "qv", "match": {"role": ["attention.q", "attention.v"]}, "action": "wrap",
         "module": {"kind": "lora", "r": 4, "alpha": 8}},
        {"name": "ffn", "match": {"role": ["ffn.in", "attention.output"]}, "action": "wrap",
         "module": {"kind": "lora", "r": 2, "alpha": 2}}]}
    surgery.apply(model, spec)
    perturb(model, 0.1)
    store = model.surgery_adapters.adapters["default"]
    with torch.no_grad():
        for i, block in enumerate(reference.transformer.h):
            prefix = f"transformer_h_{i}_"
            q, v = store["qv"][prefix + "attn_c_attn__attention_q"], store["qv"][prefix + "attn_c_attn__attention_v"]
            block.attn.c_attn.weight[:, 0:D] += (2 * q.lora_B @ q.lora_A).t()
            block.attn.c_attn.weight[:, 2 * D:3 * D] += (2 * v.lora_B @ v.lora_A).t()
            for module, key in ((block.mlp.c_fc, "mlp_c_fc"), (block.attn.c_proj, "attn_c_proj")):
                lora = store["ffn"][prefix + key]
                module.weight += (lora.lora_B @ lora.lora_A).t()
    expected = reference(input_ids=ids).logits
    torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
    report = surgery.merge(model)
    assert len(report.merged) == 8
    torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.transformer.h[0].attn.c_attn.weight, reference.transformer.h[0].attn.c_attn.weight,
                               atol=1e-6, rtol=0)


def test_ia3_on_bert_equals_explicit_reference():
    """k and v outputs (weight rows and bias) scaled, the FFN output projection's input (weight columns)."""
    model = make_bert().eval()
    reference = copy.deepcopy(model)
    ids = token_ids(2, 8)
    surgery.apply(model, "specs/ia3.yaml")
    perturb(model, 0.2)
    store = model.surgery_adapters.adapters["default"]
    with torch.no_grad():
        for i, layer in enumerate(reference.encoder.layer):
            for proj in ("key", "value"):
                scale = store["ia3_kv"][f"encoder_layer_{i}_attention_self_{proj}"].ia3_l
                getattr(layer.attention.self, proj).weight.mul_(scale[:, None])
                getattr(layer.attention.self, proj).bias.mul_(scale)
            layer.output.dense.weight.mul_(store["ia3_ffn"][f"encoder_layer_{i}_output_dense"].ia3_l[None, :])
    expected = reference(input_ids=ids).last_hidden_state
    torch.testing.assert_close(model(input_ids=ids).last_hidden_state, expected, atol=1e-5, rtol=0)


def test_krona_equals_explicit_kronecker_reference_without_building_it(monkeypatch):
    model = make_llama().eval()
    reference = copy.deepcopy(model)
    ids = token_ids(2, 8)
    spec = {"rules": [{"name": "k", "match": {"role": ["attention.q", "attention.v"]}, "action": "wrap",
                       "module": {"kind": "krona", "a_out": 4, "a_in": 8, "scale": 0.5}}]}
    surgery.apply(model, spec)
    # |A| + |B| per site: q (64 × 64): 4·8 + 16·8; v (32 × 64): 4·8 + 8·8
    assert surgery.trainable_parameters(model)[0] == LAYERS * ((32 + 16 * 8) + (32 + 8 * 8))
    base_out = model(input_ids=ids).logits.detach()
    torch.testing.assert_close(reference(input_ids=ids).logits, base_out, atol=0, rtol=0)   # A = 0: identity
    perturb(model, 0.1)
    store = model.surgery_adapters.adapters["default"]["k"]
    with torch.no_grad():
        for i, layer in enumerate(reference.model.layers):
            for proj in ("q_proj", "v_proj"):
                krona = store[f"model_layers_{i}_self_attn_{proj}"]
                assert krona.krona_A.shape == (4, 8)
                getattr(layer.self_attn, proj).weight += 0.5 * torch.kron(krona.krona_A, krona.krona_B)
    expected = reference(input_ids=ids).logits

    def no_kron(*args, **kwargs):
        raise AssertionError("the forward built the Kronecker product")
    with monkeypatch.context() as patch:
        patch.setattr(torch, "kron", no_kron)
        out = model(input_ids=ids).logits
    assert (out - base_out).abs().max() > 1e-3
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    surgery.merge(model)
    torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


def test_krona_factor_that_does_not_divide_is_an_error():
    model = make_llama().eval()
    before = state(model)
    spec = {"rules": [{"match": {"role": "attention.q"}, "action": "wrap", "module": {"kind": "krona", "a_out": 5}}]}
    with pytest.raises(surgery.RewriteError, match="a_out must divide 64"):
        surgery.apply(model, spec)
    assert_same_state(before, state(model))


# ---------------------------------------------------------------------------------------------- LoRA options

def test_lora_options_init_scaling_dropout_and_targets():
    model = make_llama().eval()
    ids = token_ids(2, 8)
    base_out = model(input_ids=ids).logits.detach()
    spec = {"rules": [{"name": "g", "match": {"role": "attention.q"}, "action": "wrap",
                       "module": {"kind": "lora", "r": 4, "alpha": 8, "init": "gaussian", "use_rslora": True}},
                      {"name": "k", "match": {"role": "attention.v"}, "action": "wrap",
                       "module": {"kind": "lora", "r": 16, "dropout": 0.5}}]}
    surgery.apply(model, spec)
    torch.testing.assert_close(model(input_ids=ids).logits, base_out, atol=0, rtol=0)   # B = 0: identity at init
    store = model.surgery_adapters.adapters["default"]
    gaussian, kaiming = store["g"]["model_layers_0_self_attn_q_proj"], store["k"]["model_layers_0_self_attn_v_proj"]
    assert gaussian.scaling == 8 / math.sqrt(4) and kaiming.scaling == 8 / 16
    assert abs(gaussian.lora_A.std().item() - 1 / 4) < 0.25 * (1 / 4)       # std 1/r
    bound = 1 / math.sqrt(D)                                                   # kaiming_uniform(a=√5) on fan_in 64
    assert 0.9 * bound < kaiming.lora_A.abs().max().item() <= bound
    assert not gaussian.lora_B.any() and not kaiming.lora_B.any()
    perturb(model, 0.1)
    model.train()
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)   # LoRA dropout on
    model.eval()
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_lora_targets_by_role_and_layer():
    model = make_llama().eval()
    spec = {"rules": [
        {"name": "late", "match": {"role": ["attention.output", "ffn.gate", "ffn.in", "ffn.out"], "layers": "-1:"},
         "action": "wrap", "module": {"kind": "lora", "r": 2}},
        {"name": "head", "match": {"role": "lm_head"}, "action": "wrap", "module": {"kind": "lora", "r": 2}}]}
    surgery.apply(model, spec)
    sites = sorted(site.owner_path for site in model.surgery_adapters.records["default"].weight_sites)
    assert sites == ["lm_head", "model.layers.1.mlp.down_proj", "model.layers.1.mlp.gate_proj",
                     "model.layers.1.mlp.up_proj", "model.layers.1.self_attn.o_proj"]
    ff, vocab = FF["llama"], model.config.vocab_size
    assert surgery.trainable_parameters(model)[0] == 2 * ((D + D) + 2 * (D + ff) + (ff + D) + (D + vocab))


def test_activation_and_weight_realizations_agree(base):
    arch, model, ids = base["arch"], base["model"], base["ids"]
    # nn.MultiheadAttention (minigpt) reads its projections' weights functionally: on activations they are
    # reached inside its F.multi_head_attention_forward (surgery/rewrite/mha.py)
    for module, roles in (({"kind": "lora", "r": 4}, ["attention.q", "attention.v", "ffn.in"]),
                          ({"kind": "ia3"}, ["attention.k", "attention.v", "ffn.out"])):
        outs = {}
        for realize in ("activation", "weight"):
            spec = {"rules": [{"name": "r", "match": {"role": roles}, "action": "wrap", "module": module,
                               "realize": realize}]}
            surgery.apply(model, spec, name=realize)
            assert {s.realized for s in model.surgery_adapters.records[realize].weight_sites} == {realize}
            generator = torch.Generator().manual_seed(5)    # the same adapter values for both
            with torch.no_grad():
                for name, p in model.surgery_adapters.named_parameters():
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.1 + name.endswith("ia3_l"))
            outs[realize] = run(arch, model, ids).detach()
            surgery.remove(model, realize)
        torch.testing.assert_close(outs["activation"], outs["weight"], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- merge behaviour

def test_merge_reports_what_cannot_fold_and_strict_changes_nothing():
    model = make_minigpt().eval()
    ids = token_ids()
    surgery.apply(model, "specs/houlsby.yaml", example_inputs=model.example_inputs(), name="bn")
    surgery.apply(model, "specs/lora.yaml", example_inputs=model.example_inputs(), name="lora")
    perturb(model, 0.1)
    out = model(ids).detach()
    before = state(model)
    with pytest.raises(surgery.SurgeryError, match="bn/attention_adapter/blocks_0_attn_out_proj"):
        surgery.merge(model, strict=True)
    assert_same_state(before, state(model))
    report = surgery.merge(model)
    assert sorted(report.merged) == ["lora/lora/blocks_0_attn__attention_q", "lora/lora/blocks_0_attn__attention_v",
                                     "lora/lora/blocks_1_attn__attention_q", "lora/lora/blocks_1_attn__attention_v"]
    assert sorted(report.not_merged) == [f"bn/{rule}/blocks_{i}_{where}" for rule, where in
                                         (("attention_adapter", "attn_out_proj"), ("ffn_adapter", "ffn_3"))
                                         for i in range(2)]
    assert all("Bottleneck" in why for why in report.not_merged.values())
    torch.testing.assert_close(model(ids), out, atol=1e-5, rtol=0)
    surgery.unmerge(model)
    torch.testing.assert_close(model(ids), out, atol=1e-6, rtol=0)


def test_failed_merge_restores_everything(monkeypatch):
    model = make_llama().eval()
    ids = token_ids()
    surgery.apply(model, "specs/lora.yaml")
    perturb(model, 0.1)
    out = model(input_ids=ids).logits.detach()
    before = state(model)
    sites = model.surgery_adapters.records["default"].weight_sites
    monkeypatch.setattr(sites[2].adapter, "transform_weight", lambda w: 1 / 0)   # two sites fold, then this fails
    with pytest.raises(surgery.SurgeryError, match="merge failed, the model is unchanged: ZeroDivisionError"):
        surgery.merge(model)
    assert_same_state(before, state(model))
    assert all(site.attached for site in sites)
    torch.testing.assert_close(model(input_ids=ids).logits, out, atol=0, rtol=0)


def test_tied_weight_is_reported_not_folded():
    model = make_gpt2().eval()
    ids = token_ids()
    assert model.lm_head.weight is model.transformer.wte.weight
    surgery.apply(model, {"rules": [{"name": "head", "match": {"role": "lm_head"}, "action": "wrap",
                                     "module": {"kind": "lora", "r": 2}}]})
    perturb(model, 0.1)
    out = model(input_ids=ids).logits.detach()
    embedding = model.transformer.wte.weight.detach().clone()
    report = surgery.merge(model)
    assert report.merged == [] and "shared by" in report.not_merged["default/head/lm_head"]
    assert torch.equal(model.transformer.wte.weight, embedding)
    torch.testing.assert_close(model(input_ids=ids).logits, out, atol=0, rtol=0)


def test_unmerge_memory_modes_and_changed_adapters():
    model = make_llama().eval()
    ids = token_ids()
    weights = base_weights(model)
    surgery.apply(model, "specs/lora.yaml")
    perturb(model, 0.1)
    out = model(input_ids=ids).logits.detach()
    covered = LAYERS * (D * D + KV["llama"] * D) * 4          # fp32 bytes of the q and v weights
    report = surgery.merge(model)
    assert 0 < report.stored_bytes < 0.6 * covered            # a bfloat16 residual, not a copy
    surgery.unmerge(model)
    assert_weights_restored(weights)
    report = surgery.merge(model, exact=False)
    assert report.stored_bytes == 0                            # the inverse (subtraction) is within 1e-6
    surgery.unmerge(model)
    assert_weights_restored(weights, exact=False)
    weights = base_weights(model)
    surgery.merge(model)
    with torch.no_grad():                                      # changing an adapter while merged
        model.surgery_adapters.records["default"].weight_sites[0].adapter.lora_B.add_(1.0)
    surgery.unmerge(model)
    assert_weights_restored(weights)                           # still the exact base
    assert (model(input_ids=ids).logits - out).abs().max() > 1e-3   # and the adapter now runs its new values


def test_merge_errors_and_merge_then_remove_bakes_in():
    model = make_llama().eval()
    ids = token_ids()
    base_nodes = len(_export_graph(model).nodes)
    with pytest.raises(surgery.SurgeryError, match="no adapters"):
        surgery.merge(model)
    surgery.apply(model, "specs/lora.yaml")
    with pytest.raises(surgery.SurgeryError, match="nothing is merged"):
        surgery.unmerge(model)
    with pytest.raises(surgery.SurgeryError, match="no adapter named 'other'"):
        surgery.merge(model, "other")
    perturb(model, 0.1)
    out = model(input_ids=ids).logits.detach()
    surgery.merge(model, "default")
    with pytest.raises(surgery.SurgeryError, match="already merged"):
        surgery.merge(model, "default")
    surgery.remove(model)                                      # PEFT's merge_and_unload
    assert not hasattr(model, "surgery_adapters")
    torch.testing.assert_close(model(input_ids=ids).logits, out, atol=1e-5, rtol=0)
    assert len(_export_graph(model).nodes) == base_nodes       # every node, placeholders included
