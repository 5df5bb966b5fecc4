"""Source lines are recorded only where a rewrite needs them.

Recording every node's `stack_trace` is about a quarter of torch.export's time, and only the interception of
torch-level calls no module boundary carries (a parallel block's attention + MLP sum: GPT-J) reads it. So
`surgery.apply` traces without them, and where a site needs them the rewrite raises NeedsStackTraces: the model
is put back as it was, with the random states the adapters drew from, and apply starts over on a graph traced
with them. The adapters are the ones a single attempt makes.
"""
from __future__ import annotations

import collections

import pytest
import torch

import surgery
import surgery.api
from tests.architectures import ARCHITECTURES


@pytest.fixture
def new_process(monkeypatch):
    monkeypatch.setenv("SURGERY_CACHE", "0")
    monkeypatch.setattr(surgery.api, "_STRUCTURE_CACHE", collections.OrderedDict())


def test_a_model_whose_sites_are_module_boundaries_is_traced_without_source_lines(new_process):
    model, inputs, _ = ARCHITECTURES["llama"]()
    surgery.apply(model, "specs/pfeiffer.yaml")
    traced = surgery.api._analysis(model, None).traced
    assert traced.stack_traces is False
    assert not any(n.meta.get("stack_trace") for n in traced.graph.nodes)


def test_a_parallel_block_retraces_with_source_lines_and_makes_the_adapters_of_one_attempt(new_process):
    model, inputs, _ = ARCHITECTURES["gptj"]()
    torch.manual_seed(7)
    surgery.apply(model, "specs/pfeiffer.yaml")       # FFN adapter on residual + attention + MLP: an intercepted add
    assert surgery.api._analysis(model, None).traced.stack_traces is True
    after = torch.rand(1)

    again, _, _ = ARCHITECTURES["gptj"]()
    surgery.api._analysis(again, None, stack_traces=True)     # source lines from the start: one attempt
    torch.manual_seed(7)
    surgery.apply(again, "specs/pfeiffer.yaml")
    assert torch.equal(torch.rand(1), after)          # the retry left the generator where one attempt leaves it
    for (name, a), (_, b) in zip(model.surgery_adapters.named_parameters(),
                                 again.surgery_adapters.named_parameters()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, again(**inputs).logits, rtol=0, atol=0)
