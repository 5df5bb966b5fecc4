"""A newcomer's first hour (issue 21): progress of long work through `logging` (shown by the CLI, silent from
Python, hidden by -q), third-party noise kept out of the terminal, export/inspect of trained adapters, shipped
spec names found from any directory, a help text for every CLI option, and a readable matplotlib drawing."""
import argparse
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import surgery
from surgery import cli
from surgery.example_models import minigpt

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "surgery", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def trained_lora(directory: Path) -> torch.nn.Module:
    """MiniGPT (seeded, as `examples.models:minigpt` builds it) with LoRA whose B is not zero, saved to `directory`."""
    model = minigpt()
    surgery.apply(model, "lora", example_inputs=model.example_inputs())
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    surgery.save(model, directory)
    return model.eval()


# ---------------------------------------------------------------- progress

def test_cli_shows_each_stage_and_its_duration_and_quiet_hides_them(capsys, monkeypatch, tmp_path):
    # a MiniGPT of a width no other test uses: surgery traces it (an architecture it saw already is not traced)
    (tmp_path / "newcomer_progress_model.py").write_text(
        "from surgery.example_models import minigpt\n\ndef model():\n    return minigpt(hidden_dim=40)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli.main(["inspect", "newcomer_progress_model:model", "--spec", "lora"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert "surgery: trace MiniGPT (torch.export) ..." in err
    assert any(line.startswith("surgery: trace MiniGPT (torch.export): done in ") and line.endswith(" s")
               for line in err), err
    for argv in (["-q", "inspect", "newcomer_progress_model:model", "--spec", "lora"],
                 ["inspect", "newcomer_progress_model:model", "--spec", "lora", "--quiet"]):
        assert cli.main(argv) == 0
        captured = capsys.readouterr()
        assert captured.err == "" and "4 site(s)" in captured.out
    assert logging.getLogger("surgery").handlers == [h for h in logging.getLogger("surgery").handlers
                                                      if isinstance(h, logging.NullHandler)]   # nothing left behind


def test_library_logs_trace_export_and_verify_through_logging(tmp_path, caplog):
    model = minigpt()
    surgery.apply(model, "lora", example_inputs=model.example_inputs())
    with caplog.at_level(logging.INFO, logger="surgery"):
        surgery.export(model, tmp_path / "m.pt", example_inputs=model.example_inputs(), format="torchscript")
    done = [r.getMessage() for r in caplog.records if r.name == "surgery" and ": done in " in r.getMessage()]
    assert [m.split(": done in ")[0] for m in done] == [
        "torchscript exporter", "verify the torchscript file in torch",
        f"export MiniGPT as torchscript to {tmp_path / 'm.pt'}"]
    assert all(float(m.split(": done in ")[1].removesuffix(" s")) >= 0 for m in done)


def test_sparse_calibration_logs_its_stage(caplog):
    model = minigpt()
    [ids] = model.example_inputs()

    def losses(m):
        for batch in (ids, ids.flip(0)):
            yield m(batch).logsumexp(-1).mean()

    spec = {"rules": [{"match": {"role": "ffn.out"}, "action": "wrap",
                       "module": {"kind": "sparse", "density": 0.1, "select": "gradient"}}]}
    with caplog.at_level(logging.INFO, logger="surgery"):
        surgery.apply(model, spec, example_inputs=(ids,), calibration=losses)
    assert any(r.getMessage().startswith("calibration pass for gradient-selected sparse masks: done in ")
               for r in caplog.records)


def test_quiet_libraries_hides_their_warnings_only_inside_and_restores_levels(capsys):
    from surgery.progress import quiet_libraries
    noisy = logging.getLogger("torch.onnx._internal.exporter._registration")
    handler = logging.StreamHandler(sys.stderr)
    noisy.addHandler(handler)
    try:
        with quiet_libraries():
            noisy.warning("torchvision is not installed. Skipping torchvision::nms")
            noisy.error("a real error")
        noisy.warning("outside")
    finally:
        noisy.removeHandler(handler)
    assert capsys.readouterr().err.splitlines() == ["a real error", "outside"]
    assert logging.getLogger("torch.onnx").level == logging.NOTSET


def test_python_use_is_silent_and_needs_no_torchao(tmp_path):
    """From Python, outside the repository: no progress or warnings unless logging is configured; torchao is
    imported only for NF4; shipped spec names resolve."""
    pytest.importorskip("torchao")
    result = run_python("""
        import sys, surgery
        from surgery.example_models import minigpt
        model = minigpt()
        surgery.apply(model, "houlsby", example_inputs=model.example_inputs())
        print(surgery.trainable_parameters(model)[0], any(m.startswith("torchao") for m in sys.modules))
        from surgery.quantize import _torchao_nf4
        _torchao_nf4()   # what quantize_nf4 imports: torchao's loader warnings stay out of the terminal
        print(any(m.startswith("torchao") for m in sys.modules))
    """, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.split() == [str(2 * 2 * (2 * 64 * 4 + 4 + 64)), "False", "True"]   # layers x sites x (64->4->64)


@pytest.mark.slow
def test_cli_onnx_export_of_a_transformers_model_prints_no_library_noise(tmp_path):
    """transformers imports torchao (when installed), whose loader and torch's pytree log warnings, and torch's
    ONNX exporter warns that torchvision is missing: none of it reaches the user's terminal."""
    (tmp_path / "factory.py").write_text(textwrap.dedent("""
        from transformers import BertConfig, BertModel
        def bert():
            return BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=64))
    """))
    result = run_cli("-q", "export", "factory:bert", "--spec", "lora", "--out", tmp_path / "bert.onnx", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert (tmp_path / "bert.onnx").is_file()


# ---------------------------------------------------------------- trained adapters in the CLI

def test_cli_export_adapters_exports_what_was_trained(tmp_path, capsys, monkeypatch):
    trained = trained_lora(tmp_path / "adapters")
    monkeypatch.chdir(ROOT)
    out = tmp_path / "trained.pt"
    assert cli.main(["-q", "export", "examples.models:minigpt", "--adapters", str(tmp_path / "adapters"),
                     "--format", "torchscript", "--out", str(out)]) == 0
    assert f"exported (torchscript) to {out}" in capsys.readouterr().out
    ids = torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = trained(ids)
        with surgery.disable(trained):
            base = trained(ids)
        got = torch.jit.load(str(out))(ids)
    got = got if isinstance(got, torch.Tensor) else got[0]
    assert (expected - base).abs().max() > 1e-2           # the trained adapters change the output ...
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)   # ... and the export has them


def test_cli_inspect_adapters_lists_the_saved_sites(tmp_path, capsys, monkeypatch):
    trained_lora(tmp_path / "adapters")
    monkeypatch.chdir(ROOT)
    assert cli.main(["-q", "inspect", "examples.models:minigpt", "--adapters", str(tmp_path / "adapters")]) == 0
    out = capsys.readouterr().out
    assert [line.split()[:5] for line in out.splitlines()[2:6]] == [
        ["default", "lora", "0", "attention.q", "blocks.0.attn"], ["default", "lora", "1", "attention.q", "blocks.1.attn"],
        ["default", "lora", "0", "attention.v", "blocks.0.attn"], ["default", "lora", "1", "attention.v", "blocks.1.attn"]]
    assert f"4 site(s); trainable parameters: {2 * 2 * 8 * (64 + 64):,} of" in out


def test_cli_spec_and_adapters_exclude_each_other(tmp_path, capsys):
    for argv in (["inspect", "m:f"], ["export", "m:f", "--out", "x.onnx"],
                 ["inspect", "m:f", "--spec", "lora", "--adapters", str(tmp_path)]):
        with pytest.raises(SystemExit) as exit:
            cli.build_parser().parse_args(argv)
        assert exit.value.code == 2
    assert "--spec" in capsys.readouterr().err


# ---------------------------------------------------------------- shipped specs, help texts

def test_shipped_spec_names_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    reference = surgery.load_spec(ROOT / "specs" / "houlsby.yaml")
    for name in ("houlsby", "houlsby.yaml", "specs/houlsby.yaml"):
        assert surgery.load_spec(name) == reference
    model = minigpt()
    surgery.apply(model, "lora", example_inputs=model.example_inputs())
    assert surgery.trainable_parameters(model)[0] == 2 * 2 * 8 * (64 + 64)
    with pytest.raises(surgery.SpecError, match="did you mean the shipped spec 'houlsby'"):
        surgery.load_spec("houlsbi")
    (tmp_path / "houlsby.yaml").write_text("rules:\n  - {match: {role: ffn.out}, action: train}\n")
    assert surgery.load_spec("houlsby.yaml") != reference     # the user's own file comes first


@pytest.mark.slow
def test_the_wheel_ships_the_specs(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    import zipfile
    [wheel] = tmp_path.glob("surgery-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.name for p in (ROOT / "specs").glob("*.yaml")}
    assert shipped and {f"surgery/specs/{name}" for name in shipped} <= names


def test_every_cli_option_has_help():
    parser = cli.build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    missing = [f"{command} {action.option_strings or action.dest}"
               for command, p in sub.choices.items() for action in p._actions
               if not action.help or action.help == argparse.SUPPRESS]
    assert missing == []
    assert {a.dest for a in sub._choices_actions} == set(sub.choices)   # and every command has one
    assert all(a.help for a in sub._choices_actions)


# ---------------------------------------------------------------- the matplotlib drawing

@pytest.mark.slow
def test_matplotlib_drawing_labels_are_readable_and_do_not_overlap():
    pytest.importorskip("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from surgery.export import layer_graphs, matplotlib_figure
    model = minigpt()
    surgery.apply(model, "houlsby", example_inputs=model.example_inputs())
    surgery.apply(model, "lora", name="lora")
    before, after, block = layer_graphs(model, model.example_inputs(), layer=1)
    fig = matplotlib_figure(before, after, block)
    try:
        fig.canvas.draw()   # places the label boxes
        renderer = fig.canvas.get_renderer()
        for ax, g in zip(fig.axes, (before, after)):
            labels = [t for t in ax.texts if t.get_bbox_patch() is not None]
            assert len(labels) == len(g) and all(t.get_fontsize() >= 8 for t in labels)
            boxes = [t.get_bbox_patch().get_window_extent(renderer) for t in labels]
            inside = ax.get_window_extent(renderer)
            for i, a in enumerate(boxes):
                assert inside.x0 - 1 <= a.x0 and a.x1 <= inside.x1 + 1, labels[i].get_text()   # not cut off
                for j in range(i):
                    assert not a.overlaps(boxes[j]), (labels[i].get_text(), labels[j].get_text())
    finally:
        plt.close(fig)
