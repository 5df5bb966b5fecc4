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
            model(input_ids=ids)                         # what applied also runs
        finally:
            if hasattr(model, "surgery_adapters"):
                for name in list(model.surgery_adapters.records):
                    surgery.remove(model, name)
            for p in model.parameters():                 # apply froze the base; the next example starts from scratch
                p.requires_grad_(True)
    after = state(model)
    assert after["modules"] == before["modules"] and after["hooks"] == before["hooks"]
    assert all(torch.equal(v, after["params"][k]) for k, v in before["params"].items())
