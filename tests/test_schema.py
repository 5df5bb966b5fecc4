"""surgery.schema.json and docs/spec.md: generated from the models and the registry, committed, never stale;
the schema accepts every shipped spec and rejects what validation rejects."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

import surgery
from surgery.modules import kinds
from surgery.spec import schema as spec_schema_module
from surgery.spec.models import ACTION_DOCS, ACTIONS, LAYER_SLICE, ROLES
from surgery.spec.schema import REGENERATE, render_docs, render_schema, spec_schema

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_FILE = ROOT / "surgery.schema.json"
DOCS_FILE = ROOT / "docs" / "spec.md"
SHIPPED = sorted(p for d in ("specs", "examples") for p in (ROOT / d).rglob("*")
                 if p.suffix in (".yaml", ".yml", ".json"))


@pytest.fixture(scope="module")
def schema():
    return spec_schema()


@pytest.fixture(scope="module")
def validator(schema):
    return jsonschema.Draft202012Validator(schema)


def test_committed_schema_is_current():
    assert SCHEMA_FILE.read_text() == render_schema(), (
        f"surgery.schema.json is stale (a module kind, option or spec key changed): run `{REGENERATE}`")


def test_surgery_schema_prints_the_committed_file():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "surgery", "schema"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == SCHEMA_FILE.read_text(), f"surgery.schema.json is stale: run `{REGENERATE}`"


def test_schema_is_a_valid_json_schema_with_a_branch_per_module_kind(schema):
    jsonschema.Draft202012Validator.check_schema(schema)
    module = schema["$defs"]["Rule"]["properties"]["module"]
    [union] = [branch for branch in module["anyOf"] if "oneOf" in branch]
    mapping = union["discriminator"]["mapping"]
    assert union["discriminator"]["propertyName"] == "kind"
    assert sorted(mapping) == sorted(kinds())                      # every registered kind, nothing else
    assert sorted(b["$ref"] for b in union["oneOf"]) == sorted(mapping.values())
    for kind, cls in kinds().items():
        options = schema["$defs"][mapping[kind].rsplit("/", 1)[1]]
        assert options["properties"]["kind"]["const"] == kind
        assert options["required"] == ["kind"]
        assert set(options["properties"]) == {f.alias or n for n, f in cls.Options.model_fields.items()}
        assert options["additionalProperties"] is False


def test_a_kind_registered_later_appears_in_the_schema(monkeypatch):
    """Generation reads the registry when it runs: a new kind needs no edit here."""
    from typing import Literal

    from torch import nn

    from surgery.modules import registry

    class ScaleOptions(registry.Options):
        kind: Literal["test_scale"] = "test_scale"
        supported_actions = ("insert_after",)
        factor: float = 1.0

    class Scale(nn.Module):
        Options = ScaleOptions

    monkeypatch.setitem(registry._REGISTRY, "test_scale", Scale)
    generated = spec_schema()
    union = next(b for b in generated["$defs"]["Rule"]["properties"]["module"]["anyOf"] if "oneOf" in b)
    assert "test_scale" in union["discriminator"]["mapping"]
    assert generated["$defs"]["ScaleOptions"]["properties"]["factor"]["type"] == "number"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_spec_matches_the_schema(path, validator):
    data = yaml.safe_load(path.read_text())
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(data)]
    assert errors == []
    surgery.load_spec(path)   # and the models accept it


def test_every_shipped_yaml_spec_names_the_schema():
    for path in SHIPPED:
        if path.parent.name == "specs" and path.suffix in (".yaml", ".yml"):
            assert path.read_text().startswith("# yaml-language-server: $schema=../surgery.schema.json\n"), path


GOOD_RULES = [
    {"match": {"role": "ffn.out", "layers": "-2:"}, "action": "insert_after", "module": {"kind": "bottleneck"}},
    {"match": {"role": ["attention.q", "attention.v"], "layers": [0, 1]}, "action": "wrap",
     "module": {"kind": "lora", "r": 1, "dropout": 0.0}, "realize": "weight", "expect": 4},
    {"match": {"role": "ffn.out"}, "action": "parallel", "from": {"role": "ffn.in", "through": True},
     "module": {"kind": "bottleneck", "reduction_factor": 0.5, "dropout": 0.99}},
    {"match": {"role": "norm"}, "action": "train", "params": ["bias"], "expect": "any"},
]

BAD_RULES = {
    "unknown key": {"match": {"role": "ffn.out", "layer": 1}, "action": "wrap", "module": {"kind": "lora"}},
    "unknown option": {"match": {"role": "ffn.out"}, "action": "wrap", "module": {"kind": "lora", "rank": 4}},
    "unknown kind": {"match": {"role": "ffn.out"}, "action": "wrap", "module": {"kind": "lroa"}},
    "no kind": {"match": {"role": "ffn.out"}, "action": "wrap", "module": {"r": 4}},
    "wrong type": {"match": {"role": "ffn.out"}, "action": "wrap", "module": {"kind": "lora", "r": "big"}},
    "r < 1": {"match": {"role": "ffn.out"}, "action": "wrap", "module": {"kind": "lora", "r": 0}},
    "dropout = 1": {"match": {"role": "ffn.out"}, "action": "wrap", "module": {"kind": "lora", "dropout": 1.0}},
    "reduction_factor = 0": {"match": {"role": "ffn.out"}, "action": "insert_after",
                             "module": {"kind": "bottleneck", "reduction_factor": 0}},
    "negative expect": {"match": {"role": "ffn.out"}, "action": "wrap", "module": {"kind": "lora"}, "expect": -1},
    "unknown role": {"match": {"role": "ffn.outt"}, "action": "wrap", "module": {"kind": "lora"}},
    "bad slice": {"match": {"role": "ffn.out", "layers": "1:x"}, "action": "wrap", "module": {"kind": "lora"}},
    "unknown action": {"match": {"role": "ffn.out"}, "action": "wrapp", "module": {"kind": "lora"}},
    "kind lacks action": {"match": {"role": "ffn.out"}, "action": "insert_after", "module": {"kind": "lora"}},
    "from without parallel": {"match": {"role": "ffn.out"}, "action": "wrap", "from": {"role": "ffn.in"},
                              "module": {"kind": "lora"}},
    "parallel without from": {"match": {"role": "ffn.out"}, "action": "parallel", "module": {"kind": "bottleneck"}},
    "train with a module": {"match": {"role": "norm"}, "action": "train", "module": {"kind": "lora"}},
    "module missing": {"match": {"role": "ffn.out"}, "action": "wrap"},
    "params without train": {"match": {"role": "ffn.out"}, "action": "wrap", "module": {"kind": "lora"},
                             "params": ["bias"]},
    "realize without wrap": {"match": {"role": "ffn.out"}, "action": "insert_after", "module": {"kind": "bottleneck"},
                             "realize": "weight"},
}


@pytest.mark.parametrize("rule", GOOD_RULES)
def test_schema_and_models_accept_the_same_good_rules(rule, validator):
    data = {"version": 1, "rules": [rule]}
    assert list(validator.iter_errors(data)) == []
    surgery.Spec.model_validate(data)


@pytest.mark.parametrize("problem", list(BAD_RULES))
def test_schema_and_models_reject_the_same_bad_rules(problem, validator):
    data = {"version": 1, "rules": [BAD_RULES[problem]]}
    assert list(validator.iter_errors(data)), f"the schema accepts: {problem}"
    with pytest.raises(surgery.SpecError) as raised:
        surgery.spec.spec_from(data)
    assert all(p.key and p.key.startswith("rules.0") for p in raised.value.problems), raised.value.render()


@pytest.mark.parametrize("text,valid", [
    ("all", True), ("-2:", True), ("0:4", True), ("::2", True), (" 1 : 3 ", True), ("3", True),
    ("1:x", False), ("1:2:3:4", False), ("--3", False), ("last", False), ("1,2", False)])
def test_layer_slices_mean_the_same_to_schema_and_models(text, valid, validator):
    data = {"rules": [{"match": {"role": "ffn.out", "layers": text}, "action": "wrap", "module": {"kind": "lora"}}]}
    assert (not list(validator.iter_errors(data))) == valid
    assert bool(LAYER_SLICE.match(text)) == valid


def test_json_specs_load_with_positions(tmp_path):
    """JSON is read by the same safe loader (tabs allowed), with `$schema` for editors, and errors keep lines."""
    good = tmp_path / "lora.json"
    good.write_text(json.dumps({"$schema": "../surgery.schema.json", "version": 1, "rules": [
        {"match": {"role": "attention.q"}, "action": "wrap", "module": {"kind": "lora", "r": 4}}]}, indent="\t"))
    assert surgery.load_spec(good).rules[0].module.r == 4
    bad = tmp_path / "bad.json"
    bad.write_text('{\n\t"rules": [\n\t\t{"match": {"role": "attention.q"}, "action": "wrap",\n'
                   '\t\t "module": {"kind": "lora", "r": 0}}\n\t]\n}\n')
    with pytest.raises(surgery.SpecError) as raised:
        surgery.load_spec(bad)
    assert raised.value.render() == f"{bad}:4:31: rules.0.module.r: input should be greater than or equal to 1"


def test_loader_refuses_alias_bombs_and_reports_duplicate_keys(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]"
              for i in range(1, 9)]
    bomb.write_text("\n".join(lines) + "\n")
    with pytest.raises(surgery.SpecError, match="spec too large"):
        surgery.load_spec(bomb)
    twice = tmp_path / "twice.yaml"
    twice.write_text("rules: []\nname: a\nname: b\n")
    with pytest.raises(surgery.SpecError) as raised:
        surgery.load_spec(twice)
    assert raised.value.render() == f"{twice}:3:1: name: duplicate key 'name' (an earlier one is overridden)"


def test_include_problems_point_into_the_right_file(tmp_path):
    (tmp_path / "base.yaml").write_text("rules:\n  - name: a\n    match: {role: ffn.out}\n    action: wrap\n"
                                        "    module: {kind: lora, r: 0}\n")
    (tmp_path / "top.yaml").write_text("include: [base.yaml, missing.yaml]\nrules: []\n")
    with pytest.raises(surgery.SpecError) as raised:
        surgery.load_spec(tmp_path / "top.yaml")
    assert raised.value.render().splitlines() == [
        f"{tmp_path / 'base.yaml'}:5:26: rules.0.module.r: input should be greater than or equal to 1",
        f"{tmp_path / 'top.yaml'}:1:22: include.1: included spec 'missing.yaml' not found "
        f"(looked at {tmp_path / 'missing.yaml'})",
    ]


# ---------------------------------------------------------------- docs/spec.md


def test_docs_are_current():
    current = DOCS_FILE.read_text()
    assert render_docs(current) == current, (
        f"docs/spec.md is stale (a key, module kind, option or spec in specs/ changed): run `{REGENERATE}`")


def test_docs_name_every_key_kind_option_role_action_and_spec(schema):
    """Independent of the generator: everything the schema knows is in the reference."""
    docs = DOCS_FILE.read_text()
    defs = schema["$defs"]
    keys = set(schema["properties"]) | set(defs["Rule"]["properties"]) | set(defs["Match"]["properties"])
    for kind, cls in kinds().items():
        assert f"`kind: {kind}`" in docs
        keys |= {f.alias or n for n, f in cls.Options.model_fields.items()}
    missing = [k for k in sorted(keys | set(ROLES) | set(ACTIONS)) if f"`{k}`" not in docs]
    assert missing == [], f"not in docs/spec.md: {missing}; run `{REGENERATE}`"
    for path in SHIPPED:
        if path.parent.name == "specs":
            assert f"specs/{path.name}" in docs
    assert "# yaml-language-server: $schema=" in docs   # the editor line is documented


def test_every_action_is_described():
    assert [a for a in ACTIONS if a not in ACTION_DOCS] == [], "describe the new action in ACTION_DOCS (models.py)"


def test_check_mode_reports_staleness_with_the_command(tmp_path, monkeypatch, capsys):
    stale_docs = tmp_path / "spec.md"
    stale_docs.write_text(DOCS_FILE.read_text().replace("`kind: lora`", "`kind: lora-old`"))
    monkeypatch.setattr(spec_schema_module, "DOCS_FILE", stale_docs)
    monkeypatch.setattr(spec_schema_module, "SCHEMA_FILE", tmp_path / "surgery.schema.json")
    assert spec_schema_module.main(["--check"]) == 1
    assert f"run `{REGENERATE}`" in capsys.readouterr().err
    assert spec_schema_module.main([]) == 0                 # regenerates both
    assert spec_schema_module.main(["--check"]) == 0
    assert (tmp_path / "surgery.schema.json").read_text() == render_schema()
    assert "`kind: lora`" in stale_docs.read_text()
