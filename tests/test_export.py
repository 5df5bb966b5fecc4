"""Export of rewritten models (ONNX checked in onnxruntime, TorchScript, pt2) at shapes other than the example's,
the user's model left as it was, and the drawing of one layer before and after surgery."""
import shutil

import pytest
import torch

import surgery
from conftest import SPECS
from models import (assert_same_state, make_bert, make_gpt2, make_llama, make_minigpt, make_minilm, perturb,
                    state, token_ids)
from surgery.export import ExportError, layer_graphs, run_artifact

NEW_SHAPES = [(3, 5), (1, 13)]   # (batch, sequence), both unlike the example's (2, 8)


def _kwargs(batch, seq, seed=0, vocab=120):
    ids = token_ids(batch, seq, seed=seed, vocab=vocab)
    mask = torch.ones_like(ids)
    mask[0, : seq // 3] = 0 if batch > 1 else 1   # some left padding where there is more than one row
    return {"input_ids": ids, "attention_mask": mask}


def _reference(model, kwargs):
    with torch.no_grad():
        out = model(**kwargs, use_cache=False) if hasattr(model.config, "use_cache") else model(**kwargs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _matmuls(path):
    import onnx
    return sum(node.op_type in ("MatMul", "Gemm") for node in onnx.load(str(path)).graph.node)


def _check_onnx(model, path, vocab=120):
    """onnxruntime within 1e-4 of PyTorch at two shapes the export never saw, with padding. Padded positions are
    not compared: in a decoder a left-padded query sees no key at all, and that row's output is undefined
    (eager SDPA and onnxruntime give different garbage)."""
    for batch, seq in NEW_SHAPES:
        kwargs = _kwargs(batch, seq, seed=seq, vocab=vocab)
        expected = _reference(model, kwargs)
        got = run_artifact("onnx", path, (kwargs["input_ids"], kwargs["attention_mask"]),
                           ["input_ids", "attention_mask"])[0]
        assert got.shape == expected.shape
        real = kwargs["attention_mask"].bool()
        assert (got - expected)[real].abs().max() <= 1e-4, (batch, seq)


def _houlsby_and_merged_lora_onnx(make, tmp_path, vocab=120):
    """Houlsby adapters export as extra ops; a merged LoRA model exports as the base graph with new weights (two
    matmuls fewer per Houlsby adapter than the Houlsby export, none for LoRA)."""
    example = _kwargs(2, 8, vocab=vocab)
    houlsby = make().eval()
    surgery.apply(houlsby, SPECS / "houlsby.yaml")
    perturb(houlsby, 0.1)
    before = state(houlsby)
    houlsby_path = surgery.export(houlsby, tmp_path / "houlsby.onnx", example_inputs=example)
    assert_same_state(before, state(houlsby))
    _check_onnx(houlsby, houlsby_path, vocab)

    lora = make().eval()
    surgery.apply(lora, SPECS / "lora.yaml")
    perturb(lora, 0.1)
    lora.train()
    before = state(lora)
    lora_path = surgery.export(lora, tmp_path / "lora.onnx", example_inputs=example, merge=True)
    assert_same_state(before, state(lora))          # unmerged again, bit for bit, and still in train mode
    lora.eval()
    _check_onnx(lora, lora_path, vocab)

    import onnxruntime
    session = onnxruntime.InferenceSession(str(lora_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    assert [d for d in session.get_inputs()[0].shape] == ["batch", "sequence"]
    houlsby_sites = sum(len(sites) for sites in houlsby.surgery_adapters.adapters["default"].values())
    assert _matmuls(lora_path) == _matmuls(houlsby_path) - 2 * houlsby_sites


def test_onnx_houlsby_and_merged_lora_on_llama(tmp_path):
    """LLaMA from a config with one layer: ONNX export time grows with the graph (two layers: twice the time)."""
    _houlsby_and_merged_lora_onnx(lambda: make_llama(layers=1), tmp_path)


@pytest.mark.slow
def test_onnx_houlsby_and_merged_lora_on_the_real_minilm(tmp_path):
    _houlsby_and_merged_lora_onnx(make_minilm, tmp_path, vocab=30522)


def test_onnx_prefix_tuning_on_llama(tmp_path):
    model = make_llama(layers=1).eval()
    surgery.apply(model, SPECS / "prefix.yaml")
    perturb(model, 0.1)
    path = surgery.export(model, tmp_path / "prefix.onnx", example_inputs=_kwargs(2, 8))
    _check_onnx(model, path)
    with surgery.disable(model):   # the prefixes really are in the exported graph
        kwargs = _kwargs(3, 5, seed=5)
        assert (_reference(model, kwargs) - run_artifact("onnx", path, tuple(kwargs.values()))[0]).abs().max() > 1e-3


def test_torchscript_minigpt_runs_at_other_shapes(tmp_path):
    model = make_minigpt().eval()
    surgery.apply(model, SPECS / "houlsby.yaml", example_inputs=model.example_inputs())
    perturb(model, 0.1)
    path = surgery.export(model, tmp_path / "minigpt.pt", example_inputs=model.example_inputs(), format="torchscript")
    loaded = torch.jit.load(str(path))
    for batch, seq in NEW_SHAPES:
        ids = token_ids(batch, seq, seed=seq)
        with torch.no_grad():
            assert (loaded(ids) - model(ids)).abs().max() <= 1e-5


def test_torchscript_transformers_model_runs_at_other_shapes(tmp_path):
    """BERT with LoRA realized as hooks (merge=False): the trace records the hooks' computation."""
    model = make_bert().eval()
    surgery.apply(model, SPECS / "lora.yaml")
    perturb(model, 0.1)
    before = state(model)
    path = surgery.export(model, tmp_path / "bert.pt", example_inputs=_kwargs(2, 8), format="torchscript",
                          merge=False)
    assert_same_state(before, state(model))
    loaded = torch.jit.load(str(path))
    for batch, seq in NEW_SHAPES:
        kwargs = _kwargs(batch, seq, seed=seq)
        with torch.no_grad():
            last_hidden, pooled = loaded(kwargs["input_ids"], kwargs["attention_mask"])
        assert (last_hidden - _reference(model, kwargs)).abs().max() <= 1e-5
        assert pooled.shape == (batch, 64)


class ShapeInPython(torch.nn.Module):
    """Computes with a Python int taken from the input's shape: torch.jit.trace freezes it."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x):
        steps = int(x.shape[1])
        return self.proj(x) * torch.arange(steps, dtype=x.dtype)[:, None]


def test_torchscript_shape_specialization_is_a_clear_error(tmp_path):
    model = ShapeInPython()
    example = torch.randn(2, 6, 4)
    with pytest.raises(ExportError, match="specialized to the example's shapes"):
        surgery.export(model, tmp_path / "m.pt", example_inputs=(example,), format="torchscript",
                       dynamic_axes={"x": {0: "batch", 1: "sequence"}})
    assert not (tmp_path / "m.pt").exists()
    # documented: verify=False keeps a module for the example's shapes only
    path = surgery.export(model, tmp_path / "m.pt", example_inputs=(example,), format="torchscript",
                          dynamic_axes={"x": {0: "batch", 1: "sequence"}}, verify=False)
    loaded = torch.jit.load(str(path))
    assert torch.allclose(loaded(example), model(example))
    with pytest.raises(RuntimeError):
        loaded(torch.randn(2, 7, 4))


def test_pt2_gpt2_with_tied_weights(tmp_path):
    model = make_gpt2().eval()
    surgery.apply(model, SPECS / "lora.yaml")
    perturb(model, 0.1)
    before = state(model)
    path = surgery.export(model, tmp_path / "gpt2.pt2", example_inputs=_kwargs(2, 8), format="pt2")
    assert_same_state(before, state(model))
    program = torch.export.load(str(path)).module()
    for batch, seq in NEW_SHAPES:
        kwargs = _kwargs(batch, seq, seed=seq)
        with torch.no_grad():
            got = program(kwargs["input_ids"], kwargs["attention_mask"])
        assert (got - _reference(model, kwargs)).abs().max() <= 1e-5


def test_bad_export_arguments(tmp_path):
    model = make_minigpt()
    with pytest.raises(ExportError, match="format must be one of"):
        surgery.export(model, tmp_path / "m", example_inputs=model.example_inputs(), format="tflite")
    with pytest.raises(ExportError, match="not inputs"):
        surgery.export(model, tmp_path / "m.pt2", example_inputs=model.example_inputs(), format="pt2",
                       dynamic_axes={"input_ids": {0: "batch"}})
    class TwoInputs(torch.nn.Module):   # nothing to derive both inputs from (a model's example_inputs() or
        def __init__(self):             # one input an nn.Embedding or nn.Linear takes would do: README, API)
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x, y):
            return self.proj(x) + y
    with pytest.raises(surgery.SurgeryError, match="example_inputs are required.*needs 2 arguments"):
        surgery.export(TwoInputs(), tmp_path / "m.pt2", format="pt2")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- drawing

@pytest.fixture(scope="module")
def two_adapters():
    """BERT with Houlsby adapters (inserted modules) and LoRA (wrapped weights) under two names."""
    model = make_bert()
    surgery.apply(model, SPECS / "houlsby.yaml")
    surgery.apply(model, SPECS / "lora.yaml", name="lora")
    return model


def test_layer_graphs_highlight_exactly_the_adapters(two_adapters):
    model = two_adapters
    before, after, block = layer_graphs(model, layer=1)
    assert block == "encoder.layer.1"
    assert not any(d["surgery"] for _, d in before.nodes(data=True))
    sites = {d["site"] for _, d in after.nodes(data=True) if d["surgery"]}
    expected = {f"{name}.{rule}.{key}" for name, rules in model.surgery_adapters.adapters.items()
                for rule, keys in rules.items() for key in keys if key.startswith("encoder_layer_1_")}
    assert sites == expected and len(expected) == 4
    base_nodes = [d["label"] for _, d in after.nodes(data=True) if not d["surgery"]]
    assert sorted(base_nodes) == sorted(d["label"] for _, d in before.nodes(data=True))


def test_draw_with_matplotlib(two_adapters, tmp_path):
    pytest.importorskip("matplotlib")
    path = surgery.draw(two_adapters, tmp_path / "layer.svg", backend="matplotlib")
    text = path.read_text()
    assert text.lstrip().startswith("<?xml") and "<svg" in text
    assert "#f59e0b" in text      # the surgery's nodes are filled orange


@pytest.mark.skipif(shutil.which("dot") is None, reason="the Graphviz `dot` program is not installed")
def test_draw_with_graphviz(two_adapters, tmp_path):
    pytest.importorskip("graphviz")
    path = surgery.draw(two_adapters, tmp_path / "layer.svg", backend="graphviz", layer=0)
    text = path.read_text()
    assert "<svg" in text
    assert text.count('class="node surgery"') >= 4 * 3   # at least down/act/up of each adapter site
    assert "lora.lora.encoder_layer_0_attention_self_query" in text
    assert "before" in text and "after" in text


def test_draw_errors(two_adapters, tmp_path):
    with pytest.raises(surgery.SurgeryError, match="out of range"):
        surgery.draw(two_adapters, tmp_path / "x.svg", layer=5)
    with pytest.raises(surgery.SurgeryError, match="backend must be"):
        surgery.draw(two_adapters, tmp_path / "x.svg", backend="ascii")


def test_cli_draw(tmp_path, monkeypatch, capsys):
    from conftest import ROOT
    from surgery.cli import main
    monkeypatch.chdir(ROOT)
    out = tmp_path / "minigpt.svg"
    assert main(["draw", "examples.models:minigpt", "--spec", "specs/lora.yaml", "--out", str(out), "--layer", "1",
                 "--backend", "matplotlib"]) == 0
    assert "<svg" in out.read_text()
    assert "drew layer 1" in capsys.readouterr().out
    assert main(["draw", "examples.models:minigpt", "--out", str(out)]) == 1
    assert "--spec SPEC or --adapters DIR" in capsys.readouterr().err
