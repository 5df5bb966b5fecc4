"""Every role the analysis assigns, pinned to the exact module, op and slice it lands on, one role per rule.

The expected sites are written by hand from each architecture's source (which projection is the query, which
FFN linear is the gate), not derived from the analysis, so exchanging any two roles in `surgery/analyze/roles.py`
fails here. Residual adds and residual values share their module and op, so they are also pinned by the data
flow: the branch operand of an attention residual add descends from that layer's attention output projection
and the residual operand does not (likewise the FFN's with its output projection). Architectures: LLaMA, BERT,
GPT-2, the seed's MiniGPT, and a plain gated model (packed qkv, the up projection called before the gate).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import surgery
from surgery.spec.models import ROLES
from tests.models import ARCHS, example_inputs

LAYERS = (0, 1)


def each(module: str, op: str, rows=None) -> list[tuple]:
    """One site per layer: `module` is a format string with {i} for the layer index."""
    return [(i, module.format(i=i), op, rows) for i in LAYERS]


def one(module: str, op: str, layer=None, rows=None) -> list[tuple]:
    return [(layer, module, op, rows)]


class GatedBlock(nn.Module):
    """Pre-norm block with a packed qkv projection and a gated FFN that calls `up` before `gate`."""

    def __init__(self, h, heads=4):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.RMSNorm(h), nn.RMSNorm(h)
        self.qkv, self.o = nn.Linear(h, 3 * h, bias=False), nn.Linear(h, h, bias=False)
        self.up, self.gate = nn.Linear(h, 2 * h, bias=False), nn.Linear(h, 2 * h, bias=False)
        self.down = nn.Linear(2 * h, h, bias=False)

    def forward(self, x):
        b, t, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, h)
        x = x + self.o(a)
        n = self.norm2(x)
        up = self.up(n)
        return x + self.down(up * F.silu(self.gate(n)))


class GatedLM(nn.Module):
    def __init__(self, vocab=120, h=32):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, h)
        self.layers = nn.ModuleList(GatedBlock(h) for _ in LAYERS)
        self.norm = nn.RMSNorm(h)
        self.head = nn.Linear(h, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


# role -> [(layer, module, op, output rows of a packed weight)], from each model's source code.
EXPECTED = {
    "llama": {
        "embedding": one("model.embed_tokens", "embedding"),
        "embedding.output": one("model.layers.0", "embedding"),
        "block.input": [(0, "model.layers.0", "embedding", None), (1, "model.layers.1", "add", None)],
        "block.output": each("model.layers.{i}", "add"),
        "attention.q": each("model.layers.{i}.self_attn.q_proj", "linear"),
        "attention.k": each("model.layers.{i}.self_attn.k_proj", "linear"),
        "attention.v": each("model.layers.{i}.self_attn.v_proj", "linear"),
        "attention.qkv": [],
        "attention.op": each("model.layers.{i}.self_attn", "scaled_dot_product_attention"),
        "attention.output": each("model.layers.{i}.self_attn.o_proj", "linear"),
        "attention.residual": [(0, "model.embed_tokens", "embedding", None), (1, "model.layers.0", "add", None)],
        "attention.residual_add": each("model.layers.{i}", "add"),
        "ffn.in": each("model.layers.{i}.mlp.up_proj", "linear"),
        "ffn.gate": each("model.layers.{i}.mlp.gate_proj", "linear"),
        "ffn.act": each("model.layers.{i}.mlp", "mul"),          # act_fn(gate_proj(x)) * up_proj(x)
        "ffn.out": each("model.layers.{i}.mlp.down_proj", "linear"),
        "ffn.residual": each("model.layers.{i}", "add"),
        "ffn.residual_add": each("model.layers.{i}", "add"),
        "norm": [(i, f"model.layers.{i}.{n}", "mul", None) for i in LAYERS
                 for n in ("input_layernorm", "post_attention_layernorm")] + one("model.norm", "mul"),
        "lm_head": one("lm_head", "linear"),
    },
    "bert": {
        "embedding": [(None, f"embeddings.{n}_embeddings", "embedding", None) for n in ("word", "token_type", "position")],
        "embedding.output": one("encoder.layer.0", "dropout"),
        "block.input": [(0, "encoder.layer.0", "dropout", None), (1, "encoder.layer.1", "layer_norm", None)],
        "block.output": each("encoder.layer.{i}", "layer_norm"),
        "attention.q": each("encoder.layer.{i}.attention.self.query", "linear"),
        "attention.k": each("encoder.layer.{i}.attention.self.key", "linear"),
        "attention.v": each("encoder.layer.{i}.attention.self.value", "linear"),
        "attention.qkv": [],
        "attention.op": each("encoder.layer.{i}.attention.self", "scaled_dot_product_attention"),
        "attention.output": each("encoder.layer.{i}.attention.output.dense", "linear"),
        "attention.residual": [(0, "embeddings.dropout", "dropout", None),
                               (1, "encoder.layer.0.output.LayerNorm", "layer_norm", None)],
        "attention.residual_add": each("encoder.layer.{i}.attention.output", "add"),
        "ffn.in": each("encoder.layer.{i}.intermediate.dense", "linear"),
        "ffn.gate": [],
        "ffn.act": each("encoder.layer.{i}.intermediate.intermediate_act_fn", "gelu"),
        "ffn.out": each("encoder.layer.{i}.output.dense", "linear"),
        "ffn.residual": each("encoder.layer.{i}.attention.output.LayerNorm", "layer_norm"),
        "ffn.residual_add": each("encoder.layer.{i}.output", "add"),
        "norm": one("embeddings.LayerNorm", "layer_norm")
        + [(i, f"encoder.layer.{i}.{n}.LayerNorm", "layer_norm", None) for i in LAYERS for n in ("attention.output", "output")],
        "lm_head": [],
    },
    "gpt2": {
        "embedding": one("transformer.wte", "embedding") + one("transformer.wpe", "embedding"),
        "embedding.output": one("transformer.h.0", "dropout"),
        "block.input": [(0, "transformer.h.0", "dropout", None), (1, "transformer.h.1", "add", None)],
        "block.output": each("transformer.h.{i}", "add"),
        "attention.q": each("transformer.h.{i}.attn.c_attn", "addmm", (0, 64)),
        "attention.k": each("transformer.h.{i}.attn.c_attn", "addmm", (64, 128)),
        "attention.v": each("transformer.h.{i}.attn.c_attn", "addmm", (128, 192)),
        "attention.qkv": each("transformer.h.{i}.attn.c_attn", "addmm"),
        "attention.op": each("transformer.h.{i}.attn", "scaled_dot_product_attention"),
        "attention.output": each("transformer.h.{i}.attn.c_proj", "addmm"),
        "attention.residual": [(0, "transformer.drop", "dropout", None), (1, "transformer.h.0", "add", None)],
        "attention.residual_add": each("transformer.h.{i}", "add"),
        "ffn.in": each("transformer.h.{i}.mlp.c_fc", "addmm"),
        "ffn.gate": [],
        "ffn.act": each("transformer.h.{i}.mlp.act", "mul"),      # gelu_new: 0.5 x (1 + tanh(...))
        "ffn.out": each("transformer.h.{i}.mlp.c_proj", "addmm"),
        "ffn.residual": each("transformer.h.{i}", "add"),
        "ffn.residual_add": each("transformer.h.{i}", "add"),
        "norm": [(i, f"transformer.h.{i}.{n}", "layer_norm", None) for i in LAYERS for n in ("ln_1", "ln_2")]
        + one("transformer.ln_f", "layer_norm"),
        "lm_head": one("lm_head", "linear"),
    },
    "minigpt": {
        "embedding": one("embed", "embedding"),
        "embedding.output": one("blocks.0", "add"),               # token + position embedding
        "block.input": [(0, "blocks.0", "add", None), (1, "blocks.1", "layer_norm", None)],
        "block.output": each("blocks.{i}", "layer_norm"),
        "attention.q": each("blocks.{i}.attn", "linear", (0, 64)),   # nn.MultiheadAttention's in_proj_weight rows
        "attention.k": each("blocks.{i}.attn", "linear", (64, 128)),
        "attention.v": each("blocks.{i}.attn", "linear", (128, 192)),
        "attention.qkv": [],
        "attention.op": each("blocks.{i}.attn", "scaled_dot_product_attention"),
        "attention.output": each("blocks.{i}.attn.out_proj", "linear"),
        "attention.residual": [(0, "", "add", None), (1, "blocks.0.ln2", "layer_norm", None)],
        "attention.residual_add": each("blocks.{i}", "add"),
        "ffn.in": each("blocks.{i}.ffn.0", "linear"),
        "ffn.gate": [],
        "ffn.act": each("blocks.{i}.ffn.1", "relu"),
        "ffn.out": each("blocks.{i}.ffn.3", "linear"),
        "ffn.residual": each("blocks.{i}.ln1", "layer_norm"),
        "ffn.residual_add": each("blocks.{i}", "add"),
        "norm": [(i, f"blocks.{i}.{n}", "layer_norm", None) for i in LAYERS for n in ("ln1", "ln2")] + one("ln_f", "layer_norm"),
        "lm_head": one("head", "linear"),
    },
    "gated": {
        "embedding": one("embed", "embedding"),
        "embedding.output": one("layers.0", "embedding"),
        "block.input": [(0, "layers.0", "embedding", None), (1, "layers.1", "add", None)],
        "block.output": each("layers.{i}", "add"),
        "attention.q": each("layers.{i}.qkv", "linear", (0, 32)),
        "attention.k": each("layers.{i}.qkv", "linear", (32, 64)),
        "attention.v": each("layers.{i}.qkv", "linear", (64, 96)),
        "attention.qkv": each("layers.{i}.qkv", "linear"),
        "attention.op": each("layers.{i}", "scaled_dot_product_attention"),
        "attention.output": each("layers.{i}.o", "linear"),
        "attention.residual": [(0, "embed", "embedding", None), (1, "layers.0", "add", None)],
        "attention.residual_add": each("layers.{i}", "add"),
        "ffn.in": each("layers.{i}.up", "linear"),
        "ffn.gate": each("layers.{i}.gate", "linear"),
        "ffn.act": each("layers.{i}", "mul"),
        "ffn.out": each("layers.{i}.down", "linear"),
        "ffn.residual": each("layers.{i}", "add"),
        "ffn.residual_add": each("layers.{i}", "add"),
        "norm": [(i, f"layers.{i}.{n}", "rms_norm", None) for i in LAYERS for n in ("norm1", "norm2")] + one("norm", "rms_norm"),
        "lm_head": one("head", "linear"),
    },
}

# The sub-layer a residual add closes: the projection whose output is its branch.
BRANCH_PROJECTION = {
    "llama": {"attention": "model.layers.{i}.self_attn.o_proj", "ffn": "model.layers.{i}.mlp.down_proj"},
    "bert": {"attention": "encoder.layer.{i}.attention.output.dense", "ffn": "encoder.layer.{i}.output.dense"},
    "gpt2": {"attention": "transformer.h.{i}.attn.c_proj", "ffn": "transformer.h.{i}.mlp.c_proj"},
    "minigpt": {"attention": "blocks.{i}.attn.out_proj", "ffn": "blocks.{i}.ffn.3"},
    "gated": {"attention": "layers.{i}.o", "ffn": "layers.{i}.down"},
}


def build(arch):
    if arch == "gated":
        model = GatedLM()
        return model, (torch.randint(0, 120, (2, 8)),)
    model = ARCHS[arch]()
    return model, example_inputs(arch, model)


_PLANS: dict[str, dict] = {}
_PARAMS: dict[str, dict] = {}


def planned(arch) -> dict[str, list]:
    """role -> its matches, from one plan with one rule per role (the rule named after the role)."""
    if arch not in _PLANS:
        model, inputs = build(arch)
        spec = {"rules": [{"name": role, "match": {"role": role}, "action": "train", "expect": "any"}
                          for role in ROLES]}
        by_rule = {role: [] for role in ROLES}
        for m in surgery.plan(model, spec, example_inputs=inputs):
            by_rule[m.rule].append(m)
        _PLANS[arch] = by_rule
        _PARAMS[arch] = dict(surgery.api._analysis(model, inputs).traced.params)   # placeholder -> parameter
    return _PLANS[arch]


def rows_of(match):
    packed = match.site.extra.get("packed")
    if packed is not None:
        return tuple(packed)
    return tuple(match.site.linear.rows) if match.site.linear is not None and match.site.linear.rows else None


def test_every_role_is_pinned():
    for arch, table in EXPECTED.items():
        assert set(table) == set(ROLES), arch
        assert sum(bool(sites) for sites in table.values()) >= 15, arch
    for role in ROLES:
        assert sum(bool(EXPECTED[a][role]) for a in EXPECTED) >= 2, f"{role} is pinned on fewer than two architectures"


@pytest.mark.parametrize("arch", list(EXPECTED))
@pytest.mark.parametrize("role", ROLES)
def test_role_lands_on_its_module_and_op(arch, role):
    got = sorted(((m.layer, m.module, m.site.op, rows_of(m)) for m in planned(arch)[role]),
                 key=lambda s: (-1 if s[0] is None else s[0], s[1], s[3] or ()))
    want = sorted(EXPECTED[arch][role], key=lambda s: (-1 if s[0] is None else s[0], s[1], s[3] or ()))
    assert got == want, f"{arch} {role}"
    for m in planned(arch)[role]:
        assert m.role == role


def _ancestor_modules(node, params) -> set[str]:
    """Every module whose forward computed some ancestor of `node` (from the export's nn_module_stack), or
    whose weight an ancestor read (nn.MultiheadAttention reads out_proj.weight without calling out_proj)."""
    seen, stack, modules = set(), [node], set()
    while stack:
        n = stack.pop()
        if not hasattr(n, "all_input_nodes") or n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder" and n.name in params:
            modules.add(params[n.name].rpartition(".")[0])
        for path, _ in (n.meta.get("nn_module_stack") or {}).values():
            modules.add(path)
        stack.extend(n.all_input_nodes)
    return modules


@pytest.mark.parametrize("arch", list(EXPECTED))
@pytest.mark.parametrize("sub", ["attention", "ffn"])
def test_residual_add_closes_its_own_sublayer(arch, sub):
    """The residual add's branch comes from this sub-layer's projection; its residual operand does not."""
    plans, params = planned(arch), _PARAMS[arch]
    adds = {m.layer: m.site.node for m in plans[f"{sub}.residual_add"]}
    residuals = {m.layer: m.site.node for m in plans[f"{sub}.residual"]}
    assert sorted(adds) == sorted(residuals) == list(LAYERS)
    for i in LAYERS:
        node, proj = adds[i], BRANCH_PROJECTION[arch][sub].format(i=i)
        assert node.target in (torch.ops.aten.add.Tensor,), node.target
        operands = [a for a in node.args[:2] if hasattr(a, "all_input_nodes")]
        assert len(operands) == 2
        from_proj = [proj in _ancestor_modules(a, params) for a in operands]
        assert sorted(from_proj) == [False, True], f"{arch} {sub} layer {i}: {node.name}"
        residual = operands[from_proj.index(False)]
        assert residuals[i] is residual, f"{arch} {sub}.residual layer {i}"
        if sub == "ffn":   # the FFN's residual is what the attention sub-layer produced (add, or its post-LN)
            other = BRANCH_PROJECTION[arch]["attention"].format(i=i)
            assert other in _ancestor_modules(residual, params)


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_block_values_chain(arch):
    """A block's output is the next block's input; the embedding output is the first block's input."""
    plans, params = planned(arch), _PARAMS[arch]
    ins = {m.layer: m.site.node for m in plans["block.input"]}
    outs = {m.layer: m.site.node for m in plans["block.output"]}
    assert outs[0] is ins[1]
    assert [m.site.node for m in plans["embedding.output"]] == [ins[0]]
    assert not any(f"{BRANCH_PROJECTION[arch]['attention'].format(i=0)}" in p for p in _ancestor_modules(ins[0], params))
    assert BRANCH_PROJECTION[arch]["ffn"].format(i=1) in _ancestor_modules(outs[1], params)
