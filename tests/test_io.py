"""Saving and loading adapters: round trips of every shipped spec, only the surgery's tensors written, and
clear errors (with the model untouched) for bases that do not fit and files that are damaged."""
import json
import math

import pytest
import torch
from safetensors import safe_open

import surgery
from conftest import SPECS
from models import (ARCHS, assert_same_state, example_inputs, make_bert, make_gpt2, make_llama, make_minilm, perturb,
                    run, state, token_ids)
from surgery.io import CheckpointError, read_manifest
from surgery.io.checkpoint import ADAPTERS_FILE, MANIFEST_FILE

# The architectures tried for a spec, in order (fastest to trace first); the first the spec applies to, and that
# gets something to train, is used. A wider BERT is there for specs whose bottleneck must be a multiple of a
# block size (Compacter's PHM layers need hidden/reduction_factor divisible by phm_dim).
FACTORIES = {**ARCHS, "bert_wide": lambda: make_bert(hidden=128)}
ARCH_ORDER = ["bert", "llama", "bert_wide", "gpt2", "minigpt"]
SPEC_FILES = sorted(p.name for p in SPECS.iterdir() if p.suffix in (".yaml", ".yml", ".json"))


def _perturb_trained(model, seed=1):
    """Change the base parameters that `train` rules selected, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for record in model.surgery_adapters.records.values():
            for p, _ in record.trained:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _adapted(spec_path):
    """(arch, adapted model, pristine base state) for the first architecture the spec applies to."""
    reasons = {}
    for arch in ARCH_ORDER:
        model = FACTORIES[arch]()
        base_state = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            surgery.apply(model, spec_path, example_inputs=example_inputs(arch, model))
        except surgery.SurgeryError as exc:
            reasons[arch] = str(exc).splitlines()[0][:200]
            continue
        if surgery.trainable_parameters(model)[0] == 0:   # e.g. BitFit on a model without biases
            reasons[arch] = "nothing to train"
            continue
        return arch, model, base_state
    pytest.fail(f"{spec_path.name} applies to none of {ARCH_ORDER}: {reasons}")   # a regression, never a skip


def _adapter_numel(model):
    """Elements the surgery added (adapter parameters and persistent buffers) or trained, each tensor once."""
    seen, total = set(), 0
    tensors = list(model.surgery_adapters.adapters.state_dict().values())
    tensors += [p for r in model.surgery_adapters.records.values() for p, _ in r.trained]
    for t in tensors:
        if id(t) not in seen and t.data_ptr() not in seen:
            seen.update({id(t), t.data_ptr()})
            total += t.numel()
    return total


@pytest.mark.parametrize("spec_name", SPEC_FILES)
def test_round_trip_every_spec(spec_name, tmp_path):
    arch, model, base_state = _adapted(SPECS / spec_name)
    perturb(model, 0.1)
    _perturb_trained(model)
    model.eval()
    surgery.save(model, tmp_path)
    shapes = [(2, 8), (3, 13)]
    with torch.no_grad():
        expected = [run(arch, model, token_ids(batch, seq, seed=seq)) for batch, seq in shapes]

    fresh = FACTORIES[arch]()
    fresh.load_state_dict(base_state)
    fresh.eval()
    loaded = surgery.load(fresh, tmp_path, example_inputs=example_inputs(arch, fresh))
    assert loaded is fresh
    for (batch, seq), want in zip(shapes, expected):
        got = run(arch, fresh, token_ids(batch, seq, seed=seq))
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 1e-6, f"{spec_name} on {arch}"
    # and loading adapters into another model did not change the first one
    assert (run(arch, model, token_ids(*shapes[0], seed=shapes[0][1])) - expected[0]).abs().max() <= 1e-6
    # the adapters are really in the loaded model's forward: without them the output differs
    ids = token_ids(2, 8, seed=8)
    with surgery.disable(fresh):
        base_out = run(arch, fresh, ids)
    if not any(r.trained for r in fresh.surgery_adapters.records.values()):
        assert (base_out - run(arch, fresh, ids)).abs().max() > 1e-4

    # only what the surgery added or trained is written, nothing else of the base
    with safe_open(str(tmp_path / ADAPTERS_FILE), "pt") as f:
        saved_numel = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert saved_numel == _adapter_numel(model)
    # the saved spec is a spec file that loads on its own
    manifest = read_manifest(tmp_path)
    assert [a["name"] for a in manifest["adapters"]] == ["default"]
    assert len(surgery.load_spec(tmp_path / manifest["adapters"][0]["spec"]).rules) == \
        len(surgery.load_spec(SPECS / spec_name).rules)


def test_readable_keys_and_manifest(tmp_path):
    model = make_llama()
    surgery.apply(model, SPECS / "lora.yaml")
    surgery.save(model, tmp_path)
    with safe_open(str(tmp_path / ADAPTERS_FILE), "pt") as f:
        keys = set(f.keys())
    assert "default/lora/model_layers_0_self_attn_q_proj/lora_A" in keys
    assert "default/lora/model_layers_1_self_attn_v_proj/lora_B" in keys
    assert len(keys) == 2 * 2 * 2      # q, v in 2 layers; A and B
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert manifest["format_version"] == 1
    names = manifest["base"]["parameters"]
    assert names["model.layers.0.self_attn.q_proj.weight"] == [64, 64]
    assert len(names) == len(list(make_llama().parameters()))


def test_tied_weights_train_and_save_once(tmp_path):
    """GPT-2's LM head is its token embedding: training it (a `train` rule on the LM head) saves it once, and the
    tie survives loading."""
    spec = {"version": 1, "rules": [
        {"name": "lora", "match": {"role": ["attention.qkv"]}, "action": "wrap", "module": {"kind": "lora", "r": 2}},
        {"name": "head", "match": {"role": "lm_head"}, "action": "train"}]}
    model = make_gpt2()
    surgery.apply(model, spec)
    assert model.lm_head.weight is model.transformer.wte.weight
    perturb(model)
    _perturb_trained(model)
    model.eval()
    surgery.save(model, tmp_path)
    with safe_open(str(tmp_path / ADAPTERS_FILE), "pt") as f:
        trained = [k for k in f.keys() if "/trained/" in k]
    assert trained == ["default/trained/transformer.wte.weight"]

    fresh = make_gpt2().eval()
    surgery.load(fresh, tmp_path)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    assert torch.equal(fresh.transformer.wte.weight, model.transformer.wte.weight)
    assert fresh.transformer.wte.weight.requires_grad
    ids = token_ids()
    assert (run("gpt2", fresh, ids) - run("gpt2", model, ids)).abs().max() <= 1e-6


def test_several_adapters_and_active_set(tmp_path):
    model = make_llama()
    surgery.apply(model, SPECS / "houlsby.yaml", name="houlsby")
    surgery.apply(model, SPECS / "lora.yaml", name="lora")
    perturb(model, 0.1)
    surgery.set_active(model, ["lora"])
    model.eval()
    surgery.save(model, tmp_path)
    manifest = read_manifest(tmp_path)
    assert [a["name"] for a in manifest["adapters"]] == ["houlsby", "lora"]

    fresh = make_llama().eval()
    surgery.load(fresh, tmp_path)
    assert fresh.surgery_adapters.runtime.active == ["lora"]
    ids = token_ids()
    assert (run("llama", fresh, ids) - run("llama", model, ids)).abs().max() <= 1e-6
    surgery.set_active(fresh, None)
    surgery.set_active(model, None)
    assert (run("llama", fresh, ids) - run("llama", model, ids)).abs().max() <= 1e-6

    # both specs apply to BERT too (strict=False skips the fingerprint), but the sites differ: both removed again
    bert = make_bert()
    _unchanged_after(bert, lambda: surgery.load(bert, tmp_path, strict=False), "do not fit this model's sites")


def test_adapter_file_is_a_small_fraction_of_the_real_minilm(tmp_path):
    model = make_minilm()
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    surgery.apply(model, SPECS / "houlsby.yaml")
    surgery.save(model, tmp_path)
    size = (tmp_path / ADAPTERS_FILE).stat().st_size
    d, layers, b = 384, 6, 384 // 16
    assert size >= 4 * 2 * layers * (2 * d * b + b + d)     # every adapter parameter, fp32
    assert size < 0.02 * base_bytes                          # measured: 1.00%


# ---------------------------------------------------------------- bad input: clear errors, model unchanged

@pytest.fixture(scope="module")
def saved_lora(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lora")
    model = make_llama()
    surgery.apply(model, SPECS / "lora.yaml")
    perturb(model)
    surgery.save(model, directory)
    return directory


def _unchanged_after(model, fn, match):
    before = state(model)
    with pytest.raises(surgery.SurgeryError, match=match):
        fn()
    assert_same_state(before, state(model))
    assert not hasattr(model, "surgery_adapters")


def test_load_into_a_model_of_another_shape(saved_lora):
    other = make_llama(hidden=96)
    _unchanged_after(other, lambda: surgery.load(other, saved_lora), r"does not fit.*another shape")
    # without the fingerprint check the spec applies, and the tensors do not fit: rolled back
    _unchanged_after(other, lambda: surgery.load(other, saved_lora, strict=False), r"saved shape \[8, 64\]")


def test_load_into_a_model_with_other_sites(saved_lora):
    deeper = make_llama(layers=3)
    _unchanged_after(deeper, lambda: surgery.load(deeper, saved_lora), r"does not fit.*missing here|lacks")
    _unchanged_after(deeper, lambda: surgery.load(deeper, saved_lora, strict=False),
                     r"not in the file \(first: default/lora/model_layers_2")


def test_truncated_safetensors(saved_lora, tmp_path):
    for name in (ADAPTERS_FILE, MANIFEST_FILE, "default.spec.yaml"):
        (tmp_path / name).write_bytes((saved_lora / name).read_bytes())
    data = (tmp_path / ADAPTERS_FILE).read_bytes()
    (tmp_path / ADAPTERS_FILE).write_bytes(data[: len(data) - 100])
    model = make_llama()
    _unchanged_after(model, lambda: surgery.load(model, tmp_path), "truncated or corrupt")


def test_unknown_manifest_version(saved_lora, tmp_path):
    for name in (ADAPTERS_FILE, "default.spec.yaml"):
        (tmp_path / name).write_bytes((saved_lora / name).read_bytes())
    manifest = json.loads((saved_lora / MANIFEST_FILE).read_text())
    manifest["format_version"] = 99
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    model = make_llama()
    _unchanged_after(model, lambda: surgery.load(model, tmp_path), "format_version 99")
    (tmp_path / MANIFEST_FILE).unlink()
    _unchanged_after(model, lambda: surgery.load(model, tmp_path), "no manifest.json")


def test_name_clash_and_nothing_to_save(saved_lora, tmp_path):
    model = make_llama()
    with pytest.raises(CheckpointError, match="no adapters to save"):
        surgery.save(model, tmp_path)
    surgery.apply(model, SPECS / "houlsby.yaml")   # also under "default"
    before = state(model)
    with pytest.raises(CheckpointError, match="already has an adapter named 'default'"):
        surgery.load(model, saved_lora)
    assert_same_state(before, state(model))


def test_checkpoint_error_is_a_surgery_error():
    assert issubclass(CheckpointError, surgery.SurgeryError)
