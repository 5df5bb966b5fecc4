"""Encoder and vision families outside the architecture matrix's first set (issue: break the promise on models
it was not tested on). Each test is one kind of defect found, on the smallest model that shows it."""
from __future__ import annotations

import pytest
import torch

import surgery

transformers = pytest.importorskip("transformers")

LORA_QV = {"version": 1, "name": "qv", "rules": [
    {"name": "lora", "match": {"role": ["attention.q", "attention.v"]}, "action": "wrap",
     "module": {"kind": "lora", "r": 2}, "expect": "every_layer"}]}


def _pixels(size=32):
    return {"pixel_values": torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))}


def _segformer():
    cfg = transformers.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                                       patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2],
                                       mlp_ratios=[2, 2])
    torch.manual_seed(0)
    return transformers.SegformerModel(cfg).eval(), _pixels()


def _funnel():
    cfg = transformers.FunnelConfig(vocab_size=96, d_model=64, n_head=4, d_head=16, d_inner=128, block_sizes=[1, 1])
    torch.manual_seed(0)
    ids = torch.randint(3, 96, (2, 8), generator=torch.Generator().manual_seed(1))
    return transformers.FunnelBaseModel(cfg).eval(), {"input_ids": ids}


@pytest.mark.parametrize("build", [_segformer, _funnel], ids=["segformer-reduced-keys", "funnel-pooled-queries"])
def test_attention_whose_keys_or_queries_are_the_other_reduced_is_self_attention(build):
    """Segformer (PVT) computes its keys and values from the hidden state through a strided conv and a norm (fewer
    positions than the queries); Funnel's first layer after pooling reads its queries from the pooled hidden state
    and its keys from the unpooled one. Both are self-attention of the layer's own stream: `attention.q` is in every
    layer. They were read as cross-attention, so LoRA on attention.q/v skipped those layers without a word (the
    every_layer check excused the layer's stack, as a decoder-only role)."""
    model, inputs = build()
    rows = surgery.plan(model, LORA_QV, example_inputs=inputs)
    layers = {(r.role, r.layer) for r in rows}
    assert layers == {(role, i) for role in ("attention.q", "attention.v") for i in (0, 1)}, sorted(layers)
    analysis_roles = surgery.plan(model, {"version": 1, "name": "x", "rules": [
        {"name": "x", "match": {"role": "cross_attention.op"}, "action": "wrap", "module": {"kind": "lora", "r": 2},
         "expect": "any"}]}, example_inputs=inputs)
    assert analysis_roles == []


def test_bart_cross_attention_is_still_cross_attention():
    cfg = transformers.BartConfig(vocab_size=96, d_model=32, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BartModel(cfg).eval()
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(1))
    rows = surgery.plan(model, {"version": 1, "name": "x", "rules": [
        {"name": "x", "match": {"role": "cross_attention.q"}, "action": "wrap", "module": {"kind": "lora", "r": 2}}]},
        example_inputs={"input_ids": ids, "decoder_input_ids": ids, "use_cache": False})
    assert [r.module for r in rows] == ["decoder.layers.0.encoder_attn.q_proj"]


def test_adaption_prompt_has_its_stage_width():
    """LLaMA-Adapter's prompts are read by each layer's own key projection, so they have that projection's input
    width: Swin's stages are 16 then 32 wide. The prompts were sized by the first attention's width, and the
    second stage's forward crashed (mat1 and mat2 shapes cannot be multiplied)."""
    cfg = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                                  window_size=4)
    torch.manual_seed(0)
    model = transformers.SwinModel(cfg).eval()
    inputs = _pixels()
    with torch.no_grad():
        base = model(**inputs).last_hidden_state
    spec = {"version": 1, "name": "adapter", "rules": [
        {"name": "a", "match": {"role": "attention.op"}, "action": "attend",
         "module": {"kind": "adaption_prompt", "adapter_len": 4}, "expect": "every_layer"}]}
    surgery.apply(model, spec, example_inputs=inputs)
    with torch.no_grad():
        assert torch.equal(model(**inputs).last_hidden_state, base)          # the zero gate: identity at init
        for name, p in model.surgery_adapters.named_parameters():
            if name.endswith("adaption_gate"):
                p.fill_(0.5)
        assert (model(**inputs).last_hidden_state - base).abs().max() > 1e-4


def test_prompt_tuning_on_a_feature_map_is_refused_before_any_change():
    """ConvNeXt's layers read a conv stem's feature map [batch, channels, h, w]: there are no token positions to
    prepend a prompt to. Prompt tuning crashed inside the rewritten forward (tensors must have the same number of
    dimensions); it is refused at apply, naming what the model lacks, and the model is left as it was."""
    cfg = transformers.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2)
    torch.manual_seed(0)
    model = transformers.ConvNextModel(cfg).eval()
    inputs = _pixels()
    spec = {"version": 1, "name": "prompt", "rules": [
        {"name": "prompt", "match": {"role": "embedding.output"}, "action": "prepend",
         "module": {"kind": "prompt", "prompt_length": 4}}]}
    with pytest.raises(surgery.SurgeryError, match=r"no token positions.*|feature map"):
        surgery.apply(model, spec, example_inputs=inputs)
    assert not hasattr(model, "surgery_adapters")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_a_mark_of_a_mark_missing_from_its_inputs_users_traces():
    """M2M-100's sinusoidal position embedding reads the scaled token embedding: torch.export left the mark of
    that module's input without a use recorded on the mark it reads, and erasing the marks crashed every spec
    with `SystemError: ... _update_args_kwargs` (a KeyError inside torch.fx), before any role was found."""
    cfg = transformers.M2M100Config(vocab_size=96, d_model=32, encoder_layers=1, decoder_layers=1,
                                    encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                    decoder_ffn_dim=64, max_position_embeddings=32, dropout=0.0, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.M2M100ForConditionalGeneration(cfg).eval()
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(1))
    rows = surgery.plan(model, LORA_QV, example_inputs={"input_ids": ids, "decoder_input_ids": ids})
    assert sorted(r.module for r in rows if r.role == "attention.q") == [
        "model.decoder.layers.0.self_attn.q_proj", "model.encoder.layers.0.self_attn.q_proj"]


def _convnext():
    cfg = transformers.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2)
    torch.manual_seed(0)
    return transformers.ConvNextModel(cfg).eval(), _pixels()


REFT = {"version": 1, "name": "reft", "rules": [
    {"name": "reft", "match": {"role": "block.output"}, "action": "insert_after",
     "module": {"kind": "reft", "r": 1, "prefix_positions": 2, "suffix_positions": 1}, "expect": "every_layer"}]}
PROMPT = {"version": 1, "name": "prompt", "rules": [
    {"name": "prompt", "match": {"role": "embedding.output"}, "action": "prepend",
     "module": {"kind": "prompt", "prompt_length": 4}}]}


@pytest.mark.parametrize("build,spec,says", [
    (_convnext, REFT, r"feature map"),                    # [batch, channels, h, w]: ReFT crashed inside the forward
    (_funnel, PROMPT, r"stacks .*no token positions"),    # the output had 9 positions, the base model's 4
], ids=["convnext-reft", "funnel-prompt"])
def test_position_methods_refuse_layers_that_change_the_sequence(build, spec, says):
    """Prompt tuning and ReFT act at token positions. Where the layers read a feature map (ConvNeXt) there are
    none: ReFT crashed inside the forward. Where the layers pool the sequence (Funnel), the prompt came out as
    extra positions of the output (shape [2, 9, 64] for the base model's [2, 4, 64]). Each is refused at apply,
    saying why, the model untouched."""
    model, inputs = build()
    with pytest.raises(surgery.SurgeryError, match=says):
        surgery.apply(model, spec, example_inputs=inputs)
    assert not hasattr(model, "surgery_adapters")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _flux():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                             attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                                             pooled_projection_dim=16, axes_dims_rope=(2, 2, 4)).eval()
    g = torch.Generator().manual_seed(1)
    inputs = {"hidden_states": torch.randn(2, 16, 8, generator=g),
              "encoder_hidden_states": torch.randn(2, 6, 32, generator=g),
              "pooled_projections": torch.randn(2, 16, generator=g), "timestep": torch.tensor([0.5, 0.5]),
              "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(6, 3)}
    return model, inputs


def test_every_layer_excuses_only_cross_attention_missing_from_a_stack():
    """`expect: every_layer` excused any role missing from a whole stack (meant for cross-attention, which only
    a decoder's layers have). Flux's single-stream blocks have no attention output projection (one proj_out reads
    the attention and the MLP concatenated): Houlsby's attention adapter went into the double-stream blocks only,
    without a word. It is refused, naming the layers without the site."""
    model, inputs = _flux()
    spec = {"version": 1, "name": "out", "rules": [
        {"name": "o", "match": {"role": "attention.output"}, "action": "wrap", "module": {"kind": "lora", "r": 2},
         "expect": "every_layer"}]}
    with pytest.raises(surgery.SurgeryError, match=r"matched none in layers \[1\]"):
        surgery.plan(model, spec, example_inputs=inputs)


def test_joint_attention_streams():
    """Joint attention (Flux, SD3): one attention op over the image and text tokens laid end to end, its output
    split back, each part through its stream's own output projection. Only the text stream's (`to_add_out`) was an
    attention output; and the blocks' hidden state was the text stream, which Flux's last block returns only to be
    dropped: ReFT's interventions there got no gradient and changed nothing. Both projections are attention
    outputs, and the hidden state is the stream that reaches the model's output, in every layer."""
    model, inputs = _flux()
    spec = {"version": 1, "name": "x", "rules": [
        {"name": "x", "match": {"role": ["attention.output", "block.input", "block.output"]}, "action": "wrap",
         "module": {"kind": "lora", "r": 2}, "expect": "any"}]}
    rows = surgery.plan(model, spec, example_inputs=inputs)
    assert sorted(r.module for r in rows if r.role == "attention.output") == [
        "transformer_blocks.0.attn.to_add_out", "transformer_blocks.0.attn.to_out.0"]
    for r in rows:
        if r.role.startswith("block."):
            assert tuple(r.site.node.meta["val"].shape) == (2, 16, 32), (r.role, r.module)   # the image tokens
