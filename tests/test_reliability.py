"""Surgery never damages a model and never does less than asked without saying so.

Every failure class (bad spec, a model torch.export cannot trace, a rule that matches too little, a module that
fails mid-way through the rewrite, a weight init that fails, a failing merge, unmerge or load) is provoked on
a real architecture, usually one that already carries a trained adapter, and the model is compared before and
after: parameter values, requires_grad flags, hooks, training modes, module tree and the output on a fixed
input. Then the numerics of merging: 100 merge/unmerge cycles in fp32, and what merging costs in bf16.
"""
from __future__ import annotations

from typing import Literal

import pytest
import torch
from torch import nn

import surgery
from models import assert_same_state, make_llama, make_minigpt, perturb, state, token_ids
from surgery.io.checkpoint import ADAPTERS_FILE
from surgery.modules import registry
from surgery.modules.lora import LoRA, LoRAOptions

IDS = token_ids(2, 9, seed=7)
ALL_LINEARS = ["attention.q", "attention.k", "attention.v", "attention.output", "ffn.in", "ffn.gate", "ffn.out"]


def logits(model, ids=IDS):
    out = model(input_ids=ids) if hasattr(model, "config") else model(ids)
    return (out.logits if hasattr(out, "logits") else out).detach()


def snapshot(model):
    return state(model), logits(model)


def assert_unchanged(before, model):
    """Same state (values, flags, hooks, modes, module tree) and bit-identical output on the fixed input."""
    saved_state, saved_out = before
    assert_same_state(saved_state, state(model))
    assert torch.equal(logits(model), saved_out)


def adapted_llama(train_mode=False):
    """A LLaMA that already carries a trained LoRA adapter named 'trained' (what a failure must not damage)."""
    model = make_llama()
    surgery.apply(model, "specs/lora.yaml", name="trained")
    perturb(model, 0.1)
    return model.train(train_mode)


@pytest.fixture(scope="module")
def shared_llama():
    """One adapted LLaMA for the failures that must leave it as it is (each test checks it did): traced once."""
    return adapted_llama()


# ---------------------------------------------------------------------------------------------- test modules

class TrapOptions(LoRAOptions):
    kind: Literal["test_trap_lora"] = "test_trap_lora"


class TrapLoRA(LoRA):
    """LoRA that raises at a chosen call: `traps[event] = n` lets n calls of that event pass and fails the next
    one (once: a rollback that calls it again succeeds)."""

    Options = TrapOptions
    traps: dict[str, int] = {}

    @classmethod
    def tick(cls, event: str):
        if event in cls.traps:
            cls.traps[event] -= 1
            if cls.traps[event] == -1:
                raise RuntimeError(f"trap: {event}")

    @classmethod
    def build(cls, options, site, action):
        if torch.get_default_device().type != "meta":   # apply's memory estimate builds on meta first
            cls.tick("build")
        return super().build(options, site, action)

    def transform_weight(self, weight):
        self.tick("transform")
        return super().transform_weight(weight)

    def inverse_weight(self, merged):
        self.tick("inverse")
        return super().inverse_weight(merged)


@pytest.fixture
def trap():
    """TrapLoRA registered for one test only (the registry is global: the schema tests must not see it)."""
    registry.register(TrapLoRA)
    TrapLoRA.traps = {}
    yield TrapLoRA.traps
    TrapLoRA.traps = {}
    registry._REGISTRY.pop("test_trap_lora", None)


def trap_rule(roles=("attention.q", "attention.v"), **extra):
    return {"name": "trap", "match": {"role": list(roles)}, "action": "wrap",
            "module": {"kind": "test_trap_lora", "r": 4}, **extra}


# ---------------------------------------------------------------------------------------------- apply: each stage

BAD_SPECS = {
    "unknown_kind": {"rules": [{"match": {"role": "ffn.out"}, "action": "insert_after", "module": {"kind": "nope"}}]},
    "bad_option": {"rules": [{"match": {"role": "ffn.out"}, "action": "insert_after",
                              "module": {"kind": "bottleneck", "reduction_factor": -1}}]},
    "wrong_action": {"rules": [{"match": {"role": "ffn.out"}, "action": "insert_after", "module": {"kind": "lora"}}]},
    "unknown_role": {"rules": [{"match": {"role": "ffn.output"}, "action": "wrap", "module": {"kind": "lora"}}]},
    "not_a_mapping": ["rules"],
    "bad_layers": {"rules": [{"match": {"role": "ffn.out", "layers": "one"}, "action": "wrap", "module": {"kind": "lora"}}]},
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_bad_spec(case, shared_llama):
    model = shared_llama
    before = snapshot(model)
    with pytest.raises(surgery.SpecError):
        surgery.apply(model, BAD_SPECS[case], name="new")
    assert_unchanged(before, model)


class DataDependent(nn.Module):
    """MiniGPT followed by a branch on a tensor's value: torch.export cannot trace it."""

    def __init__(self):
        super().__init__()
        self.gpt = make_minigpt()

    def forward(self, ids):
        h = self.gpt(ids)
        return h if h.sum() > 0 else -h


def test_trace_failure_keeps_train_mode_and_everything_else():
    model = DataDependent().train()     # tracing runs in eval mode: the mode must come back
    before = snapshot(model.eval())
    model.train()
    modes = [m.training for m in model.modules()]
    with pytest.raises(surgery.SurgeryError, match="torch.export could not trace DataDependent"):
        surgery.apply(model, "specs/houlsby.yaml", example_inputs=model.gpt.example_inputs())
    assert [m.training for m in model.modules()] == modes
    assert not hasattr(model, "surgery_adapters")
    assert_unchanged(before, model.eval())


def test_match_failure(shared_llama):
    model = shared_llama
    before = snapshot(model)
    spec = {"rules": [
        {"name": "fine", "match": {"role": "ffn.out"}, "action": "insert_after", "module": {"kind": "bottleneck"}},
        {"name": "too_deep", "match": {"role": "ffn.out", "layers": [1, 5]}, "action": "wrap",
         "module": {"kind": "lora"}, "expect": 2}]}
    with pytest.raises(surgery.MatchError, match="'too_deep'"):
        surgery.apply(model, spec, name="new")
    assert_unchanged(before, model)


def test_rewrite_failure_on_the_second_site_undoes_hooks_parametrizations_and_flags(trap, shared_llama):
    model = shared_llama.train()
    before = snapshot(model)
    trap["build"] = 1      # the trap module builds at its first site, then fails at the second
    spec = {"rules": [
        {"name": "norms", "match": {"role": "norm"}, "action": "train"},                        # flags
        {"name": "bn", "match": {"role": "ffn.out"}, "action": "insert_after", "module": {"kind": "bottleneck"}},  # hooks
        trap_rule(realize="weight")]}                                                          # parametrizations
    with pytest.raises(surgery.RewriteError, match="trap: build"):
        surgery.apply(model, spec, name="new")
    assert all(m.training for m in model.modules())
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    assert_unchanged(before, model)
    assert list(model.surgery_adapters.records) == ["trained"]
    model.eval()


def test_weight_init_failure_mid_way(shared_llama):
    """Sparse masks are chosen from the weights: k fits a 64x64 query weight, not the 32x64 key weight (GQA)."""
    model = shared_llama
    before = snapshot(model)
    spec = {"rules": [{"name": "sparse", "match": {"role": ["attention.q", "attention.k"]}, "action": "wrap",
                       "module": {"kind": "sparse", "k": 3000}}]}
    with pytest.raises(surgery.RewriteError, match="k=3000 exceeds"):
        surgery.apply(model, spec, name="new")
    assert_unchanged(before, model)


def test_calibration_failure_leaves_no_gradients_behind(shared_llama):
    model = shared_llama
    before = snapshot(model)

    def losses(m):
        yield m(input_ids=IDS, labels=IDS).loss
        raise ValueError("the calibration data ran out")
    spec = {"rules": [{"match": {"role": "attention.q"}, "action": "wrap",
                       "module": {"kind": "sparse", "k": 16, "select": "gradient"}}]}
    with pytest.raises(surgery.SurgeryError, match="calibration data ran out"):
        surgery.apply(model, spec, name="new", calibration=losses)
    assert all(p.grad is None for p in model.parameters())
    assert_unchanged(before, model)


# ---------------------------------------------------------------------------------------------- no silent partial work

def test_every_layer_names_the_rule_and_the_missing_layer():
    model = make_minigpt(layers=3)
    spec = {"rules": [{"name": "first_two", "match": {"role": "ffn.out", "module": "blocks.[01].*"},
                       "action": "insert_after", "module": {"kind": "bottleneck"}, "expect": "every_layer"}]}
    with pytest.raises(surgery.MatchError, match=r"rule 'first_two' expects a site in every layer but matched none "
                                                 r"in layers \[2\]"):
        surgery.apply(model, spec, example_inputs=model.example_inputs())


def test_expect_n_names_the_rule_and_the_layers_without_a_site():
    model = make_minigpt(layers=3)
    spec = {"rules": [{"name": "three", "match": {"role": "ffn.out", "module": "blocks.[02].*"},
                       "action": "insert_after", "module": {"kind": "bottleneck"}, "expect": 3}]}
    with pytest.raises(surgery.MatchError, match=r"rule 'three' expects 3 site\(s\) but matched 2.*matched layers "
                                                 r"\[0, 2\]; no site in layers \[1\]"):
        surgery.apply(model, spec, example_inputs=model.example_inputs())


def test_second_apply_under_a_name_in_use_is_an_error(shared_llama):
    model = shared_llama
    before = snapshot(model)
    with pytest.raises(surgery.SurgeryError, match="'trained' is already applied"):
        surgery.apply(model, "specs/houlsby.yaml", name="trained")
    assert_unchanged(before, model)


def test_rewrites_that_cannot_fold_are_reported_by_merge():
    model = adapted_llama()
    surgery.apply(model, "specs/houlsby.yaml", name="bn")
    perturb(model, 0.1, seed=3)
    before = snapshot(model)
    with pytest.raises(surgery.SurgeryError, match="(?s)cannot be merged.*bn/ffn_adapter/model_layers_1_mlp_down_proj"):
        surgery.merge(model, strict=True)
    assert_unchanged(before, model)
    report = surgery.merge(model)
    assert len(report.merged) == 4 and len(report.not_merged) == 4
    assert all(site.startswith("bn/") and "BottleneckAdapter" in why for site, why in report.not_merged.items())
    assert "not merged: bn/attention_adapter/model_layers_0_self_attn_o_proj" in str(report)
    torch.testing.assert_close(logits(model), before[1], atol=1e-5, rtol=0)


def test_a_zero_wide_adapter_is_an_error_not_a_silent_no_op(shared_llama):
    """An invertible adapter's subnets are d/2 // reduction_factor wide: 0 units would leave only a bias."""
    model = shared_llama
    before = snapshot(model)
    spec = {"rules": [{"match": {"role": "embedding.output"}, "action": "insert_after",
                       "module": {"kind": "invertible", "reduction_factor": 40}}]}
    with pytest.raises(surgery.RewriteError, match="reduction_factor 40.0 leaves no hidden unit for a 32-wide"):
        surgery.apply(model, spec, name="new")
    assert_unchanged(before, model)


def test_attention_adapters_of_two_models_both_run():
    """Both models' prefixes live behind one transformers attention function: neither may drop the other's."""
    first, second = make_llama().eval(), make_llama().eval()
    base = logits(first)
    surgery.apply(first, "specs/prefix.yaml")
    with_prefix = logits(first)
    assert (with_prefix - base).abs().max() > 1e-3
    surgery.apply(second, "specs/prefix.yaml")
    assert torch.equal(logits(first), with_prefix)
    surgery.remove(second)
    assert torch.equal(logits(first), with_prefix)
    surgery.remove(first)
    assert torch.equal(logits(first), base)


# ---------------------------------------------------------------------------------------------- merge / unmerge / load

def test_merge_failure_across_adapter_sets_is_all_or_nothing(trap):
    model = adapted_llama()
    surgery.apply(model, {"rules": [trap_rule()]}, name="trap")
    perturb(model, 0.1, seed=5)
    before = snapshot(model)
    trap["transform"] = 2          # 'trained' folds its four sites, the trap set two, then the third fails
    with pytest.raises(surgery.SurgeryError, match="(?s)merge failed, the model is unchanged.*trap: transform"):
        surgery.merge(model)
    assert_unchanged(before, model)
    trap.clear()
    surgery.merge(model)
    torch.testing.assert_close(logits(model), before[1], atol=1e-5, rtol=0)


def test_unmerge_failure_keeps_the_model_merged(trap):
    model = adapted_llama()
    surgery.apply(model, {"rules": [trap_rule()]}, name="trap")
    perturb(model, 0.1, seed=5)
    unmerged = snapshot(model)
    surgery.merge(model)
    merged = snapshot(model)
    trap["inverse"] = 1            # unmerge restores one trap site, then the next fails
    with pytest.raises(surgery.SurgeryError, match="(?s)unmerge failed, the model is unchanged.*trap: inverse"):
        surgery.unmerge(model)
    assert_unchanged(merged, model)
    trap.clear()
    assert surgery.unmerge(model) == ["trained", "trap"]
    assert_unchanged(unmerged, model)     # the base weights bit for bit, hooks and flags back


def test_load_failure_on_the_second_adapter(tmp_path):
    source = make_llama()
    surgery.apply(source, "specs/lora.yaml", name="lora")
    surgery.apply(source, "specs/houlsby.yaml", name="houlsby")
    perturb(source, 0.1)
    surgery.save(source, tmp_path)
    from safetensors.torch import load_file, save_file
    tensors = load_file(tmp_path / ADAPTERS_FILE)
    key = next(k for k in tensors if k.startswith("houlsby/ffn_adapter/") and k.endswith("weight"))
    tensors[key] = tensors[key][:-1]            # one tensor of the second adapter no longer fits
    save_file(tensors, tmp_path / ADAPTERS_FILE)
    import hashlib, json                        # a file written so (not altered after save: its digest matches)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["tensors"]["sha256"] = hashlib.sha256((tmp_path / ADAPTERS_FILE).read_bytes()).hexdigest()
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))

    model = adapted_llama(train_mode=True)
    before = snapshot(model)
    with pytest.raises(surgery.SurgeryError, match=key.replace(".", r"\.")):
        surgery.load(model, tmp_path)
    assert list(model.surgery_adapters.records) == ["trained"]
    assert_unchanged(before, model)


# ---------------------------------------------------------------------------------------------- numerics

def _base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("surgery_adapters.")}


@pytest.mark.parametrize("exact", [True, False])
def test_merge_unmerge_100_times_drifts_at_most_1e_5_in_fp32(exact):
    model = make_llama().eval()
    surgery.apply(model, "specs/lora.yaml")
    perturb(model, 0.05)
    base = _base_weights(model)
    out = logits(model)
    for _ in range(100):
        surgery.merge(model, exact=exact)
        surgery.unmerge(model)
    drift = max((p - base[n]).abs().max().item() for n, p in _base_weights(model).items())
    assert drift <= 1e-5
    if exact:
        assert drift == 0.0           # the residual kept at merge restores the base bit for bit
    torch.testing.assert_close(logits(model), out, atol=1e-5, rtol=0)


BF16_OUTPUT_TOLERANCE = 3e-2    # of the output's largest magnitude; documented in docs/reliability.md


def test_bf16_merge_tolerance():
    """In bf16, a merged model computes x·bf16(W + ΔW) where the unmerged one computes bf16(x·W) + bf16(x·ΔW):
    both round differently, by about the same amount, so merging moves the output by about bf16's own error
    (measured: 0.6-0.8% of the largest logit here) and no further from the fp32 model than bf16 already is."""
    model = make_llama().eval()
    surgery.apply(model, {"rules": [{"match": {"role": ALL_LINEARS}, "action": "wrap",
                                     "module": {"kind": "lora", "r": 8, "alpha": 16}}]})
    perturb(model, 0.05)
    reference = logits(model)                                    # fp32, unmerged
    model.to(torch.bfloat16)
    base = _base_weights(model)
    q_proj = model.model.layers[0].self_attn.q_proj
    lora_q = model.surgery_adapters.records["default"].weight_sites[0].adapter
    folded_in_fp32 = q_proj.weight.float() + lora_q.delta_weight().float()
    unmerged = logits(model).float()
    surgery.merge(model)
    merged = logits(model).float()
    scale = reference.abs().max()
    # the merged weight is W + ΔW rounded to bf16: within one bf16 ulp (2^-8 relative) of the fp32 sum
    assert ((q_proj.weight.float() - folded_in_fp32).abs() <= folded_in_fp32.abs() * 2 ** -8 + 1e-30).all()
    assert (merged - unmerged).abs().max() <= BF16_OUTPUT_TOLERANCE * scale
    assert (merged - reference).abs().max() <= BF16_OUTPUT_TOLERANCE * scale
    assert (merged - reference).abs().max() <= 2 * (unmerged - reference).abs().max()
    for _ in range(10):                                          # unmerge is exact in bf16 too
        surgery.unmerge(model)
        surgery.merge(model)
    surgery.unmerge(model)
    assert all(torch.equal(p, base[n]) for n, p in _base_weights(model).items())


def test_two_attention_adapters_at_one_op_run_together():
    """LLaMA-Adapter's attention over its own prompt keys, inside prefix tuning's attention (found by fuzzing:
    the prefix's key count was added to the prompt's, and the mask computation failed)."""
    prefix = {"name": "prefix", "match": {"role": "attention.op"}, "action": "attend",
              "module": {"kind": "prefix", "prefix_length": 5}}
    prompt = {"name": "prompt", "match": {"role": "attention.op"}, "action": "attend",
              "module": {"kind": "adaption_prompt", "adapter_len": 4}}
    alone, both = make_llama().eval(), make_llama().eval()
    torch.manual_seed(0)
    surgery.apply(alone, {"rules": [prefix]})
    torch.manual_seed(0)
    surgery.apply(both, {"rules": [prefix, prompt]})
    with torch.no_grad():
        for name, p in alone.surgery_adapters.named_parameters():
            both.surgery_adapters.get_parameter(name).copy_(p)
    torch.testing.assert_close(logits(both), logits(alone), atol=1e-6, rtol=0)   # the prompt's gate starts at 0
    with torch.no_grad():
        for p in both.surgery_adapters.adapters.default.prompt.parameters():
            if p.numel() == 1:
                p.fill_(0.5)
    assert (logits(both) - logits(alone)).abs().max() > 1e-3
