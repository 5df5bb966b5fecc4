"""The on-disk trace cache (surgery/trace/cache.py): a model traced once is read back in a new process (no
torch.export), with the same plan; stale, truncated, altered or foreign entries are rebuilt, never trusted;
SURGERY_CACHE=0 turns it off; writes are atomic and stay inside the cache directory."""
from __future__ import annotations

import collections
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import surgery
import surgery.api
import surgery.trace
from models import ARCHS, example_inputs
from surgery.analyze import analyze
from surgery.match import match_spec
from surgery.spec import spec_from
from surgery.trace import cache

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "specs").glob("*.yaml"))


@pytest.fixture
def cache_on(tmp_path, monkeypatch):
    """The cache on, in a temporary directory, and no process-level structure cache: each model is "new"."""
    directory = tmp_path / "cache"
    monkeypatch.setenv("SURGERY_CACHE", "1")
    monkeypatch.setenv("SURGERY_CACHE_DIR", str(directory))
    monkeypatch.setattr(surgery.api, "_STRUCTURE_CACHE", collections.OrderedDict())
    return directory


@pytest.fixture
def traces(monkeypatch):
    """Counts the calls of surgery.trace.trace (what the cache saves)."""
    calls = []
    real = surgery.trace.trace

    def counted(model, example_inputs=None, **kwargs):
        calls.append(type(model).__name__)
        return real(model, example_inputs, **kwargs)
    monkeypatch.setattr(surgery.trace, "trace", counted)
    return calls


def rows(model, spec, example=None):
    return [m.as_row() for m in surgery.plan(model, spec, example_inputs=example)]


def fresh(name):
    torch.manual_seed(0)
    model = ARCHS[name]()
    return model, example_inputs(name, model)


def entries(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.trace"))


def new_process(monkeypatch):
    """What a new process has: no process-level cache of the analysis."""
    monkeypatch.setattr(surgery.api, "_STRUCTURE_CACHE", collections.OrderedDict())


@pytest.mark.parametrize("name", ["minigpt", pytest.param("llama", marks=pytest.mark.slow)])
def test_a_new_process_reads_the_trace_and_plans_the_same(name, cache_on, traces, monkeypatch, caplog):
    model, example = fresh(name)
    first = rows(model, "lora", example)
    assert traces == [type(model).__name__] and len(entries(cache_on)) == 1
    new_process(monkeypatch)
    again, example = fresh(name)
    with caplog.at_level(logging.INFO, logger="surgery"):
        second = rows(again, "lora", example)
    assert traces == [type(model).__name__]           # not traced again
    assert any("read from the cache" in r.getMessage() for r in caplog.records)
    assert second == first
    surgery.apply(again, "lora", example_inputs=example)   # and it applies
    assert surgery.trainable_parameters(again)[0] > 0


def test_the_cache_off_reads_and_writes_nothing(cache_on, traces, monkeypatch):
    monkeypatch.setenv("SURGERY_CACHE", "0")
    for _ in range(2):
        new_process(monkeypatch)
        model, example = fresh("minigpt")
        rows(model, "lora", example)
    assert len(traces) == 2
    assert not cache_on.exists()


def _corrupt_header(path):
    path.write_bytes(b"not a trace\n" + path.read_bytes())


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def _flip_a_payload_byte(path):
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))


def _other_key(path):
    """A valid entry of another model renamed to this key: its header names the other key."""
    payload = path.read_bytes().partition(b"\n")[2]
    path.write_bytes(cache._header("0" * 64, payload) + payload)


def _valid_checksum_bad_content(path):
    """A payload whose SHA-256 is right but whose graph cannot be rebuilt (an operator that does not exist)."""
    import json
    import zlib
    key = path.stem
    data = json.loads(zlib.decompress(path.read_bytes().partition(b"\n")[2]))
    op = next(n for n in data["nodes"] if isinstance(n[2], dict))
    op[2] = {"op": ["aten", "no_such_operator", "default"]}
    payload = zlib.compress(json.dumps(data).encode())
    path.write_bytes(cache._header(key, payload) + payload)


@pytest.mark.parametrize("damage", [_corrupt_header, _truncate, _flip_a_payload_byte, _other_key,
                                    _valid_checksum_bad_content, lambda p: p.write_bytes(b"")])
def test_a_damaged_entry_is_rebuilt_not_trusted(damage, cache_on, traces, monkeypatch):
    model, example = fresh("minigpt")
    first = rows(model, "lora", example)
    [path] = entries(cache_on)
    damage(path)
    new_process(monkeypatch)
    again, example = fresh("minigpt")
    assert rows(again, "lora", example) == first
    assert len(traces) == 2                          # traced again...
    assert entries(cache_on) == [path]               # ...and written again, now valid
    new_process(monkeypatch)
    third, example = fresh("minigpt")
    assert rows(third, "lora", example) == first and len(traces) == 2


def test_a_stale_entry_is_not_used(cache_on, traces, monkeypatch):
    """Another torch (or surgery, transformers) version, another structure or another source file: another key."""
    model, example = fresh("minigpt")
    rows(model, "lora", example)
    new_process(monkeypatch)
    versions = cache._versions
    monkeypatch.setattr(cache, "_versions", lambda: {**versions(), "torch": "0.0.0"})
    again, example = fresh("minigpt")
    rows(again, "lora", example)
    assert len(traces) == 2 and len(entries(cache_on)) == 2
    monkeypatch.setattr(cache, "_versions", versions)
    new_process(monkeypatch)
    wider = surgery.example_models.minigpt(vocab_size=120, hidden_dim=32, n_layers=2, n_heads=4, seq_len=32)
    rows(wider, "lora", wider.example_inputs())
    assert len(traces) == 3
    source = [p for p, _ in cache._class_sources(model)]
    assert "surgery.example_models.MiniGPT" in source   # the model's own code is part of the key


def test_a_model_class_without_a_source_file_is_not_cached(cache_on, traces, monkeypatch):
    namespace = {}
    exec("import torch\nclass Tiny(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
         "        self.fc = torch.nn.Linear(4, 4)\n    def forward(self, x):\n        return self.fc(x)\n", namespace)
    for _ in range(2):
        new_process(monkeypatch)
        surgery.plan(namespace["Tiny"](), {"rules": [
            {"match": {"module": "fc"}, "action": "wrap", "module": {"kind": "lora"}}]},
            example_inputs=(torch.randn(2, 4),))
    assert traces == ["Tiny", "Tiny"]
    assert not cache_on.exists() or not entries(cache_on)


def test_writes_are_atomic_and_stay_in_the_cache_directory(cache_on, monkeypatch):
    replaced = []
    real_replace = os.replace

    def recording(src, dst):
        replaced.append((Path(src), Path(dst)))
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", recording)
    model, example = fresh("minigpt")
    rows(model, "lora", example)
    [(src, dst)] = replaced
    assert src.parent == dst.parent == cache_on and src.name.startswith(".tmp-") and dst.suffix == ".trace"
    assert {p for p in cache_on.rglob("*")} == {dst}        # nothing else, nothing outside
    for key in ("../escape", "/etc/passwd", "a" * 63, "G" * 64):
        with pytest.raises(ValueError):
            cache._path(key)

    def failing(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", failing)
    new_process(monkeypatch)
    dst.unlink()
    other, example = fresh("minigpt")
    rows(other, "lora", example)                         # a failed write costs nothing but the entry
    assert list(cache_on.iterdir()) == []               # and leaves no temporary file


def _round_trip_plans(model, example):
    """Every shipped spec's matches (or error) on the fresh trace and on the trace read back from its entry."""
    traced = surgery.trace.trace(model, example)
    import json
    import zlib
    payload = zlib.compress(json.dumps(cache.encode(traced)).encode())
    back = cache.decode(json.loads(zlib.decompress(payload)), model)
    results = []
    for analysis in (analyze(traced), analyze(back)):
        out = {}
        for path in SPECS:
            try:
                out[path.name] = [[m.as_row() for m in ms] for ms in match_spec(spec_from(path), analysis)]
            except surgery.SurgeryError as exc:
                out[path.name] = f"{type(exc).__name__}: {exc}"
        results.append(out)
    assert set(traced.boundaries and [v.name for v in traced.boundaries]) == {v.name for v in back.boundaries}
    assert [b for bs in traced.boundaries.values() for b in bs] == [b for bs in back.boundaries.values() for b in bs]
    return results


@pytest.mark.parametrize("name", ["minigpt", "llama", *(pytest.param(n, marks=pytest.mark.slow) for n in ("bert", "gpt2"))])
def test_the_read_back_trace_plans_every_shipped_spec_the_same(name):
    model, example = fresh(name)
    fresh_plans, cached_plans = _round_trip_plans(model, example)
    assert cached_plans == fresh_plans


def _architectures():
    sys.path.insert(0, str(Path(__file__).parent))
    from architectures import ARCHITECTURES
    return sorted(ARCHITECTURES)


@pytest.mark.slow
@pytest.mark.parametrize("arch", _architectures())
def test_every_architecture_plans_the_same_from_the_cache(arch):
    from architectures import ARCHITECTURES
    model, inputs, _ = ARCHITECTURES[arch]()
    fresh_plans, cached_plans = _round_trip_plans(model, inputs)
    assert cached_plans == fresh_plans


@pytest.mark.slow
def test_the_command_line_in_a_second_process_does_not_trace(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SURGERY_CACHE": "1", "SURGERY_CACHE_DIR": str(tmp_path)}
    outs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-m", "surgery", "inspect", "examples.models:minigpt", "--spec", "lora"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        outs.append(done)
    assert "(torch.export)" in outs[0].stderr and "read from the cache" not in outs[0].stderr
    assert "(torch.export)" not in outs[1].stderr and "read from the cache" in outs[1].stderr
    assert outs[0].stdout == outs[1].stdout


def test_code_next_to_the_model_class_is_part_of_the_key(tmp_path, monkeypatch):
    """A helper the forward calls from a file beside the model's class: editing it gives another key."""
    package = tmp_path / "cache_key_models"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helpers.py").write_text("def act(x):\n    return x.relu()\n")
    (package / "model.py").write_text(
        "import torch\nfrom cache_key_models.helpers import act\n\n"
        "class Net(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.fc = torch.nn.Linear(4, 4)\n\n    def forward(self, x):\n        return act(self.fc(x))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from cache_key_models.model import Net
    model = Net()
    fingerprint = surgery.api._fingerprint(model, None)
    before = cache.entry_key(model, fingerprint)
    assert cache.entry_key(Net(), surgery.api._fingerprint(Net(), None)) == before     # deterministic
    (package / "helpers.py").write_text("def act(x):\n    return x.tanh()\n")
    assert cache.entry_key(model, fingerprint) != before
