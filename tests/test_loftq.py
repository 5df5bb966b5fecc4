"""LoftQ (Li et al. 2023) against PEFT's `init_lora_weights="loftq"` (issue 22): the same quantizer (bitsandbytes'
NF4 with float32 block scales, `surgery/modules/nf4.py`), the same A and B and outputs for the same base weights,
for one and several alternating steps; the residual error falls step by step; `quantize_nf4` stores the last
step's Q for a multi-step torchao LoftQ."""
import copy
import inspect
import types

import pytest
import torch
from torch import nn

import surgery
from models import make_llama, run, token_ids
from surgery.modules.nf4 import nf4_round_trip

peft = pytest.importorskip("peft")


def loftq_rule(iters, quantizer="bitsandbytes", r=4):
    return {"version": 1, "rules": [{
        "name": "loftq", "match": {"role": ["attention.q", "attention.v"]}, "action": "wrap", "expect": "every_layer",
        "module": {"kind": "lora", "r": r, "alpha": r, "init": "loftq", "loftq_iter": iters,
                   "loftq_quantizer": quantizer}}]}


def sites(model):
    return model.surgery_adapters.records["default"].weight_sites


def test_nf4_round_trip_is_bitsandbytes_nf4():
    functional = pytest.importorskip("bitsandbytes.functional")
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code
    g = torch.Generator().manual_seed(0)
    for shape in [(64, 64), (37, 13), (128, 96)]:      # whole blocks, a partial last block, blocks across rows
        w = torch.randn(shape, generator=g) * 0.1
        codes, state = functional.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
        # bitsandbytes' reference dequantization (its CUDA kernel's; the CPU C++ kernel differs when a row is not
        # a whole number of blocks, as (128, 96))
        theirs = _dequantize_4bit_compute(codes.reshape(-1), state.absmax, _get_4bit_code("nf4", w.device), 64,
                                          w.shape, torch.float32)
        assert torch.equal(nf4_round_trip(w), theirs), shape


def _peft_loftq_on_cpu(monkeypatch):
    """PEFT's own loftq_init, run on the CPU: its code hard-codes the "cuda" compute device (bitsandbytes
    quantizes on the CPU too); the same function with that one constant changed."""
    pytest.importorskip("bitsandbytes")
    from peft.tuners.lora import layer
    from peft.utils import loftq_utils
    inner = inspect.unwrap(loftq_utils.loftq_init)
    consts = tuple("cpu" if c == "cuda" else c for c in inner.__code__.co_consts)
    assert consts != inner.__code__.co_consts
    cpu = types.FunctionType(inner.__code__.replace(co_consts=consts), inner.__globals__, inner.__name__,
                             inner.__defaults__, inner.__closure__)
    monkeypatch.setattr(layer, "loftq_init", torch.no_grad()(cpu))


@pytest.mark.parametrize("iters", [1, 3])
def test_loftq_equals_peft(monkeypatch, iters):
    _peft_loftq_on_cpu(monkeypatch)
    base = make_llama().eval()
    ids = token_ids(2, 9)
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="loftq",
                             loftq_config=peft.LoftQConfig(loftq_bits=4, loftq_iter=iters))
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    ours = surgery.apply(copy.deepcopy(base), loftq_rule(iters))
    modules = dict(theirs.named_modules())
    for site in sites(ours):
        peft_layer = modules[f"base_model.model.{site.owner_path}"]
        q = site.adapter.loftq_quantized()
        torch.testing.assert_close(q, peft_layer.base_layer.weight, atol=1e-6, rtol=0)    # the same Q_T
        torch.testing.assert_close(site.adapter.lora_A, peft_layer.lora_A["default"].weight, atol=1e-5, rtol=0)
        torch.testing.assert_close(site.adapter.lora_B, peft_layer.lora_B["default"].weight, atol=1e-5, rtol=0)
        site.owner.weight = nn.Parameter(q, requires_grad=False)     # PEFT's new base weight
    expected = run("llama", theirs, ids)
    torch.testing.assert_close(run("llama", ours, ids), expected, atol=1e-5, rtol=0)
    with surgery.disable(ours):     # the correction matters: Q alone is farther from it
        assert (run("llama", ours, ids) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("quantizer", ["bitsandbytes", "torchao"])
def test_loftq_error_falls_with_each_step(quantizer):
    if quantizer == "torchao":
        pytest.importorskip("torchao")
    model = surgery.apply(make_llama().eval(), loftq_rule(5, quantizer))
    for site in sites(model):
        errors = site.adapter.loftq_errors()
        w = site.adapter._init_weight[0].detach()
        plain = torch.linalg.norm(w - site.adapter._nf4()(w.float()))     # NF4 alone, no correction
        assert errors[0] < plain
        assert all(b < a for a, b in zip(errors, errors[1:])), errors
        assert errors[-1] < 0.97 * errors[0], errors


def test_quantize_nf4_stores_the_last_steps_q():
    pytest.importorskip("torchao")
    model = make_llama().eval()
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    surgery.apply(model, loftq_rule(3, "torchao"))
    expected = {s.owner_path: s.adapter.loftq_quantized() for s in sites(model)}
    surgery.quantize_nf4(model, {"role": ["attention.q", "attention.v"]})
    for site in sites(model):
        stored = site.owner.weight.get_original_weight()
        torch.testing.assert_close(stored, expected[site.owner_path], atol=0, rtol=0)
        w = dense[f"{site.owner_path}.weight"]
        corrected = torch.linalg.norm(w - stored - site.adapter.delta_weight().detach())
        assert abs(float(corrected) - site.adapter.loftq_errors()[-1]) < 1e-4
    bnb_model = surgery.apply(make_llama().eval(), loftq_rule(1, "bitsandbytes"))
    with pytest.raises(surgery.SurgeryError, match="bitsandbytes NF4"):
        surgery.quantize_nf4(bnb_model, {"role": ["attention.q", "attention.v"]})
