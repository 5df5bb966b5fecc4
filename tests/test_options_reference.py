"""Each output-changing option of each module kind against a value computed independently of the module.

The reference is the *base* model (an untouched copy) with a forward hook at the same host module that computes
the method's equation written out here, from the option values of the spec (never constants read back from the
module under test, such as `adapter.scaling`) and the adapter's learned tensors (which the test sets itself).
So an option the module ignores, or applies with another meaning, fails here.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

import surgery
from models import make_bert, make_llama, token_ids

ATOL = 1e-5
O_PROJ = "model.layers.0.self_attn.o_proj"
Q_PROJ = "model.layers.0.self_attn.q_proj"
K_PROJ = "model.layers.0.self_attn.k_proj"
DOWN_PROJ = "model.layers.0.mlp.down_proj"
POST_ATTN_NORM = "model.layers.0.post_attention_layernorm"
BERT_SELF_OUT = "encoder.layer.0.attention.output"

# the activations by their definitions (transformers' names, which AdapterHub uses)
ACT = {
    "relu": lambda x: torch.clamp(x, min=0),
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    "swish": lambda x: x / (1 + torch.exp(-x)),
    "silu": lambda x: x / (1 + torch.exp(-x)),
    "tanh": lambda x: (torch.exp(2 * x) - 1) / (torch.exp(2 * x) + 1),
    "sigmoid": lambda x: 1 / (1 + torch.exp(-x)),
    "gelu_new": lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
    "quick_gelu": lambda x: x / (1 + torch.exp(-1.702 * x)),
    "mish": lambda x: x * torch.tanh(torch.log1p(torch.exp(x))),
    "relu6": lambda x: torch.clamp(x, 0, 6),
    "leakyrelu": lambda x: torch.where(x > 0, x, 0.01 * x),
    "identity": lambda x: x,
}


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    out = (x - mu) / torch.sqrt(var + eps)
    return out * weight + bias if weight is not None else out


@contextmanager
def hooked(model, path, fn, pre=False):
    """Replace the output of `model.<path>` by fn(module, args, output) (or record its inputs, pre=True)."""
    module = model.get_submodule(path)
    handle = (module.register_forward_pre_hook(fn) if pre else module.register_forward_hook(fn))
    try:
        yield
    finally:
        handle.remove()


def only(model, cls_name):
    found = [m for m in model.surgery_adapters.modules() if type(m).__name__ == cls_name]
    assert len(found) == 1, found
    return found[0]


def rewritten(make, rule):
    base = make().eval()
    model = surgery.apply(copy.deepcopy(base), {"rules": [{"name": "r", "expect": "any", **rule}]}).eval()
    return base, model


def logits(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def fill(module, seed=0, scale=0.3):
    """Set every parameter of `module` to fresh values the test knows (non-zero, so an ignored term shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def spread_down_bias(adapter):
    """Pre-activations over [-8, 8], so each non-linearity differs from the others (relu vs relu6, leaky)."""
    with torch.no_grad():
        adapter.down.bias.copy_(torch.linspace(-8, 8, adapter.down.bias.numel()))


def bn(adapter, z, act="relu"):
    """up(act(down(z))) with the adapter's learned tensors."""
    return F.linear(ACT[act](F.linear(z, adapter.down.weight, adapter.down.bias)), adapter.up.weight, adapter.up.bias)


IDS = token_ids(2, 7)


# ----------------------------------------------------------------------------------------- bottleneck: insert

@pytest.mark.parametrize("scaling", [4.0, 0.25])
def test_bottleneck_numeric_scaling(scaling):
    base, model = rewritten(make_llama, {"match": {"role": "attention.output", "layers": "0"}, "action": "insert_after",
                                         "module": {"kind": "bottleneck", "reduction_factor": 4, "scaling": scaling}})
    adapter = only(model, "BottleneckAdapter")
    fill(adapter)
    with hooked(base, O_PROJ, lambda m, a, y: y + scaling * bn(adapter, y)):
        want = logits(base, IDS)
    torch.testing.assert_close(logits(model, IDS), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["learned", "channel"])
def test_bottleneck_learned_scaling_starts_at_one_and_trains(kind):
    base, model = rewritten(make_llama, {"match": {"role": "attention.output", "layers": "0"}, "action": "insert_after",
                                         "module": {"kind": "bottleneck", "reduction_factor": 4, "scaling": kind}})
    adapter = only(model, "BottleneckAdapter")
    fill(adapter.down), fill(adapter.up, seed=1)
    with hooked(base, O_PROJ, lambda m, a, y: y + 1.0 * bn(adapter, y)):     # AdapterHub: initialized to ones
        want = logits(base, IDS)
    torch.testing.assert_close(logits(model, IDS), want, atol=ATOL, rtol=0)
    s = torch.linspace(0.5, 3.0, 64) if kind == "channel" else torch.tensor([2.5])
    scale = [p for n, p in adapter.named_parameters() if not n.startswith(("down", "up"))]
    assert len(scale) == 1 and scale[0].requires_grad and scale[0].numel() == s.numel()
    with torch.no_grad():
        scale[0].copy_(s)
    with hooked(base, O_PROJ, lambda m, a, y: y + s * bn(adapter, y)):
        want = logits(base, IDS)
    out = logits(model, IDS)
    torch.testing.assert_close(out, want, atol=ATOL, rtol=0)
    out.sum().backward()
    assert scale[0].grad is not None and scale[0].grad.abs().sum() > 0


@pytest.mark.parametrize("act", sorted(ACT))
def test_bottleneck_non_linearity(act):
    base, model = rewritten(make_llama, {"match": {"role": "attention.output", "layers": "0"}, "action": "insert_after",
                                         "module": {"kind": "bottleneck", "reduction_factor": 2, "non_linearity": act}})
    adapter = only(model, "BottleneckAdapter")
    fill(adapter)
    spread_down_bias(adapter)
    with hooked(base, O_PROJ, lambda m, a, y: y + bn(adapter, y, act)):
        want = logits(base, IDS)
    torch.testing.assert_close(logits(model, IDS), want, atol=ATOL, rtol=0)


def test_bottleneck_width_from_reduction_factor_and_per_layer_size():
    def widths(options):
        _, model = rewritten(make_llama, {"match": {"role": "attention.output"}, "action": "insert_after",
                                          "module": {"kind": "bottleneck", **options}})
        return [tuple(m.down.weight.shape) for m in model.surgery_adapters.modules() if hasattr(m, "down")]

    assert widths({"reduction_factor": {"0": 8, "default": 2}}) == [(64 // 8, 64), (64 // 2, 64)]
    assert widths({"reduction_factor": 3}) == [(21, 64), (21, 64)]                 # int(64 // 3)
    assert widths({"reduction_factor": 2, "bottleneck_size": {"1": 5, "default": 3}}) == [(3, 64), (5, 64)]


@pytest.mark.parametrize("flags", [
    {"residual": False},
    {"ln_before": True},
    {"ln_after": True},
    {"ln_after": True, "adapter_residual_before_ln": True},
    {"use_gating": True},
    {"use_gating": True, "ln_before": True, "scaling": 2.0, "residual": False},
])
def test_bottleneck_residual_norms_and_gate(flags):
    base, model = rewritten(make_llama, {"match": {"role": "attention.output", "layers": "0"}, "action": "insert_after",
                                         "module": {"kind": "bottleneck", "reduction_factor": 4, **flags}})
    adapter = only(model, "BottleneckAdapter")
    fill(adapter, scale=0.5)
    s = flags.get("scaling", 1.0)

    def reference(m, a, y):
        # AdapterHub's Adapter.forward: down(LN_before(z)) ... up, scaling, gate, residual around LN_after
        z = y
        h = layer_norm(z, adapter.ln_before.weight, adapter.ln_before.bias) if flags.get("ln_before") else z
        out = s * bn(adapter, h)
        if flags.get("use_gating"):
            gate = torch.sigmoid(F.linear(z, adapter.gate.weight, adapter.gate.bias))     # (batch, seq, 1)
            out = out * gate.mean(dim=1, keepdim=True)                                    # mean over tokens
        residual = z if flags.get("residual", True) else None
        if residual is not None and flags.get("adapter_residual_before_ln"):
            out = out + residual
        if flags.get("ln_after"):
            out = layer_norm(out, adapter.ln_after.weight, adapter.ln_after.bias)
        if residual is not None and not flags.get("adapter_residual_before_ln"):
            out = out + residual
        return out

    with hooked(base, O_PROJ, reference):
        want = logits(base, IDS)
    torch.testing.assert_close(logits(model, IDS), want, atol=ATOL, rtol=0)


def _stats(w):
    return w.abs().max().item(), w.std().item(), w.mean().item()


def test_bottleneck_init_weights():
    d, m = 64, 32
    made = {}
    for init in ("bert", "houlsby", "mam", "lora", "zeros"):
        base, model = rewritten(make_llama, {"match": {"role": "attention.output", "layers": "0"},
                                             "action": "insert_after",
                                             "module": {"kind": "bottleneck", "reduction_factor": 2, "init_weights": init}})
        made[init] = (base, model, only(model, "BottleneckAdapter"))
    a = made["bert"][2]                                   # N(0, 0.02), zero biases
    for w in (a.down.weight, a.up.weight):
        assert abs(w.std().item() - 0.02) < 0.003 and abs(w.mean().item()) < 0.002
    assert not a.down.bias.any() and not a.up.bias.any()
    a = made["houlsby"][2]                                # truncated N(0, 0.01) within ±0.02
    for w in (a.down.weight, a.up.weight):
        top, std, _ = _stats(w)
        assert top <= 0.02 and 0.007 < std < 0.011
    for init in ("mam", "lora"):                          # kaiming-uniform(a=√5) down: bound 1/√fan_in; zero up
        a = made[init][2]
        top, std, _ = _stats(a.down.weight)
        bound = 1 / math.sqrt(d)
        assert top <= bound and abs(std - bound / math.sqrt(3)) < 0.1 * bound
        assert not a.up.weight.any() and not a.up.bias.any() and a.down.weight.shape == (m, d)
    assert not any(p.any() for p in made["zeros"][2].parameters())
    for init in ("mam", "lora", "zeros"):                 # identity at init
        base, model, _ = made[init]
        torch.testing.assert_close(logits(model, IDS), logits(base, IDS), atol=0, rtol=0)
    base, model, _ = made["bert"]
    assert not torch.allclose(logits(model, IDS), logits(base, IDS), atol=1e-6)


# ---------------------------------------------------------------------------------------- bottleneck: parallel

@pytest.mark.parametrize("scaling", [4.0, 0.5])
def test_parallel_adapter_scaling(scaling):
    """MAM's parallel adapter: the FFN output y becomes y + s·A(x), x the FFN's residual input."""
    base, model = rewritten(make_llama, {"match": {"role": "ffn.out", "layers": "0"}, "action": "parallel",
                                         "from": {"role": "ffn.residual"},
                                         "module": {"kind": "bottleneck", "reduction_factor": 2, "scaling": scaling,
                                                    "is_parallel": True, "init_weights": "mam"}})
    adapter = only(model, "BottleneckAdapter")
    fill(adapter)
    seen = {}
    with hooked(base, POST_ATTN_NORM, lambda m, a: seen.update(x=a[0]), pre=True), \
            hooked(base, DOWN_PROJ, lambda m, a, y: y + scaling * bn(adapter, seen["x"])):
        want = logits(base, IDS)
    torch.testing.assert_close(logits(model, IDS), want, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------- bottleneck: sublayer

@pytest.mark.parametrize("flags", [
    {},
    {"original_ln_before": True},
    {"original_ln_before": True, "residual_before_ln": False},
    {"original_ln_before": True, "residual_before_ln": "post_add"},
    {"original_ln_before": True, "original_ln_after": False},
    {"original_ln_after": False, "residual_before_ln": False},
    {"is_parallel": True},
    {"original_ln_before": True, "scaling": 3.0, "residual": False},
])
def test_sublayer_flags_equal_adapterhubs_bottleneck_layer_forward(flags):
    """On BERT's attention sub-layer out = LN(h + x): AdapterHub's pre_forward, Adapter.forward, post_forward,
    written out here from adapters' `bottleneck_layer_forward`."""
    base, model = rewritten(make_bert, {"match": {"role": "attention.residual_add", "layers": "0"},
                                        "action": "sublayer",
                                        "module": {"kind": "bottleneck", "reduction_factor": 4, **flags}})
    adapter = only(model, "BottleneckAdapter")
    fill(adapter, scale=0.5)
    s = flags.get("scaling", 1.0)
    ln_before, ln_after = flags.get("original_ln_before", False), flags.get("original_ln_after", True)
    rbl = flags.get("residual_before_ln", True)

    def reference(module, args, _out):
        hidden, x = args
        h = module.dense(hidden)
        norm = module.LayerNorm
        if flags.get("is_parallel"):
            out = s * bn(adapter, x) + h
        else:
            residual = h if rbl is True else None
            z = h
            if ln_before:
                z = h + x
                if rbl == "post_add":
                    residual = z
                z = norm(z)
            if rbl is False:
                residual = z
            out = s * bn(adapter, z)
            if flags.get("residual", True):
                out = out + residual
        if ln_after:
            out = norm(out + x)
        return out

    with hooked(base, BERT_SELF_OUT, reference):
        want = logits(base, IDS)
    torch.testing.assert_close(logits(model, IDS), want, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------------ LoRA

@pytest.mark.parametrize("r,alpha,rslora", [(4, 8, False), (4, 6, True), (2, 1, False), (8, 16, True)])
def test_lora_scaling(r, alpha, rslora):
    base, model = rewritten(make_llama, {"match": {"role": "attention.q", "layers": "0"}, "action": "wrap",
                                         "module": {"kind": "lora", "r": r, "alpha": alpha, "use_rslora": rslora}})
    lora = only(model, "LoRA")
    fill(lora)
    s = alpha / math.sqrt(r) if rslora else alpha / r
    assert lora.lora_A.shape == (r, 64) and lora.lora_B.shape == (64, r)
    with hooked(base, Q_PROJ, lambda m, a, y: y + s * (a[0] @ lora.lora_A.T @ lora.lora_B.T)):
        want = logits(base, IDS)
    torch.testing.assert_close(logits(model, IDS), want, atol=ATOL, rtol=0)


def test_lora_init():
    found = {}
    for init in ("kaiming", "gaussian"):
        base, model = rewritten(make_llama, {"match": {"role": ["attention.q", "attention.output", "ffn.out"]},
                                             "action": "wrap", "module": {"kind": "lora", "r": 8, "init": init}})
        torch.testing.assert_close(logits(model, IDS), logits(base, IDS), atol=0, rtol=0)   # B = 0
        found[init] = [m for m in model.surgery_adapters.modules() if type(m).__name__ == "LoRA"]
    for lora in found["kaiming"]:                         # uniform(±1/√fan_in)
        bound = 1 / math.sqrt(lora.lora_A.shape[1])
        assert lora.lora_A.abs().max() <= bound and lora.lora_A.abs().max() > 0.9 * bound
        assert not lora.lora_B.any()
    a = torch.cat([lora.lora_A.flatten() for lora in found["gaussian"]])   # N(0, 1/r)
    assert abs(a.std().item() - 1 / 8) < 0.01 and a.abs().max() > 2 / 8


def test_lora_gating_replaces_the_scaling():
    """UniPELT's gated LoRA: y + (x A^T B^T) · mean over tokens of sigmoid(gate(x))."""
    base, model = rewritten(make_llama, {"match": {"role": "attention.q", "layers": "0"}, "action": "wrap",
                                         "module": {"kind": "lora", "r": 4, "alpha": 16, "use_gating": True}})
    lora = only(model, "LoRA")
    fill(lora)

    def reference(m, a, y):
        x = a[0]
        gate = torch.sigmoid(F.linear(x, lora.gate.weight, lora.gate.bias)).mean(dim=1, keepdim=True)
        return y + (x @ lora.lora_A.T @ lora.lora_B.T) * gate

    with hooked(base, Q_PROJ, reference):
        want = logits(base, IDS)
    torch.testing.assert_close(logits(model, IDS), want, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------- DoRA, IA3, KronA

@pytest.mark.parametrize("rslora", [False, True])
def test_dora(rslora):
    r, alpha = 4, 12
    base, model = rewritten(make_llama, {"match": {"role": "attention.q", "layers": "0"}, "action": "wrap",
                                         "module": {"kind": "dora", "r": r, "alpha": alpha, "use_rslora": rslora}})
    dora = only(model, "DoRA")
    W = base.get_submodule(Q_PROJ).weight.detach()
    torch.testing.assert_close(dora.magnitude, torch.linalg.norm(W, dim=1), atol=0, rtol=0)   # m = ‖W‖ per row
    torch.testing.assert_close(logits(model, IDS), logits(base, IDS), atol=ATOL, rtol=0)      # identity at init
    fill(dora)
    with torch.no_grad():
        dora.magnitude.copy_(torch.linspace(0.5, 2.0, W.shape[0]))
    s = alpha / math.sqrt(r) if rslora else alpha / r
    V = W + s * dora.lora_B @ dora.lora_A
    W_new = torch.linspace(0.5, 2.0, W.shape[0])[:, None] * V / torch.linalg.norm(V, dim=1, keepdim=True)
    with hooked(base, Q_PROJ, lambda m, a, y: F.linear(a[0], W_new)):
        want = logits(base, IDS)
    torch.testing.assert_close(logits(model, IDS), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("scale,role,path", [("output", "attention.k", K_PROJ), ("input", "ffn.out", DOWN_PROJ),
                                             ("auto", "ffn.out", DOWN_PROJ), ("auto", "attention.k", K_PROJ)])
def test_ia3_scales_the_side_it_names(scale, role, path):
    base, model = rewritten(make_llama, {"match": {"role": role, "layers": "0"}, "action": "wrap",
                                         "module": {"kind": "ia3", "scale": scale}})
    ia3 = only(model, "IA3")
    torch.testing.assert_close(logits(model, IDS), logits(base, IDS), atol=0, rtol=0)        # ones at init
    module = base.get_submodule(path)
    scales_input = scale == "input" or (scale == "auto" and role == "ffn.out")
    size = module.in_features if scales_input else module.out_features
    l = torch.linspace(0.2, 1.8, size)
    with torch.no_grad():
        ia3.ia3_l.copy_(l)
    if scales_input:
        ref = lambda m, a, y: F.linear(a[0] * l, m.weight, m.bias)     # noqa: E731
    else:
        ref = lambda m, a, y: y * l                                     # noqa: E731
    with hooked(base, path, ref):
        want = logits(base, IDS)
    torch.testing.assert_close(logits(model, IDS), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("opts", [{"scale": 0.5}, {"a_out": 4, "a_in": 16, "scale": 2.0}, {}])
def test_krona(opts):
    base, model = rewritten(make_llama, {"match": {"role": "attention.q", "layers": "0"}, "action": "wrap",
                                         "module": {"kind": "krona", **opts}})
    krona = only(model, "KronA")
    a_out, a_in = opts.get("a_out", 8), opts.get("a_in", 8)               # default: divisor nearest √64 = 8
    assert krona.krona_A.shape == (a_out, a_in) and krona.krona_B.shape == (64 // a_out, 64 // a_in)
    torch.testing.assert_close(logits(model, IDS), logits(base, IDS), atol=0, rtol=0)        # A = 0 at init
    fill(krona)
    A, B, s = krona.krona_A.detach(), krona.krona_B.detach(), opts.get("scale", 1.0)
    delta = torch.zeros(64, 64)                                          # A ⊗ B by its definition
    for i in range(a_out):
        for j in range(a_in):
            delta[i * B.shape[0]:(i + 1) * B.shape[0], j * B.shape[1]:(j + 1) * B.shape[1]] = A[i, j] * B
    with hooked(base, Q_PROJ, lambda m, a, y: y + s * F.linear(a[0], delta)):
        want = logits(base, IDS)
    torch.testing.assert_close(logits(model, IDS), want, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------ prompt init

@pytest.mark.parametrize("init", [{"ids": [5, 7, 9]}, "random_uniform", "normal"])
def test_prompt_init(init):
    """ids: the embedding table's rows for the ids, repeated to the prompt length (PEFT's TEXT init);
    random_uniform: U(-scale, scale); normal: N(0, 1)."""
    length, scale = 7, 0.1
    base, model = rewritten(make_llama, {"match": {"role": "embedding.output"}, "action": "prepend",
                                         "module": {"kind": "prompt", "prompt_length": length, "init": init,
                                                    "random_uniform_scale": scale}})
    prompt = only(model, "PromptTuning").prompt_embedding.detach()
    assert prompt.shape == (length, 64)
    if isinstance(init, dict):
        table = base.get_input_embeddings().weight.detach()
        torch.testing.assert_close(prompt, table[[5, 7, 9, 5, 7, 9, 5]], atol=0, rtol=0)
    elif init == "random_uniform":
        assert prompt.abs().max() <= scale and prompt.abs().max() > 0.9 * scale
        assert abs(prompt.std().item() - scale / math.sqrt(3)) < 0.15 * scale / math.sqrt(3)
    else:
        assert abs(prompt.std().item() - 1.0) < 0.15 and abs(prompt.mean().item()) < 0.15
