"""PEFT checkpoints in and out: a PEFT LoRA/IA3 checkpoint made here (non-zero weights) loads with from_peft and
gives PEFT's outputs; what to_peft writes loads in PEFT (PeftModel.from_pretrained) and gives ours. PEFT is
used only by these tests; surgery's reader and writer never import it."""
import ast
import copy
import json
import math
from pathlib import Path

import pytest
import torch

import surgery
from models import (assert_same_state, make_bert, make_gpt2, make_llama, make_minigpt, perturb, run, state,
                    token_ids)

peft = pytest.importorskip("peft")

FACTORIES = {"bert": make_bert, "llama": make_llama, "gpt2": make_gpt2}
D = 64


@pytest.fixture(scope="module", params=list(FACTORIES))
def base(request):
    """A pristine model (for PEFT) and a traced one for surgery (traced once; tests leave it clean)."""
    arch = request.param
    model = FACTORIES[arch]().eval()
    pristine = copy.deepcopy(model)
    surgery.plan(model, "specs/lora.yaml")
    ids = token_ids(2, 9)
    return {"arch": arch, "model": model, "pristine": pristine, "ids": ids, "out": run(arch, model, ids).detach()}


def fill(named_parameters, marker, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named_parameters:
            if marker in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + offset)


def peft_outputs(arch, peft_model, ids):
    return run(arch, peft_model.eval(), ids).detach()


LORA_CONFIGS = {
    "bert": dict(r=4, lora_alpha=8, target_modules=["query", "value", "intermediate.dense"], use_rslora=True),
    "llama": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                  rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3}, layers_to_transform=[1]),
    "gpt2": dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
}


def lora_count(config, dims):
    """Σ r·(d_in + d_out) over the modules, r from rank_pattern where it names the module."""
    return sum(config.get("rank_pattern", {}).get(suffix, config["r"]) * (d_in + d_out) for suffix, d_in, d_out in dims)


LORA_DIMS = {   # (module suffix, d_in, d_out) of every adapted module
    "bert": [("query", D, D), ("value", D, D), ("intermediate.dense", D, 4 * D)] * 2,
    "llama": [("q_proj", D, D), ("v_proj", D, 32), ("down_proj", 2 * D, D)],   # layer 1 only
    "gpt2": [("c_attn", D, 3 * D), ("c_fc", D, 4 * D)] * 2,
}


def test_peft_lora_checkpoint_loads_with_peft_outputs(base, tmp_path):
    arch, model, ids = base["arch"], base["model"], base["ids"]
    config = LORA_CONFIGS[arch]
    peft_model = peft.get_peft_model(copy.deepcopy(base["pristine"]), peft.LoraConfig(**config))
    fill(peft_model.named_parameters(), "lora_")                 # non-zero B (and A)
    expected = peft_outputs(arch, peft_model, ids)
    assert (expected - base["out"]).abs().max() > 1e-2
    peft_model.save_pretrained(tmp_path)

    surgery.from_peft(model, tmp_path, name="from_peft")
    try:
        torch.testing.assert_close(run(arch, model, ids), expected, atol=1e-5, rtol=0)
        assert surgery.trainable_parameters(model)[0] == lora_count(config, LORA_DIMS[arch])
        sites = model.surgery_adapters.records["from_peft"].weight_sites
        peft_paths = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                      if hasattr(m, "lora_A") and len(m.lora_A)}
        assert {s.owner_path for s in sites} == peft_paths
        if arch == "llama":
            v = next(s.adapter for s in sites if s.owner_path.endswith("v_proj"))
            assert (v.r, v.scaling) == (4, 3 / 4)                # alpha_pattern
        if arch == "bert":
            assert all(s.adapter.scaling == 8 / math.sqrt(4) for s in sites)   # rsLoRA
    finally:
        surgery.remove(model, "from_peft")


def test_surgery_lora_writes_a_checkpoint_peft_loads(base, tmp_path):
    arch, model, ids = base["arch"], base["model"], base["ids"]
    spec = surgery.load_spec("specs/lora.yaml").model_dump(by_alias=True, exclude_none=True)
    # a second rule with another rank and rsLoRA: written with per-module rank/alpha patterns
    spec["rules"].append({"name": "ffn", "match": {"role": "ffn.out", "layers": "-1:"}, "action": "wrap",
                          "module": {"kind": "lora", "r": 2, "alpha": 6, "use_rslora": True}})
    surgery.apply(model, spec, name="mine")
    try:
        perturb(model, 0.1)
        ours = run(arch, model, ids).detach()
        assert (ours - base["out"]).abs().max() > 1e-2
        surgery.to_peft(model, tmp_path)
    finally:
        surgery.remove(model, "mine")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] == (arch == "gpt2")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base["pristine"]), tmp_path)
    torch.testing.assert_close(peft_outputs(arch, loaded, ids), ours, atol=1e-5, rtol=0)
    # and back: the directory loads into surgery with the same outputs
    surgery.from_peft(model, tmp_path, name="back")
    try:
        torch.testing.assert_close(run(arch, model, ids), ours, atol=1e-5, rtol=0)
    finally:
        surgery.remove(model, "back")


@pytest.mark.parametrize("direction", ["from_peft", "to_peft"])
def test_ia3_both_ways(base, tmp_path, direction):
    arch, model, ids = base["arch"], base["model"], base["ids"]
    if direction == "from_peft":
        # PEFT's defaults: BERT key, value, output.dense (which also matches attention.output.dense, and both
        # count as feed-forward: scaled on the input); LLaMA k_proj, v_proj, down_proj (feed-forward); GPT-2
        # c_attn (all of q, k, v) and mlp.c_proj (feed-forward)
        peft_model = peft.get_peft_model(copy.deepcopy(base["pristine"]), peft.IA3Config(task_type=None))
        fill(peft_model.named_parameters(), "ia3_l", offset=1.0)
        expected = peft_outputs(arch, peft_model, ids)
        peft_model.save_pretrained(tmp_path)
        surgery.from_peft(model, tmp_path, name="ia3")
        try:
            torch.testing.assert_close(run(arch, model, ids), expected, atol=1e-5, rtol=0)
            sites = model.surgery_adapters.records["ia3"].weight_sites
            inputs = sorted(s.owner_path for s in sites if s.adapter.scale_input)
            assert inputs == sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                                    if getattr(m, "is_feedforward", False))
        finally:
            surgery.remove(model, "ia3")
    else:
        surgery.apply(model, "specs/ia3.yaml", name="ia3")
        try:
            perturb(model, 0.1)
            ours = run(arch, model, ids).detach()
            surgery.to_peft(model, tmp_path)
        finally:
            surgery.remove(model, "ia3")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base["pristine"]), tmp_path)
        torch.testing.assert_close(peft_outputs(arch, loaded, ids), ours, atol=1e-5, rtol=0)


def test_surgery_never_imports_peft():
    """PEFT is a test dependency only: no module of the package imports it."""
    root = Path(surgery.__file__).parent
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "peft" for a in node.names), path
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                assert (node.module or "").split(".")[0] != "peft", path


# ------------------------------------------------------------------------------------------------ bad input

def _save_lora(model, path, **config):
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**config))
    fill(peft_model.named_parameters(), "lora_")
    peft_model.save_pretrained(path)
    return path


def test_unsupported_or_mismatched_checkpoints_are_errors_and_leave_the_model(tmp_path):
    model = make_llama().eval()
    before = state(model)
    biased = _save_lora(model, tmp_path / "bias", target_modules=["q_proj"], lora_bias=True)
    with pytest.raises(surgery.SurgeryError, match="lora_bias=True is not supported"):
        surgery.from_peft(model, biased)
    other = _save_lora(make_bert(), tmp_path / "bert", target_modules=["query"])
    with pytest.raises(surgery.SurgeryError, match="encoder.layer.0.attention.self.query, .*does not have"):
        surgery.from_peft(model, other)
    good = _save_lora(model, tmp_path / "good", target_modules=["q_proj"])
    (good / "adapter_model.safetensors").rename(good / "adapter_model.bin")
    with pytest.raises(surgery.SurgeryError, match="pickle"):
        surgery.from_peft(model, good)
    assert_same_state(before, state(model))


def test_to_peft_refuses_what_peft_cannot_express(tmp_path):
    mha = make_minigpt().eval()
    surgery.apply(mha, "specs/lora.yaml", example_inputs=mha.example_inputs())
    with pytest.raises(surgery.SurgeryError, match="blocks.0.attn, blocks.1.attn: the weight is read without"):
        surgery.to_peft(mha, tmp_path / "mha")
    model = make_llama().eval()
    surgery.apply(model, "specs/houlsby.yaml", name="bn")
    with pytest.raises(surgery.SurgeryError, match="rewrites PEFT's LoRA/IA3 cannot express: attention_adapter"):
        surgery.to_peft(model, tmp_path / "bn")
    assert not (tmp_path / "mha").exists() and not (tmp_path / "bn").exists()
