"""Spec validation without a model stays light: `surgery --help` and `surgery validate SPECS` import neither torch
nor transformers nor peft (a pre-commit hook or CI job pays pydantic and YAML only), and the shipped pre-commit
hook runs `surgery validate` on the shipped specs."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "specs").glob("*.yaml"))
HEAVY = ("torch", "transformers", "peft", "numpy")

# run the command line as `python -m surgery ARGS` does, then report which heavy packages got imported
WRAPPER = """\
import json, runpy, sys
sys.argv = ["surgery"] + sys.argv[1:]
try:
    runpy.run_module("surgery", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
print("IMPORTED", json.dumps(sorted(m for m in %r if m in sys.modules)))
sys.exit(code)
""" % (HEAVY,)


def run_light(*args: str, cwd: Path = ROOT) -> tuple[subprocess.CompletedProcess, list]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)
    line = next(l for l in proc.stdout.splitlines() if l.startswith("IMPORTED "))
    return proc, yaml.safe_load(line.removeprefix("IMPORTED "))


def test_validate_of_every_shipped_spec_imports_no_torch():
    proc, imported = run_light("validate", *SPECS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sum(line.endswith(")") and ": ok (" in line for line in proc.stdout.splitlines()) == len(SPECS)
    assert imported == []


def test_help_imports_no_torch():
    proc, imported = run_light("--help")
    assert proc.returncode == 0 and "validate" in proc.stdout
    assert imported == []


def test_a_broken_spec_is_reported_without_torch(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - match: {role: attention.q}\n    action: wrap\n    module: {kind: lora, r: 0}\n"
                   "  - match: {role: attention.v}\n    action: wrap\n    module: {kind: lroa}\n")
    proc, imported = run_light("validate", str(bad))
    assert proc.returncode == 1
    assert re.search(r"bad\.yaml:4:\d+: rules\.0\.module\.r: .*greater than or equal to 1", proc.stdout), proc.stdout
    assert "did you mean 'lora'" in proc.stdout
    assert imported == []


def test_the_torch_free_options_are_the_module_classes_options():
    """Every built-in kind's module class takes its Options from surgery/modules/options.py, the catalog spec
    validation reads; the activation names the options accept are the ones the modules build."""
    import surgery.modules
    from surgery.modules import options, registry
    from surgery.modules.bottleneck import ACTIVATIONS
    package = Path(surgery.modules.__file__).parent
    registering = {p.stem for p in package.glob("*.py") if "\n@register\n" in p.read_text()}
    assert registering == set(registry.BUILTIN_MODULES)
    builtin_kinds = {k for k, cls in registry.kinds().items() if cls.__module__.split(".")[-1] in registering}
    assert builtin_kinds == set(options.BUILTIN)     # every module file that registers a kind is a built-in
    for kind, opts in options.BUILTIN.items():
        assert registry.module_class(kind).Options is opts
    assert options.ACTIVATION_NAMES == tuple(ACTIVATIONS)


def test_the_pre_commit_hook_runs_surgery_validate_on_the_shipped_specs():
    hooks = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    hook = next(h for h in hooks if h["id"] == "surgery-validate")
    assert hook["language"] == "system"   # the surgery where one commits from: nothing to install (test_first_hour)
    command = hook["entry"].split()
    assert command[0] == "surgery"   # the console script of pyproject.toml's [project.scripts]
    files = [f for f in SPECS if re.search(hook["files"], f)]
    assert files == SPECS            # the pattern selects every shipped spec...
    assert not re.search(hook["files"], ".github/workflows/ci.yaml")   # ...and not any YAML file
    proc, imported = run_light(*command[1:], *files)   # what pre-commit runs: the entry, then the file names
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert imported == []
    broken = ROOT / "specs" / "does_not_exist.yaml"
    proc, _ = run_light(*command[1:], str(broken))
    assert proc.returncode != 0
