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


@pytest.mark.skipif(shutil.which("pre-commit") is None or shutil.which("git") is None,
                    reason="needs pre-commit and git")
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
