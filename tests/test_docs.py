"""Every code block of README.md and docs/*.md runs, so an example that breaks fails the suite.

- ```python blocks are executed (in a temporary directory, with `surgery` imported and the names the block's
  setup provides).
- ```bash blocks: every `surgery ...` / `python -m surgery ...` command is run (other commands, e.g. pip,
  pytest, torchrun, are not); the README's placeholders (MODEL, SPEC, DIR, `[--layer 0]`) are filled in with
  small values. Each command must exit 0. These are slow-marked: each command is a process importing torch.
- ```yaml blocks that are whole specs (they have `rules:`) must load with `surgery.load_spec`.

A block is configured by an HTML comment on the line before it (invisible on GitHub; docs/spec.md is generated,
so its blocks carry none and must run as they are):

    <!-- doctest: setup=llama slow -->        names from SETUPS below; slow-marked
    <!-- doctest: skip (needs a 7B checkpoint) -->   not run; the reason is required

Blocks in other languages (text, json output) are not code.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w+)\s*$")
MARKER = re.compile(r"^<!--\s*doctest:\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    file: Path
    line: int            # 1-based line of the opening fence
    language: str
    code: str
    options: str         # the doctest marker's text, "" when there is none

    @property
    def id(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line}"

    @property
    def skip_reason(self) -> str | None:
        found = re.match(r"skip\s*\((.+)\)\s*$", self.options)
        return found.group(1) if found else None

    @property
    def setup(self) -> str | None:
        found = re.search(r"setup=(\w+)", self.options)
        return found.group(1) if found else None

    @property
    def slow(self) -> bool:
        return re.search(r"(^|\s)slow(\s|$)", self.options) is not None


def blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(before)
        found.append(Block(path, i + 1, opening.group(1), "\n".join(lines[i + 1:end]) + "\n",
                           marker.group(1) if marker else ""))
        i = end + 1
    return found


ALL = [b for path in DOCS for b in blocks(path)]


def runnable(block) -> bool:
    """Whether a block is something to run: not marked skip (the marker says why), a bash block with a `surgery`
    command (pip, pytest, benchmarks and torchrun lines are not run), a YAML block that is a whole spec."""
    if block.skip_reason:
        return False
    if block.language == "bash":
        return bool(surgery_commands(block.code))
    if block.language == "yaml":
        import yaml
        data = yaml.safe_load(block.code)
        return isinstance(data, dict) and "rules" in data
    return True


def params(language: str):
    """One parameter per runnable block; bash blocks are slow (each command is a process that imports torch)."""
    return [pytest.param(b, id=b.id, marks=[pytest.mark.slow] if b.slow or language == "bash" else [])
            for b in ALL if b.language == language and runnable(b)]


# ---------------------------------------------------------------- names the python blocks use

def _tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def setup_llama() -> dict:
    """A tiny transformers LLaMA (example inputs come from its config), a batch of 4 and a fresh base."""
    import torch
    ids = torch.randint(0, 128, (4, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    return {"model": _tiny_llama(), "base_model": _tiny_llama(), "ids": ids, "mask": mask,
            "batch": {"input_ids": ids, "attention_mask": mask}}


def setup_llama_lora() -> dict:
    """`setup_llama` with specs/lora.yaml applied to `model` (as adapter "default")."""
    import surgery
    names = setup_llama()
    surgery.apply(names["model"], "specs/lora.yaml")
    return names


def setup_llama_lora_and_peft_dir() -> dict:
    """`setup_llama` with specs/lora.yaml applied to `model` as adapter "task" (the PEFT checkpoint then loads
    as "default"), and a PEFT LoRA directory `peft_dir/` of the same base."""
    import surgery
    from peft import LoraConfig, get_peft_model
    names = setup_llama()
    surgery.apply(names["model"], "specs/lora.yaml", name="task")
    get_peft_model(_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained("peft_dir")
    return names


SETUPS = {"llama": setup_llama, "llama_lora": setup_llama_lora,
          "llama_lora_and_peft_dir": setup_llama_lora_and_peft_dir}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A scratch directory holding the repository's specs/ and examples/ (as the README's commands expect) and
    `my.yaml` / `my_spec.yaml` (the user's own spec in the docs' examples)."""
    for name in ("specs", "examples"):
        (tmp_path / name).symlink_to(ROOT / name)
    for name in ("my.yaml", "my_spec.yaml"):
        (tmp_path / name).write_text((ROOT / "specs" / "lora.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---------------------------------------------------------------- the tests

def test_the_docs_have_code_blocks_and_markers_are_well_formed():
    assert {b.file.name for b in ALL} >= {"README.md", "spec.md"}
    for b in ALL:
        assert b.options == "" or b.skip_reason or b.setup or b.slow, f"{b.id}: unknown doctest marker {b.options!r}"
        assert b.setup is None or b.setup in SETUPS, f"{b.id}: unknown setup {b.setup!r}"


@pytest.mark.parametrize("block", params("python"))
def test_python_block_runs(block: Block, workdir):
    import surgery
    names = SETUPS[block.setup]() if block.setup else {}
    code = compile(block.code, f"{block.id}", "exec")
    exec(code, {"__name__": "__doc_example__", "surgery": surgery, **names})   # as after the first block's import


PLACEHOLDERS = {"MODEL": "examples.models:minigpt", "SPEC": "lora", "DIR": "adapters_out"}
SURGERY_COMMAND = re.compile(r"^(surgery|python -m surgery)\s")


def surgery_commands(code: str) -> list[str]:
    """The `surgery` commands of a bash block (one per line or `&&`-separated part), placeholders filled in."""
    commands = []
    for line in code.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()   # trailing comments
        for part in (p.strip() for p in line.split("&&")):
            if not SURGERY_COMMAND.match(part):
                continue
            part = re.sub(r"\[[^\]]*\]", "", part)      # optional arguments shown in brackets
            part = re.sub(r"\b(MODEL|SPEC|DIR)\b", lambda m: PLACEHOLDERS[m.group(1)], part)
            part = re.sub(r"^surgery\s", "python -m surgery ", part)
            commands.append(part)
    return commands


@pytest.mark.parametrize("block", params("bash"))
def test_bash_block_surgery_commands_run(block: Block, workdir):
    commands = surgery_commands(block.code)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(workdir)]), "HF_HUB_OFFLINE": "1"}
    for command in commands:
        result = subprocess.run(["bash", "-c", command.replace("python -m", f"{shlex.quote(sys.executable)} -m", 1)],
                                cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{block.id}: `{command}` exited {result.returncode}:\n{result.stderr[-3000:]}"


@pytest.mark.parametrize("block", params("yaml"))
def test_yaml_spec_block_loads(block: Block, tmp_path):
    import surgery
    for spec in (ROOT / "specs").glob("*.yaml"):   # docs/spec.md's examples include shipped specs by relative path
        (tmp_path / spec.name).write_text(spec.read_text())
    (tmp_path / "other.yaml").write_text(   # the format overview's `include: [other.yaml]` (a spec has rules)
        "rules:\n  - name: other\n    match: {role: attention.output}\n    action: insert_after\n"
        "    module: {kind: bottleneck, reduction_factor: 16}\n")
    path = tmp_path / "block.yaml"
    path.write_text(block.code)
    surgery.load_spec(path)
