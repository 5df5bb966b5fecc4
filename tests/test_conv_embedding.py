"""LoRA, DoRA and IA3 on nn.Conv1d/2d/3d and LoRA/DoRA on nn.Embedding, against PEFT's own custom-model cases
(peft tests/test_custom_models.py: the Conv1d, Conv2d, Conv2d 1x1, grouped Conv2d, Conv3d and Embedding
models with the same layer shapes and target lists): a PEFT checkpoint with non-zero adapter weights loads with
`from_peft` and gives PEFT's outputs (1e-5) and trainable count; merge/unmerge; save/load; `to_peft` loads back
into PEFT with our outputs. Plus the kinds PEFT does not test (stride, dilation, padding="same", padding_mode,
the weight path), and PEFT's LoRA on nn.MultiheadAttention."""
import copy

import pytest
import torch
from torch import nn

import surgery
from models import assert_same_state, make_llama, state, token_ids

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


# ------------------------------------------------------------------ PEFT's custom models (same layer shapes)

class Conv1dModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1d = nn.Conv1d(1, 1, 2)
        self.lin0 = nn.Linear(9, 2)

    def forward(self, x):
        return torch.log_softmax(self.lin0(torch.relu(self.conv1d(x.reshape(-1, 1, 10))).flatten(1)), -1)


class Conv2dModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv2d = nn.Conv2d(5, 10, 3)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, x):
        return torch.log_softmax(self.lin0(torch.relu(self.conv2d(x.reshape(-1, 5, 3, 3))).flatten(1)), -1)


class Conv2d1x1Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv2d = nn.Conv2d(1, 10, kernel_size=(1, 1))
        self.lin0 = nn.Linear(90, 2)

    def forward(self, x):
        return torch.log_softmax(self.lin0(torch.relu(self.conv2d(x.reshape(-1, 1, 3, 3))).flatten(1)), -1)


class Conv2dGroupsModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(90, 288)
        self.conv2d = nn.Conv2d(16, 16, 3, groups=8)
        self.lin1 = nn.Linear(16, 2)

    def forward(self, x):
        h = self.lin0(x.flatten()).reshape(2, 16, 3, 3)
        return torch.log_softmax(self.lin1(torch.relu(self.conv2d(h)).flatten(1)), -1)


class Conv2dGroups2Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv2d = nn.Conv2d(16, 32, 3, padding=1, groups=2)
        self.lin0 = nn.Linear(32 * 4 * 4, 2)

    def forward(self, x):
        return torch.log_softmax(self.lin0(torch.relu(self.conv2d(x.reshape(-1, 16, 4, 4))).flatten(1)), -1)


class Conv3dModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv3d = nn.Conv3d(5, 10, 3)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, x):
        h = torch.stack([x] * 3, dim=-1).reshape(-1, 5, 3, 3, 3)
        return torch.log_softmax(self.lin0(torch.relu(self.conv3d(h)).flatten(1)), -1)


class EmbConv1DModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 5)
        self.conv1d = transformers.pytorch_utils.Conv1D(1, 5)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, x):
        return torch.log_softmax(self.lin0(torch.relu(self.conv1d(self.emb(x))).flatten(1)), -1)


MODELS = {"Conv1d": Conv1dModel, "Conv2d": Conv2dModel, "Conv2d1x1": Conv2d1x1Model,
          "Conv2dGroups": Conv2dGroupsModel, "Conv2dGroups2": Conv2dGroups2Model, "Conv3d": Conv3dModel,
          "EmbConv1D": EmbConv1DModel}


def inputs(model_name):
    g = torch.Generator().manual_seed(3)
    if model_name == "EmbConv1D":
        return torch.randint(0, 100, (9, 10), generator=g)
    if model_name == "Conv2dGroups2":
        return torch.randn(3, 16 * 16, generator=g)
    return torch.randn(9, 10, generator=g)


LORA, IA3 = "lora", "ia3"
CASES = [   # PEFT's names and configs (tests/test_custom_models.py), plus the 1x1 conv with LoRA
    ("Embedding + transformers Conv1D 1 LoRA", "EmbConv1D", LORA, {"target_modules": ["conv1d"]}),
    ("Embedding + transformers Conv1D 2 LoRA", "EmbConv1D", LORA, {"target_modules": ["emb"]}),
    ("Embedding + transformers Conv1D 3 LoRA", "EmbConv1D", LORA, {"target_modules": ["emb", "conv1d"]}),
    ("Embedding + transformers Conv1D 1 DoRA", "EmbConv1D", LORA, {"target_modules": ["conv1d"], "use_dora": True}),
    ("Embedding + transformers Conv1D 2 DoRA", "EmbConv1D", LORA, {"target_modules": ["emb"], "use_dora": True}),
    ("Embedding + transformers Conv1D 3 DoRA", "EmbConv1D", LORA,
     {"target_modules": ["emb", "conv1d"], "use_dora": True}),
    ("Conv1d LoRA", "Conv1d", LORA, {"target_modules": ["conv1d"]}),
    ("Conv1d LoRA with DoRA", "Conv1d", LORA, {"target_modules": ["conv1d"], "use_dora": True}),
    ("Conv2d 1 LoRA", "Conv2d", LORA, {"target_modules": ["conv2d"]}),
    ("Conv2d 2 LoRA", "Conv2d", LORA, {"target_modules": ["conv2d", "lin0"]}),
    ("Conv2d 1 LoRA with DoRA", "Conv2d", LORA, {"target_modules": ["conv2d"], "use_dora": True}),
    ("Conv2d 2 LoRA with DoRA", "Conv2d", LORA, {"target_modules": ["conv2d", "lin0"], "use_dora": True}),
    ("Conv2d 1x1 LoRA", "Conv2d1x1", LORA, {"target_modules": ["conv2d"]}),
    ("Conv2d Groups LoRA", "Conv2dGroups", LORA, {"target_modules": ["conv2d"]}),
    ("Conv2d Groups2 LoRA", "Conv2dGroups2", LORA, {"target_modules": ["conv2d"]}),
    ("Conv2d Groups LoRA with DoRA", "Conv2dGroups", LORA, {"target_modules": ["conv2d"], "use_dora": True}),
    ("Conv2d Groups2 LoRA with DoRA", "Conv2dGroups2", LORA, {"target_modules": ["conv2d"], "use_dora": True}),
    ("Conv3d 1 LoRA", "Conv3d", LORA, {"target_modules": ["conv3d"]}),
    ("Conv3d 2 LoRA", "Conv3d", LORA, {"target_modules": ["conv3d", "lin0"]}),
    ("Conv3d 1 LoRA with DoRA", "Conv3d", LORA, {"target_modules": ["conv3d"], "use_dora": True}),
    ("Conv3d 2 LoRA with DoRA", "Conv3d", LORA, {"target_modules": ["conv3d", "lin0"], "use_dora": True}),
    ("Conv2d 1 IA3", "Conv2d", IA3, {"target_modules": ["conv2d"], "feedforward_modules": []}),
    ("Conv2d 2 IA3", "Conv2d", IA3, {"target_modules": ["conv2d"], "feedforward_modules": ["conv2d"]}),
    ("Conv2d 3 IA3", "Conv2d", IA3, {"target_modules": ["conv2d", "lin0"], "feedforward_modules": []}),
    ("Conv2d 4 IA3", "Conv2d", IA3, {"target_modules": ["conv2d", "lin0"], "feedforward_modules": ["conv2d"]}),
    ("Conv2d 5 IA3", "Conv2d", IA3,
     {"target_modules": ["conv2d", "lin0"], "feedforward_modules": ["conv2d", "lin0"]}),
    ("Conv3d 1 IA3", "Conv3d", IA3, {"target_modules": ["conv3d"], "feedforward_modules": []}),
    ("Conv3d 2 IA3", "Conv3d", IA3, {"target_modules": ["conv3d"], "feedforward_modules": ["conv3d"]}),
    ("Conv3d 3 IA3", "Conv3d", IA3, {"target_modules": ["conv3d", "lin0"], "feedforward_modules": []}),
    ("Conv3d 4 IA3", "Conv3d", IA3, {"target_modules": ["conv3d", "lin0"], "feedforward_modules": ["conv3d"]}),
    ("Conv3d 5 IA3", "Conv3d", IA3,
     {"target_modules": ["conv3d", "lin0"], "feedforward_modules": ["conv3d", "lin0"]}),
]


def _grouped(model_name):
    return model_name.startswith("Conv2dGroups")


def _peft_model(model, method, config, model_name):
    """PEFT's model with non-zero adapter weights. PEFT's grouped-conv DoRA reshapes the grouped B (out, r/g) as
    (-1, r) for its norm (surgery uses the dense kernel's norm; docs in surgery/modules/dora.py): the two agree
    while B is zero, so there B stays zero and A and the magnitude are random."""
    cfg = peft.LoraConfig(**config) if method == LORA else peft.IA3Config(**config)
    peft_model = peft.get_peft_model(copy.deepcopy(model), cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name and config.get("use_dora") and _grouped(model_name):
                continue
            if "lora_" in name or "ia3_l" in name:
                offset = 1.0 if ("ia3_l" in name or "magnitude" in name) else 0.0
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + offset)
    return peft_model.eval()


def _trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_peft_checkpoint_loads_and_round_trips(case, tmp_path):
    name, model_name, method, config = case
    torch.manual_seed(0)
    model = MODELS[model_name]().eval()
    x = inputs(model_name)
    base_out = model(x).detach()
    peft_model = _peft_model(model, method, config, model_name)
    peft_out = peft_model(x).detach()
    assert not torch.allclose(peft_out, base_out, atol=1e-4)
    peft_model.save_pretrained(tmp_path / "peft")

    ours = copy.deepcopy(model)
    before = state(ours)
    surgery.from_peft(ours, tmp_path / "peft", example_inputs=(x,))
    out = ours(x).detach()
    torch.testing.assert_close(out, peft_out, atol=1e-5, rtol=0)
    assert _trainable(ours) == peft_model.get_nb_trainable_parameters()[0]

    # merge folds (a grouped conv's LoRA is no grouped kernel: reported, left in the forward), unmerge exact
    report = surgery.merge(ours)
    if _grouped(model_name) and method == LORA:
        assert any("grouped conv" in why for why in report.not_merged.values())
    else:
        assert not report.not_merged
    torch.testing.assert_close(ours(x).detach(), out, atol=1e-5, rtol=0)
    surgery.unmerge(ours)
    assert torch.equal(ours(x).detach(), out)
    with surgery.disable(ours):
        assert torch.equal(ours(x).detach(), base_out)

    # save/load, and to_peft back into PEFT
    surgery.save(ours, tmp_path / "ours")
    again = surgery.load(copy.deepcopy(model), tmp_path / "ours", example_inputs=(x,))
    assert torch.equal(again(x).detach(), out)
    surgery.to_peft(ours, tmp_path / "back", example_inputs=(x,))
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "back").eval()
    torch.testing.assert_close(reloaded(x).detach(), out, atol=1e-5, rtol=0)
    surgery.remove(ours, "default")
    assert_same_state(before, state(ours))


# ------------------------------------------------------------------ what PEFT's cases leave out

class Geometry(nn.Module):
    """Convs with stride, dilation, padding="same", padding_mode="reflect" and groups, and a 1-D/3-D conv."""

    def __init__(self):
        super().__init__()
        self.strided = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.same = nn.Conv2d(8, 6, 4, padding="same")
        self.reflect = nn.Conv2d(6, 6, 3, padding=1, padding_mode="reflect")
        self.grouped = nn.Conv2d(6, 12, 3, padding=1, groups=3)
        self.c1 = nn.Conv1d(12, 4, 3, stride=2)
        self.c3 = nn.Conv3d(4, 2, (1, 2, 2), dilation=(1, 2, 1))

    def forward(self, x):
        h = self.grouped(torch.relu(self.reflect(self.same(self.dilated(self.strided(x))))))
        h = self.c1(h.flatten(2))
        return self.c3(h.unsqueeze(-1).unsqueeze(-1).expand(-1, -1, -1, 5, 3))


GEOMETRY = ["strided", "dilated", "same", "reflect", "c1", "c3"]   # groups 1: each has a dense definition


def _randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 else 0.0))


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3_out", "ia3_in"])
@pytest.mark.parametrize("realize", ["auto", "weight"])
def test_conv_geometry_equals_the_definition_on_the_folded_weight(kind, realize):
    """Any stride/padding/dilation (and reflect padding, which only the weight path can adapt): the adapted op
    equals the base conv with the adapter's weight form (LoRA: W + s·B·A, DoRA: m·(W+ΔW)/‖W+ΔW‖ per output
    channel, IA3: channel scaling), built here from the adapter's own tensors."""
    torch.manual_seed(0)
    model = Geometry().eval()
    x = torch.randn(2, 4, 12, 12)
    module = {"lora": {"kind": "lora", "r": 4, "alpha": 6}, "dora": {"kind": "dora", "r": 4},
              "ia3_out": {"kind": "ia3", "scale": "output"}, "ia3_in": {"kind": "ia3", "scale": "input"}}[kind]
    spec = {"rules": [{"name": "r", "match": {"module": GEOMETRY, "op": ["conv1d", "conv2d", "conv3d"]},
                       "action": "wrap", "module": module,
                       "realize": realize}]}
    reference = copy.deepcopy(model)
    surgery.apply(model, spec, example_inputs=(x,))
    _randomize(model)   # the adapters only: the base is frozen
    out = model(x).detach()
    adapters = model.surgery_adapters.adapters["default"]["r"]
    with torch.no_grad():
        for path in GEOMETRY:
            conv, a = getattr(reference, path), adapters[path]
            w = conv.weight
            if kind in ("lora", "dora"):
                delta = (a.lora_B.flatten(1) @ a.lora_A.flatten(1)).view_as(w) * a.scaling
                new = w + delta
                if kind == "dora":
                    new = new * (a.magnitude / new.flatten(1).norm(dim=1)).view(-1, *[1] * (w.dim() - 1))
            elif kind == "ia3_out":
                new = w * a.ia3_l.view(-1, *[1] * (w.dim() - 1))
                conv.bias.mul_(a.ia3_l)
            else:
                new = w * a.ia3_l.view(1, -1, *[1] * (w.dim() - 2))
            w.copy_(new)
    torch.testing.assert_close(out, reference(x), atol=1e-4, rtol=1e-4)
    sites = {s.owner_path: s.realized for s in model.surgery_adapters.records["default"].weight_sites}
    assert sites["reflect"] == "weight"   # the padded input is not the module's input
    if realize == "auto":
        assert sites["strided"] == "activation"


def test_grouped_conv_lora_is_the_dense_composition():
    """LoRA on a grouped conv: A (r, in, k, k) reads every input channel, B is grouped 1×1 (PEFT's layout); the
    composed op is the dense kernel blockdiag(B)·A, which no grouped kernel holds: activation path only."""
    torch.manual_seed(0)
    model = Geometry().eval()
    x = torch.randn(2, 4, 12, 12)
    spec = {"rules": [{"name": "r", "match": {"module": "grouped"}, "action": "wrap",
                       "module": {"kind": "lora", "r": 6}}]}
    surgery.apply(model, spec, example_inputs=(x,))
    _randomize(model)
    a = model.surgery_adapters.adapters["default"]["r"]["grouped"]
    h = torch.relu(model.reflect(model.same(model.dilated(model.strided(x)))))
    dense = surgery.modules.weight_ops.grouped_to_dense(a.lora_B.flatten(1), 3) @ a.lora_A.flatten(1)
    expected = model.grouped(h) + 0  # the hooked module output
    with surgery.disable(model):
        base = model.grouped(h)
    delta = torch.nn.functional.conv2d(h, dense.view(12, 6, 3, 3), padding=1) * a.scaling
    torch.testing.assert_close(expected, base + delta, atol=1e-5, rtol=1e-5)
    bad = {"rules": [{"name": "r", "match": {"module": "grouped"}, "action": "wrap", "realize": "weight",
                      "module": {"kind": "lora", "r": 6}}]}
    with pytest.raises(surgery.SurgeryError, match="grouped conv"):
        surgery.apply(Geometry(), bad, example_inputs=(x,))
    with pytest.raises(surgery.SurgeryError, match="r divisible by groups"):
        surgery.apply(Geometry(), {"rules": [{"name": "r", "match": {"module": "grouped"}, "action": "wrap",
                                              "module": {"kind": "lora", "r": 4}}]}, example_inputs=(x,))


def test_modules_that_only_know_linears_refuse_convs_and_the_message_is_accurate():
    x = torch.randn(2, 4, 12, 12)
    model = Geometry().eval()
    before = state(model)
    with pytest.raises(surgery.SurgeryError, match=r"krona adapts linear ops, but strided is a conv \(conv2d\)"):
        surgery.apply(model, {"rules": [{"name": "k", "match": {"module": "strided"}, "action": "wrap",
                                         "module": {"kind": "krona"}}]}, example_inputs=(x,))
    with pytest.raises(surgery.SurgeryError, match=r"weight-bearing op \(linear, conv1d/2d/3d, embedding\)"):
        surgery.apply(model, {"rules": [{"name": "k", "match": {"op": "relu"}, "action": "wrap",
                                         "module": {"kind": "lora"}}]}, example_inputs=(x,))
    emb = nn.Sequential(nn.Embedding(10, 4))
    with pytest.raises(surgery.SurgeryError, match="cannot scale an embedding's input"):
        surgery.apply(emb, {"rules": [{"name": "k", "match": {"module": "0"}, "action": "wrap",
                                       "module": {"kind": "ia3", "scale": "input"}}]},
                      example_inputs=(torch.tensor([[1, 2]]),))
    assert_same_state(before, state(model))


def test_lora_on_the_token_embedding_by_role_equals_peft(tmp_path):
    """`role: embedding` wraps a transformers model's token embedding: same count as PEFT's target_modules
    ["embed_tokens"] and, with PEFT's tensors, PEFT's logits."""
    model = make_llama().eval()
    ids = token_ids(2, 9)
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=["embed_tokens"], r=4,
                                                                          lora_alpha=8))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.eval()
    spec = {"rules": [{"name": "emb", "match": {"role": "embedding"}, "action": "wrap", "expect": 1,
                       "module": {"kind": "lora", "r": 4, "alpha": 8}}]}
    ours = surgery.apply(copy.deepcopy(model), spec)
    assert _trainable(ours) == peft_model.get_nb_trainable_parameters()[0]
    adapter = ours.surgery_adapters.adapters["default"]["emb"]["model_embed_tokens"]
    layer = peft_model.base_model.model.model.embed_tokens
    with torch.no_grad():
        adapter.lora_A.copy_(layer.lora_embedding_A["default"])
        adapter.lora_B.copy_(layer.lora_embedding_B["default"])
    torch.testing.assert_close(ours(input_ids=ids).logits, peft_model(input_ids=ids).logits, atol=1e-5, rtol=0)


class Mha(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, x):
        return torch.log_softmax(self.lin0(self.mha(x, x, x)[0]), -1)


@pytest.mark.parametrize("targets", [["mha"], ["mha", "lin0"]], ids=["MHA 1 LoRA", "MHA 2 LoRA"])
def test_peft_lora_on_multihead_attention_loads_as_lora_is_defined(targets, tmp_path):
    """PEFT's LoRA on nn.MultiheadAttention (one LoRA on the packed in_proj_weight, one on out_proj) loads as
    W + ΔW on both weights. PEFT 0.21 computes W + 2ΔW for out_proj (shared/notes/peft-facts.md): its outputs
    equal ours with out_proj's delta doubled."""
    torch.manual_seed(0)
    model = Mha().eval()
    x = torch.randn(3, 2, 10)
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=targets,
                                                                          init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path)
    ours = surgery.from_peft(copy.deepcopy(model), tmp_path, example_inputs=(x,))
    layer = peft_model.base_model.model.mha
    d_in = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
    out_proj = layer.base_layer.out_proj
    d_out = out_proj.lora_B["default"].weight @ out_proj.lora_A["default"].weight * out_proj.scaling["default"]
    for times, compare in ((1, ours), (2, peft_model)):
        reference = copy.deepcopy(model)
        with torch.no_grad():
            reference.mha.in_proj_weight += d_in
            reference.mha.out_proj.weight += times * d_out
            if "lin0" in targets:
                lin = peft_model.base_model.model.lin0
                reference.lin0.weight += lin.lora_B["default"].weight @ lin.lora_A["default"].weight \
                    * lin.scaling["default"]
        torch.testing.assert_close(compare(x).detach(), reference(x).detach(), atol=1e-5, rtol=0)


class Denoiser(nn.Module):
    """Takes and returns `sample`, as a diffusers UNet does."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_out = nn.Conv2d(8, 3, 1)

    def forward(self, sample):
        return {"sample": self.conv_out(torch.relu(self.conv_in(sample)))}


def test_merged_conv_lora_exports_to_onnx_with_an_output_named_like_an_input(tmp_path):
    pytest.importorskip("onnxruntime")
    model = Denoiser().eval()
    x = torch.randn(2, 3, 8, 8)
    surgery.apply(model, {"rules": [{"name": "r", "match": {"op": "conv2d"}, "action": "wrap", "expect": 2,
                                     "module": {"kind": "lora", "r": 2}}]}, example_inputs=(x,))
    _randomize(model)
    path = surgery.export(model, tmp_path / "d.onnx", example_inputs=(x,))   # verified in onnxruntime
    import onnxruntime
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["sample_output"]
    got = torch.from_numpy(session.run(None, {"sample": x.numpy()})[0])
    torch.testing.assert_close(got, model(x)["sample"].detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale", ["input", "output"])
def test_ia3_on_a_grouped_conv_agrees_on_activations_and_on_the_weight(scale):
    """IA3's input vector on a grouped conv folds into each group's slice of the kernel (PEFT's
    `_get_ia3_scaling_for_weight`); both realizations and the merge give the same outputs."""
    x = torch.randn(2, 4, 12, 12)
    outs = []
    for realize in ("activation", "weight"):
        torch.manual_seed(0)
        model = Geometry().eval()
        surgery.apply(model, {"rules": [{"name": "r", "match": {"module": "grouped", "op": "conv2d"},
                                         "action": "wrap", "realize": realize,
                                         "module": {"kind": "ia3", "scale": scale}}]}, example_inputs=(x,))
        _randomize(model)
        outs.append(model(x).detach())
        surgery.merge(model)
        torch.testing.assert_close(model(x).detach(), outs[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_dora_on_a_grouped_conv_is_the_normalized_dense_kernel():
    """DoRA on a grouped conv: m · (W + s·BA) / ‖W + s·BA‖ per output channel, W taken as the dense kernel with
    zeros across groups (LoRA's BA reads every input channel)."""
    torch.manual_seed(0)
    model = Geometry().eval()
    x = torch.randn(2, 4, 12, 12)
    surgery.apply(model, {"rules": [{"name": "r", "match": {"module": "grouped", "op": "conv2d"}, "action": "wrap",
                                     "module": {"kind": "dora", "r": 6}}]}, example_inputs=(x,))
    _randomize(model)
    a = model.surgery_adapters.adapters["default"]["r"]["grouped"]
    h = torch.relu(model.reflect(model.same(model.dilated(model.strided(x)))))
    conv = model.grouped
    dense = surgery.modules.weight_ops.grouped_to_dense(conv.weight.detach(), 3)
    dense = dense + (surgery.modules.weight_ops.grouped_to_dense(a.lora_B.flatten(1), 3)
                     @ a.lora_A.flatten(1)).view_as(dense) * a.scaling
    dense = dense * (a.magnitude / dense.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)
    expected = torch.nn.functional.conv2d(h, dense, conv.bias, padding=1)
    torch.testing.assert_close(conv(h), expected, atol=1e-5, rtol=1e-5)


class ScaledEmbedding(nn.Embedding):
    """An embedding whose module output is the lookup times a constant (Gemma's scaled word embedding)."""

    def forward(self, ids):
        return super().forward(ids) * 3.0


class Lookup(nn.Module):
    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, ids):
        return self.table(ids)


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3"])
def test_embedding_adapters_agree_on_activations_and_on_the_weight(kind):
    """A plain nn.Embedding is adapted on activations, a scaled one (the lookup is not the module's output) on the
    table; both equal the definition on the table, scaled after the lookup."""
    ids = torch.tensor([[1, 5, 7, 1], [0, 2, 9, 3]])
    outs = {}
    for cls in (nn.Embedding, ScaledEmbedding):
        torch.manual_seed(0)
        model = Lookup(cls(10, 6)).eval()
        surgery.apply(model, {"rules": [{"name": "r", "match": {"role": "embedding"}, "action": "wrap",
                                         "module": {"kind": kind, "r": 2} if kind != "ia3" else {"kind": "ia3"}}]},
                      example_inputs=(ids,))
        _randomize(model)
        site = model.surgery_adapters.records["default"].weight_sites[0]
        assert site.realized == ("activation" if cls is nn.Embedding else "weight")
        outs[cls] = model(ids).detach()
    torch.testing.assert_close(outs[ScaledEmbedding], 3.0 * outs[nn.Embedding], atol=1e-5, rtol=1e-5)
