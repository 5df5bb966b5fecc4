"""Bad and hostile input (issue 19): specs and adapter directories written by someone else.

One test (or one parametrized family) per kind of problem: values that make the model useless, unbounded work,
paths that leave their directory, names that collide, raw Python exceptions, input accepted though meaningless,
tracebacks from the CLI, and the error messages a user must act on. Each either is refused with a
`SurgeryError` subclass naming the file/line/column, key or name, or (warnings) is accepted with a
`SurgeryWarning`; the model is left unchanged whenever something is refused.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import pytest
import torch

import surgery
from surgery import cli
from surgery.modules.registry import kinds
from surgery.spec import load as spec_load
from surgery.spec.load import validate_data
from models import assert_same_state, make_bert, make_llama, state

# getattr: benchmarks/hostile_inputs.py also runs this file against older checkouts, which lack these names
MAX_INCLUDE_DEPTH = getattr(spec_load, "MAX_INCLUDE_DEPTH", 16)
MAX_NESTING = getattr(spec_load, "MAX_NESTING", 32)
LimitError = getattr(surgery, "LimitError", surgery.SurgeryError)
SurgeryWarning = getattr(surgery, "SurgeryWarning", UserWarning)


@pytest.fixture(scope="module")
def traced_llama():
    model = make_llama().eval()
    surgery.plan(model, {"rules": [{"match": {"role": "ffn.out"}, "action": "train"}]})   # trace once
    return model


@pytest.fixture
def llama(traced_llama):
    """The shared LLaMA, with whatever a test left applied removed afterwards (so one failure stays one)."""
    yield traced_llama
    store = getattr(traced_llama, "surgery_adapters", None)
    for name in list(store.records) if store is not None else []:
        surgery.remove(traced_llama, name)


def _rule(module: dict, action: str | None = None) -> dict:
    kind = module["kind"]
    action = action or sorted(kinds()[kind].Options.actions())[0]
    role = {"wrap": "attention.q", "attend": "attention.op", "prepend": "embedding.output",
            "sublayer": "attention.residual_add"}.get(action, "block.output")
    rule = {"name": "r", "match": {"role": role}, "action": action, "module": module}
    if action == "parallel":
        rule["from"] = {"role": "block.input"}
    return rule


def _number_options(types: set[str]) -> list[tuple[str, str]]:
    """(kind, option) for every option of every registered kind whose JSON Schema admits one of `types`."""
    out = []
    for kind, cls in sorted(kinds().items()):
        if kind.startswith("test_"):
            continue
        for name, schema in cls.Options.model_json_schema()["properties"].items():
            alternatives = schema.get("anyOf", [schema])
            found = {a.get("type") for a in alternatives}
            if found & types and "boolean" not in found:
                out.append((kind, name))
    return out


# ---------------------------------------------------------------- values that make the model useless

@pytest.mark.parametrize("kind,option", _number_options({"number"}))
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), 1e308])
def test_every_float_option_is_finite_and_bounded(kind, option, value, tmp_path):
    path = tmp_path / "spec.yaml"
    text = {float("inf"): ".inf", float("-inf"): "-.inf", 1e308: "1e308"}.get(value, ".nan")
    path.write_text(f"rules:\n  - name: r\n    match: {{role: {_rule({'kind': kind})['match']['role']}}}\n"
                    f"    action: {_rule({'kind': kind})['action']}\n"
                    f"    module:\n      kind: {kind}\n      {option}: {text}\n")
    with pytest.raises(surgery.SpecError) as raised:
        surgery.load_spec(path)
    lines = raised.value.render().splitlines()
    assert any(line.startswith(f"{path}:7:7: rules.0.module.{option}:") for line in lines), lines


@pytest.mark.parametrize("kind,option", _number_options({"integer", "number"}))
def test_booleans_are_not_numbers(kind, option):
    with pytest.raises(surgery.SpecError, match=f"rules.0.module.{option}: True: a boolean is not a number"):
        validate_data({"rules": [_rule({"kind": kind, option: True})]})


@pytest.mark.parametrize("where,value", [("layers", True), ("leave_out", [0, False]), ("expect", True)])
def test_booleans_are_not_layers_or_counts(where, value):
    rule = {"match": {"role": "norm"}, "action": "train"}
    (rule if where == "expect" else rule["match"])[where] = value
    with pytest.raises(surgery.SpecError, match="a boolean is not a number"):
        validate_data({"rules": [rule]})


def test_composition_weights_are_finite():
    with pytest.raises(surgery.SpecError, match="compose: weights: nan is not a finite number"):
        validate_data({"compose": {"average": ["a", "b"], "weights": [float("nan"), 0.5]}})


def test_validate_with_model_refuses_an_infinite_alpha(tmp_path, capsys):
    spec = tmp_path / "inf.yaml"
    spec.write_text("rules:\n  - match: {role: attention.q}\n    action: wrap\n    module: {kind: lora, alpha: .inf}\n")
    assert cli.main(["validate", "--model", "examples.models:minigpt", str(spec)]) == 1
    assert f"{spec}:4:26: rules.0.module.alpha: inf is not a finite number" in capsys.readouterr().out


# ---------------------------------------------------------------- unbounded work

def test_apply_estimates_memory_before_allocating(llama, monkeypatch):
    before = state(llama)
    huge = {"rules": [_rule({"kind": "lora", "r": 10 ** 12})]}     # ~0.5 PB: no machine has it
    start = time.perf_counter()
    with pytest.warns(SurgeryWarning, match=r"r=1000000000000 exceeds min\(d_in, d_out\) = 64"):
        with pytest.raises(LimitError, match="over the memory limit") as raised:
            surgery.apply(llama, huge)
    assert time.perf_counter() - start < 10
    assert "rule 'r'" in str(raised.value)
    assert_same_state(before, state(llama))
    # the limit is the caller's: a kwarg, else the environment
    small = {"rules": [_rule({"kind": "lora", "r": 4})]}
    with pytest.raises(LimitError, match=r"limit of 1.0 KiB \(memory_limit\)"):
        surgery.apply(llama, small, memory_limit="1KiB")
    monkeypatch.setenv("SURGERY_MEMORY_LIMIT", "2KiB")
    with pytest.raises(LimitError, match="SURGERY_MEMORY_LIMIT"):
        surgery.apply(llama, small)
    surgery.apply(llama, small, memory_limit="1GiB")        # the kwarg wins over the environment
    surgery.remove(llama)
    with pytest.raises(LimitError, match="not a memory limit"):
        surgery.apply(llama, small, memory_limit="lots")
    assert_same_state(before, state(llama))


def test_estimate_is_the_bytes_apply_allocates(llama):
    from surgery.rewrite import budget
    from surgery.api import _analysis
    from surgery.match import match_spec
    for rule in ({"kind": "lora", "r": 8}, {"kind": "said", "d": 100}, {"kind": "bottleneck"}):
        spec = surgery.load_spec({"rules": [_rule(rule)]})
        found = budget.estimate(llama, _analysis(llama, None), spec, match_spec(spec, _analysis(llama, None)))
        surgery.apply(llama, spec)
        adapters = llama.surgery_adapters.adapters["default"]
        real = sum(t.numel() * t.element_size() for t in list(adapters.parameters()) + list(adapters.buffers()))
        surgery.remove(llama)
        assert found.total == real, (rule, found, real)


def test_estimating_does_not_change_the_initial_values(llama):
    """The meta builds leave the random state alone: a seeded apply draws what it drew without the estimate."""
    spec = {"rules": [_rule({"kind": "bottleneck"}), {**_rule({"kind": "lora", "r": 4}), "name": "l"}]}
    values = []
    for limit in ("none", "1GiB"):
        torch.manual_seed(0)
        surgery.apply(llama, spec, memory_limit=limit)
        values.append({k: v.clone() for k, v in llama.surgery_adapters.adapters["default"].state_dict().items()})
        surgery.remove(llama)
    assert values[0].keys() == values[1].keys()
    assert all(torch.equal(values[0][k], values[1][k]) for k in values[0])


def test_said_subspace_beyond_the_weight_is_warned_and_bounded(llama):
    with pytest.warns(SurgeryWarning, match="d=10000 exceeds the 4096 entries"):
        surgery.apply(llama, {"rules": [_rule({"kind": "said", "d": 10_000})]})
    surgery.remove(llama)
    before = state(llama)
    with pytest.raises(LimitError):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SurgeryWarning)
            surgery.apply(llama, {"rules": [_rule({"kind": "said", "d": 10 ** 12})]})
    assert_same_state(before, state(llama))


def test_each_include_is_read_once(tmp_path):
    """Each file includes the next one twice: 2^15 reads before, 15 now (and the duplicate rules are named)."""
    n = 15
    for i in range(n):
        include = f"include: [f{i + 1}.yaml, f{i + 1}.yaml]\n" if i < n - 1 else ""
        rules = f"rules:\n  - name: r{i}\n    match: {{role: norm}}\n    action: train\n"
        (tmp_path / f"f{i}.yaml").write_text(include + rules)
    start = time.perf_counter()
    with pytest.raises(surgery.SpecError, match="comes earlier") as raised:
        surgery.load_spec(tmp_path / "f0.yaml")
    assert time.perf_counter() - start < 5
    assert len(raised.value.problems) < 4 * n


def test_include_depth_is_limited(tmp_path):
    n = MAX_INCLUDE_DEPTH + 3
    for i in range(n):
        include = f"include: [f{i + 1}.yaml]\n" if i < n - 1 else ""
        (tmp_path / f"f{i}.yaml").write_text(include + f"rules:\n  - {{name: r{i}, match: {{role: norm}}, action: train}}\n")
    with pytest.raises(surgery.SpecError, match=f"includes nested more than {MAX_INCLUDE_DEPTH} deep"):
        surgery.load_spec(tmp_path / "f0.yaml")


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_nesting_depth_is_limited(tmp_path, suffix):
    path = tmp_path / f"deep{suffix}"
    path.write_text('{"rules": [{"name": "r", "match": {"role": "norm"}, "action": "train", "x": '
                    + "[" * 5000 + "]" * 5000 + "}]}")
    with pytest.raises(surgery.SpecError, match=f"nested too deeply: more than {MAX_NESTING} levels") as raised:
        surgery.load_spec(path)
    assert raised.value.line == 1 and raised.value.column is not None


def test_deeply_nested_manifest_is_a_checkpoint_error(tmp_path):
    (tmp_path / "manifest.json").write_text('{"format": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(surgery.CheckpointError, match="nested too deeply|not readable JSON"):
        surgery.load(make_llama(), tmp_path)


# ---------------------------------------------------------------- paths

@pytest.fixture
def saved(tmp_path, llama):
    surgery.apply(llama, {"rules": [_rule({"kind": "lora", "r": 2})]})
    try:
        surgery.save(llama, tmp_path / "ckpt")
    finally:
        surgery.remove(llama)
    return tmp_path / "ckpt"


def _edit_manifest(directory: Path, edit) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    edit(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("field,value", [
    ("spec", "/etc/hostname"), ("spec", "../outside.spec.yaml"), ("spec", "link.spec.yaml"),
    ("tensors", "../adapters.safetensors"), ("tensors", "/tmp/adapters.safetensors")])
def test_a_checkpoint_names_only_files_inside_its_directory(saved, llama, field, value):
    outside = saved.parent / "outside.spec.yaml"
    outside.write_text((saved / "default.spec.yaml").read_text())
    (saved / "link.spec.yaml").symlink_to(outside)
    if field == "spec":
        _edit_manifest(saved, lambda m: m["adapters"][0].update(spec=value))
    else:
        _edit_manifest(saved, lambda m: m["tensors"].update(file=value))
    before = state(llama)
    with pytest.raises(surgery.CheckpointError, match="inside the checkpoint directory|leads outside"):
        surgery.load(llama, saved)
    assert_same_state(before, state(llama))


def test_includes_stay_under_the_spec_directory(tmp_path):
    (tmp_path / "shared.yaml").write_text("rules:\n  - {name: a, match: {role: norm}, action: train}\n")
    (tmp_path / "sub").mkdir()
    for rel in ("../shared.yaml", str(tmp_path / "shared.yaml")):
        top = tmp_path / "sub" / "top.yaml"
        top.write_text(f"include: [{rel!r}]\nrules:\n  - {{name: b, match: {{role: ffn.out}}, action: train}}\n")
        with pytest.raises(surgery.SpecError, match="lies outside") as raised:
            surgery.load_spec(top)
        assert raised.value.problems[0].render().startswith(f"{top}:1:11: include.0:")
        assert len(surgery.load_spec(top, include_dirs=[tmp_path]).rules) == 2    # the caller allows more


def test_save_does_not_follow_symlinks(tmp_path, llama):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "ckpt"
    out.mkdir()
    for name in ("manifest.json.tmp", "adapters.safetensors.tmp", "default.spec.yaml.tmp", "manifest.json"):
        (out / name).symlink_to(victim)
    surgery.apply(llama, {"rules": [_rule({"kind": "lora", "r": 2})]})
    try:
        surgery.save(llama, out)
    finally:
        surgery.remove(llama)
    assert victim.read_text() == "precious"
    assert not (out / "manifest.json").is_symlink()
    assert not any(p.name.startswith(".") for p in out.iterdir())       # no temporary file left behind


# ---------------------------------------------------------------- names

@pytest.mark.parametrize("name", ["b/c", "a.b", "", " x", "-x", "x" * 65, "trained", "naïve"])
def test_rule_names_use_one_character_set(tmp_path, name):
    path = tmp_path / "spec.yaml"
    path.write_text(f"rules:\n  - name: {json.dumps(name)}\n    match: {{role: norm}}\n    action: train\n")
    with pytest.raises(surgery.SpecError) as raised:
        surgery.load_spec(path)
    assert raised.value.render().startswith(f"{path}:2:5: rules.0.name:")


@pytest.mark.parametrize("name", ["a/b", "a.b", "x y", "-a"])
def test_adapter_names_use_one_character_set(llama, name):
    before = state(llama)
    with pytest.raises(surgery.SurgeryError, match="adapter name"):
        surgery.apply(llama, {"rules": [_rule({"kind": "lora", "r": 2})]}, name=name)
    assert_same_state(before, state(llama))


def test_saved_tensor_keys_cannot_collide():
    from surgery.io.checkpoint import _put
    out = {}
    _put(out, "a/b/c", torch.zeros(1))
    with pytest.raises(surgery.CheckpointError, match="same name 'a/b/c'"):
        _put(out, "a/b/c", torch.zeros(1))


# ---------------------------------------------------------------- raw exceptions

def test_zero_slice_step_is_a_spec_error(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("rules:\n  - match: {role: norm, layers: '1:2:0'}\n    action: train\n")
    with pytest.raises(surgery.SpecError, match="a slice step cannot be zero") as raised:
        surgery.load_spec(path)
    assert raised.value.render().startswith(f"{path}:2:")


@pytest.mark.parametrize("edit", [
    lambda m: m.update(adapters=[{"name": 1, "spec": "default.spec.yaml"}]),
    lambda m: m.update(adapters=[{"name": "default", "spec": ["x"]}]),
    lambda m: m.update(tensors="adapters.safetensors"),
    lambda m: m["tensors"].update(aliases=["x"]),
    lambda m: m["tensors"].update(file=3),
    lambda m: m.update(base=[1, 2]),
    lambda m: m["base"].update(parameters={"w": "64x64"}),
    lambda m: m.update(active=3),
    lambda m: m.update(format_version=True),
], ids=["name", "spec", "tensors", "aliases", "file", "base", "parameters", "active", "version"])
def test_manifest_field_types_are_checked(saved, llama, edit):
    _edit_manifest(saved, edit)
    before = state(llama)
    with pytest.raises(surgery.CheckpointError, match="manifest.json"):
        surgery.load(llama, saved)
    assert_same_state(before, state(llama))


def test_save_into_a_file_or_under_one_is_a_checkpoint_error(tmp_path, llama):
    target = tmp_path / "file"
    target.write_text("x")
    surgery.apply(llama, {"rules": [_rule({"kind": "lora", "r": 2})]})
    try:
        with pytest.raises(surgery.CheckpointError, match="is a file, not a directory"):
            surgery.save(llama, target)
        with pytest.raises(surgery.CheckpointError, match="cannot create the directory"):
            surgery.save(llama, target / "sub")
    finally:
        surgery.remove(llama)
    assert target.read_text() == "x"


# ---------------------------------------------------------------- accepted though meaningless

@pytest.mark.parametrize("text", ["", "# nothing\n", "rules: []\n", "name: x\n"])
def test_a_spec_that_changes_nothing_is_an_error(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(surgery.SpecError, match="no rules") as raised:
        surgery.load_spec(path)
    assert raised.value.render().startswith(f"{path}:1:")


def test_non_utf8_and_nul_bytes_have_a_position(tmp_path):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"rules:\n  - name: caf\xe9\n")
    with pytest.raises(surgery.SpecError, match="not UTF-8") as raised:
        surgery.load_spec(latin)
    assert (raised.value.line, raised.value.column) == (2, 14)
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"rules:\n  - name: a\x00b\n")
    with pytest.raises(surgery.SpecError, match="not allowed") as raised:
        surgery.load_spec(nul)
    assert (raised.value.line, raised.value.column) == (2, 12)


def test_cli_refuses_what_checks_nothing(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["validate", str(tmp_path / "empty")]) == 2
    assert "nothing to check" in capsys.readouterr().err
    spec = tmp_path / "s.yaml"
    spec.write_text("rules:\n  - {match: {role: norm}, action: train}\n")
    assert cli.main(["validate", "--model", "", str(spec)]) == 2
    assert "--model is empty" in capsys.readouterr().err


# ---------------------------------------------------------------- the CLI never prints a traceback

@pytest.mark.parametrize("ref,code,expected", [
    (":f", 2, "expected package.module:factory_or_class"),
    (".rel:f", 2, "expected package.module:factory_or_class"),
    ("hostile_syntax:f", 1, "syntax error"),
    ("hostile_raises:f", 1, "importing hostile_raises raised RuntimeError: boom"),
    ("hostile_returns:f", 1, "f() returned str, not a torch.nn.Module"),
    ("hostile_returns:g", 1, "has no callable 'g'"),
])
def test_cli_model_problems_are_one_line(tmp_path, monkeypatch, capsys, ref, code, expected):
    (tmp_path / "hostile_syntax.py").write_text("def f(:\n")
    (tmp_path / "hostile_raises.py").write_text("raise RuntimeError('boom')\n")
    (tmp_path / "hostile_returns.py").write_text("def f():\n    return 'not a model'\n")
    spec = tmp_path / "s.yaml"
    spec.write_text("rules:\n  - {match: {role: norm}, action: train}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli.main(["validate", "--model", ref, str(spec)]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def test_cli_deeply_nested_spec_is_one_line(tmp_path, capsys):
    spec = tmp_path / "deep.yaml"
    spec.write_text("rules: " + "[" * 20000 + "]" * 20000 + "\n")
    assert cli.main(["validate", str(spec)]) == 1
    out = capsys.readouterr()
    assert out.out.strip() == f"{spec}:1:{7 + MAX_NESTING}: nested too deeply: more than {MAX_NESTING} levels of " \
                              f"mappings and lists"


def test_cli_unexpected_exception_is_one_line(monkeypatch, capsys, tmp_path):
    def broken(args):
        raise RuntimeError("unexpected\nsecond line")
    monkeypatch.setattr(cli, "cmd_schema", broken)
    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser(), "schema", broken))
    assert cli.main(["schema"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: internal error: RuntimeError: unexpected second line")


def _with_func(parser, command, func):
    parser._subparsers._group_actions[0].choices[command].set_defaults(func=func)
    return parser


# ---------------------------------------------------------------- messages

def test_a_glob_that_matches_nothing_lists_the_nearest_module_names():
    model = make_bert().eval()
    with pytest.raises(surgery.MatchError) as raised:
        surgery.plan(model, {"rules": [{"match": {"module": "*.q_proj"}, "action": "train"}]},
                     example_inputs={"input_ids": torch.randint(0, 50, (1, 6))})
    message = str(raised.value)
    assert "no module matches '*.q_proj'; nearest module names: encoder.layer.0.attention.self.query" in message
    assert "embeddings" not in message        # not samples of every other site


def test_every_unknown_role_is_reported():
    with pytest.raises(surgery.SpecError) as raised:
        validate_data({"rules": [{"match": {"role": ["attn.q", "attention.k", "ffn.up"]}, "action": "train"}]})
    assert "'attn.q' (did you mean 'attention.q'?)" in str(raised.value)
    assert "'ffn.up'" in str(raised.value)


def test_a_match_error_from_python_carries_the_file_position(tmp_path, llama):
    path = tmp_path / "spec.yaml"
    path.write_text("rules:\n  - name: a\n    match: {role: norm}\n    action: train\n"
                    "  - name: b\n    match: {role: attention.q, layers: 7}\n    action: train\n")
    before = state(llama)
    with pytest.raises(surgery.MatchError) as raised:
        surgery.apply(llama, str(path))
    assert str(raised.value).startswith(f"{path}:6:5: rules.1.match: rule 'b' matched no site")
    assert (raised.value.file, raised.value.line, raised.value.column) == (str(path), 6, 5)
    assert_same_state(before, state(llama))


def test_validate_with_model_counts_the_sites_of_each_rule(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text("rules:\n  - {name: q, match: {role: attention.q}, action: wrap, module: {kind: lora}}\n"
                    "  - {name: n, match: {role: norm}, action: train}\n")
    assert cli.main(["validate", "--model", "examples.models:minigpt", str(spec)]) == 0
    assert capsys.readouterr().out.strip() == f"{spec}: ok (2 rules on examples.models:minigpt; sites: q 2, n 5)"


def test_printed_merge_report_names_the_folded_sites(llama):
    surgery.apply(llama, {"rules": [_rule({"kind": "lora", "r": 2})]})
    try:
        text = str(surgery.merge(llama))
        assert "merged: default/r/model_layers_0_self_attn_q_proj" in text
        surgery.unmerge(llama)
    finally:
        surgery.remove(llama)
