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
