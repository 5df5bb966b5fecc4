"""Decoders outside the architecture matrix's first set (hybrid attention + state-space stacks, parallel blocks
that add their branches one by one, a head forwarding `use_cache` through **kwargs): tiny random-weight models
built from transformers configs (hidden 64, 2 layers, vocab 96)."""
from __future__ import annotations

import pytest
import torch

import surgery
from surgery.rewrite.host import cache_length
from architectures import _decoder, _ids


def _roles(model, spec):
    return [(m.role, m.layer, m.module) for m in surgery.plan(model, surgery.load_spec(spec))]


def _spec(rules):
    return {"version": 1, "name": "t", "rules": rules}


def bamba():
    # layer 0 a Mamba-2 mixer, layer 1 attention; both with a gated FFN; one layer class for both
    return _decoder("BambaConfig", "BambaForCausalLM", num_key_value_heads=2, attn_layer_indices=[1],
                    mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8, mamba_d_conv=4,
                    mamba_expand=2, mamba_chunk_size=4)


def jamba():
    # layers of two classes in one ModuleList: JambaMambaDecoderLayer, JambaAttentionDecoderLayer
    return _decoder("JambaConfig", "JambaForCausalLM", num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                    expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=1,
                    mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8, use_mamba_kernels=False)


@pytest.mark.parametrize("build", [bamba, jamba])
def test_hybrid_layers_are_numbered_by_position_in_the_stack(build):
    """The attention of model.layers.1 is layer 1 (it was layer 0: layers were counted by attention ops, so
    `layers: [0]` selected the second block), and the state-space layer is a layer with its own block.output."""
    model, _, _ = build()
    rows = _roles(model, _spec([
        {"name": "q", "match": {"role": "attention.q"}, "action": "wrap", "module": {"kind": "lora", "r": 2}},
        {"name": "ffn", "match": {"role": "ffn.out"}, "action": "wrap", "module": {"kind": "lora", "r": 2}}]))
    assert [(layer, module) for role, layer, module in rows if role == "attention.q"] == \
        [(1, "model.layers.1.self_attn.q_proj")]
    reft = _roles(model, "specs/loreft.yaml")
    assert sorted((layer, module) for role, layer, module in reft if role == "block.output") == \
        [(0, "model.layers.0"), (1, "model.layers.1")]
    assert {layer for role, layer, module in rows if role == "ffn.out"} == {0, 1}
    assert all(module.startswith(f"model.layers.{layer}.") for role, layer, module in rows if role == "ffn.out")


def test_hybrid_attention_in_every_layer_is_refused_saying_which_layers_lack_it():
    model, _, _ = bamba()
    with pytest.raises(surgery.SurgeryError, match=r"every layer but matched none in layers \[0\]"):
        surgery.plan(model, surgery.load_spec(_spec([
            {"name": "lora", "match": {"role": ["attention.q", "attention.v"]}, "action": "wrap",
             "module": {"kind": "lora", "r": 2}, "expect": "every_layer"}])))


def test_parallel_block_adding_branches_one_by_one_has_ffn_residual_add():
    """Cohere: h = residual + attention(norm(residual)) + mlp(norm(residual)); the FFN's sub-layer closes at the
    second add, its residual the stream (was: no ffn.residual_add, Pfeiffer refused)."""
    model, inputs, _ = _decoder("CohereConfig", "CohereForCausalLM", num_key_value_heads=2, logit_scale=0.0625)
    rows = _roles(model, _spec([{"name": "ffn_adapter", "match": {"role": "ffn.residual_add"}, "action": "sublayer",
                                 "module": {"kind": "bottleneck", "reduction_factor": 16}}]))
    assert sorted((layer, module) for _, layer, module in rows) == [(0, "model.layers.0"), (1, "model.layers.1")]
    base = model(**inputs).logits
    surgery.apply(model, surgery.load_spec("specs/pfeiffer.yaml"))
    with torch.no_grad():
        for p in model.surgery_adapters.parameters():
            p.normal_(0, 0.05)
        out = model(**inputs).logits
        with surgery.disable(model):
            off = model(**inputs).logits
    assert (off - base).abs().max() < 1e-5 and (out - base).abs().max() > 1e-4
    # the FFN adapter replaces the FFN branch, never the whole sum: the attention branch still reaches the output
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(2.0)
        assert (model(**inputs).logits - out).abs().max() > 1e-4


def test_hybrid_cache_length_is_the_longest_layers():
    """MiniMax's cache: layer 0 (linear attention) holds a state, no positions; get_seq_length() (layer 0) says
    0 after a prefill of 8, which made prompt tuning prepend its prompt again at every decoding step."""
    model, inputs, _ = _decoder("MiniMaxConfig", "MiniMaxForCausalLM", num_key_value_heads=2, head_dim=16,
                                num_local_experts=4, num_experts_per_tok=2,
                                layer_types=["linear_attention", "full_attention"])
    with torch.no_grad():
        cache = model(**inputs, use_cache=True).past_key_values
    assert cache.get_seq_length() == 0       # the library's answer, layer 0
    assert cache_length([cache]) == inputs["input_ids"].shape[1]


def test_trace_passes_use_cache_false_through_kwargs():
    """GraniteMoeForCausalLM.forward takes use_cache only through **kwargs: tracing built a DynamicCache and
    torch.export refused it ("could not trace")."""
    model, _, _ = _decoder("GraniteMoeConfig", "GraniteMoeForCausalLM", num_key_value_heads=2, num_local_experts=4,
                           num_experts_per_tok=2, embedding_multiplier=12.0, residual_multiplier=0.22,
                           attention_multiplier=0.0078125, logits_scaling=8.0)
    rows = _roles(model, "specs/lora.yaml")
    assert {(r, layer) for r, layer, _ in rows} == {(r, layer) for layer in (0, 1) for r in ("attention.q", "attention.v")}


def test_a_trace_read_from_the_cache_intercepts_torch_calls_as_a_fresh_one(tmp_path, monkeypatch):
    """Granite scales each branch (`branch * residual_multiplier`, no module boundary): Pfeiffer's FFN adapter
    reads it through its source line. The disk cache dropped `stack_trace`, so the second process (a cache hit)
    refused "not at any module boundary" what the first applied."""
    import collections
    monkeypatch.setenv("SURGERY_CACHE", "1")
    monkeypatch.setenv("SURGERY_CACHE_DIR", str(tmp_path / "cache"))
    outputs = []
    for _ in range(2):      # a fresh trace written to the cache, then a new process reading it back
        monkeypatch.setattr(surgery.api, "_STRUCTURE_CACHE", collections.OrderedDict())
        model, inputs, _ = _decoder("GraniteConfig", "GraniteForCausalLM", num_key_value_heads=2,
                                    embedding_multiplier=12.0, residual_multiplier=0.22,
                                    attention_multiplier=0.0078125, logits_scaling=8.0)
        surgery.apply(model, surgery.load_spec("specs/pfeiffer.yaml"))
        with torch.no_grad():
            outputs.append(model(**inputs).logits)
    assert len(list((tmp_path / "cache").glob("*.trace"))) == 1
    assert torch.equal(outputs[0], outputs[1])


def _ernie_moe():
    # a router with a score-correction bias (a frozen nn.Parameter) added before the top-k: it selects experts,
    # the routing weights are gathered from the uncorrected scores
    return _decoder("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM", num_key_value_heads=2, head_dim=16,
                    moe_num_experts=4, moe_k=2, moe_intermediate_size=32, moe_layer_start_index=0,
                    moe_num_shared_experts=1)


def test_a_parameter_read_only_to_select_is_not_trained():
    """Ernie 4.5 MoE's only biases are the routers' e_score_correction_bias: BitFit marked them trainable, and a
    training step had no gradient at all (torch: "element 0 of tensors does not require grad"); top_layers
    trained them with the block and they never got a gradient."""
    model, inputs, _ = _ernie_moe()
    with pytest.raises(surgery.SurgeryError, match=r"e_score_correction_bias reach the output only through a "
                                                    r"selection"):
        surgery.apply(model, surgery.load_spec("specs/bitfit.yaml"))
    assert not any(p.requires_grad for n, p in model.named_parameters() if "e_score" in n)
    model, inputs, _ = _ernie_moe()
    surgery.apply(model, surgery.load_spec("specs/top_layers.yaml"))
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and not any("e_score_correction_bias" in n for n in trained)
    model(**inputs).logits.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_prompt_tuning_generates_where_token_ids_are_copied_to_the_tables_device():
    """Llama 4 embeds `input_ids.to(embed_tokens.weight.device)`: the token table was not recognized through
    the copy, the prompt went in at the embedding output, and generate()'s explicit position_ids (the caller's
    8, not 8 + 10) crashed the rotary embedding ("size of tensor a (18) must match ... (8)")."""
    from models import perturb
    from test_architectures import check_generate
    model, inputs, facts = _decoder("Llama4TextConfig", "Llama4ForCausalLM", num_key_value_heads=2, head_dim=16,
                                    intermediate_size=64, intermediate_size_mlp=128, num_local_experts=4,
                                    num_experts_per_tok=1, interleave_moe_layer_step=2, attention_chunk_size=4,
                                    no_rope_layers=[1, 0])
    surgery.apply(model, surgery.load_spec("specs/prompt.yaml"))
    perturb(model)
    check_generate(model, facts, inputs)       # each step's logits with the KV cache == a full forward
