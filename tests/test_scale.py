"""Surgery at scale without memory: specs applied to a LLaMA-7B-shaped model on the meta device, and the
workflow that turns such a model into a trainable one (`surgery.materialize`), proven on a small LLaMA.

The full sweep over every shipped spec at the 7B shape is `python benchmarks/meta_sweep.py`.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import surgery
from conftest import SPECS
from models import make_llama, perturb, token_ids
from surgery.materialize import MaterializeError
from test_reliability import TrapLoRA, trap  # noqa: F401  (a registered module kind that fails on demand)

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000)
IDS = token_ids(2, 7, seed=3)


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@pytest.mark.slow
def test_lora_and_houlsby_on_a_7b_shape_on_the_meta_device():
    from transformers import LlamaConfig, LlamaForCausalLM
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_7B))
    rss = rss_mib()
    wall, cpu = time.perf_counter(), time.process_time()
    surgery.apply(model, SPECS / "lora.yaml", name="lora")          # traces the 32 layers once
    lora_seconds, lora_cpu = time.perf_counter() - wall, time.process_time() - cpu
    wall = time.perf_counter()
    surgery.apply(model, SPECS / "houlsby.yaml", name="houlsby")    # reuses the analysis cached on the model
    houlsby_seconds = time.perf_counter() - wall
    grown = rss_mib() - rss
    print(f"\n7B on meta: lora {lora_seconds:.1f} s wall ({lora_cpu:.1f} s CPU, trace included), houlsby "
          f"{houlsby_seconds:.1f} s; RSS grew {grown:.0f} MiB")

    d, layers, r = 4096, 32, 8
    b = d // 16
    trainable, total = surgery.trainable_parameters(model)
    assert trainable == layers * 2 * r * (d + d) + layers * 2 * (2 * d * b + b + d)
    assert total - trainable == 6_738_415_616                       # LLaMA-7B itself, untouched
    assert all(t.is_meta for t in list(model.surgery_adapters.parameters()) + list(model.surgery_adapters.buffers()))
    assert grown < 1024                                              # fp32 weights alone would be 25 GiB


# ---------------------------------------------------------------------------------------------- materialize

# DoRA on k and the attention output: stacked on LoRA's q and v it would not compose as merge folds (refused)
DORA_K_O = {"version": 1, "rules": [{"name": "dora", "match": {"role": ["attention.k", "attention.output"]},
                                     "action": "wrap", "module": {"kind": "dora", "r": 8, "alpha": 8},
                                     "expect": "every_layer"}]}
SPECS_APPLIED = [("lora", "lora.yaml"), ("dora", DORA_K_O), ("houlsby", "houlsby.yaml"), ("prefix", "prefix.yaml")]


def apply_all(model):
    for name, spec in SPECS_APPLIED:
        surgery.apply(model, SPECS / spec if isinstance(spec, str) else spec, name=name)
    surgery.set_active(model, ["lora", "dora", "houlsby"])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 'pretrained' small LLaMA (base weights as a dict and a safetensors file) and, from its weights, the
    reference: what apply gives on the real model, the random init drawn after tracing as materialize draws it."""
    model = make_llama().eval()
    weights = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    save_file(weights, str(path))
    surgery.plan(model, SPECS / "lora.yaml")
    torch.manual_seed(11)
    apply_all(model)
    return weights, path, model


def meta_twin(model):
    """The same architecture built on the meta device (its own config object: surgery changes the attention
    implementation named in the config)."""
    with torch.device("meta"):
        return type(model)(copy.deepcopy(model.config)).eval()


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert a.surgery_adapters.runtime.active == b.surgery_adapters.runtime.active
    assert {n: p.requires_grad for n, p in a.named_parameters()} == {n: p.requires_grad for n, p in b.named_parameters()}
    torch.testing.assert_close(a(input_ids=IDS).logits, b(input_ids=IDS).logits, atol=0, rtol=0)


def test_materialize_from_safetensors_equals_apply_on_the_loaded_model(pretrained):
    _, path, reference = pretrained
    meta = meta_twin(reference)
    apply_all(meta)
    torch.manual_seed(11)
    surgery.materialize(meta, path)
    assert not any(t.is_meta for t in list(meta.parameters()) + list(meta.buffers()))
    assert_same_model(meta, reference)
    # DoRA's magnitude is initialized from the real weights, not left at meta values
    dora = meta.surgery_adapters.records["dora"].weight_sites[0]
    weight = dora.owner.get_parameter(dora.weight_name)
    torch.testing.assert_close(dora.adapter.magnitude, torch.linalg.norm(weight, dim=1))
    perturb(meta)                                       # and it trains
    loss = meta(input_ids=IDS, labels=IDS).loss
    loss.backward()
    assert all(p.grad is not None for p in meta.surgery_adapters.adapters["lora"].parameters())


def test_materialize_after_the_users_own_load_state_dict(pretrained):
    """The user loads the base with load_state_dict(assign=True); materialize computes the rotary buffers the
    file does not hold and initializes the adapters."""
    _, path, reference = pretrained
    from safetensors.torch import load_file
    meta = meta_twin(reference)
    apply_all(meta)
    missing, unexpected = meta.load_state_dict(load_file(str(path)), strict=False, assign=True)
    assert not unexpected and all(k.startswith("surgery_adapters.") for k in missing)
    assert meta.model.rotary_emb.inv_freq.is_meta        # non-persistent: in no weights file
    torch.manual_seed(11)
    surgery.materialize(meta)
    assert_same_model(meta, reference)


def meta_state(model):
    """What must be unchanged after a failed materialize (meta tensors have no values to compare)."""
    return {
        "tensors": {n: (tuple(t.shape), t.dtype, t.device.type) for n, t in model.state_dict().items()},
        "buffers": {n: t.device.type for n, t in model.named_buffers()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "modules": [n for n, _ in model.named_modules()],
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        "adapters": list(model.surgery_adapters.records),
        "active": model.surgery_adapters.runtime.active,
        "attention": model.config._attn_implementation,
    }


@pytest.fixture(scope="module")
def meta_adapted(pretrained):
    """One meta model with adapters for the failures that must leave it as it is (each test checks it did)."""
    meta = meta_twin(pretrained[2])
    apply_all(meta)
    return meta


@pytest.mark.parametrize("damage", ["missing", "shape", "extra", "not_safetensors"])
def test_bad_weights_leave_the_meta_model_as_it_was(pretrained, meta_adapted, damage, tmp_path):
    meta = meta_adapted
    state = dict(pretrained[0])
    if damage == "missing":
        del state["model.layers.1.mlp.down_proj.weight"]
    elif damage == "shape":
        state["model.norm.weight"] = state["model.norm.weight"][:-1]
    elif damage == "extra":
        state["model.layers.9.mlp.down_proj.weight"] = torch.zeros(1)
    weights = state
    if damage == "not_safetensors":
        weights = tmp_path / "base.bin"
        weights.write_bytes(b"pickle")
    before = meta_state(meta)
    with pytest.raises(MaterializeError, match={"missing": "missing from the weights.*down_proj",
                                                "shape": "model.norm.weight: the weights have shape \\[63\\]",
                                                "extra": "not in the model.*layers.9",
                                                "not_safetensors": "safetensors files only"}[damage]):
        surgery.materialize(meta, weights)
    assert meta_state(meta) == before


def test_failure_while_rebuilding_the_adapters_restores_the_meta_model(pretrained, trap):
    path = pretrained[1]
    meta = meta_twin(pretrained[2])
    apply_all(meta)
    surgery.apply(meta, {"rules": [{"match": {"role": "ffn.out"}, "action": "wrap",
                                    "module": {"kind": "test_trap_lora"}}]}, name="trap")
    before = meta_state(meta)
    trap["build"] = 1              # materialize builds one trap site, then the second fails; the rollback builds again
    with pytest.raises(surgery.RewriteError, match="trap: build"):
        surgery.materialize(meta, path)
    assert meta_state(meta) == before


def test_what_cannot_be_built_on_the_meta_device_says_so():
    with torch.device("meta"):
        meta = make_llama()
    with pytest.raises(surgery.RewriteError, match="meta device: apply this spec after loading the weights"):
        surgery.apply(meta, SPECS / "sparse.yaml")
    # a spec drawing its structure from the values works once they are real: sparse after materialize
    surgery.apply(meta, SPECS / "lora.yaml")
    surgery.materialize(meta, {k: torch.randn(v.shape) for k, v in meta.state_dict().items()
                               if not k.startswith("surgery_adapters.")})
    surgery.apply(meta, SPECS / "sparse.yaml", name="sparse")
    assert surgery.trainable_parameters(meta)[0] > 0
