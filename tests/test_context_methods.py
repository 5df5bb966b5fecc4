"""Attention-context methods: prefix tuning, prompt tuning, LLaMA-Adapter, ReFT (issue 5)."""
import pytest
import torch

import surgery
from models import ARCHS, example_inputs, lm_losses, make_llama, perturb, run, token_ids

D, L, HEADS = 64, 2, 4
KV_WIDTH = {"minigpt": D, "bert": D, "gpt2": D, "llama": D // 2}   # LLaMA test config: 2 of 4 heads for keys/values


def prefix_spec(flat, length=5):
    return {"rules": [{"name": "prefix", "match": {"role": "attention.op"}, "action": "attend",
                       "module": {"kind": "prefix", "prefix_length": length, "flat": flat, "bottleneck_size": 16},
                       "expect": "every_layer"}]}


def expected_count(spec_name, arch):
    kv = KV_WIDTH[arch]
    if spec_name == "prefix_flat":
        return L * 2 * 5 * kv
    if spec_name == "prefix_mlp":
        n = 2 * L * kv
        return 5 * D + (D * 16 + 16) + (16 * n + n)
    if spec_name == "prompt":
        return 10 * D
    if spec_name == "llama_adapter":
        return 2 * (10 * D + 1)
    if spec_name in ("loreft", "noreft", "direft"):
        return L * (2 * D * 1 + 1)
    raise KeyError(spec_name)


SPECS = {
    "prefix_flat": prefix_spec(True),
    "prefix_mlp": prefix_spec(False),
    "prompt": "specs/prompt.yaml",
    "llama_adapter": "specs/llama_adapter.yaml",
    "loreft": "specs/loreft.yaml",
    "noreft": "specs/noreft.yaml",
    "direft": "specs/direft.yaml",
}


COUNT_CASES = [(m, a) for m in SPECS for a in ARCHS
               if a in ("minigpt", "llama") or m in ("prefix_mlp", "prompt", "loreft")]


@pytest.mark.parametrize("method,arch", COUNT_CASES)
def test_counts_only_adapters_train_and_outputs_change(method, arch):
    model = ARCHS[arch]().eval()
    ids = token_ids(2, 9)
    base = run(arch, model, ids).detach()
    surgery.apply(model, SPECS[method], example_inputs=example_inputs(arch, model))
    trainable, _ = surgery.trainable_parameters(model)
    assert trainable == expected_count(method, arch)
    assert all(p.requires_grad == n.startswith("surgery_adapters.") for n, p in model.named_parameters())
    perturb(model, 0.3)
    out = run(arch, model, ids)
    assert out.shape == base.shape
    assert (out - base).abs().max() > 1e-4


@pytest.mark.parametrize("method,arch", [("prefix_mlp", "bert"), ("prefix_mlp", "gpt2"), ("prefix_flat", "llama"),
                                         ("prompt", "bert"), ("prompt", "gpt2"), ("prompt", "llama"),
                                         ("llama_adapter", "llama"), ("loreft", "bert"), ("loreft", "llama")])
def test_padded_batch_rows_equal_each_sequence_alone(method, arch):
    model = ARCHS[arch]().eval()
    surgery.apply(model, SPECS[method], example_inputs=example_inputs(arch, model))
    perturb(model, 0.3)
    ids = token_ids(2, 9)
    mask = torch.ones_like(ids)
    short = 6
    if arch == "bert":           # right padding for the encoder
        mask[1, short:] = 0
        real = slice(0, short)
    else:                        # left padding for decoders, as generate() uses
        mask[1, : 9 - short] = 0
        real = slice(9 - short, 9)
    extra = {}
    if arch != "bert":    # absolute positions (GPT-2) follow the real tokens, as generate() passes them
        extra["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    batched = run(arch, model, ids, attention_mask=mask, **extra)
    alone = run(arch, model, ids[1:2, real])
    torch.testing.assert_close(batched[1, real], alone[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(batched[0], run(arch, model, ids[0:1])[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("method,arch", [("prefix_flat", "gpt2"), ("prompt", "gpt2"), ("prefix_mlp", "llama"),
                                         ("prompt", "llama"), ("llama_adapter", "llama")])
def test_causal_models_never_see_later_tokens(method, arch):
    model = ARCHS[arch]().eval()
    surgery.apply(model, SPECS[method], example_inputs=example_inputs(arch, model))
    perturb(model, 0.3)
    ids = token_ids(1, 9)
    changed = ids.clone()
    changed[0, 6:] = (changed[0, 6:] + 7) % 100 + 1
    torch.testing.assert_close(run(arch, model, ids)[0, :6], run(arch, model, changed)[0, :6])


def test_llama_adapter_is_the_base_bit_for_bit_at_init():
    model = make_llama().eval()
    ids = token_ids(2, 9)
    base = run("llama", model, ids).detach()
    surgery.apply(model, "specs/llama_adapter.yaml")
    assert torch.equal(run("llama", model, ids), base)
    matches = surgery.plan(model, "specs/llama_adapter.yaml")
    assert [m.layer for m in matches] == [0, 1]   # top 2 of 2 layers


@pytest.mark.parametrize("arch", ["bert", "minigpt"])
def test_reft_with_zero_weights_is_the_base(arch):
    model = ARCHS[arch]().eval()
    ids = token_ids(2, 9)
    base = run(arch, model, ids).detach()
    spec = surgery.load_spec("specs/noreft.yaml")
    surgery.apply(model, spec, example_inputs=example_inputs(arch, model))
    with torch.no_grad():
        for p in model.surgery_adapters.parameters():
            p.zero_()
    torch.testing.assert_close(run(arch, model, ids), base, atol=2e-6, rtol=0)


def test_reft_acts_on_the_first_real_tokens_only():
    model = make_llama().eval()
    ids = token_ids(1, 9)
    base = run("llama", model, ids).detach()
    surgery.apply(model, "specs/loreft.yaml")
    perturb(model, 0.5)
    out = run("llama", model, ids)
    changed = (out - base).abs().amax(-1)[0] > 1e-5
    assert changed[:3].all()
    # LoReFT's R stays orthonormal
    unit = next(iter(model.surgery_adapters.adapters["default"]["reft"].values())).units[0]
    R = unit.projection.weight
    torch.testing.assert_close(R @ R.t(), torch.eye(R.shape[0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "minigpt"])
def test_eject_gives_the_same_outputs(arch):
    model = ARCHS[arch]().eval()
    surgery.apply(model, prefix_spec(False), example_inputs=example_inputs(arch, model))
    perturb(model, 0.3)
    ids = token_ids(2, 7)
    before = run(arch, model, ids).detach()
    surgery.eject(model)
    after = run(arch, model, ids)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)
    assert surgery.trainable_parameters(model)[0] == expected_count("prefix_flat", arch)


@pytest.mark.parametrize("method", ["prefix_mlp", "prompt", "llama_adapter", "direft"])
def test_training_lowers_the_loss(method):
    model = make_llama()
    surgery.apply(model, SPECS[method])
    losses = lm_losses(model, token_ids(4, 10, seed=5), steps=6)
    assert losses[-1] < losses[0]


def test_prompt_init_from_token_ids_uses_the_embedding_table():
    model = make_llama()
    spec = {"rules": [{"match": {"role": "embedding.output"}, "action": "prepend",
                       "module": {"kind": "prompt", "prompt_length": 4, "init": {"ids": [5, 6]}}}]}
    surgery.apply(model, spec)
    prompt = next(iter(model.surgery_adapters.adapters["default"]["rule0"].values())).prompt_embedding
    table = model.model.embed_tokens.weight
    torch.testing.assert_close(prompt, table[[5, 6, 5, 6]])
