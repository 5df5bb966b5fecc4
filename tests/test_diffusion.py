"""specs/diffusion_lora.yaml on a tiny diffusers UNet2DConditionModel and a tiny DiT (PixArtTransformer2DModel),
built from configs: the attention projections are found by role in every transformer block; the trainable count
equals PEFT's for diffusers' usual targets (to_q, to_k, to_v, to_out.0, and the resnet convs when that rule is
enabled); with the same (non-zero) weights the outputs equal PEFT's (via to_peft); save/load; merged ==
unmerged; the merged UNet exported to ONNX and checked in onnxruntime. Tracing a UNet takes several seconds,
so these are slow tests."""
import copy
from pathlib import Path

import pytest
import torch
import yaml

import surgery

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.slow
SPEC = Path(__file__).resolve().parent.parent / "specs" / "diffusion_lora.yaml"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def make_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8).eval()


def unet_inputs(batch=2):
    g = torch.Generator().manual_seed(1)
    return {"sample": torch.randn(batch, 4, 16, 16, generator=g), "timestep": torch.tensor([10, 500][:batch]),
            "encoder_hidden_states": torch.randn(batch, 7, 32, generator=g)}


def make_dit():
    torch.manual_seed(0)
    return diffusers.PixArtTransformer2DModel(
        sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2, in_channels=4, out_channels=8,
        cross_attention_dim=16, caption_channels=32, patch_size=2, norm_num_groups=1,
        use_additional_conditions=False).eval()


def dit_inputs():
    g = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(2, 4, 8, 8, generator=g), "encoder_hidden_states": torch.randn(2, 5, 32,
                                                                                                         generator=g),
            "timestep": torch.tensor([10, 500]), "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


def spec_with_resnets() -> dict:
    """The shipped spec with its commented-out resnet rule enabled, exactly as the comment says to."""
    lines = SPEC.read_text().splitlines()
    start = lines.index("  # - name: resnets")
    enabled = lines[:start] + [line.replace("  # ", "  ", 1) for line in lines[start:]]
    return yaml.safe_load("\n".join(enabled))


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def peft_count(model, targets):
    config = peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets)
    return peft.get_peft_model(copy.deepcopy(model), config).get_nb_trainable_parameters()[0]


def randomize_lora_b(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def output(model, inputs):
    return model(**inputs).sample.detach()


@pytest.fixture(scope="module")
def unet():
    model = make_unet()
    inputs = unet_inputs()
    return model, inputs, output(model, inputs)


def test_unet_attention_lora_by_role_counts_matches_peft_merges_saves_and_exports(unet, tmp_path):
    base, inputs, base_out = unet
    model = copy.deepcopy(base)
    matches = surgery.plan(model, SPEC, example_inputs=inputs)
    modules = sorted(m.module for m in matches)
    # 4 transformer blocks × (self- and cross-attention) × q, k, v, out
    assert len(modules) == 32 and all(m.endswith(tuple(f"{a}.{t}" for a in ("attn1", "attn2") for t in TARGETS))
                                      for m in modules)
    surgery.apply(model, SPEC, example_inputs=inputs)
    assert trainable(model) == peft_count(base, TARGETS)
    assert torch.equal(output(model, inputs), base_out)           # B = 0: the base model at init
    randomize_lora_b(model)
    out = output(model, inputs)
    assert not torch.allclose(out, base_out, atol=1e-4)

    # PEFT with our weights gives our outputs
    surgery.to_peft(model, tmp_path / "peft", example_inputs=inputs)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    torch.testing.assert_close(output(reloaded, inputs), out, atol=1e-5, rtol=0)

    surgery.save(model, tmp_path / "ours")
    again = surgery.load(copy.deepcopy(base), tmp_path / "ours", example_inputs=inputs)
    assert torch.equal(output(again, inputs), out)

    report = surgery.merge(model)
    assert len(report.merged) == 32 and not report.not_merged
    torch.testing.assert_close(output(model, inputs), out, atol=1e-5, rtol=0)
    surgery.unmerge(model)
    assert torch.equal(output(model, inputs), out)

    # ONNX of the merged UNet: export merges, checks the artifact in onnxruntime at another batch size
    onnx_path = surgery.export(model, tmp_path / "unet.onnx", example_inputs=inputs,
                               dynamic_axes={"sample": {0: "batch"}, "timestep": {0: "batch"},
                                             "encoder_hidden_states": {0: "batch"}})
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feed = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
    got = torch.from_numpy(session.run(None, feed)[0])
    torch.testing.assert_close(got, out, atol=1e-4, rtol=1e-4)
    assert torch.equal(output(model, inputs), out)                # export left the adapters unmerged


def test_unet_with_the_resnet_conv_rule_counts_and_merges(unet):
    base, inputs, base_out = unet
    model = copy.deepcopy(base)
    surgery.apply(model, spec_with_resnets(), example_inputs=inputs)
    convs = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Conv2d) and ".resnets." in n
             and n.rsplit(".", 1)[-1] in ("conv1", "conv2")]
    assert len(model.surgery_adapters.adapters["default"]["resnets"]) == len(convs) == 16   # 8 resnets × conv1, conv2
    assert trainable(model) == peft_count(base, TARGETS + convs)
    assert torch.equal(output(model, inputs), base_out)
    randomize_lora_b(model)
    out = output(model, inputs)
    report = surgery.merge(model)
    assert len(report.merged) == 32 + 16 and not report.not_merged
    torch.testing.assert_close(output(model, inputs), out, atol=1e-5, rtol=0)
    surgery.unmerge(model)
    assert torch.equal(output(model, inputs), out)


def test_dit_attention_lora_by_role(tmp_path):
    base = make_dit()
    inputs = dit_inputs()
    base_out = output(base, inputs)
    model = copy.deepcopy(base)
    surgery.apply(model, SPEC, example_inputs=inputs)
    assert len(model.surgery_adapters.adapters["default"]["attention"]) == 16   # 2 blocks × 2 attentions × 4
    assert trainable(model) == peft_count(base, TARGETS)
    assert torch.equal(output(model, inputs), base_out)
    randomize_lora_b(model)
    out = output(model, inputs)
    surgery.to_peft(model, tmp_path / "peft", example_inputs=inputs)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    torch.testing.assert_close(output(reloaded, inputs), out, atol=1e-5, rtol=0)
    surgery.merge(model)
    torch.testing.assert_close(output(model, inputs), out, atol=1e-5, rtol=0)
    surgery.unmerge(model)
    assert torch.equal(output(model, inputs), out)
