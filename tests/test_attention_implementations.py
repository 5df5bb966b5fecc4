"""Eager attention computes what SDPA computes, so the same adapters with the same weights must give the same
output under either (`model.set_attn_implementation("eager")`, what a user sets for `output_attentions=True`).
Eager attention runs the model's own softmax and F.dropout calls: a functional intercept that counted one of them
wrongly (an FFN adapter at the n-th F.dropout beside a prefix: OPT, BART) or a role read off their graph (BART's
last cross-attention read as self-attention) differed only there. A differential test over architectures of the
matrix whose attention has both implementations, for the specs whose sites eager attention moves: 17 of these
48 cells differed (OPT, BART, T5, Whisper; 0.1-0.8 apart). Over the whole matrix (37 architectures with both x
prefix, llama_adapter, mam, unipelt, houlsby, parallel, loreft, prompt, lora) 336 cells are equal within 1e-4
(MiniMax's lightning layers refuse under both); here a representative subset."""
from __future__ import annotations

import copy

import pytest
import torch

import surgery
from architectures import main_output
from models import perturb
from test_architectures import base

ARCHS = ["opt", "bart", "t5", "whisper", "gpt2", "bert", "llama", "albert"]
SPECS = ["prefix", "llama_adapter", "mam", "unipelt", "parallel", "houlsby"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("arch", ARCHS)
def test_eager_attention_equals_sdpa(arch, spec):
    b = base(arch)
    outs = []
    for impl in ("sdpa", "eager"):
        model = copy.deepcopy(b["model"])
        if impl == "eager":
            model.set_attn_implementation("eager")
        torch.manual_seed(1)
        try:
            surgery.apply(model, spec, example_inputs=b["facts"]["apply_inputs"])
        except surgery.SurgeryError as exc:     # a refusal the matrix declares: the same under both
            outs.append(type(exc).__name__)
            continue
        perturb(model)
        with torch.no_grad():
            outs.append(main_output(model, b["inputs"]))
    if isinstance(outs[0], str) or isinstance(outs[1], str):
        assert outs[0] == outs[1], outs
        return
    assert (outs[0] - outs[1]).abs().max() < 1e-4
