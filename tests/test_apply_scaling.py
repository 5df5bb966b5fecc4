"""Apply's work grows linearly with depth, by a bounded amount per layer (issue 20: apply costs one block).

Counted, not timed: the Python function calls (and calls of C functions) `surgery.apply(model, "specs/lora.yaml")`
makes on LLaMA stacks of 4, 8 and 12 layers built on the meta device, in a process that has applied once
already (torch's one-time imports are not in the count). The export is of a two-layer prefix whatever the depth,
so what each extra layer adds is the unrolled copy of its graph, its analysis, its two LoRA sites and the walks
over its modules. Before the copy recipes, the create_node-free copy, the analysis' linear scans and the mark
elision a layer cost about 33,000 calls; after them about 16,000; now (a layer's kind read without nn.Module's own
bookkeeping, the analysis memoized per module stack, sites of role-less nodes built on first use) about 11,300;
with one walk of the model for its structure and fingerprint, no walk for CUDA generators on a model without
CUDA, and an order check of the unrolled graph in place of `Graph.lint`: about 10,700; the checks of the
layers beyond the prefix (stand-ins in the forward's loop, attribute kinds of functions, enums and held
objects) add about 800: 11,500.
"""
from __future__ import annotations

import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import surgery  # noqa: E402
import surgery.api  # noqa: E402

CALLS_PER_LAYER = 13_000


def _llama(layers: int):
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=128))


def _calls_of_apply(layers: int) -> int:
    model = _llama(layers)
    surgery.api._STRUCTURE_CACHE.clear()     # a model of the same shape would be answered from the process cache
    count = 0

    def profile(frame, event, arg):
        nonlocal count
        if event in ("call", "c_call"):
            count += 1
    sys.setprofile(profile)
    try:
        surgery.apply(model, "specs/lora.yaml")
    finally:
        sys.setprofile(None)
    assert len(model.surgery_adapters.records["default"].weight_sites) == 2 * layers
    return count


def test_apply_work_per_layer_is_bounded_and_linear(monkeypatch):
    monkeypatch.setenv("SURGERY_CACHE", "0")
    surgery.apply(_llama(3), "specs/lora.yaml")       # the process's first apply: torch's one-time work
    calls = {n: _calls_of_apply(n) for n in (4, 8, 12)}
    first, second = (calls[8] - calls[4]) / 4, (calls[12] - calls[8]) / 4
    assert first <= CALLS_PER_LAYER, f"{first:.0f} calls per layer ({calls})"
    # linear: a quadratic term (a scan over every layer for each layer) makes the second step the larger
    assert abs(second - first) <= 0.03 * first, f"per layer {first:.0f} then {second:.0f} ({calls})"
