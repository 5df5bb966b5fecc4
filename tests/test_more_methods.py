"""QLoRA, DoRA, layer-wise selection, sparse fine-tuning and Intrinsic SAID on BERT and LLaMA from configs.

Counts come from the configs and each method's definition; merged vs unmerged, PEFT parity, the Fastfood
projection against a dense matrix, and the gradient mask against a direct computation are numerical checks.
"""
import pytest
import torch
import torch.nn.functional as F

import surgery
from models import assert_same_state, make_bert, make_llama, make_minigpt, perturb, run, state, token_ids
from surgery.modules.dora import DoRA
from surgery.modules.said import Fastfood, fwht

BLOCK_LINEARS = ["attention.q", "attention.k", "attention.v", "attention.output", "ffn.in",
                 "ffn.gate", "ffn.out"]


def linear_shapes(name, model):
    """(out, in) of every linear in one block, from the config alone."""
    c = model.config
    d, inter = c.hidden_size, c.intermediate_size
    if name == "bert":
        return {"attention.q": (d, d), "attention.k": (d, d), "attention.v": (d, d), "attention.output": (d, d),
                "ffn.in": (inter, d), "ffn.out": (d, inter)}
    kv = c.num_key_value_heads * (d // c.num_attention_heads)
    return {"attention.q": (d, d), "attention.k": (kv, d), "attention.v": (kv, d), "attention.output": (d, d),
            "ffn.gate": (inter, d), "ffn.in": (inter, d), "ffn.out": (d, inter)}


MAKERS = {"bert": make_bert, "llama": make_llama}


def weight_names(model, roles):
    """Site key -> qualified weight name of the linears with these roles."""
    from surgery.rewrite.actions import site_key
    rule = {"rules": [{"match": {"role": roles}, "action": "train"}]}
    return {site_key(m): m.site.linear.weight for m in surgery.plan(model, rule)}


def modules_of(model, rule):
    return {k: m for k, m in model.surgery_adapters.adapters["default"][rule].items() if k != "shared"}


def base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("surgery_adapters.")}


def assert_folds_exactly(model, rule, ids, name):
    """The weight form (transform_weight, what merge writes) computes what the activation form does, and
    merge/unmerge keep outputs and restore the base weights."""
    for module in modules_of(model, rule).values():
        if isinstance(module, DoRA):   # its activation form reads the base weight it was built on
            w = module._base_weight[0].detach()
        else:
            w = torch.randn(module.out_features, module.in_features)
        x = torch.randn(3, w.shape[1])
        torch.testing.assert_close(F.linear(x, module.transform_weight(w)), module(x, F.linear(x, w)),
                                   atol=1e-5, rtol=1e-5)
    unmerged = run(name, model, ids).detach()
    weights = base_weights(model)
    report = surgery.merge(model)
    assert len(report.merged) == len(modules_of(model, rule))
    merged = run(name, model, ids).detach()
    assert (merged - unmerged).abs().max() < 1e-5
    surgery.unmerge(model)
    for n, p in base_weights(model).items():
        assert (p - weights[n]).abs().max() <= 1e-6, n
    assert (run(name, model, ids) - unmerged).abs().max() < 1e-6


# ---------------------------------------------------------------------------------------------- DoRA

@pytest.mark.parametrize("name", ["bert", "llama"])
def test_dora_counts_identity_peft_parity_and_merge(name, specs_dir):
    from peft import LoraConfig, get_peft_model

    model = MAKERS[name]().eval()
    ids = token_ids()
    base = run(name, model, ids).detach()
    surgery.apply(model, specs_dir / "dora.yaml")
    shapes, r, layers = linear_shapes(name, model), 8, model.config.num_hidden_layers
    expected = layers * sum(r * (i + o) + o for o, i in (shapes["attention.q"], shapes["attention.v"]))
    assert surgery.trainable_parameters(model)[0] == expected
    assert (run(name, model, ids) - base).abs().max() < 1e-5          # m = ‖W‖ and B = 0: W' = W

    perturb(model, 0.1)
    targets = ["query", "value"] if name == "bert" else ["q_proj", "v_proj"]
    reference = get_peft_model(MAKERS[name]().eval(), LoraConfig(r=8, lora_alpha=8, target_modules=targets,
                                                                  use_dora=True)).eval()
    ours = modules_of(model, "dora")
    peft_layers = {n.removeprefix("base_model.model.").replace(".", "_"): m
                   for n, m in reference.named_modules() if hasattr(m, "lora_magnitude_vector")}
    assert sorted(peft_layers) == sorted(ours)
    with torch.no_grad():
        for key, module in ours.items():
            peft_layer = peft_layers[key]
            peft_layer.lora_A["default"].weight.copy_(module.lora_A)
            peft_layer.lora_B["default"].weight.copy_(module.lora_B)
            peft_layer.lora_magnitude_vector["default"].weight.copy_(module.magnitude)
    out, expected_out = run(name, model, ids), run(name, reference, ids)
    assert (out - expected_out).abs().max() < 1e-5
    # the same gradients, so the norm is detached as in PEFT (and the paper, §4.3)
    out.square().mean().backward()
    expected_out.square().mean().backward()
    for key, module in ours.items():
        peft_layer = peft_layers[key]
        for ours_p, theirs in ((module.lora_A, peft_layer.lora_A["default"].weight),
                               (module.lora_B, peft_layer.lora_B["default"].weight),
                               (module.magnitude, peft_layer.lora_magnitude_vector["default"].weight)):
            torch.testing.assert_close(ours_p.grad, theirs.grad, atol=1e-5, rtol=1e-4)
    assert_folds_exactly(model, "dora", ids, name)


def test_dora_on_packed_multihead_attention_sees_each_slice_of_the_base_weight():
    """MiniGPT's nn.MultiheadAttention packs q, k, v in one in_proj_weight, adapted on the weight: the v site is
    built after the q site parametrized that weight, and must still start from the base rows."""
    model = make_minigpt().eval()
    ids = token_ids()
    base = model(ids).detach()
    surgery.apply(model, "specs/dora.yaml", example_inputs=model.example_inputs())
    assert (model(ids) - base).abs().max() < 1e-5
    d = 64
    for layer in range(2):
        weight = model.blocks[layer].attn.parametrizations.in_proj_weight.original.detach()
        modules = modules_of(model, "dora")
        q, v = (modules[f"blocks_{layer}_attn__attention_{role}"] for role in ("q", "v"))
        torch.testing.assert_close(q.magnitude, weight[:d].norm(dim=1))
        torch.testing.assert_close(v.magnitude, weight[2 * d:].norm(dim=1))
    perturb(model, 0.1)
    assert_folds_exactly(model, "dora", ids, "minigpt")


# ---------------------------------------------------------------------------------------------- layer-wise

@pytest.mark.parametrize("name", ["bert", "llama"])
def test_top_layers_train_exactly_the_top_blocks(name, specs_dir):
    model = MAKERS[name](layers=3).eval()
    surgery.apply(model, specs_dir / "top_layers.yaml")
    shapes, d = linear_shapes(name, model), model.config.hidden_size
    if name == "bert":   # every linear has a bias; two LayerNorms (weight, bias) per block
        per_block = sum(o * i + o for o, i in shapes.values()) + 2 * 2 * d
        prefix = "encoder.layer.{}."
    else:                # no biases; two RMSNorms (weight) per block
        per_block = sum(o * i for o, i in shapes.values()) + 2 * d
        prefix = "model.layers.{}."
    assert surgery.trainable_parameters(model)[0] == 2 * per_block
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in model.named_parameters()
                       if n.startswith(prefix.format(1)) or n.startswith(prefix.format(2))}
    assert not hasattr(model, "surgery_adapters") or not list(model.surgery_adapters.parameters())

    surgery.remove(model)
    attention_only = {"rules": [{"name": "bottom_attention", "action": "train", "params": ["weight"],
                                 "match": {"role": ["attention.q", "attention.k", "attention.v",
                                                    "attention.output"], "layers": [0]}}]}
    surgery.apply(model, attention_only)
    assert surgery.trainable_parameters(model)[0] == sum(
        o * i for role, (o, i) in shapes.items() if role.startswith("attention."))


# ---------------------------------------------------------------------------------------------- sparse

def sparse_spec(select, density=0.02, **extra):
    return {"rules": [{"name": "sparse", "match": {"role": BLOCK_LINEARS}, "action": "wrap",
                       "module": {"kind": "sparse", "density": density, "select": select, **extra}}]}


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_sparse_counts_magnitude_merge_and_saved_state(name, specs_dir):
    model = MAKERS[name]().eval()
    ids = token_ids()
    base = run(name, model, ids).detach()
    surgery.apply(model, specs_dir / "sparse.yaml")
    shapes, layers = linear_shapes(name, model), model.config.num_hidden_layers
    assert surgery.trainable_parameters(model)[0] == layers * sum(round(0.01 * o * i) for o, i in shapes.values())
    assert (run(name, model, ids) - base).abs().max() == 0
    names = weight_names(model, BLOCK_LINEARS)
    for key, module in modules_of(model, "sparse").items():
        k = round(0.01 * module.out_features * module.in_features)
        assert {n: t.numel() for n, t in module.state_dict().items()} == {"values": k, "indices": k}
        weight = model.get_parameter(names[key]).detach().flatten()   # magnitude: the k largest |W|
        assert set(module.indices.tolist()) == set(weight.abs().topk(k).indices.tolist())
    perturb(model, 0.1)
    assert_folds_exactly(model, "sparse", ids, name)


def test_sparse_random_is_seeded_and_trains_only_k_entries():
    first = make_llama().eval()
    surgery.apply(first, sparse_spec("random", seed=7), name="again")
    surgery.apply(first, sparse_spec("random", seed=7))
    a, b = modules_of(first, "sparse"), first.surgery_adapters.adapters["again"]["sparse"]
    assert all(torch.equal(a[k].indices, b[k].indices) for k in a)
    surgery.remove(first, "again")
    q, v = a["model_layers_0_self_attn_q_proj"], a["model_layers_1_self_attn_q_proj"]
    assert not torch.equal(q.indices, v.indices)              # per-site seeds: no shared pattern

    weights = base_weights(first)
    opt = torch.optim.AdamW([p for p in first.parameters() if p.requires_grad], lr=1e-2)
    data = token_ids(4, 12, seed=3)
    losses = []
    for _ in range(3):
        loss = first(input_ids=data, labels=data).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    names = weight_names(first, BLOCK_LINEARS)
    surgery.merge(first)
    for key, module in a.items():
        name = names[key]
        changed = (first.get_parameter(name) - weights[name]).flatten().nonzero().flatten()
        assert 0 < changed.numel() <= module.indices.numel()
        assert set(changed.tolist()) <= set(module.indices.tolist())


def test_sparse_gradient_mask_is_the_largest_accumulated_squared_gradient():
    batches = [{"input_ids": token_ids(2, 10, seed=s), "labels": token_ids(2, 10, seed=s)} for s in (5, 6, 7)]
    reference = make_llama().eval()
    totals = {n: torch.zeros_like(p) for n, p in reference.named_parameters()}
    for batch in batches:
        reference.zero_grad()
        reference(**batch).loss.backward()
        for n, p in reference.named_parameters():
            totals[n] += p.grad ** 2

    model = make_llama().eval()
    spec = {"rules": [{"name": "sparse", "match": {"role": ["attention.v", "ffn.out"]}, "action": "wrap",
                       "module": {"kind": "sparse", "k": 50, "select": "gradient"}}]}
    before = state(model)
    with pytest.raises(surgery.RewriteError, match="calibration"):
        surgery.apply(model, spec)
    assert_same_state(before, state(model))
    surgery.apply(model, spec, calibration=batches)
    assert all(p.grad is None for p in model.parameters())
    modules = modules_of(model, "sparse")
    names = weight_names(model, ["attention.v", "ffn.out"])
    assert len(modules) == 4
    for key, module in modules.items():
        expected = totals[names[key]].flatten().topk(50).indices
        assert set(module.indices.tolist()) == set(expected.tolist()), key

    # a callable yielding losses works for any model (here the same losses); adapters are off while it runs
    perturb(model, 0.1)
    surgery.apply(model, spec, calibration=lambda m: (m(**b).loss for b in batches), name="callable")
    again = model.surgery_adapters.adapters["callable"]["sparse"]
    assert all(torch.equal(again[k].indices, modules[k].indices) for k in modules)


# ---------------------------------------------------------------------------------------------- Intrinsic SAID

def hadamard(n):
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@pytest.mark.parametrize("d,size", [(5, 37), (40, 24)])
def test_fastfood_equals_dense_reference(d, size):
    projection = Fastfood(d, size, seed=3)
    n = projection.n
    assert n >= max(d, size) and n < 2 * max(d, size) and n & (n - 1) == 0
    x = torch.randn(4, n)
    assert torch.allclose(fwht(x), x @ hadamard(n).t(), atol=1e-4)
    permutation = torch.zeros(n, n)
    permutation[torch.arange(n), projection.permutation] = 1
    pad = torch.eye(n)[:, :d]
    H = hadamard(n)
    M = (H @ torch.diag(projection.gauss) @ permutation @ H @ torch.diag(projection.signs) @ pad)[:size]
    M = M / (size * projection.gauss.pow(2).sum()).sqrt()
    theta = torch.randn(d)
    torch.testing.assert_close(projection(theta), M @ theta, atol=1e-5, rtol=1e-5)


def test_fastfood_memory_is_linear_in_D():
    d, size = 1000, 300 * 700
    projection = Fastfood(d, size, seed=0)
    assert projection.n < 2 * size
    state_floats = sum(b.numel() for b in projection.buffers())
    assert state_floats <= 3 * projection.n + 1          # signs, permutation, Gaussian: O(D), not D·d
    saved = []
    theta = torch.randn(d, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        projection(theta).sum().backward()
    assert theta.grad is not None
    assert sum(saved) <= 4 * projection.n                  # what autograd keeps: a few length-n vectors
    assert sum(saved) < size * d / 100                     # a dense D×d projection: 100× more


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_said_counts_shared_subspace_and_merge(name, specs_dir):
    model = MAKERS[name]().eval()
    ids = token_ids()
    base = run(name, model, ids).detach()
    surgery.apply(model, specs_dir / "said.yaml")
    layers, shapes = model.config.num_hidden_layers, linear_shapes(name, model)
    tensors = layers * len(shapes)
    assert surgery.trainable_parameters(model)[0] == 1000 + tensors
    modules = modules_of(model, "said")
    assert len(modules) == tensors
    thetas = {id(m.theta) for m in modules.values()}
    assert len(thetas) == 1                                    # one θ_d shared by every tensor
    assert sum(1 for n, _ in model.surgery_adapters.named_parameters() if n.endswith("theta")) == 1
    assert (run(name, model, ids) - base).abs().max() == 0     # θ_d = 0 at init

    # training moves θ_d and every λ_t
    model.train()
    out = run(name, model, ids)
    out.square().mean().backward()
    theta = next(iter(modules.values())).theta
    assert theta.grad.abs().sum() > 0
    with torch.no_grad():
        theta.add_(torch.randn(theta.shape) * 0.05)
    model.zero_grad()
    run(name, model, ids).square().mean().backward()
    assert all(m.scale.grad.abs() > 0 for m in modules.values())
    model.eval()
    perturb(model, 0.05)
    assert_folds_exactly(model, "said", ids, name)


# ---------------------------------------------------------------------------------------------- QLoRA

def test_qlora_nf4_memory_error_training_and_merge_into_dequantized(specs_dir):
    model = make_llama(layers=1, hidden=512, heads=8, kv_heads=2, intermediate=1376).eval()
    ids = token_ids(2, 12)
    dense = model(input_ids=ids).logits.detach()
    surgery.quantize_nf4(model)
    memory = surgery.nf4_memory(model)
    shapes = linear_shapes("llama", model)
    assert memory["tensors"] == len(shapes)
    assert memory["dense_bytes"] == 4 * sum(o * i for o, i in shapes.values())
    assert memory["nf4_bytes"] <= memory["dense_bytes"] / 4
    quantized = model(input_ids=ids).logits.detach()
    error = ((quantized - dense).norm() / dense.norm()).item()
    print(f"\nNF4 linears: {memory['nf4_bytes']} B vs {memory['dense_bytes']} B fp32 "
          f"({memory['nf4_bytes'] / memory['dense_bytes']:.3f}); logits relative L2 error {error:.3f}")
    assert 0 < error < 0.3

    surgery.apply(model, specs_dir / "qlora.yaml")
    assert surgery.trainable_parameters(model)[0] == sum(64 * (o + i) for o, i in shapes.values())
    assert torch.equal(model(input_ids=ids).logits, quantized)        # B = 0: the quantized base
    codes = {n: p.quantized_data.clone() for n, p in model.named_parameters() if surgery.quantize.is_nf4(p)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    data = token_ids(2, 16, seed=3)
    losses = []
    for _ in range(3):
        loss = model(input_ids=data, labels=data).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(model.get_parameter(n).quantized_data, c) for n, c in codes.items())

    model.eval()
    unmerged = model(input_ids=ids).logits.detach()
    with pytest.raises(surgery.SurgeryError):          # merging into 4-bit weights is refused, nothing changes
        surgery.merge(model)
    assert torch.equal(model(input_ids=ids).logits, unmerged)
    surgery.dequantize_nf4(model)
    assert surgery.nf4_memory(model)["tensors"] == 0
    surgery.merge(model)
    assert (model(input_ids=ids).logits - unmerged).abs().max() < 1e-5


def test_quantize_bad_block_size_leaves_model_untouched():
    model = make_llama()
    before = state(model)
    with pytest.raises(surgery.SurgeryError, match="block_size"):
        surgery.quantize_nf4(model, block_size=48)
    assert_same_state(before, state(model))
