"""The command line as a user runs it (`python -m surgery ...` in a subprocess): every error class of `validate`
at its exact file:line:col, no tracebacks, unsafe YAML refused, and the model-facing commands end to end."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import surgery
from surgery import cli

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted(p for d in ("specs", "examples") for p in (ROOT / d).rglob("*")
                 if p.suffix in (".yaml", ".yml", ".json"))


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "surgery", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


# One spec file per error class; the comments give the line and column each problem must be reported at.
BROKEN = {
    "unknown_key.yaml": """\
version: 1
rule: []
rules:
  - name: adapter
    match: {role: ffn.out, layer: 1}
    action: insert_after
    module: {kind: bottleneck}
""",  # 2:1 rule -> rules;  5:28 layer -> layers
    "wrong_type.yaml": """\
rules:
  - match: {role: attention.q}
    action: wrap
    module:
      kind: lora
      r: big
""",  # 6:7
    "out_of_range.yaml": """\
rules:
  - match: {role: attention.v}
    action: wrap
    module: {kind: lora, r: 0, dropout: 1.5}
  - match: {role: ffn.out}
    action: insert_after
    module: {kind: bottleneck, reduction_factor: -4}
""",  # 4:26 r, 4:32 dropout, 7:32 reduction_factor
    "syntax.yaml": """\
rules:
  - match: {role: ffn.out
    action: wrap
""",  # 3:11
    "unknown_kind.yaml": """\
rules:
  - match: {role: attention.q}
    action: wrap
    module: {kind: lroa, r: 4}
""",  # 4:14
    "combination.yaml": """\
rules:
  - name: lora_after_ffn
    match: {role: ffn.out}
    action: insert_after
    module: {kind: lora}
  - name: wrap_from
    match: {role: ffn.out}
    action: wrap
    from: {role: ffn.in}
    module: {kind: lora}
  - name: lora_after_ffn
    match: {role: ffn.in}
    action: train
""",  # 4:5 action; 9:5 from; 11:5 duplicate name
}


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """All broken files (and one good one) in one `validate` run: every problem of every file is reported."""
    directory = tmp_path_factory.mktemp("broken")
    for name, text in BROKEN.items():
        (directory / name).write_text(text)
    result = run_cli("validate", *sorted(BROKEN), ROOT / "specs" / "lora.yaml", cwd=directory)
    return result, result.stdout.splitlines()


def lines_for(output: list[str], file: str) -> list[str]:
    return [line for line in output if line.startswith(file + ":")]


def test_validate_reports_every_problem_once_and_exits_1(broken):
    result, output = broken
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    problems = [line for line in output if ": ok (" not in line]
    assert len(problems) == 2 + 1 + 3 + 1 + 1 + 3, result.stdout
    assert f"{ROOT / 'specs' / 'lora.yaml'}: ok (1 rule)" in output
    assert "11 problems in 6 files" in result.stderr


def test_unknown_key_with_did_you_mean(broken):
    assert lines_for(broken[1], "unknown_key.yaml") == [
        "unknown_key.yaml:2:1: rule: unknown key 'rule' (did you mean 'rules'?)",
        "unknown_key.yaml:5:28: rules.0.match.layer: unknown key 'layer' (did you mean 'layers'?)",
    ]


def test_wrong_type(broken):
    assert lines_for(broken[1], "wrong_type.yaml") == [
        "wrong_type.yaml:6:7: rules.0.module.r: input should be a valid integer, unable to parse string as an integer"]


def test_out_of_range_values(broken):
    assert lines_for(broken[1], "out_of_range.yaml") == [
        "out_of_range.yaml:4:26: rules.0.module.r: input should be greater than or equal to 1",
        "out_of_range.yaml:4:32: rules.0.module.dropout: input should be less than 1",
        "out_of_range.yaml:7:32: rules.1.module.reduction_factor: input should be greater than 0",
    ]


def test_yaml_syntax_error(broken):
    [line] = lines_for(broken[1], "syntax.yaml")
    assert line.startswith("syntax.yaml:3:11: YAML syntax error: ")


def test_unknown_module_kind(broken):
    [line] = lines_for(broken[1], "unknown_kind.yaml")
    assert line.startswith("unknown_kind.yaml:4:14: rules.0.module.kind: unknown module kind 'lroa' "
                           "(did you mean 'lora'?); known kinds: ")
    assert all(kind in line for kind in surgery.modules.kinds())


def test_incompatible_combinations(broken):
    assert lines_for(broken[1], "combination.yaml") == [
        "combination.yaml:4:5: rules.0.action: module 'lora' supports actions wrap, not insert_after",
        "combination.yaml:9:5: rules.1.from: `from` is only for action parallel, not wrap",
        "combination.yaml:11:5: rules.2.name: a rule named 'lora_after_ffn' comes earlier in this spec",
    ]


def test_python_tags_are_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    spec = tmp_path / "evil.yaml"
    spec.write_text(f"version: 1\nrules:\n  - !!python/object/apply:os.system [\"touch {marker}\"]\n"
                    f"name: !!python/name:os.system ''\n")
    result = run_cli("validate", "evil.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout.splitlines()[:2] == [
        "evil.yaml:3:5: rules.0: refused YAML tag '!!python/object/apply:os.system': specs are plain data "
        "(mappings, lists, strings, numbers, booleans) and cannot construct Python objects",
        "evil.yaml:4:7: name: refused YAML tag '!!python/name:os.system': specs are plain data "
        "(mappings, lists, strings, numbers, booleans) and cannot construct Python objects",
    ]
    assert "Traceback" not in result.stderr
    assert not marker.exists()
    with pytest.raises(surgery.SpecError, match="refused YAML tag"):   # the API refuses it the same way
        surgery.load_spec(spec)
    assert not marker.exists()


def test_every_shipped_spec_validates():
    """What CI checks: every spec in specs/ and examples/ is valid."""
    assert any(p.parent.name == "specs" for p in SHIPPED)
    result = run_cli("validate", "specs", "examples")   # a directory stands for every YAML/JSON file in it
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(line.split(": ok (")[0] for line in result.stdout.splitlines()) == sorted(
        str(p.relative_to(ROOT)) for p in SHIPPED)


def test_validate_with_a_model_points_at_the_rule_that_matches_nothing(tmp_path):
    spec = tmp_path / "gated.yaml"
    spec.write_text("""\
version: 1
name: gated
rules:
  - name: q_lora
    match: {role: attention.q}
    action: wrap
    module: {kind: lora, r: 4}
  - name: gate_lora
    match: {role: ffn.gate}
    action: wrap
    module: {kind: lora, r: 4}
  - match: {role: attention.v, layers: 7}
    action: wrap
    module: {kind: lora}
""")
    unrealizable = tmp_path / "act_lora.yaml"   # matches, but the site has no weight to wrap
    unrealizable.write_text("""\
rules:
  - name: q_lora
    match: {role: attention.q}
    action: wrap
    module: {kind: lora}
  - name: act_lora
    match: {role: ffn.act}
    action: wrap
    module: {kind: lora}
""")
    result = run_cli("validate", "--model", "examples.models:minigpt", spec, unrealizable,
                     ROOT / "specs" / "houlsby.yaml")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    out = result.stdout.splitlines()
    assert len(out) == 4, result.stdout
    assert out[0].startswith(f"{spec}:9:5: rules.1.match: rule 'gate_lora' in spec 'gated' matched no site: "
                             "pattern (role='ffn.gate')")
    assert out[0].endswith("(on examples.models:minigpt)")
    assert out[1].startswith(f"{spec}:12:5: rules.2.match: rule 'rule2' in spec 'gated' matched no site: "
                             "pattern (role='attention.v', layers=7)")
    assert out[2].startswith(f"{unrealizable}:6:5: rules.1: cannot apply on examples.models:minigpt: ")
    assert out[3] == (f"{ROOT / 'specs' / 'houlsby.yaml'}: ok (2 rules on examples.models:minigpt; sites: "
                      f"attention_adapter 2, ffn_adapter 2)")
    assert "3 problems in 2 files" in result.stderr


def test_validate_with_a_transformers_directory(tmp_path, capsys, monkeypatch):
    """MODEL as a directory saved by transformers, loaded offline as the class it was saved from (in-process:
    a subprocess would spend most of its time importing transformers)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    monkeypatch.chdir(ROOT)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    model, _ = cli.load_model(str(tmp_path / "llama"))
    assert type(model) is LlamaForCausalLM
    assert cli.main(["validate", "--model", str(tmp_path / "llama"), "specs/lora.yaml", "specs/houlsby.yaml"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"specs/lora.yaml: ok (1 rule on {tmp_path / 'llama'}; sites: lora 4)",
        f"specs/houlsby.yaml: ok (2 rules on {tmp_path / 'llama'}; sites: attention_adapter 2, ffn_adapter 2)"]


def test_model_errors_are_one_line(tmp_path, capsys, monkeypatch):
    result = run_cli("validate", "--model", "no_such_package.models:thing", "specs/lora.yaml")
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: cannot load model 'no_such_package.models:thing': "
                                     "No module named 'no_such_package'")
    monkeypatch.chdir(ROOT)
    assert cli.main(["inspect", str(tmp_path / "missing"), "--spec", "specs/lora.yaml"]) == 1
    assert capsys.readouterr().err.startswith(
        "error: MODEL must be package.module:factory_or_class or a model directory")


def test_demo_runs_the_quick_start():
    result = run_cli("demo", "--steps", "2")
    assert result.returncode == 0, result.stderr
    assert "trainable parameters:" in result.stdout and "step   1  loss" in result.stdout


def test_inspect_prints_the_sites(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert cli.main(["inspect", "examples.models:minigpt", "--spec", "specs/lora.yaml"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[:4] for line in out.splitlines()[2:6]] == [
        ["lora", "0", "attention.q", "blocks.0.attn"], ["lora", "1", "attention.q", "blocks.1.attn"],
        ["lora", "0", "attention.v", "blocks.0.attn"], ["lora", "1", "attention.v", "blocks.1.attn"]]
    lora_params = 2 * 2 * 8 * (64 + 64)   # layers x (q, v) x r x (in + out)
    assert f"4 site(s); trainable parameters: {lora_params:,} of" in out


def test_apply_saves_the_adapters(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    assert cli.main(["apply", "examples.models:minigpt", "--spec", "specs/lora.yaml", "--out", str(out)]) == 0
    assert f"saved the adapters to {out}" in capsys.readouterr().out
    assert (out / "adapters.safetensors").is_file()
    base, _ = cli.load_model("examples.models:minigpt")
    loaded = surgery.load(base, out, base.example_inputs())
    assert surgery.trainable_parameters(loaded)[0] == 2 * 2 * 8 * (64 + 64)


def test_apply_and_export_without_the_io_stage_say_so(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    for name in ("save", "export"):
        monkeypatch.delattr(surgery, name, raising=False)
        monkeypatch.delitem(surgery._LAZY, name)   # imported on first use: not there either
    assert cli.main(["apply", "examples.models:minigpt", "--spec", "specs/lora.yaml", "--out", "unused"]) == 1
    assert cli.main(["export", "examples.models:minigpt", "--spec", "specs/lora.yaml", "--out", "unused.onnx"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: `surgery apply` saves the adapters with surgery.save, which this installation lacks",
                   "error: `surgery export` needs surgery.export, which this installation lacks"]


@pytest.mark.slow
def test_export_writes_an_onnx_model_that_runs(tmp_path, capsys, monkeypatch):
    import onnxruntime
    import torch
    monkeypatch.chdir(ROOT)
    out = tmp_path / "minigpt.onnx"
    assert cli.main(["export", "examples.models:minigpt", "--spec", "specs/lora.yaml", "--out", str(out)]) == 0
    assert f"exported (onnx) to {out}" in capsys.readouterr().out
    model, _ = cli.load_model("examples.models:minigpt")   # seeded: the same weights the CLI exported
    surgery.apply(model, "specs/lora.yaml", example_inputs=model.example_inputs())
    model.eval()
    tokens = torch.randint(0, 100, (3, 5))                  # a batch and length other than the example's
    with torch.no_grad():
        expected = model(tokens).numpy()
    session = onnxruntime.InferenceSession(str(out))
    [feed] = session.get_inputs()
    [got] = session.run(None, {feed.name: tokens.numpy()})
    assert abs(got - expected).max() < 1e-4
