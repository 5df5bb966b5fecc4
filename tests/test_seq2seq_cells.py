"""Architecture-matrix cells outside the matrix's own checks (issues 16/17): T5's LLaMA-Adapter, a UNet's UniPELT
and prompt tuning, ReFT on encoder-decoders, Mamba's refusals and prompt tuning, and a classification head
that pools after reading every position (GPT2ForSequenceClassification's `score`)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import surgery
from architectures import ARCHITECTURES, main_output

SPECS = Path(__file__).resolve().parent.parent / "specs"


def _build(arch):
    model, inputs, facts = ARCHITECTURES[arch]()
    return model, inputs, facts


def _generate_matches_full_forwards(model, prompt: dict, seq2seq: bool, new_tokens: int = 3, atol: float = 1e-4):
    """Each step's logits of generate() with the cache equal a full forward without it."""
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        seq = out.sequences
        for t, step in enumerate(out.logits):
            if seq2seq:
                start = seq.shape[1] - len(out.logits)
                ref = model(**prompt, decoder_input_ids=seq[:, :start + t], use_cache=False).logits[:, -1]
            else:
                ref = model(input_ids=seq[:, :prompt["input_ids"].shape[1] + t], use_cache=False).logits[:, -1]
            assert (step - ref).abs().max().item() <= atol, f"step {t}"


# ---------------------------------------------------------------- T5 + LLaMA-Adapter

def test_score_term_over_added_keys_alone_is_zeros():
    """LLaMA-Adapter attends over its prompts alone: a score term of the original keys (T5's position bias)
    becomes zeros over the prompts, as the mask makes them visible to every query."""
    from surgery.rewrite.attention import _extend_scores
    bias = torch.randn(2, 4, 6, 6)
    prompts = torch.randn(2, 4, 10, 16)
    assert torch.equal(_extend_scores(bias, 10, prompts, 6), torch.zeros(2, 4, 6, 10))
    both = torch.randn(2, 4, 16, 16)             # prefix tuning: [prefix, original keys]
    extended = _extend_scores(bias, 10, both, 6)
    assert torch.equal(extended[..., 10:], bias) and not extended[..., :10].any()


@pytest.mark.slow
def test_t5_llama_adapter_runs_and_generates_like_full_forwards():
    model, inputs, facts = _build("t5")
    with torch.no_grad():
        base = main_output(model, inputs)
    surgery.apply(model, SPECS / "llama_adapter.yaml", example_inputs=facts["apply_inputs"])
    with torch.no_grad():
        assert torch.allclose(main_output(model, inputs), base, atol=1e-5)        # zero gate: identity
        for name, p in model.surgery_adapters.named_parameters():
            if name.endswith("adaption_gate"):
                p.fill_(0.5)
        changed = main_output(model, inputs)
    assert changed.shape == base.shape and (changed - base).abs().max() > 1e-4
    _generate_matches_full_forwards(model, {"input_ids": inputs["input_ids"][:, :6]}, seq2seq=True)


# ---------------------------------------------------------------- UNet

@pytest.mark.slow
def test_unet_unipelt_gates_read_each_resolutions_width():
    """A UNet's attention layers have several widths (32 and 64 here): UniPELT's prefix gate reads the hidden
    state entering its own attention module, and the shared prefix MLP gives each layer its own columns."""
    pytest.importorskip("diffusers")
    model, inputs, facts = _build("unet")
    with torch.no_grad():
        base = main_output(model, inputs)
    surgery.apply(model, SPECS / "unipelt.yaml", example_inputs=facts["apply_inputs"])
    prefixes = [m for m in model.surgery_adapters.modules() if type(m).__name__ == "PrefixTuning"]
    widths = {m.layer: m.kv_heads * m.head_dim for m in prefixes}
    assert sorted(set(widths.values())) == [32, 64]
    columns = sorted((m.offset, m.offset + 2 * m.kv_heads * m.head_dim) for m in prefixes)
    assert all(a[1] <= b[0] for a, b in zip(columns, columns[1:])), columns        # disjoint
    mlp = prefixes[0]._mlp[0]
    assert columns[-1][1] == mlp.control_trans[-1].out_features == 2 * sum(widths.values())
    assert {m.gate.in_features for m in prefixes} == {32, 64}
    with torch.no_grad():
        out = main_output(model, inputs)
    assert out.shape == base.shape and torch.isfinite(out).all()


# ---------------------------------------------------------------- ReFT on encoder-decoders

def _first_real(mask: torch.Tensor, n: int) -> torch.Tensor:
    return mask.bool() & (mask.long().cumsum(1) - 1 < n)


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_reft_intervenes_at_each_stacks_own_positions(arch):
    """Encoder blocks: the first 3 real tokens of input_ids (attention_mask); decoder blocks: the first 3 real
    tokens of decoder_input_ids (decoder_attention_mask). Checked against hooks written from the definition
    (h + Rᵀ(W h + b − R h)) with the same units on the base model."""
    model, inputs, facts = _build(arch)
    reference = copy.deepcopy(model)
    surgery.apply(model, SPECS / "loreft.yaml", example_inputs=facts["apply_inputs"])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.surgery_adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    mask = torch.ones_like(inputs["input_ids"])
    mask[1, :2] = 0                                  # left padding in the encoder's input
    dmask = torch.ones_like(inputs["decoder_input_ids"])
    dmask[0, :1] = 0                                 # and in the decoder's
    call = {**inputs, "attention_mask": mask, "decoder_attention_mask": dmask, "use_cache": False}
    units = {n.split(".")[-1]: m for n, m in model.surgery_adapters.named_modules()
             if type(m).__name__ == "ReftIntervention"}
    assert {m.stack_call.rpartition(".")[2] for m in units.values()} == {"encoder", "decoder"}
    hooks = []
    for block in facts["blocks"]:
        key = block.replace(".", "_") + "__block_output"
        unit = units[key].units[0]
        where = _first_real(dmask if "decoder" in block else mask, 3)

        def hook(mod, args, out, unit=unit, where=where):
            h = out[0] if isinstance(out, tuple) else out
            h = torch.where(where[..., None], unit(h), h)
            return (h, *out[1:]) if isinstance(out, tuple) else h
        hooks.append(reference.get_submodule(block).register_forward_hook(hook))
    model.eval()
    with torch.no_grad():
        want = reference(**call).logits
        got = model(**call).logits
        with surgery.disable(model):
            base = model(**call).logits
    assert (got - base).abs().max() > 1e-4
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


@pytest.mark.parametrize("arch", ["t5", pytest.param("whisper", marks=pytest.mark.slow)])
def test_reft_on_encoder_decoder_generates_like_full_forwards(arch):
    """The decoder's prompt is its start token: the next two positions are intervened in the decoding steps
    too (they are among the first 3), so generate() with the cache equals full forwards; the encoder, which
    generate() calls directly, is intervened at its own input's positions."""
    model, inputs, facts = _build(arch)
    surgery.apply(model, SPECS / "loreft.yaml", example_inputs=facts["apply_inputs"])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.surgery_adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.eval()
    key = facts.get("encoder_input", "input_ids")
    prompt = {key: inputs[key][:, :6] if key == "input_ids" else inputs[key]}
    _generate_matches_full_forwards(model, prompt, seq2seq=True)


def test_reft_decoding_steps_among_the_first_positions_are_intervened():
    """A decoder-only prompt shorter than prefix_positions: the decoding steps' new positions among the first
    real tokens are intervened, as in a full forward, so generate() with the cache equals full forwards."""
    model, inputs, facts = _build("llama")
    surgery.apply(model, SPECS / "loreft.yaml", example_inputs=facts["apply_inputs"])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.surgery_adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.eval()
    _generate_matches_full_forwards(model, {"input_ids": inputs["input_ids"][:, :1]}, seq2seq=False)


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["loreft", "prompt"])
def test_unet_has_no_token_positions(spec):
    """A UNet's layers form several stacks (its resolutions) that all cross-attend to a conditioning input, not
    an encoder-decoder: methods at token positions are refused before anything is changed."""
    pytest.importorskip("diffusers")
    model, inputs, facts = _build("unet")
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    with pytest.raises(surgery.SurgeryError, match=r"stacks that are not an encoder.*no token positions"):
        surgery.apply(model, SPECS / f"{spec}.yaml", example_inputs=facts["apply_inputs"])
    assert hooks == [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    assert not hasattr(model, "surgery_adapters")


# ---------------------------------------------------------------- heads

def test_head_role_covers_a_head_pooled_after_it():
    """GPT2ForSequenceClassification's `score` reads every position and the model then indexes each row's last
    real token: a classification head (`head`), not an LM head; a causal LM's head keeps `lm_head`."""
    model, inputs, facts = _build("gpt2-cls")
    rows = surgery.plan(model, {"rules": [{"name": "h", "match": {"role": "head"}, "action": "train",
                                            "params": ["all"]}]})
    assert [(r.role, r.module) for r in rows] == [("head", "score")]
    assert not [r for r in surgery.plan(model, {"rules": [{"name": "h", "match": {"role": "lm_head"},
                                                            "action": "train", "expect": "any"}]})]
    lm, _, _ = _build("gpt2")
    rows = surgery.plan(lm, {"rules": [{"name": "h", "match": {"role": ["head", "lm_head"]}, "action": "train"}]})
    assert [(r.role, r.module) for r in rows] == [("lm_head", "lm_head")]


# ---------------------------------------------------------------- Mamba

@pytest.mark.parametrize("spec,pattern", [
    ("vera", r"rule 'vera' .*matched no site.*no attention op \(no softmax between two matmuls, no SDPA\), so no "
             r"site has the role attention\.q or attention\.v; nearest alternative: module globs on the linears of "
             r"its layers, e\.g\. backbone\.layers\.\*\.mixer\.in_proj"),
    ("parallel", r"`from` \(role='ffn\.residual'\) matches nothing.*no attention op.*no FFN sub-layer beside "
                 r"attention.*nearest alternative: module globs"),
], ids=["vera", "parallel"])
def test_mamba_refusals_say_the_model_has_no_attention(spec, pattern):
    model, inputs, facts = _build("mamba")
    with pytest.raises(surgery.MatchError, match=pattern):
        surgery.apply(model, SPECS / f"{spec}.yaml")
    assert not hasattr(model, "surgery_adapters")


def test_mamba_alternative_globs_match():
    """The nearest alternative the refusal names is a pattern that works."""
    model, inputs, facts = _build("mamba")
    spec = {"rules": [{"name": "lora", "match": {"module": ["backbone.layers.*.mixer.in_proj",
                                                            "backbone.layers.*.mixer.x_proj"]},
                       "action": "wrap", "module": {"kind": "lora", "r": 2}, "expect": "every_layer"}]}
    assert len(surgery.plan(model, spec)) == 4


def test_mamba_prompt_tuning_is_prompts_before_the_embeddings():
    """Prompt tuning on a Mamba LM: the prompt embeddings go in front of the token embeddings and the logits of
    the caller's positions come out (the prompts' are dropped before the LM head's logits_to_keep slice, so
    generate() keeps its last position); generate() with the recurrent cache equals full forwards."""
    model, inputs, facts = _build("mamba")
    base = copy.deepcopy(model)
    surgery.apply(model, SPECS / "prompt.yaml", example_inputs=facts["apply_inputs"])
    prompt = next(m for m in model.surgery_adapters.modules() if type(m).__name__ == "PromptTuning")
    ids = inputs["input_ids"]
    with torch.no_grad():
        embeds = base.get_input_embeddings()(ids)
        full = torch.cat([prompt.prompt_embedding.expand(ids.shape[0], -1, -1), embeds], dim=1)
        want = base(inputs_embeds=full, use_cache=False).logits[:, prompt.length:]
        got = model(input_ids=ids, use_cache=False).logits
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
    _generate_matches_full_forwards(model.eval(), {"input_ids": ids[:, :6]}, seq2seq=False)
