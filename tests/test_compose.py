"""Several named adapters in one model, composition blocks and AdapterFusion (issue 6)."""
import pytest
import torch

import surgery
from models import ARCHS, lm_losses, make_bert, make_llama, perturb, run, token_ids

LORA_QV = {"rules": [{"name": "lora", "match": {"role": ["attention.q", "attention.v"]}, "action": "wrap",
                      "module": {"kind": "lora", "r": 4}}]}
SEQ_BN = {"rules": [{"name": "adapter", "match": {"role": "ffn.out"}, "action": "insert_after",
                     "module": {"kind": "bottleneck", "reduction_factor": 8}}]}


def two_adapters(arch, spec):
    model = ARCHS[arch]().eval()
    surgery.apply(model, spec, name="a")
    perturb(model, 0.2, seed=1)
    surgery.apply(model, spec, name="b")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.surgery_adapters.adapters["b"].parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def outputs_alone(model, arch, ids):
    out = {}
    for name in ("a", "b"):
        surgery.set_active(model, name)
        out[name] = run(arch, model, ids).detach()
    with surgery.disable(model):
        out["base"] = run(arch, model, ids).detach()
    return out


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_two_named_loras_alone_together_disabled_and_removed(arch):
    model = two_adapters(arch, LORA_QV)
    ids = token_ids(2, 8)
    alone = outputs_alone(model, arch, ids)
    assert (alone["a"] - alone["b"]).abs().max() > 1e-3
    surgery.set_active(model, ["a", "b"])   # both: at each projection the deltas add up
    q_path = surgery.plan(model, LORA_QV)[0].module
    q = model.get_submodule(q_path)
    seen = {}
    handle = q.register_forward_hook(lambda m, a, o: seen.update(x=a[0], y=o))
    both = run(arch, model, ids)
    handle.remove()
    key = q_path.replace(".", "_")
    la, lb = (model.surgery_adapters.adapters[n]["lora"][key] for n in ("a", "b"))
    base_y = torch.nn.functional.linear(seen["x"], q.weight, q.bias)
    expected = base_y + (la(seen["x"], base_y) - base_y) + (lb(seen["x"], base_y) - base_y)
    torch.testing.assert_close(seen["y"], expected, atol=1e-5, rtol=1e-5)
    assert (both - alone["a"]).abs().max() > 1e-4
    with pytest.raises(surgery.SurgeryError, match="already applied"):
        surgery.apply(model, LORA_QV, name="a")
    surgery.remove(model, "a")
    surgery.remove(model, "b")
    assert not hasattr(model, "surgery_adapters")
    torch.testing.assert_close(run(arch, model, ids), alone["base"], atol=0, rtol=0)
    assert all(not m.__dict__.get("_surgery_dispatch") for m in model.modules())


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_average_is_the_weighted_mean_of_adapter_outputs(arch):
    model = two_adapters(arch, SEQ_BN)
    ids = token_ids(2, 8)
    # a single-layer check: the FFN output site of layer 0 under Average equals the weighted mean of each alone
    site = model.get_submodule(surgery.plan(model, SEQ_BN)[0].module)
    captured = {}
    handle = site.register_forward_hook(lambda m, a, o: captured.__setitem__("in", a[0]))
    run(arch, model, ids)
    handle.remove()
    store = model.surgery_adapters.adapters
    key = next(iter(store["a"]["adapter"]))
    surgery.set_active(model, surgery.Average("a", "b", weights=[0.7, 0.3]))
    out_site = {}
    handle = site.register_forward_hook(lambda m, a, o: out_site.__setitem__("out", o), prepend=False)
    run(arch, model, ids)
    handle.remove()
    h = torch.nn.functional.linear(captured["in"], site.weight, site.bias)
    expected = 0.7 * store["a"]["adapter"][key](h) + 0.3 * store["b"]["adapter"][key](h)
    torch.testing.assert_close(out_site["out"], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_batch_split_and_parallel_rows_equal_each_adapters_rows(arch):
    model = two_adapters(arch, SEQ_BN)
    ids = token_ids(4, 8)
    alone = outputs_alone(model, arch, ids)
    surgery.set_active(model, surgery.BatchSplit("a", "b", batch_sizes=[1, 3]))
    out = run(arch, model, ids)
    torch.testing.assert_close(out[:1], alone["a"][:1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1:], alone["b"][1:], atol=1e-5, rtol=1e-5)
    surgery.set_active(model, surgery.Parallel("a", "b"))
    out = run(arch, model, ids)
    assert out.shape[0] == 8
    torch.testing.assert_close(out[:4], alone["a"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[4:], alone["b"], atol=1e-5, rtol=1e-5)


def test_split_gives_each_adapter_its_positions_and_stack_orders():
    model = two_adapters("bert", SEQ_BN)
    ids = token_ids(2, 8)
    surgery.set_active(model, surgery.Split("a", "b", splits=[3]))
    split = run("bert", model, ids)
    surgery.set_active(model, surgery.Stack("a", "b"))
    ab = run("bert", model, ids)
    surgery.set_active(model, surgery.Stack("b", "a"))
    ba = run("bert", model, ids)
    assert (ab - ba).abs().max() > 1e-5   # order matters for sequential adapters
    assert split.shape == ab.shape
    # a per-token check on the site: positions < 3 went through a only
    site = model.get_submodule(surgery.plan(model, SEQ_BN)[0].module)
    got = {}
    h1 = site.register_forward_hook(lambda m, a, o: got.__setitem__("in", a[0]))
    surgery.set_active(model, surgery.Split("a", "b", splits=[3]))
    h2 = site.register_forward_hook(lambda m, a, o: got.__setitem__("out", o))
    run("bert", model, ids)
    h1.remove()
    h2.remove()
    store = model.surgery_adapters.adapters
    key = next(iter(store["a"]["adapter"]))
    h = torch.nn.functional.linear(got["in"], site.weight, site.bias)
    torch.testing.assert_close(got["out"][:, :3], store["a"]["adapter"][key](h[:, :3]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["out"][:, 3:], store["b"]["adapter"][key](h[:, 3:]), atol=1e-5, rtol=1e-5)


def test_fusion_trains_only_fusion_parameters():
    model = two_adapters("bert", SEQ_BN)
    for p in model.surgery_adapters.adapters["a"].parameters():
        assert p.requires_grad
    surgery.apply(model, {"compose": {"fuse": ["a", "b"]}}, name="ab")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".ab." in n for n in trainable)
    d, L = 64, 2
    assert surgery.trainable_parameters(model)[0] == L * (3 * d * d + 2 * d)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    ids = token_ids(4, 8)
    target = torch.randn(4, 8, d)
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.mse_loss(run("bert", model, ids), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n not in trainable), n
    surgery.remove(model, "ab")
    surgery.set_active(model, "a")


def test_weight_realized_adapters_refuse_blocks_other_than_stack_and_average():
    from models import make_minigpt
    model = make_minigpt().eval()
    surgery.apply(model, LORA_QV, name="a", example_inputs=model.example_inputs())
    surgery.apply(model, LORA_QV, name="b", example_inputs=model.example_inputs())
    perturb(model, 0.2, seed=1)
    with pytest.raises(surgery.SurgeryError, match="parametrization"):
        surgery.set_active(model, surgery.BatchSplit("a", "b", batch_sizes=[1, 1]))
    ids = token_ids(2, 8)
    surgery.set_active(model, "a")
    only_a = model(ids)
    surgery.set_active(model, "b")
    assert (model(ids) - only_a).abs().max() > 1e-4
    surgery.set_active(model, surgery.Average("a", "b", weights=[1, 0]))   # nn.MultiheadAttention's weights
    torch.testing.assert_close(model(ids), only_a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec,expected", [
    # AdapterHub's figures for BERT-base (hidden 768, 12 layers, 12 heads, intermediate 3072)
    ("specs/mam.yaml", 22_493_984),
    ("specs/unipelt.yaml", 11_083_376),
])
def test_mam_and_unipelt_counts_equal_adapterhub_on_bert_base(spec, expected):
    from transformers import BertConfig, BertModel
    with torch.device("meta"):
        model = BertModel(BertConfig())
    surgery.apply(model, spec)
    d, L = 768, 12
    if "mam" in spec:
        P, B, N, m = 30, 800, 2 * L * d, d // 2
        formula = P * d + (d * B + B) + (B * N + N) + L * (2 * d * m + m + d)
    else:
        P, B, N, m, r = 10, 512, 2 * L * d, d // 16, 8
        formula = (P * d + (d * B + B) + (B * N + N) + L * (d + 1)      # prefix + its gates
                   + L * (2 * d * m + m + d) + L * (d + 1)               # sequential adapter + gates
                   + L * 2 * r * (d + d) + 2 * L * (d + 1))              # LoRA q, v + gates
    assert formula == expected
    assert surgery.trainable_parameters(model)[0] == expected


@pytest.mark.parametrize("spec", ["specs/mam.yaml", "specs/unipelt.yaml"])
def test_mam_and_unipelt_train_and_report_what_cannot_merge(spec):
    model = make_llama()
    surgery.apply(model, spec)
    ids = token_ids(4, 10, seed=5)
    losses = lm_losses(model, ids, steps=5)
    assert losses[-1] < losses[0]
    model.eval()
    before = run("llama", model, ids).detach()
    report = surgery.merge(model)
    assert report.not_merged   # prefixes, bottleneck adapters and gated LoRA stay in the forward, by name
    assert all("/" in key for key in report.not_merged)
    torch.testing.assert_close(run("llama", model, ids), before, atol=1e-5, rtol=1e-5)
    surgery.unmerge(model)


def test_compose_with_an_option_the_block_does_not_take_is_a_spec_error():
    with pytest.raises(surgery.SpecError, match="split"):
        surgery.apply(make_llama(), {"compose": {"split": ["default"], "weights": "x"}})
