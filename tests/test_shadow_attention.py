"""Attention adapters at softmax attention a module computes with its own ops (surgery/rewrite/shadow.py).

The shadow-score path is checked against independent realizations for the same adapter weights: transformers'
attention registry (LLaMA and BERT with eager attention, the path forced), the SDPA intercept (Falcon with
sdpa vs eager), and the explicit concatenation of the added keys and values (a hand-written attention module).
The architecture matrix (tests/test_architectures.py) checks DeBERTa-v2, GPT-Neo, BLOOM and Falcon cells.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import surgery
from surgery.errors import RewriteError
from surgery.rewrite import actions

ATOL = 1e-5


def _perturb_gates(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("adaption_gate"):
                p.fill_(0.7)


def _shadow_modules(model):
    return [m for m in model.modules() if "_surgery_shadow" in m.__dict__]


def _pair(build, spec, monkeypatch):
    """(base, through transformers' registry, through shadow scores), the adapters' weights equal."""
    base = build()
    registry = copy.deepcopy(base)
    surgery.apply(registry, spec)
    _perturb_gates(registry)
    shadow = copy.deepcopy(base)
    with monkeypatch.context() as m:
        m.setattr(actions, "registry_of", lambda model: None)
        surgery.apply(shadow, spec)
    shadow.load_state_dict(registry.state_dict())
    assert _shadow_modules(shadow) and not _shadow_modules(registry)
    return base, registry, shadow


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    return LlamaForCausalLM._from_config(cfg, attn_implementation="eager").eval()


def _bert():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     max_position_embeddings=64)
    return BertModel._from_config(cfg, attn_implementation="eager").eval()


IDS = torch.randint(3, 96, (2, 8), generator=torch.Generator().manual_seed(1))
LEFT_PAD = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["prefix", "llama_adapter"])
def test_llama_eager_shadow_equals_registry(spec, monkeypatch):
    base, registry, shadow = _pair(_llama, spec, monkeypatch)
    for mask in (None, LEFT_PAD):
        want = registry(input_ids=IDS, attention_mask=mask).logits
        got = shadow(input_ids=IDS, attention_mask=mask).logits
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        assert (want - base(input_ids=IDS, attention_mask=mask).logits).abs().max() > 1e-3
    with surgery.disable(shadow):
        torch.testing.assert_close(shadow(input_ids=IDS).logits, base(input_ids=IDS).logits, atol=0, rtol=0)
    # generate() with the KV cache: the same scores at every step as the registry's
    kw = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    a = registry.generate(input_ids=IDS, attention_mask=torch.ones_like(IDS), **kw)
    b = shadow.generate(input_ids=IDS, attention_mask=torch.ones_like(IDS), **kw)
    assert torch.equal(a.sequences, b.sequences)
    for sa, sb in zip(a.scores, b.scores):
        torch.testing.assert_close(sb, sa, atol=1e-4, rtol=0)


@pytest.mark.parametrize("spec", ["prefix", "llama_adapter"])
def test_bert_eager_shadow_equals_registry(spec, monkeypatch):
    base, registry, shadow = _pair(_bert, spec, monkeypatch)
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    want = registry(input_ids=IDS, attention_mask=mask).last_hidden_state
    got = shadow(input_ids=IDS, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert (want - base(input_ids=IDS, attention_mask=mask).last_hidden_state).abs().max() > 1e-3
    got.pow(2).sum().backward()
    trained = {n for n, p in shadow.named_parameters() if p.grad is not None}
    assert trained and all(n.startswith("surgery_adapters.") for n in trained)


def _falcon(implementation, **extra):
    from transformers import FalconConfig, FalconForCausalLM
    torch.manual_seed(0)
    cfg = FalconConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, bias=False,
                       max_position_embeddings=64, **extra)
    return FalconForCausalLM._from_config(cfg, attn_implementation=implementation).eval()


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{"new_decoder_architecture": True, "num_kv_heads": 2},
                                   {"new_decoder_architecture": False, "multi_query": True}], ids=["rotary-gqa", "multi-query"])
def test_falcon_eager_shadow_equals_sdpa_intercept(extra):
    sdpa, eager = _falcon("sdpa", **extra), _falcon("eager", **extra)
    base = eager(input_ids=IDS).logits
    surgery.apply(sdpa, "prefix")
    surgery.apply(eager, "prefix")
    eager.load_state_dict(sdpa.state_dict())
    assert _shadow_modules(eager) and not _shadow_modules(sdpa)
    for mask in (None, LEFT_PAD):
        want = sdpa(input_ids=IDS, attention_mask=mask).logits
        got = eager(input_ids=IDS, attention_mask=mask).logits
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert (got - base).abs().max() > 1e-3


# ---------------------------------------------------------------- a hand-written attention

class _Attention(nn.Module):
    def __init__(self, dim=32, heads=4, stable=False):
        super().__init__()
        self.heads, self.head_dim, self.stable = heads, dim // heads, stable
        self.renormalize = False
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.drop = nn.Dropout(0.1)

    def split(self, x):
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x, mask, prefix=None):
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        if prefix is not None:     # the reference: added keys and values concatenated, visible to every query
            pk, pv = prefix
            k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
            mask = torch.cat([mask.new_zeros(*mask.shape[:-1], pk.shape[2]), mask], -1)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        scores = scores + mask
        if self.stable:
            scores = scores - scores.amax(-1, keepdim=True)
        probs = self.drop(F.softmax(scores, dim=-1))
        if self.renormalize:
            probs = F.normalize(probs, p=1.0, dim=-1)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return self.o(out)


class _StableAttention(_Attention):
    """Subtracts the row maximum before the softmax (an op on the scores the replay does not follow)."""

    def __init__(self):
        super().__init__(stable=True)


class _FoldedAttention(_Attention):
    """Heads folded into the batch and the keys scaled before the product (DeBERTa's layout), `.mT`, a tanh
    soft-cap, a bool mask by `masked_fill`, explicit key lengths in the views."""

    def forward(self, x, mask, prefix=None):
        b, n = x.shape[:2]
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        allowed = mask == 0
        if prefix is not None:
            pk, pv = prefix
            k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
            allowed = torch.cat([allowed.new_ones(*allowed.shape[:-1], pk.shape[2]), allowed], -1)
        keys = k.shape[2]
        qf = q.reshape(b * self.heads, n, self.head_dim)
        kf = k.reshape(b * self.heads, keys, self.head_dim).mT / math.sqrt(self.head_dim)
        vf = v.reshape(b * self.heads, keys, self.head_dim)
        scores = torch.bmm(qf, kf).view(b, self.heads, n, keys)
        scores = 5.0 * torch.tanh(scores / 5.0)
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = self.drop(scores.softmax(-1)).view(b * self.heads, n, keys)
        out = torch.bmm(probs, vf).view(b, self.heads, n, -1).transpose(1, 2).reshape(b, n, -1)
        return self.o(out)


class _EinsumAttention(_Attention):
    """Products by einsum; the values' product puts the heads after the queries ('bhij,bhjd->bihd')."""

    def forward(self, x, mask, prefix=None):
        b, n = x.shape[:2]
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        if prefix is not None:
            pk, pv = prefix
            k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
            mask = torch.cat([mask.new_zeros(*mask.shape[:-1], pk.shape[2]), mask], -1)
        scores = torch.einsum("bhid,bhjd->bhij", q, k) * self.head_dim ** -0.5 + mask
        probs = self.drop(scores.softmax(dim=-1))
        return self.o(torch.einsum("bhij,bhjd->bihd", probs, v).reshape(b, n, -1))


class _PositionsFirstAttention(_Attention):
    """Funnel's layout: q, k, v stay [batch, positions, heads, head_dim], read by einsum ('bind,bjnd->bnij'),
    a relative-position-like term of the scores' shape from the queries alone, and the additive mask."""

    def __init__(self):
        super().__init__()
        self.r = nn.Parameter(torch.randn(16, 16) * 0.3)

    def forward(self, x, mask, prefix=None):
        b, n = x.shape[:2]
        q, k, v = (f(x).view(b, n, self.heads, self.head_dim) for f in (self.q, self.k, self.v))
        position = torch.einsum("bind,ij->bni", q, self.r[:n, :n]).unsqueeze(-1) * self.r[:n, :n]
        if prefix is not None:
            pk, pv = (p.transpose(1, 2) for p in prefix)
            k, v = torch.cat([pk, k], 1), torch.cat([pv, v], 1)
            mask = torch.cat([mask.new_zeros(*mask.shape[:-1], pk.shape[1]), mask], -1)
            position = torch.cat([position.new_zeros(*position.shape[:-1], pk.shape[1]), position], -1)
        scores = torch.einsum("bind,bjnd->bnij", q * self.head_dim ** -0.5, k) + position + mask
        probs = self.drop(torch.softmax(scores, dim=-1))
        return self.o(torch.einsum("bnij,bjnd->bind", probs, v).reshape(b, n, -1))


class _Block(nn.Module):
    def __init__(self, attention=_Attention):
        super().__init__()
        self.attn = attention()
        self.norm1, self.norm2 = nn.LayerNorm(32), nn.LayerNorm(32)
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x, mask, prefix=None):
        x = self.norm1(x + self.attn(x, mask, prefix))
        return self.norm2(x + self.fc2(torch.relu(self.fc1(x))))


class _Model(nn.Module):
    def __init__(self, attention=_Attention):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.layers = nn.ModuleList([_Block(attention), _Block(attention)])
        self.head = nn.Linear(32, 50)

    def forward(self, ids, prefixes=None):
        x, n = self.embed(ids), ids.shape[1]
        mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, prefixes[i] if prefixes else None)
        return self.head(x)


def _heads(flat, batch, heads=4):
    return flat.view(flat.shape[0], heads, -1).transpose(0, 1).unsqueeze(0).expand(batch, -1, -1, -1)


@pytest.mark.parametrize("attention", [_Attention, _FoldedAttention, _EinsumAttention, _PositionsFirstAttention],
                         ids=["matmul", "folded-bmm", "einsum", "positions-first"])
def test_custom_attention_prefix_equals_concatenation(attention):
    torch.manual_seed(0)
    model = _Model(attention).eval()
    ids = torch.randint(0, 50, (2, 7))
    base = model(ids)
    surgery.apply(model, "prefix")
    assert len(_shadow_modules(model)) == 2
    got = model(ids)
    adapters = [m for m in model.modules() if type(m).__name__ == "PrefixTuning"]
    prefixes = []
    for adapter in adapters:
        flat = adapter.prefixes()
        width = flat.shape[1] // 2
        prefixes.append((_heads(flat[:, :width], 2), _heads(flat[:, width:], 2)))
    with surgery.disable(model):
        want = model(ids, prefixes)
        torch.testing.assert_close(model(ids), base, atol=0, rtol=0)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert (got - base).abs().max() > 1e-3
    model.train()   # dropout on the added probabilities too; gradients only on the adapters
    model(ids).sum().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(n.startswith("surgery_adapters.") for n in trained)


def test_custom_attention_llama_adapter_equals_separate_softmax():
    torch.manual_seed(0)
    model = _Model().eval()
    ids = torch.randint(0, 50, (2, 7))
    base = model(ids)
    surgery.apply(model, "llama_adapter")
    torch.testing.assert_close(model(ids), base, atol=ATOL, rtol=0)    # zero-initialized gate
    _perturb_gates(model)
    got = model(ids)
    # the reference: the model's attention plus gate * softmax(q pk^T / sqrt(d)) @ pv, per layer
    adapters = [m for m in model.modules() if type(m).__name__ == "AdaptionPrompt"]
    with surgery.disable(model):
        x = model.embed(ids)
        mask = torch.full((7, 7), float("-inf")).triu(1)[None, None]
        for layer, adapter in zip(model.layers, adapters):
            attn = layer.attn
            q = attn.split(attn.q(x))
            pk = _heads(attn.k(adapter.adaption_prompt), 2)
            pv = _heads(attn.v(adapter.adaption_prompt), 2)
            extra = F.softmax(q @ pk.transpose(-1, -2) / math.sqrt(attn.head_dim), -1) @ pv
            main = attn(x, mask) - attn.o.bias
            gated = main + attn.o(adapter.adaption_gate * extra.transpose(1, 2).reshape(2, 7, -1)) - attn.o.bias
            x = layer.norm1(x + gated + attn.o.bias)
            x = layer.norm2(x + layer.fc2(torch.relu(layer.fc1(x))))
        want = model.head(x)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert (got - base).abs().max() > 1e-3


def test_unknown_score_op_is_refused_naming_it():
    torch.manual_seed(0)
    model = _Model(_StableAttention).eval()
    ids = torch.randint(0, 50, (2, 7))
    base = model(ids)
    with pytest.raises(RewriteError, match="amax"):
        surgery.apply(model, "prefix")
        model(ids)
    assert not hasattr(model, "surgery_adapters")
    torch.testing.assert_close(model(ids), base, atol=0, rtol=0)


def test_unknown_score_op_at_run_time_raises_naming_it():
    """The forward's real ops are checked on every call too (a forward that branches differently than traced)."""
    torch.manual_seed(0)
    model = _Model().eval()
    ids = torch.randint(0, 50, (2, 7))
    surgery.apply(model, "prefix")
    model.layers[1].attn.stable = True
    with pytest.raises(RewriteError, match="amax"):
        model(ids)
    model.layers[1].attn.stable = False
    model.layers[1].attn.renormalize = True     # after the softmax
    with pytest.raises(RewriteError, match="normalize"):
        model(ids)


@pytest.mark.slow
def test_custom_attention_compiles_with_graph_breaks():
    """torch.compile runs the recording mode as Python (graph breaks there) and gives the eager outputs."""
    torch.manual_seed(0)
    model = _Model().eval()
    ids = torch.randint(0, 50, (2, 7))
    surgery.apply(model, "prefix")
    want = model(ids)
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(compiled(ids), want, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_custom_attention_exports_with_dynamic_shapes(tmp_path):
    """torch.export (symbolic batch and sequence sizes) records the replay; the program gives the eager outputs at
    other sizes."""
    torch.manual_seed(0)
    model = _Model(_FoldedAttention).eval()
    surgery.apply(model, "prefix")
    path = surgery.export(model, tmp_path / "model.pt2", example_inputs=(torch.randint(0, 50, (2, 7)),), format="pt2")
    program = torch.export.load(str(path)).module()
    ids = torch.randint(0, 50, (3, 5))
    torch.testing.assert_close(program(ids), model(ids), atol=ATOL, rtol=0)
