"""Fuzzing: generated specs, valid and broken, either work or raise a SurgeryError; nothing else, no hang.

The generator knows the vocabulary (roles, actions, registered kinds and each kind's options from its JSON
Schema) and mixes it with wrong keys, types, values and layer strings, so that both valid and invalid specs are
common. Validation runs on many examples (it is cheap); apply runs on one LLaMA traced once (the analysis is
cached on the model), and after every example the model must be as it was: untouched after an error, and
restored by `surgery.remove` after a success.

The examples are derandomized so the suite is deterministic; `SURGERY_FUZZ=deep` runs many more, at random.
"""
from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from datetime import timedelta

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import surgery
from conftest import SPECS
from models import make_llama, state, token_ids
from surgery.modules.registry import kinds
from surgery.spec.load import validate_data
from surgery.spec.models import ACTIONS, BLOCKS, ROLES

DEEP = os.environ.get("SURGERY_FUZZ") == "deep"
COMMON = dict(database=None, deadline=timedelta(seconds=20), derandomize=not DEEP,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
EXAMPLE_TIME_LIMIT = 60          # seconds; an example running longer is a hang

junk_text = st.text(alphabet="abcdefgxyz_.:-*0123456789 ", max_size=12)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.floats(-2, 300), st.sampled_from([float("nan"), float("inf")]), junk_text)
anything = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(junk_text, inner, max_size=3)), max_leaves=6)


def maybe(strategy, junk=anything, p_junk=0.1):
    """Mostly `strategy`, sometimes anything at all."""
    return st.one_of(strategy, junk) if p_junk else strategy


def _value_for(schema: dict, valid: bool = True):
    """Values of one option from its JSON Schema: within its bounds when `valid`, anything of its type otherwise."""
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "anyOf" in schema:
        options = [s for s in schema["anyOf"] if not valid or s.get("type") not in ("object", "string")]
        return st.one_of([_value_for(s, valid) for s in options or schema["anyOf"]])
    kind = schema.get("type")
    low = schema.get("minimum", schema.get("exclusiveMinimum")) if valid else None
    high = schema.get("maximum", schema.get("exclusiveMaximum")) if valid else None
    if kind == "integer":
        low = -2 if low is None else int(low) + ("exclusiveMinimum" in schema)
        return st.integers(low, max(low, min(16 if valid else 96, 10 ** 6 if high is None else int(high))))
    if kind == "number":
        if valid:
            return st.floats(0.0 if low is None else low, 0.9 if high is None else high, exclude_min="exclusiveMinimum"
                             in schema, exclude_max="exclusiveMaximum" in schema)
        return st.one_of(st.floats(-1, 64), st.sampled_from([0.0, 0.5, float("inf"), float("nan")]))
    if kind == "boolean":
        return st.booleans()
    if kind == "string":
        return junk_text
    if kind == "null":
        return st.none()
    if kind == "object":
        return st.dictionaries(junk_text, scalars, max_size=2)
    return anything


def _shipped_rules() -> list[dict]:
    """Every rule of every shipped spec, as data: seeds the generator mutates."""
    out = []
    for path in sorted(SPECS.glob("*.yaml")):
        for rule in surgery.load_spec(path).rules:
            data = rule.model_dump(mode="json", by_alias=True, exclude_unset=True)
            data.pop("name", None)
            out.append(data)
    return out


SEEDS = _shipped_rules()
KIND_OPTIONS = {kind: cls.Options.model_json_schema()["properties"] for kind, cls in kinds().items()
                if not kind.startswith("test_")}
layer_values = st.one_of(st.sampled_from(["all", "-1:", "0:1", ":", "::2", "1", "-2:", "0:4", "5"]),
                         st.integers(-3, 3), st.lists(st.integers(-3, 3), max_size=3), junk_text)


@st.composite
def patterns(draw, depth=0):
    """Arbitrary patterns: roles, layers, module globs, ops, input sub-patterns and wrong keys."""
    pattern = {}
    if draw(st.booleans()):
        pattern["role"] = draw(maybe(st.one_of(st.sampled_from(ROLES), st.lists(st.sampled_from(ROLES), min_size=1,
                                                                                  max_size=3)), junk_text))
    if draw(st.integers(0, 3)) == 0:
        pattern["layers"] = draw(layer_values)
    if draw(st.integers(0, 5)) == 0:
        pattern["module"] = draw(st.sampled_from(["*.q_proj", "model.layers.0.*", "*mlp*", "nothing.*", "*"]))
    if draw(st.integers(0, 7)) == 0:
        pattern["op"] = draw(st.sampled_from(["linear", "add", "scaled_dot_product_attention", "mul", "nope"]))
    if depth == 0 and draw(st.integers(0, 9)) == 0:
        pattern["inputs"] = draw(st.lists(patterns(depth=1), max_size=2))
    if draw(st.integers(0, 11)) == 0:
        pattern[draw(st.sampled_from(["bind", "through", "roles", "layer"]))] = draw(scalars)
    return pattern


def _chance(draw, one_in: int) -> bool:
    """True about once in `one_in` draws (a middle value: hypothesis favours zero and the bounds)."""
    return draw(st.integers(0, one_in - 1)) == one_in // 2


@st.composite
def rules(draw):
    """A shipped rule with its options, layers and expectations varied, and, often, something broken."""
    rule = {k: (dict(v) if isinstance(v, dict) else v) for k, v in draw(st.sampled_from(SEEDS)).items()}
    module = rule.get("module")
    if module is not None:
        props = KIND_OPTIONS[module["kind"]]
        names = [n for n in props if n != "kind"]
        for name in draw(st.lists(st.sampled_from(names), max_size=2, unique=True)) if names else []:
            module[name] = draw(_value_for(props[name]))
    if _chance(draw, 3):
        rule["match"] = {**rule["match"], "layers": draw(st.sampled_from(["all", "-1:", "0:1", 0, 1, [0, 1]]))}
    if _chance(draw, 4):
        rule["expect"] = draw(st.sampled_from(["every_layer", "any", 1, 2, 4]))
    if _chance(draw, 4):
        rule["name"] = draw(st.sampled_from(["a", "b", "adapter"]))
    if _chance(draw, 4):   # break something
        breakage = draw(st.sampled_from(["option", "kind", "action", "match", "key", "drop", "value", "extra"]))
        if breakage == "option" and module is not None:
            props = KIND_OPTIONS[module["kind"]]
            name = draw(st.sampled_from(sorted(props)))
            module[name] = draw(maybe(_value_for(props[name], valid=False)))
        elif breakage == "kind" and module is not None:
            module["kind"] = draw(st.one_of(st.sampled_from(sorted(KIND_OPTIONS)), junk_text, scalars))
        elif breakage == "action":
            rule["action"] = draw(st.sampled_from(ACTIONS + ("explode",)))
        elif breakage == "match":
            rule["match"] = draw(maybe(patterns(), p_junk=0.1))
        elif breakage == "key":
            (module if module is not None and draw(st.booleans()) else rule)[draw(junk_text)] = draw(scalars)
        elif breakage == "drop":
            rule.pop(draw(st.sampled_from(sorted(rule))))
        elif breakage == "value":
            rule[draw(st.sampled_from(sorted(rule)))] = draw(anything)
        else:
            extras = {"through": st.lists(st.sampled_from(["dropout", "add", "x"]), max_size=2),
                      "params": st.lists(st.sampled_from(["weight", "bias", "all", "grad"]), max_size=2),
                      "realize": st.sampled_from(["auto", "activation", "weight", "lazy"]),
                      "from": patterns(depth=1), "expect": st.sampled_from(["all", -1, 0, 7, 1.5])}
            key = draw(st.sampled_from(sorted(extras)))
            rule[key] = draw(extras[key])
    return rule


@st.composite
def specs(draw):
    spec = {"rules": draw(st.lists(rules(), min_size=0 if _chance(draw, 8) else 1, max_size=3))}
    if _chance(draw, 8):
        spec["version"] = draw(st.sampled_from([1, 2, "1"]))
    if _chance(draw, 8):
        block = draw(st.sampled_from(BLOCKS + ("mix",)))
        spec["compose"] = draw(st.one_of(st.just({block: ["default", "other"]}), junk_text,
                                         st.just({block: ["default"], "weights": draw(scalars)})))
    if _chance(draw, 10):
        spec[draw(junk_text)] = draw(scalars)
    if _chance(draw, 30):
        return draw(st.one_of(st.lists(scalars, max_size=2), scalars))     # not a mapping at all
    return spec


@contextmanager
def time_limit(seconds: int):
    """Turn a hang into a failure (SIGALRM: the main thread on Unix, where the suite runs)."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"an example ran longer than {seconds} s")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@settings(max_examples=2000 if DEEP else 300, **COMMON)
@given(specs())
def test_validate_data_accepts_or_raises_spec_error(data):
    try:
        spec = validate_data(data)
    except surgery.SpecError as exc:
        assert str(exc).strip()                          # a message, every problem with its key path
        return
    assert isinstance(spec, surgery.Spec)


@pytest.fixture(scope="module")
def fuzz_model():
    """One LLaMA for every apply example, traced once here (outside the examples' deadline): the analysis is
    cached on the model object."""
    model = make_llama().eval()
    surgery.plan(model, {"rules": [{"match": {"role": "ffn.out"}, "action": "train"}]})
    return model, state(model), token_ids(1, 6)


@settings(max_examples=1000 if DEEP else 50, **COMMON)
@given(specs())
def test_apply_succeeds_or_raises_surgery_error_and_leaves_the_model_as_it_was(fuzz_model, data):
    model, before, ids = fuzz_model
    with time_limit(EXAMPLE_TIME_LIMIT):
        try:
            surgery.apply(model, data)
        except surgery.SurgeryError as exc:
            assert str(exc).strip()
            after = state(model)
            assert after["modules"] == before["modules"] and after["hooks"] == before["hooks"]
            assert after["flags"] == before["flags"]
            assert all(torch.equal(v, after["params"][k]) for k, v in before["params"].items())
            return
        try:
            try:
                model(input_ids=ids)                     # what applied also runs
            except surgery.SurgeryError as exc:          # a LoftQ init runs only once the base is quantized
                assert "quantize_nf4" in str(exc), exc
        finally:
            if hasattr(model, "surgery_adapters"):
                for name in list(model.surgery_adapters.records):
                    surgery.remove(model, name)
            for p in model.parameters():                 # apply froze the base; the next example starts from scratch
                p.requires_grad_(True)
    after = state(model)
    assert after["modules"] == before["modules"] and after["hooks"] == before["hooks"]
    assert all(torch.equal(v, after["params"][k]) for k, v in before["params"].items())


# ---------------------------------------------------------------- hostile input, by kind (issue 19)
#
# Each generator below mixes valid and hostile input of one kind. Every example must end in success or a
# SurgeryError, leave the model as it was on error, stay within a time limit and a memory growth limit, and
# write nothing outside its target directory. Each test also counts the valid mutations (those the
# generator knows to be valid) and requires a share of them to succeed, so a change that refuses everything
# fails too.

import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

from surgery.spec.load import MAX_INCLUDE_DEPTH, MAX_NESTING  # noqa: E402
from surgery.spec.models import NAME_PATTERN  # noqa: E402

HOSTILE = dict(max_examples=200 if DEEP else 25, **COMMON)
MEMORY_GROWTH_LIMIT = 1 << 30    # bytes of peak RSS one example may add
FUZZ_MEMORY_LIMIT = "64MiB"      # what apply may allocate for adapters in these tests


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _unchanged(before, model):
    after = state(model)
    assert after["modules"] == before["modules"] and after["hooks"] == before["hooks"]
    assert after["flags"] == before["flags"]
    assert all(torch.equal(v, after["params"][k]) for k, v in before["params"].items())


def _clear(model):
    if hasattr(model, "surgery_adapters"):
        for name in list(model.surgery_adapters.records):
            surgery.remove(model, name)
    for p in model.parameters():
        p.requires_grad_(True)


def _tree(root: Path) -> dict:
    """Every file under root with its bytes (symlinks by their target): to check nothing else was written."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p)] = ("link", os.readlink(p))
        elif p.is_file():
            out[str(p)] = p.read_bytes()
    return out


def _try_apply(model, data, ids, stats, valid: bool, **kwargs):
    """Apply; on success the output is finite and `remove` restores the model; on error nothing changed."""
    before = state(model)
    peak = _peak_rss()
    with time_limit(EXAMPLE_TIME_LIMIT), warnings.catch_warnings():
        warnings.simplefilter("ignore", surgery.SurgeryWarning)
        try:
            surgery.apply(model, data, memory_limit=FUZZ_MEMORY_LIMIT, **kwargs)
        except surgery.SurgeryError as exc:
            assert str(exc).strip()
            _unchanged(before, model)
            stats["refused"] += 1
            stats["valid refused"] += valid
            return False
        try:
            with torch.no_grad():
                out = model(input_ids=ids)
            logits = out.logits if hasattr(out, "logits") else out[0]
            assert torch.isfinite(logits).all(), "applied, and the output is not finite"
        finally:
            _clear(model)
    assert _peak_rss() - peak < MEMORY_GROWTH_LIMIT
    _unchanged(before, model)
    stats["applied"] += 1
    stats["valid applied"] += valid
    return True


HOSTILE_NUMBERS = [float("inf"), float("-inf"), float("nan"), 1e308, -1e308, 1e5, 10 ** 12, 2 ** 63, True, False]


@st.composite
def value_mutations(draw):
    """A shipped rule with one number option set to a hostile value (or to a valid one: `valid` is True)."""
    rule = {k: (dict(v) if isinstance(v, dict) else v) for k, v in draw(st.sampled_from(SEEDS)).items()}
    module = rule.get("module")
    numbers = [n for n, s in KIND_OPTIONS[module["kind"]].items()
               if {a.get("type") for a in s.get("anyOf", [s])} & {"integer", "number"}] if module else []
    if not numbers:
        return {"rules": [rule]}, True
    name = draw(st.sampled_from(numbers))
    valid = draw(st.booleans())
    if valid:
        module[name] = draw(_value_for(KIND_OPTIONS[module["kind"]][name]))
        return {"rules": [rule]}, not isinstance(module[name], (dict, str))
    module[name] = draw(st.sampled_from(HOSTILE_NUMBERS))
    return {"rules": [rule]}, False


def test_hostile_values_are_refused_or_keep_the_output_finite(fuzz_model):
    """Non-finite, huge and boolean numbers in every number option: refused at validation or by the memory
    limit, never an apply whose output is inf/NaN or that allocates past the limit."""
    model, _, ids = fuzz_model
    stats = Counter()

    @settings(**HOSTILE)
    @given(value_mutations())
    def run(case):
        data, valid = case
        stats["valid"] += valid
        _try_apply(model, data, ids, stats, valid)
    run()
    print(f"test_hostile_values_are_refused_or_keep_the_output_finite: {dict(stats)}")
    assert stats["valid"] >= 5, stats
    assert stats["valid applied"] >= 0.6 * stats["valid"], stats


@st.composite
def include_graphs(draw):
    """Up to 7 spec files with includes between them: trees, diamonds, cycles, self-includes, paths with `..`,
    absolute paths, missing files and chains deeper than the limit. Returns (files, valid): valid when every
    file is included at most once, by a relative path inside the root, without cycles, within the depth limit."""
    n = draw(st.integers(1, 7))
    files = {i: [] for i in range(n)}
    parents = Counter()
    odd = False
    for i in range(n):
        for _ in range(draw(st.integers(0, 3))):
            kind = draw(st.sampled_from(["child"] * 8 + ["any", "outside", "absolute", "missing"]))
            if kind == "child" and i + 1 < n:
                j = draw(st.integers(i + 1, n - 1))
                files[i].append(f"f{j}.yaml")
                parents[j] += 1
            elif kind == "any":
                j = draw(st.integers(0, n - 1))
                files[i].append(f"f{j}.yaml")
                parents[j] += 1
                odd = odd or j <= i          # a cycle or a self-include
            elif kind == "outside":
                files[i].append("../outside.yaml")
                odd = True
            elif kind == "absolute":
                files[i].append("/etc/hostname")
                odd = True
            elif kind == "missing":
                files[i].append("nope.yaml")
                odd = True
    if _chance(draw, 8):   # a chain deeper than the limit
        n0 = len(files)
        for k in range(MAX_INCLUDE_DEPTH + 2):
            files[n0 + k] = [f"f{n0 + k + 1}.yaml"] if k < MAX_INCLUDE_DEPTH + 1 else []
            parents[n0 + k + 1] += 1
        files[0].append(f"f{n0}.yaml")
        parents[n0] += 1
        odd = True
    valid = not odd and all(c <= 1 for c in parents.values())
    return files, valid


def test_include_graphs_load_once_each_within_limits(tmp_path_factory):
    stats = Counter()

    @settings(**{**HOSTILE, "max_examples": 300 if DEEP else 60})
    @given(include_graphs())
    def run(case):
        files, valid = case
        root = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
        specs = root / "specs"
        specs.mkdir()
        (root / "outside.yaml").write_text("rules:\n  - {name: outside, match: {role: norm}, action: train}\n")
        for i, includes in files.items():
            text = (f"include: {json.dumps(includes)}\n" if includes else "")
            text += f"rules:\n  - {{name: f{i}, match: {{role: norm}}, action: train}}\n"
            (specs / f"f{i}.yaml").write_text(text)
        before = _tree(root)
        with time_limit(10):
            try:
                spec = surgery.load_spec(specs / "f0.yaml")
            except surgery.SpecError as exc:
                assert str(exc).strip()
                stats["refused"] += 1
                assert not valid, f"a valid include graph was refused: {exc}"
            else:
                stats["loaded"] += 1
                reachable, todo, deepest = {0}, [(0, 0)], 0
                while todo:
                    i, depth = todo.pop()
                    deepest = max(deepest, depth)
                    for p in files[i]:
                        if p.startswith("f") and int(p[1:-5]) not in reachable:
                            reachable.add(int(p[1:-5]))
                            todo.append((int(p[1:-5]), depth + 1))
                escapes = any(p in ("../outside.yaml", "/etc/hostname") for i in reachable for p in files[i])
                assert not escapes, f"an include outside the spec's directory was followed: {files}"
                assert deepest <= MAX_INCLUDE_DEPTH, f"includes {deepest} deep were followed"
                assert {r.name for r in spec.rules} == {f"f{i}" for i in reachable}
        assert _tree(root) == before
        stats["valid"] += valid
        shutil.rmtree(root)
    run()
    print(f"test_include_graphs_load_once_each_within_limits: {dict(stats)}")
    assert stats["valid"] >= 10 and stats["loaded"] >= stats["valid"], stats


@st.composite
def nested_specs(draw):
    """Spec text whose rule nests input patterns `depth` deep (valid up to the nesting limit), or holds a list
    nested `depth` deep under an unknown key; as JSON or as YAML flow. Built as text: no deep Python object."""
    depth = draw(st.one_of(st.integers(1, 12), st.integers(MAX_NESTING - 8, MAX_NESTING + 2),
                           st.integers(100, 20000)))
    as_inputs = draw(st.booleans())
    if as_inputs:
        pattern = '{"inputs": [' * depth + '{"op": "linear"}' + "]}" * depth
        rule = f'{{"name": "deep", "match": {{"role": "ffn.out", "inputs": [{pattern}]}}, "action": "train", ' \
               f'"expect": "any"}}'
    else:
        rule = '{"name": "deep", "match": {"role": "ffn.out"}, "action": "train", "junk": ' + "[" * depth + "1" \
               + "]" * depth + "}"
    text = '{"rules": [' + rule + "]}"
    levels, deepest = 0, 0
    for ch in text:
        levels += ch in "[{"
        levels -= ch in "]}"
        deepest = max(deepest, levels)
    return text, draw(st.sampled_from([".json", ".yaml"])), as_inputs and deepest <= MAX_NESTING


def test_nesting_is_limited_without_recursion_errors(tmp_path_factory):
    stats = Counter()

    @settings(**{**HOSTILE, "max_examples": 200 if DEEP else 40})
    @given(nested_specs())
    def run(case):
        text, suffix, valid = case
        path = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp())) / f"deep{suffix}"
        path.write_text(text)
        with time_limit(20):
            try:
                surgery.load_spec(path)
            except surgery.SpecError as exc:   # a RecursionError would fail the test
                assert str(exc).strip()
                assert not valid, str(exc)
                stats["refused"] += 1
                return
        assert valid, "loaded a spec with an unknown key or nested beyond the limit"
        stats["valid"] += 1
    run()
    print(f"test_nesting_is_limited_without_recursion_errors: {dict(stats)}")
    assert stats["valid"] >= 3, stats


NAME_CHARS = "ab_-09./ :\\\x00é*\n"


@st.composite
def hostile_names(draw):
    if draw(st.booleans()):   # half of them valid: A-Z a-z 0-9 _ -, not starting with -
        return draw(st.text(alphabet="abcXYZ019_-", min_size=1, max_size=12).filter(lambda n: n[0] != "-"))
    return draw(st.one_of(st.sampled_from(["", "-", "trained", "a" * 64, "a" * 65, "a/b", "a.b", "..", "default",
                                           "x-1", "X_2"]),
                          st.text(alphabet=NAME_CHARS, min_size=0, max_size=8)))


def test_hostile_names_are_checked_and_keys_never_collide(fuzz_model, tmp_path_factory):
    """Adapter and rule names from a hostile alphabet: valid names (NAME_PATTERN) apply, save and load back
    with one tensor per live tensor; others are refused with the name in the message."""
    model, _, ids = fuzz_model
    stats = Counter()

    @settings(**{**HOSTILE, "max_examples": 100 if DEEP else 20})
    @given(hostile_names(), hostile_names())
    def run(adapter, rule):
        valid = bool(NAME_PATTERN.match(adapter or "default")) and all(
            NAME_PATTERN.match(n) and n != "trained" for n in (rule, rule + "2"))
        data = {"rules": [{"name": rule, "match": {"role": "attention.q"}, "action": "wrap",
                           "module": {"kind": "lora", "r": 2}},
                          {"name": rule + "2", "match": {"role": "attention.v"}, "action": "wrap",
                           "module": {"kind": "lora", "r": 2}}]}
        before = state(model)
        out_dir = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
        try:
            surgery.apply(model, data, name=adapter or None, memory_limit=FUZZ_MEMORY_LIMIT)
        except surgery.SurgeryError as exc:
            assert not valid, f"valid names {adapter!r}, {rule!r} refused: {exc}"
            _unchanged(before, model)
            stats["refused"] += 1
            return
        assert valid, f"names {adapter!r}, {rule!r} accepted"
        try:
            from surgery.io.checkpoint import surgery_tensors
            live = surgery_tensors(model)
            surgery.save(model, out_dir / "ckpt")
            from safetensors.torch import load_file
            assert len(load_file(str(out_dir / "ckpt" / "adapters.safetensors"))) == len(live) == 8
        finally:
            _clear(model)
        surgery.load(model, out_dir / "ckpt")
        _clear(model)
        _unchanged(before, model)
        stats["valid"] += 1
    run()
    print(f"test_hostile_names_are_checked_and_keys_never_collide: {dict(stats)}")
    assert stats["valid"] >= 3, stats


MANIFEST_PATHS = ["../adapters.safetensors", "/etc/hostname", "a/../../x", "", ".", "manifest.json", "link",
                  "sub/../default.spec.yaml", "default.spec.yaml", "adapters.safetensors", "\x00", "nope"]


@st.composite
def manifest_mutations(draw):
    """A saved manifest with one field replaced: a hostile path, a value of another type, a deep nesting, or a
    harmless change (an unknown extra field): `valid` is True only for the harmless ones."""
    where = draw(st.sampled_from(["spec", "tensors.file", "name", "adapters", "tensors", "aliases", "base",
                                  "parameters", "active", "format_version", "extra", "extra", "deep"]))
    if where in ("spec", "tensors.file"):
        value = draw(st.sampled_from(MANIFEST_PATHS))
    elif where == "deep":
        value = draw(st.integers(10, 5000))
    else:
        value = draw(anything)
    return where, value


def test_hostile_manifests_and_paths_load_only_inside_the_directory(fuzz_model, tmp_path_factory):
    model, _, ids = fuzz_model
    stats = Counter()
    base = tmp_path_factory.mktemp("manifests")
    surgery.apply(model, {"rules": [{"name": "q", "match": {"role": "attention.q"}, "action": "wrap",
                                     "module": {"kind": "lora", "r": 2}}]})
    try:
        surgery.save(model, base / "saved")
    finally:
        _clear(model)
    original = json.loads((base / "saved" / "manifest.json").read_text())

    @settings(**{**HOSTILE, "max_examples": 150 if DEEP else 30})
    @given(manifest_mutations())
    def run(case):
        where, value = case
        root = Path(tempfile.mkdtemp(dir=base))
        shutil.copytree(base / "saved", root / "ckpt")
        (root / "ckpt" / "link").symlink_to(root / "secret.spec.yaml")
        (root / "secret.spec.yaml").write_text((root / "ckpt" / "default.spec.yaml").read_text())
        manifest = json.loads(json.dumps(original))
        valid = where == "extra"
        if where == "spec":
            manifest["adapters"][0]["spec"] = value
            valid = value == "default.spec.yaml"
        elif where == "tensors.file":
            manifest["tensors"]["file"] = value
            valid = value == "adapters.safetensors"
        elif where == "name":
            manifest["adapters"][0]["name"] = value
        elif where in ("adapters", "tensors", "base", "active", "format_version"):
            manifest[where] = value
        elif where == "aliases":
            manifest["tensors"]["aliases"] = value
        elif where == "parameters":
            manifest["base"]["parameters"] = value
        elif where == "extra":
            manifest["comment"] = value
        text = json.dumps(manifest)
        if where == "deep":
            text = text[:-1] + ', "deep": ' + "[" * value + "]" * value + "}"
        (root / "ckpt" / "manifest.json").write_text(text)
        before, files = state(model), _tree(root)
        with time_limit(EXAMPLE_TIME_LIMIT):
            try:
                surgery.load(model, root / "ckpt")
            except surgery.SurgeryError as exc:
                assert str(exc).strip()
                _unchanged(before, model)
                stats["refused"] += 1
                stats["valid refused"] += valid
            else:
                assert valid or where not in ("spec", "tensors.file"), f"loaded with {where} = {value!r}"
                stats["loaded"] += 1
                stats["valid loaded"] += valid
                _clear(model)
                _unchanged(before, model)
        assert _tree(root) == files            # load writes nothing
        stats["valid"] += valid
        shutil.rmtree(root)
    run()
    print(f"test_hostile_manifests_and_paths_load_only_inside_the_directory: {dict(stats)}")
    assert stats["valid"] >= 3 and stats["valid loaded"] >= 0.8 * stats["valid"], stats


@st.composite
def hostile_targets(draw):
    """Save targets: a fresh directory, an existing file, a path under a file, a directory holding symlinks
    named like the files save writes (and their temporary files) pointing at a file outside."""
    return draw(st.sampled_from(["fresh", "file", "under_file", "links", "links", "existing"]))


def test_save_writes_only_inside_its_directory(fuzz_model, tmp_path_factory):
    model, _, ids = fuzz_model
    stats = Counter()
    base = tmp_path_factory.mktemp("targets")

    @settings(**{**HOSTILE, "max_examples": 60 if DEEP else 12})
    @given(hostile_targets())
    def run(kind):
        root = Path(tempfile.mkdtemp(dir=base))
        victim = root / "victim"
        victim.write_text("precious")
        target = root / "out"
        if kind == "file":
            target.write_text("a file")
        elif kind == "under_file":
            (root / "f").write_text("a file")
            target = root / "f" / "out"
        elif kind in ("links", "existing"):
            target.mkdir()
            if kind == "links":
                for name in ("manifest.json", "adapters.safetensors", "default.spec.yaml", "manifest.json.tmp",
                             "adapters.safetensors.tmp", "default.spec.yaml.tmp"):
                    (target / name).symlink_to(victim)
        outside = {k: v for k, v in _tree(root).items() if not k.startswith(str(target) + os.sep)}
        surgery.apply(model, {"rules": [{"name": "q", "match": {"role": "attention.q"}, "action": "wrap",
                                         "module": {"kind": "lora", "r": 2}}]})
        try:
            surgery.save(model, target)
        except surgery.SurgeryError as exc:
            assert kind in ("file", "under_file"), exc
            stats["refused"] += 1
        else:
            assert kind not in ("file", "under_file")
            stats["saved"] += 1
        finally:
            _clear(model)
        now = {k: v for k, v in _tree(root).items() if not k.startswith(str(target) + os.sep)}
        assert now == outside, "save wrote outside its directory"
        assert victim.read_text() == "precious"
    run()
    print(f"test_save_writes_only_inside_its_directory: {dict(stats)}")
    assert stats["saved"] >= 3, stats
