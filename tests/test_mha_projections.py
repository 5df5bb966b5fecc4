"""nn.MultiheadAttention's projections adapted on activations (issue 16; surgery/rewrite/mha.py).

nn.MultiheadAttention reads in_proj_weight and out_proj.weight inside F.multi_head_attention_forward. LoRA with
dropout on its input (QLoRA's recipe) and UniPELT's gated LoRA read the projection's input, which a weight
parametrization cannot: QLoRA was refused, and UniPELT's gates silently got no gradient (the weight path dropped
them). Both now run on the projection's activations inside the routed copy of that function.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import surgery
from architectures import ARCHITECTURES
from models import perturb
from surgery.errors import RewriteError


def _encoder():
    model, inputs, facts = ARCHITECTURES["torch-encoder"]()
    return model, inputs, facts["apply_inputs"]


def _lora_sites(model, name="default", rule=None):
    rules = model.surgery_adapters.adapters[name]
    return {f"{r}/{k}": m for r, mods in rules.items() if rule in (None, r) for k, m in mods.items()}


def _spec(roles, **module):
    return {"rules": [{"name": "lora", "match": {"role": roles}, "action": "wrap",
                       "module": {"kind": "lora", "r": 4, **module}}]}


def test_lora_with_dropout_equals_the_weight_path_in_eval_and_drops_in_train():
    """QLoRA's LoRA (dropout 0.1) on q, k, v and the output projection of nn.MultiheadAttention: in eval it equals
    LoRA on the weight with the same A and B; in train each site's dropout sees the attention's own input (q, k
    and v) or the heads' concatenation (output), batch-first, and every A and B gets a gradient."""
    roles = ["attention.q", "attention.k", "attention.v", "attention.output"]
    model, inputs, apply_inputs = _encoder()
    weight = copy.deepcopy(model)
    surgery.apply(model, _spec(roles, dropout=0.1), example_inputs=apply_inputs)
    surgery.apply(weight, _spec(roles), example_inputs=apply_inputs)
    sites = model.surgery_adapters.records["default"].weight_sites
    assert len(sites) == 8 and {s.realized for s in sites} == {"activation"}
    assert {s.realized for s in weight.surgery_adapters.records["default"].weight_sites} == {"weight"}
    perturb(model, scale=0.1)
    weight.surgery_adapters.load_state_dict(model.surgery_adapters.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs), weight(**inputs), atol=1e-5, rtol=0)
        with surgery.disable(model):
            base = model(**inputs)
        assert (model(**inputs) - base).abs().max() > 1e-3
        adapted = model(**inputs)
        twin = copy.deepcopy(model)                              # the routing hooks travel with a copy
        torch.testing.assert_close(twin(**inputs), adapted, atol=1e-6, rtol=0)
        with surgery.disable(twin):
            torch.testing.assert_close(twin(**inputs), base, atol=1e-6, rtol=0)
        report = surgery.merge(model)                            # merged == unmerged
        assert not report.not_merged
        torch.testing.assert_close(model(**inputs), adapted, atol=1e-5, rtol=0)
        surgery.unmerge(model)
        torch.testing.assert_close(model(**inputs), adapted, atol=1e-5, rtol=0)

    # train: dropout runs on the projections' inputs
    attn0 = model.encoder.layers[0].self_attn
    seen, calls = {}, []
    attn0.register_forward_pre_hook(lambda m, args, kwargs: seen.update(x=args[0]), with_kwargs=True)
    layer0 = {k: m for k, m in _lora_sites(model).items() if "layers_0" in k}
    for key, lora in layer0.items():
        lora.dropout.register_forward_pre_hook(lambda m, args, key=key: calls.append((key, args[0])))
    model.train()
    out = model(**inputs)
    out.float().pow(2).mean().backward()
    inputs_of = dict(calls)
    assert len(calls) == 4
    for key, x in inputs_of.items():
        if not key.endswith("out_proj"):
            torch.testing.assert_close(x, seen["x"])           # (batch, seq, hidden): the layer's own input
        else:
            assert x.shape == seen["x"].shape
    for name, p in model.surgery_adapters.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("surgery_adapters"))


def test_unipelt_gate_multiplies_the_lora_delta_and_trains():
    """UniPELT's gated LoRA on nn.MultiheadAttention's q: q = x Wq^T + bq + (x A^T B^T) · mean over the
    sequence of sigmoid(gate(x)), computed here by hand from the layer's input; the gate gets a gradient."""
    model, inputs, apply_inputs = _encoder()
    surgery.apply(model, "unipelt", example_inputs=apply_inputs)
    perturb(model, scale=0.1)
    attn = model.encoder.layers[0].self_attn
    lora = _lora_sites(model, rule="lora")
    q_lora = next(m for k, m in lora.items() if "layers_0" in k and k.endswith("attention_q"))
    seen = {}
    attn.register_forward_pre_hook(lambda m, args, kwargs: seen.update(x=args[0]), with_kwargs=True)
    q_lora.register_forward_hook(lambda m, args, out: seen.update(args=args, out=out))
    model.train()
    model(**inputs).float().pow(2).mean().backward()
    x = seen["x"]
    e = attn.embed_dim
    with torch.no_grad():
        base_q = F.linear(x, attn.in_proj_weight[:e], attn.in_proj_bias[:e])
        gate = torch.sigmoid(q_lora.gate(x)).mean(dim=1, keepdim=True)        # over the sequence (dim 1)
        want = base_q + (x @ q_lora.lora_A.t() @ q_lora.lora_B.t()) * gate
    torch.testing.assert_close(seen["args"][0], x)
    torch.testing.assert_close(seen["out"].detach(), want, atol=1e-5, rtol=0)
    assert q_lora.gate.weight.grad is not None and q_lora.gate.weight.grad.abs().sum() > 0


def test_gated_lora_on_a_weight_only_op_is_refused():
    """A gate read from the op's input cannot live in a weight parametrization: refused, not silently dropped
    (before, the gate was left out and its parameters got no gradient)."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(16, 16) * 0.1)

        def forward(self, x):
            return F.linear(x, self.weight) * 2.0

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(32, 16)
            self.proj = Scaled()

        def forward(self, ids):
            return self.proj(self.emb(ids))

    net = Net()
    spec = {"rules": [{"match": {"module": "proj", "op": "linear"}, "action": "wrap",
                       "module": {"kind": "lora", "r": 2, "use_gating": True}}]}
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(RewriteError, match="gate"):
        surgery.apply(net, spec, example_inputs={"ids": torch.randint(0, 32, (2, 5))})
    assert not getattr(net, "surgery_adapters", None) or not net.surgery_adapters.records
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k])
