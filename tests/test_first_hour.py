"""A new user's first hour with the command line: the pre-commit hook, `surgery validate` on odd inputs, model
references, and the trace cache across processes. Each case runs the command line in a subprocess, as a user
does."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
LORA = "version: 1\nrules:\n  - name: a\n    match: {role: attention.q}\n    action: wrap\n    module: {kind: lora, r: 8}\n"
TYPO = "version: 1\nrules:\n  - name: a\n    match: {role: attention.qq}\n    action: wrap\n    module: {kind: lora, r: 8}\n"


def surgery(*args: str, cwd: Path, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m surgery ARGS` with this checkout's surgery, in `cwd`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "surgery", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


# --- pre-commit -----------------------------------------------------------------------------------------------

def _hooks() -> dict:
    return {h["id"]: h for h in yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())}


def test_the_default_pre_commit_hook_installs_nothing():
    """`language: python` makes pre-commit `pip install` the repository with all its dependencies: torch, 5.5 GB
    with the CUDA wheel (measured), for a hook that never imports it. The default hook runs the surgery the user
    already has; the isolated one is there for machines without it, and says what it costs."""
    hooks = _hooks()
    default = hooks["surgery-validate"]
    assert default["language"] == "system" and default["entry"].split()[:2] == ["surgery", "validate"]
    isolated = hooks["surgery-validate-isolated"]
    assert isolated["language"] == "python" and isolated["entry"] == default["entry"]
    assert isolated["files"] == default["files"]
    assert "torch" in isolated["description"]


@pytest.mark.skipif(shutil.which("pre-commit") is None or shutil.which("git") is None
                    or not (ROOT / ".git").exists(), reason="needs pre-commit, git and a git checkout")
def test_pre_commit_runs_the_hook_from_this_repository(tmp_path):
    """`pre-commit try-repo` of this checkout on a project with a good and a broken spec: the hook runs the
    `surgery` on PATH (here a shim for this checkout), fails on the broken spec and names its line."""
    pre_commit = shutil.which("pre-commit")
    project = tmp_path / "project"
    (project / "specs").mkdir(parents=True)
    (project / "specs" / "good.yaml").write_text(LORA)
    (project / "specs" / "typo.yaml").write_text(TYPO)
    (project / "notes.yaml").write_text("not: a spec\n")   # outside specs/: not the hook's
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "surgery"
    shim.write_text(f"#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} -m surgery \"$@\"\n")
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PRE_COMMIT_HOME": str(tmp_path / "cache"), "GIT_CONFIG_GLOBAL": os.devnull}
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q", "."], cwd=project, check=True, env=env)
    subprocess.run(git + ["add", "."], cwd=project, check=True, env=env)
    proc = subprocess.run([pre_commit, "try-repo", str(ROOT), "surgery-validate", "--all-files"], cwd=project,
                          env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "specs/typo.yaml:4:13: rules.0.match.role: unknown role 'attention.qq'" in out
    assert "specs/good.yaml: ok (1 rule)" in out
    assert "notes.yaml" not in out
    assert "Installing environment" not in out   # try-repo's store is temporary: its log says what it does


# --- models on the command line, and the trace cache across processes ----------------------------------------

NET = '''\
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d=32, heads=4):
        super().__init__()
        self.ln1, self.ln2, self.heads = nn.LayerNorm(d), nn.LayerNorm(d), heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        y = self.ln1(x)
        q, k, v = (m(y).view(b, t, self.heads, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(torch.relu(self.up(self.ln2(x))))


class Net(nn.Module):   # no example_inputs(): surgery derives token ids for the embedding
    def __init__(self, vocab=50, d=32, layers=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def tiny():
    torch.manual_seed(0)
    return Net()
'''


def _project(tmp_path: Path) -> Path:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "net.py").write_text(NET)
    (tmp_path / "lora.yaml").write_text(LORA)
    return tmp_path


def test_a_model_file_on_the_command_line(tmp_path):
    """A new user names the file their model is in: `path/to/net.py:tiny` loads it (its directory first on
    sys.path, as when running it), not `No module named 'net.py'`."""
    project = _project(tmp_path)
    proc = surgery("inspect", "models/net.py:tiny", "--spec", "lora.yaml", "-q", cwd=project,
                   env={"SURGERY_CACHE": "0"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 site(s)" in proc.stdout and "blocks.1.q" in proc.stdout
    missing = surgery("inspect", "models/nope.py:tiny", "--spec", "lora.yaml", cwd=project)
    assert missing.returncode == 1 and "no file models/nope.py" in missing.stderr and "Traceback" not in missing.stderr


def _traced(proc) -> bool:
    return "(torch.export)" in proc.stderr


@pytest.mark.slow
def test_the_trace_cache_across_commands(tmp_path):
    """`validate --model` traces and writes the cache; `inspect`, `apply` and `export` in new processes read it
    (their progress says so) and do not run torch.export on the base model again. `export` of a model without
    example_inputs() derives them as tracing does (README: API) instead of refusing."""
    project = _project(tmp_path)
    env = {"SURGERY_CACHE": "1", "SURGERY_CACHE_DIR": str(tmp_path / "cache")}
    model = "models/net.py:tiny"
    first = surgery("validate", "lora.yaml", "--model", model, cwd=project, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert _traced(first) and "sites: a 2" in first.stdout
    for command in (["inspect", model, "--spec", "lora.yaml"],
                    ["apply", model, "--spec", "lora.yaml", "--out", "adapters"],
                    ["export", model, "--spec", "lora.yaml", "--format", "pt2", "--out", "net.pt2"]):
        proc = surgery(*command, cwd=project, env=env)
        assert proc.returncode == 0, (command, proc.stdout + proc.stderr)
        assert "read from the cache" in proc.stderr and not _traced(proc), (command, proc.stderr)
    assert (project / "net.pt2").is_file() and (project / "adapters" / "manifest.json").is_file()


@pytest.mark.slow
def test_draw_reads_the_base_model_from_the_cache(tmp_path):
    """`surgery draw` traced the base model again with trace() (adapters disabled) instead of reading the
    analysis apply made (from the trace cache): only the rewritten model is traced."""
    pytest.importorskip("matplotlib")
    project = _project(tmp_path)
    env = {"SURGERY_CACHE": "1", "SURGERY_CACHE_DIR": str(tmp_path / "cache")}
    model = "models/net.py:tiny"
    assert surgery("inspect", model, "--spec", "lora.yaml", cwd=project, env=env).returncode == 0
    proc = surgery("draw", model, "--spec", "lora.yaml", "--out", "layer.svg", "--backend", "matplotlib",
                   cwd=project, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr.count("(torch.export) ...") <= 1, proc.stderr   # the rewritten model only


def test_export_derives_example_inputs_as_tracing_does(tmp_path):
    """README (API): example_inputs may be omitted for models with an example_inputs() method and for plain models
    whose one input an nn.Embedding takes; surgery.export refused both ("without a transformers config")."""
    import torch

    import surgery
    from surgery.example_models import minigpt
    namespace: dict = {}
    exec(NET, namespace)
    for model in (minigpt(n_layers=1, hidden_dim=32), namespace["tiny"]()):
        surgery.apply(model, yaml.safe_load(LORA))
        state = torch.random.get_rng_state()
        path = surgery.export(model, tmp_path / f"{type(model).__name__}.pt", format="torchscript")
        assert torch.equal(torch.random.get_rng_state(), state)   # the user's RNG untouched
        assert Path(path).is_file()


# --- `surgery validate` on what a new user points it at ----------------------------------------------------------

def test_a_huge_file_is_refused_before_parsing(tmp_path):
    """A 2 MB file (thousands of rules, or a weights file named by mistake) took 11 s of CPU to be refused as
    'more than 100000 values (aliases expanding?)'; it is refused from its size, without reading it all."""
    huge = tmp_path / "huge.yaml"
    huge.write_text("version: 1\nrules:\n" + "".join(
        f"  - name: r{i}\n    match: {{role: attention.q}}\n    action: wrap\n    module: {{kind: lora, r: 8}}\n"
        for i in range(20000)))
    proc = surgery("validate", str(huge), "/dev/zero", cwd=tmp_path, timeout=30)
    assert proc.returncode == 1
    assert f"{huge}: not a spec: the file is too large ({huge.stat().st_size:,} bytes; a spec is at most 512 KiB)" \
        in proc.stdout
    assert "/dev/zero: not a spec: the file is too large (more than 512 KiB" in proc.stdout


def test_a_directory_leaves_out_hidden_files_and_virtual_environments(tmp_path):
    """`surgery validate .` in a project checked .git, .github workflows, .pre-commit-hooks.yaml and every JSON
    file of a virtual environment in it as specs."""
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "lora.yaml").write_text(LORA)
    for hidden in (".github/workflows/ci.yaml", ".pre-commit-config.yaml", "specs/.draft.yaml",
                   "venv/lib/python3/site-packages/pkg/config.json"):
        (tmp_path / hidden).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / hidden).write_text("on: push\n")
    (tmp_path / "venv" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    proc = surgery("validate", ".", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == ["specs/lora.yaml: ok (1 rule)"]
    proc = surgery("validate", "specs/lora.yaml", "specs", "./specs/lora.yaml", cwd=tmp_path)   # once each
    assert proc.returncode == 0 and proc.stdout.splitlines() == ["specs/lora.yaml: ok (1 rule)"], proc.stdout


def test_a_pattern_no_shell_expanded(tmp_path):
    """Quoted, or typed in Windows' cmd.exe, `specs/*.yaml` reached surgery as is: 'cannot read spec: No such
    file or directory'. It stands for the files it matches; one that matches nothing is a usage error (exit 2)."""
    (tmp_path / "specs" / "more").mkdir(parents=True)
    (tmp_path / "specs" / "a.yaml").write_text(LORA)
    (tmp_path / "specs" / "more" / "b.yaml").write_text(TYPO)
    proc = surgery("validate", "specs/*.yaml", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.splitlines() == ["specs/a.yaml: ok (1 rule)"], proc.stdout
    proc = surgery("validate", "specs/**/*.yaml", cwd=tmp_path)
    assert proc.returncode == 1 and "specs/more/b.yaml:4:13: rules.0.match.role" in proc.stdout
    proc = surgery("validate", "configs/*.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: no file matches 'configs/*.yaml'"


def test_another_file_format_is_named_as_such(tmp_path):
    """A JSON or YAML file of another kind (package.json, a CI workflow) got one 'unknown key' line per key; it
    gets one line saying it is not a spec. A misspelt spec key still gets its 'did you mean'."""
    (tmp_path / "package.json").write_text('{"name": "x", "scripts": {}, "dependencies": {}}\n')
    (tmp_path / "rule.yaml").write_text("rule:\n  - name: a\n")
    proc = surgery("validate", "package.json", "rule.yaml", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [
        "package.json:1:1: not a spec: it has no `rules`, `compose` or `include` (its keys: name, scripts, "
        "dependencies); a spec is a mapping with a `rules` list",
        "rule.yaml:1:1: rule: unknown key 'rule' (did you mean 'rules'?)"]


def test_an_unclosed_bracket_is_reported_where_it_opens(tmp_path):
    """PyYAML notices a missing `}` on a later line; the message names the line where the mapping started."""
    (tmp_path / "open.yaml").write_text("version: 1\nrules:\n  - name: a\n    match: {role: attention.q\n"
                                        "    action: wrap\n")
    proc = surgery("validate", "open.yaml", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stdout.strip() == ("open.yaml:5:11: YAML syntax error: while parsing a flow mapping that starts at "
                                   "line 4, column 12; expected ',' or '}', but got ':'")


def test_a_composition_is_checked_without_a_model(tmp_path):
    """`surgery validate` said ok to compositions that apply fails on (weights not one per adapter, a misspelt
    option) or silently ignores (a stack takes no weights: the adapters ran in sequence, not averaged)."""
    cases = {
        "{stack: [a, b], weights: [0.1, 0.9]}": "stack: unknown option 'weights' (stack takes no options)",
        "{average: [a, b], weigths: [0.1, 0.9]}": "average: unknown option 'weigths' (average takes weights, "
                                                  "normalize_weights) (did you mean 'weights'?)",
        "{average: [a, b], weights: [0.7]}": "weights: one per adapter of the average (2), not [0.7]",
        "{average: [a, {parallel: [b, c], name: x}]}": "average.1: parallel: unknown option 'name'",
        "{batch_split: [a, b]}": "batch_split: needs batch_sizes",
        "{fusion: [a, b]}": "(did you mean 'fuse'?)",
    }
    for i, (compose, message) in enumerate(cases.items()):
        (tmp_path / f"c{i}.yaml").write_text(f"version: 1\ncompose: {compose}\n")
    (tmp_path / "good.yaml").write_text("version: 1\ncompose: {average: [a, {stack: [b, c]}], weights: [0.7, 0.3], "
                                        "normalize_weights: false}\n")
    proc = surgery("validate", *(f"c{i}.yaml" for i in range(len(cases))), "good.yaml", cwd=tmp_path)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 1 and len(lines) == len(cases) + 1, proc.stdout
    for i, message in enumerate(cases.values()):
        assert lines[i].startswith(f"c{i}.yaml:2:1: compose: ") and message in lines[i], (lines[i], message)
    assert lines[-1] == "good.yaml: ok (0 rules)"


def test_the_composition_options_are_the_blocks_arguments():
    """spec validation (no torch) keeps a table of each block's options: it is the blocks' keyword arguments."""
    import inspect

    from surgery.rewrite import compose
    from surgery.spec.models import BLOCK_OPTIONS, BLOCK_REQUIRED, BLOCKS
    assert tuple(BLOCK_OPTIONS) == BLOCKS == tuple(compose.BLOCKS)
    for kind, cls in compose.BLOCKS.items():
        keywords = {n: p for n, p in inspect.signature(cls.__init__).parameters.items() if p.kind is p.KEYWORD_ONLY}
        assert set(BLOCK_OPTIONS[kind]) == set(keywords), kind
        assert set(BLOCK_REQUIRED.get(kind, ())) == {n for n, p in keywords.items() if p.default is p.empty}, kind


KINDS = NET + '''

from typing import Literal

import surgery
from surgery.modules.lora import LoRA


class MyLoRAOptions(LoRA.Options):
    kind: Literal["my_lora"] = "my_lora"


@surgery.register_module
class MyLoRA(LoRA):
    """LoRA under a kind of the user's own."""
    Options = MyLoRAOptions
'''


@pytest.mark.slow
def test_module_kinds_registered_by_the_users_code(tmp_path):
    """`surgery inspect kinds.py:tiny --spec my.yaml` applied a kind the model's module registers, but `surgery
    validate my.yaml --model kinds.py:tiny` refused it as unknown (the specs were read before the model's module
    was imported), and without a model there was no way to name the module that registers it."""
    (tmp_path / "kinds.py").write_text(KINDS)
    (tmp_path / "my.yaml").write_text(LORA.replace("kind: lora", "kind: my_lora"))
    env = {"SURGERY_CACHE": "0"}
    plain = surgery("validate", "my.yaml", cwd=tmp_path, env=env)
    assert plain.returncode == 1 and "unknown module kind 'my_lora'" in plain.stdout
    proc = surgery("validate", "my.yaml", "--import", "kinds", cwd=tmp_path, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "my.yaml: ok (1 rule)", proc.stdout + proc.stderr
    proc = surgery("validate", "my.yaml", "--model", "kinds.py:tiny", "-q", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "my.yaml: ok (1 rule on kinds.py:tiny; sites: a 2)"
    proc = surgery("validate", "my.yaml", "--import", "no_such_module", cwd=tmp_path, env=env)
    assert proc.returncode == 1 and "error: cannot import 'no_such_module': No module named" in proc.stderr


def test_an_option_given_twice_is_a_usage_error(tmp_path):
    """`surgery inspect MODEL --spec lora --spec houlsby` applied houlsby alone, silently."""
    proc = surgery("inspect", "surgery.example_models:minigpt", "--spec", "lora", "--spec", "houlsby", cwd=tmp_path)
    assert proc.returncode == 2
    assert "surgery inspect: error: --spec given twice ('lora', then 'houlsby'): it takes one value" in proc.stderr


def test_a_yaml_boolean_where_a_string_goes_says_to_quote_it(tmp_path):
    """`name: yes` or `role: on` is a boolean to YAML: 'input should be a valid string' did not say why."""
    (tmp_path / "yes.yaml").write_text("version: 1\nrules:\n  - name: yes\n    match: {role: on}\n    action: wrap\n"
                                       "    module: {kind: lora, r: 8}\n")
    proc = surgery("validate", "yes.yaml", cwd=tmp_path)
    hint = "(YAML reads an unquoted yes, no, on, off, true or false as a boolean: quote it)"
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [
        f"yes.yaml:3:5: rules.0.name: input should be a valid string {hint}",
        f"yes.yaml:4:13: rules.0.match.role: input should be a valid string or a valid list (got True) {hint}"]
