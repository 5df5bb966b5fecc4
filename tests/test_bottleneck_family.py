"""The bottleneck family (AdapterHub BnConfig presets, invertible adapters, Compacter): parameter counts from the
formulas, placement, each method's equation against a hand-written computation, invertibility and PHM."""
import pytest
import torch
import torch.nn.functional as F

import surgery
from models import (assert_same_state, example_inputs, make_bert, make_gpt2, make_llama, make_minigpt, make_minilm,
                    perturb, run, state, token_ids)
from surgery.spec import spec_from
from surgery.modules.invertible import GLOWCoupling, NICECoupling
from surgery.modules.phm import PHMLayer, PHMOptions

PRESETS = ["pfeiffer", "houlsby", "parallel", "adapterplus", "pfeiffer_inv", "houlsby_inv", "compacter", "compacterpp"]


# ------------------------------------------------------------------------------------- AdapterHub's formulas

def bottleneck(d, m):
    """One adapter: down Linear(d, m) and up Linear(m, d) with biases."""
    return 2 * d * m + m + d


def phm_adapter(d, m, n=4, k=1):
    """Down PHM(d -> m) and up PHM(m -> d), rank-k blocks: W_left [n, in/n, k], W_right [n, k, out/n], bias."""
    return (d + m) * 2 * k + m + d


def nice(d):
    return d * d // 2 + 3 * d // 2


def expected_count(preset, d, L):
    return {
        "pfeiffer": L * bottleneck(d, d // 16),
        "houlsby": 2 * L * bottleneck(d, d // 16),
        "parallel": L * bottleneck(d, d // 2),
        "adapterplus": L * (bottleneck(d, d // 96) + d),       # + the channel scaling vector
        "pfeiffer_inv": L * bottleneck(d, d // 16) + nice(d),
        "houlsby_inv": 2 * L * bottleneck(d, d // 16) + nice(d),
        "compacter": 2 * L * phm_adapter(d, d // 32) + 4 ** 3,  # + one shared 4x4x4 rule
        "compacterpp": L * phm_adapter(d, d // 32) + 4 ** 3,
    }[preset]


# the notes' table (adapters 1.3.0, measured): the formulas above must give these
ADAPTERHUB_BERT_BASE = {"pfeiffer": 894_528, "houlsby": 1_789_056, "parallel": 7_091_712, "adapterplus": 165_984,
                        "pfeiffer_inv": 1_190_592, "houlsby_inv": 2_085_120, "compacter": 57_088, "compacterpp": 28_576}
ADAPTERHUB_MINILM = {"pfeiffer": 113_040, "houlsby": 226_080, "parallel": 888_192, "adapterplus": 23_064,
                     "pfeiffer_inv": 187_344, "houlsby_inv": 300_384, "compacter": 14_320, "compacterpp": 7_192}


def test_formulas_reproduce_adapterhub_table():
    for preset in PRESETS:
        assert expected_count(preset, 768, 12) == ADAPTERHUB_BERT_BASE[preset], preset
        assert expected_count(preset, 384, 6) == ADAPTERHUB_MINILM[preset], preset


def _counts(model):
    found = {}
    for preset in PRESETS:
        surgery.apply(model, f"specs/{preset}.yaml", name=preset)
        found[preset] = surgery.trainable_parameters(model)[0]
        surgery.remove(model, preset)
    return found


def test_counts_bert_base_on_meta():
    from transformers import BertConfig, BertModel
    with torch.device("meta"):
        model = BertModel(BertConfig())
    assert _counts(model) == {p: expected_count(p, 768, 12) for p in PRESETS}


def test_counts_real_minilm():
    model = make_minilm().eval()
    ids = token_ids(2, 9, vocab=1000)
    base = model(input_ids=ids).last_hidden_state.detach()
    assert _counts(model) == {p: expected_count(p, 384, 6) for p in PRESETS}
    torch.testing.assert_close(model(input_ids=ids).last_hidden_state, base, atol=0, rtol=0)   # removed cleanly
    surgery.apply(model, "specs/parallel.yaml")        # and the one that starts exactly at the base
    assert torch.equal(model(input_ids=ids).last_hidden_state, base)


# ------------------------------------------------------------------------------------------------ placement

PLACEMENT = {
    "bert": {"block": "encoder.layer.{i}", "sub": "encoder.layer.{i}.output", "ffn_out": "encoder.layer.{i}.output.dense",
             "attn_out": "encoder.layer.{i}.attention.output.dense", "lm_head": None},
    "llama": {"block": "model.layers.{i}", "sub": "model.layers.{i}", "ffn_out": "model.layers.{i}.mlp.down_proj",
              "attn_out": "model.layers.{i}.self_attn.o_proj", "lm_head": "lm_head"},
    "minigpt": {"block": "blocks.{i}", "sub": "blocks.{i}", "ffn_out": "blocks.{i}.ffn.3",
                "attn_out": "blocks.{i}.attn.out_proj", "lm_head": "head"},
    "gpt2": {"block": "transformer.h.{i}", "sub": "transformer.h.{i}", "ffn_out": "transformer.h.{i}.mlp.c_proj",
             "attn_out": "transformer.h.{i}.attn.c_proj", "lm_head": "lm_head"},
}
FACTORIES = {"bert": make_bert, "llama": make_llama, "minigpt": make_minigpt, "gpt2": make_gpt2}


def test_plan_places_every_preset(rewritten):
    arch, model, _ = rewritten
    where = {k: (v.format if v else None) for k, v in PLACEMENT[arch].items()}
    layers = range(2)

    def sites(preset):
        return [(m.rule, m.module, m.role) for m in surgery.plan(model, f"specs/{preset}.yaml")]
    seqbn = [("ffn_adapter", where["sub"](i=i), "ffn.residual_add") for i in layers]
    houlsby = ([("attention_adapter", where["attn_out"](i=i), "attention.output") for i in layers]
               + [("ffn_adapter", where["ffn_out"](i=i), "ffn.out") for i in layers])
    inv = [("invertible_adapter", where["block"](i=0), "embedding.output")]
    if where["lm_head"]:
        inv.append(("invertible_adapter_inverse", where["lm_head"](), "lm_head"))
    assert sites("pfeiffer") == seqbn
    assert sites("adapterplus") == seqbn
    assert sites("compacterpp") == seqbn
    assert sites("houlsby") == houlsby
    assert sites("compacter") == houlsby
    assert sites("parallel") == [("ffn_adapter", where["ffn_out"](i=i), "ffn.out") for i in layers]
    assert sites("pfeiffer_inv") == seqbn + inv
    assert sites("houlsby_inv") == houlsby + inv


# ------------------------------------------------------------------- each method's equation, one layer by hand

ACT = {"relu": F.relu, "swish": F.silu, "gelu": F.gelu}


def kron_weight(layer: PHMLayer) -> torch.Tensor:
    """The dense reference: H = Σᵢ kron(Cᵢ, W_leftᵢ W_rightᵢ), an in×out matrix."""
    C = layer.phm_rule()
    W = layer.W_left @ layer.W_right if layer.factorized_W else layer.W
    return sum(torch.kron(C[i], W[i]) for i in range(layer.n))


def project(layer, z):
    if isinstance(layer, PHMLayer):
        return z @ kron_weight(layer) + layer.b
    return F.linear(z, layer.weight, layer.bias)


def A(adapter, z, act):
    """up(act(down(z))) times the scaling, as the papers write the bottleneck."""
    return project(adapter.up, ACT[act](project(adapter.down, z))) * adapter.scaling


def layer_norm(module):
    return lambda v: F.layer_norm(v, module.normalized_shape, module.weight, module.bias, module.eps)


def rms_norm(module):
    return lambda v: module.weight * (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + module.variance_epsilon))


def conv1d(module, v):
    return v @ module.weight + module.bias


def out_of(value):
    return value[0] if isinstance(value, tuple) else value


class Recorder:
    """Hooks that read (never change) values at module boundaries during one forward."""

    def __init__(self):
        self.values, self.handles = {}, []

    def input(self, module, name, index=0):
        def pre(mod, args, kwargs):
            self.values[name] = args[index] if index < len(args) else kwargs["hidden_states"]
        self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))

    def output(self, module, name):
        self.handles.append(module.register_forward_hook(lambda mod, args, out: self.values.__setitem__(name, out_of(out))))

    def close(self):
        for h in self.handles:
            h.remove()


def sublayers(arch, model, rec: Recorder):
    """For layer 0: per sub-layer a function giving (h, x, norm, out) from the recorded values, by hand."""
    if arch == "bert":
        layer = model.encoder.layer[0]
        rec.input(layer.attention.output, "attn_ctx", 0)
        rec.input(layer.attention.output, "attn_x", 1)
        rec.output(layer.attention.output, "attn_out")
        rec.input(layer.output, "ffn_inter", 0)
        rec.input(layer.output, "ffn_x", 1)
        rec.output(layer.output, "ffn_out")
        so, fo = layer.attention.output, layer.output
        return {
            "attention": lambda v: (F.linear(v["attn_ctx"], so.dense.weight, so.dense.bias), v["attn_x"],
                                    layer_norm(so.LayerNorm), v["attn_out"]),
            "ffn": lambda v: (F.linear(v["ffn_inter"], fo.dense.weight, fo.dense.bias), v["ffn_x"],
                              layer_norm(fo.LayerNorm), v["ffn_out"]),
        }
    if arch == "llama":
        layer = model.model.layers[0]
        rec.input(layer, "x0")
        rec.input(layer.self_attn.o_proj, "o_in")
        rec.input(layer.post_attention_layernorm, "x1")
        rec.output(layer, "out")
        mlp = layer.mlp

        def ffn(v):
            n = rms_norm(layer.post_attention_layernorm)(v["x1"])
            h = F.linear(F.silu(F.linear(n, mlp.gate_proj.weight)) * F.linear(n, mlp.up_proj.weight), mlp.down_proj.weight)
            return h, v["x1"], None, v["out"]
        return {"attention": lambda v: (F.linear(v["o_in"], layer.self_attn.o_proj.weight), v["x0"], None, v["x1"]),
                "ffn": ffn}
    if arch == "gpt2":
        block = model.transformer.h[0]
        rec.input(block.ln_2, "x1")
        rec.output(block, "out")

        def ffn(v):
            n = layer_norm(block.ln_2)(v["x1"])
            h = conv1d(block.mlp.c_proj, F.gelu(conv1d(block.mlp.c_fc, n), approximate="tanh"))
            return h, v["x1"], None, v["out"]
        return {"ffn": ffn}
    block = model.blocks[0]
    rec.input(block.ffn, "x1")
    rec.output(block, "out")
    ffn_in, ffn_out = block.ffn[0], block.ffn[3]
    return {"ffn": lambda v: (F.linear(F.relu(F.linear(v["x1"], ffn_in.weight, ffn_in.bias)), ffn_out.weight,
                                       ffn_out.bias), v["x1"], layer_norm(block.ln2), v["out"])}


def identity(v):
    return v


# (sub-layers it changes, the paper's equation for one sub-layer: (h, x, LN, adapter) -> output)
METHODS = {
    "pfeiffer": (["ffn"], lambda h, x, N, a: N(A(a, N(h + x), "relu") + h + x)),
    "houlsby": (["attention", "ffn"], lambda h, x, N, a: N(x + h + A(a, h, "swish"))),
    "parallel": (["ffn"], lambda h, x, N, a: N(h + x + A(a, x, "relu"))),
    "adapterplus": (["ffn"], lambda h, x, N, a: N(h + x) + A(a, N(h + x), "gelu")),
    "compacter": (["attention", "ffn"], lambda h, x, N, a: N(x + h + A(a, h, "gelu"))),
    "compacterpp": (["ffn"], lambda h, x, N, a: N(A(a, N(h + x), "gelu") + h + x)),
}


@pytest.fixture(scope="module", params=["bert", "llama", "minigpt", "gpt2"])
def rewritten(request):
    """One model per architecture carrying every method as a named adapter (one trace; one active at a time).
    Also returns what it computed before perturbing the adapters: the base output and each method's output."""
    arch = request.param
    model = FACTORIES[arch](hidden=128).eval()
    ids = token_ids(3, 10)
    with torch.no_grad():
        outputs = {"base": run(arch, model, ids)}
        for i, method in enumerate(METHODS):
            surgery.apply(model, f"specs/{method}.yaml", name=method,
                          example_inputs=example_inputs(arch, model) if i == 0 else None)
        for method in METHODS:
            surgery.set_active(model, method)
            outputs[method] = run(arch, model, ids)
    perturb(model, 0.05)
    return arch, model, outputs


@pytest.mark.parametrize("method", list(METHODS))
def test_layer_equals_the_papers_equation(rewritten, method):
    arch, model, _ = rewritten
    changed, equation = METHODS[method]
    surgery.set_active(model, method)
    rec = Recorder()
    parts = sublayers(arch, model, rec)
    ids = token_ids(2, 7)
    with torch.no_grad():
        run(arch, model, ids)
        rec.close()
        adapters = model.surgery_adapters.adapters[method]
        for part in parts:
            h, x, norm, out = parts[part](rec.values)
            rule = "attention_adapter" if part == "attention" else "ffn_adapter"
            if part not in changed:
                torch.testing.assert_close(out, (norm or identity)(h + x), atol=1e-5, rtol=1e-5)
                continue
            adapter = next(a for key, a in adapters[rule].items() if _layer0(key))
            expected = equation(h, x, norm or identity, adapter)
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
            assert (expected - (norm or identity)(h + x)).abs().max() > 1e-3   # the adapter really contributes


def _layer0(key):
    return any(tag in key for tag in ("layer_0_", "layers_0_", "blocks_0_", "h_0_"))


# ------------------------------------------------------------------------------------------- parallel, zero

def test_parallel_with_zeroed_adapter_is_the_base_exactly(rewritten):
    arch, model, outputs = rewritten
    ids = token_ids(3, 10)
    assert torch.equal(outputs["parallel"], outputs["base"])      # mam init: the up projection starts at zero
    assert not torch.equal(outputs["pfeiffer"], outputs["base"])  # (bert init does not)
    surgery.set_active(model, "parallel")
    adapters = list(model.surgery_adapters.adapters["parallel"]["ffn_adapter"].values())
    saved = [(a.up.weight.detach().clone(), a.up.bias.detach().clone()) for a in adapters]
    with torch.no_grad():
        assert not torch.equal(run(arch, model, ids), outputs["base"])   # perturbed: it contributes
        for a in adapters:
            a.up.weight.zero_()
            a.up.bias.zero_()
        assert torch.equal(run(arch, model, ids), outputs["base"])
        for a, (w, b) in zip(adapters, saved):
            a.up.weight.copy_(w)
            a.up.bias.copy_(b)


# ------------------------------------------------------------------------------------------------ invertible

@pytest.mark.parametrize("block", [NICECoupling, GLOWCoupling])
@pytest.mark.parametrize("dim", [64, 37])
def test_coupling_inverse_roundtrip(block, dim):
    torch.manual_seed(0)
    coupling = block(dim, "relu", 2)
    with torch.no_grad():
        for p in coupling.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(3, 11, dim)
    y = coupling(x)
    assert (y - x).abs().max() > 1e-2
    torch.testing.assert_close(coupling.inverse(y), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(coupling(coupling.inverse(x)), x, atol=1e-5, rtol=0)


def embedding_and_head(arch, model, ids):
    """Layer 0's input and the LM head's input, with the values they come from: the embedding output (a run with
    the adapters off; by hand for MiniGPT, whose is no module's output) and the final norm's output (by hand from
    its input, since the inverse may be realized on that norm's output)."""
    rec = Recorder()
    if arch == "minigpt":
        first, norm, head, final = model.blocks[0], model.ln_f, model.head, layer_norm(model.ln_f)
    else:
        first, norm, head = {
            "bert": lambda m: (m.encoder.layer[0], None, None),
            "llama": lambda m: (m.model.layers[0], m.model.norm, m.lm_head),
            "gpt2": lambda m: (m.transformer.h[0], m.transformer.ln_f, m.lm_head),
        }[arch](model)
        final = rms_norm(norm) if arch == "llama" else (layer_norm(norm) if norm is not None else None)
    rec.input(first, "layer0_in")
    if head is not None:
        rec.input(norm, "norm_in")
        rec.input(head, "head_in")
    with torch.no_grad():
        with surgery.disable(model):
            run(arch, model, ids)
        emb = rec.values["layer0_in"]
        run(arch, model, ids)
    rec.close()
    v = dict(rec.values, emb=emb)
    if head is not None:
        v["final_norm"] = final(v["norm_in"])
    return v


def perturb_adapter(model, name, scale):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.surgery_adapters.adapters[name].parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def test_invertible_adapter_on_embeddings_and_inverse_before_lm_head(rewritten):
    arch, model, _ = rewritten
    spec = surgery.load_spec("specs/houlsby_inv.yaml").model_dump(by_alias=True)
    spec["include"] = []
    spec["rules"] = [r for r in spec["rules"] if r["name"].startswith("invertible")]
    d = 128
    counts = {"nice": nice(d), "glow": 3 * d * d // 4 + 5 * d // 2}   # AdapterHub's NICE and GLOW formulas
    for block_type in ("nice", "glow"):
        spec["rules"][0]["module"]["block_type"] = block_type
        surgery.apply(model, spec, name=block_type)
        surgery.set_active(model, block_type)
        perturb_adapter(model, block_type, 0.1)
        adapters = model.surgery_adapters.adapters[block_type]
        (forward,) = adapters["invertible_adapter"].values()
        inverses = list(adapters["invertible_adapter_inverse"].values())
        assert len(inverses) == (0 if arch == "bert" else 1)
        assert all(list(inverse.parameters()) == [] for inverse in inverses)   # one set of weights, shared
        assert sum(p.numel() for p in adapters.parameters()) == counts[block_type]
        v = embedding_and_head(arch, model, token_ids())
        with torch.no_grad():
            assert (v["layer0_in"] - v["emb"]).abs().max() > 1e-3
            torch.testing.assert_close(v["layer0_in"], forward.block(v["emb"]), atol=1e-6, rtol=0)
            if inverses:
                torch.testing.assert_close(v["head_in"], forward.block.inverse(v["final_norm"]), atol=1e-6, rtol=0)
                torch.testing.assert_close(forward.block(v["head_in"]), v["final_norm"], atol=1e-5, rtol=0)
        surgery.remove(model, block_type)


def test_per_layer_reduction_factor_and_gating_count(rewritten):
    arch, model, _ = rewritten
    spec = {"rules": [{"name": "a", "match": {"role": "ffn.residual_add"}, "action": "sublayer",
                       "module": {"kind": "bottleneck", "reduction_factor": {0: 4, "default": 16},
                                  "original_ln_before": True, "use_gating": True, "ln_before": True}}]}
    surgery.apply(model, spec, name="per_layer")
    d = 128
    per_layer = [bottleneck(d, d // rf) + (d + 1) + 2 * d for rf in (4, 16)]   # + gate Linear(d, 1), + LN
    assert sum(p.numel() for p in model.surgery_adapters.adapters["per_layer"].parameters()) == sum(per_layer)
    surgery.remove(model, "per_layer")


def test_inverse_of_unknown_rule_is_an_error_and_model_untouched(rewritten):
    arch, model, _ = rewritten
    before = state(model)
    spec = {"rules": [{"name": "inv", "match": {"role": "block.input", "layers": 0}, "action": "insert_after",
                       "module": {"kind": "invertible", "inverse_of": "nowhere"}}]}
    with pytest.raises(surgery.RewriteError, match="nowhere"):
        surgery.apply(model, spec, name="broken")
    assert_same_state(before, state(model))
    with pytest.raises(surgery.SpecError, match="belong"):
        spec_from({"rules": [{"match": {"role": "lm_head"}, "action": "insert_before",
                              "module": {"kind": "invertible", "inverse_of": "x", "block_type": "glow"}}]})


# ------------------------------------------------------------------------------------------------- Compacter

@pytest.mark.parametrize("opts", [
    {},                                                        # Compacter's defaults: rank-1 blocks
    {"phm_rank": 3, "factorized_phm_rule": True},
    {"factorized_phm_W": False, "phm_dim": 8},
    {"phm_bias": False, "hypercomplex_nonlinearity": "normal", "phm_init_range": 0.1},
])
@pytest.mark.parametrize("shape", [(768, 24), (24, 768), (64, 64)])
def test_phm_layer_equals_the_dense_kronecker_sum(opts, shape):
    torch.manual_seed(0)
    options = PHMOptions(**opts)
    layer = PHMLayer(*shape, options)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(5, 13, shape[0])
    expected = x @ kron_weight(layer) + (layer.b if layer.b is not None else 0)
    paths = set()
    for tokens in (1, 65):
        xs = x.reshape(-1, shape[0])[:tokens]
        paths.add(layer.path(tokens))
        torch.testing.assert_close(layer(xs), expected.reshape(-1, shape[1])[:tokens], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    if options.factorized_phm_W and shape != (64, 64):
        assert "dense" not in paths       # the thin products: H is never built


def test_compacter_shares_one_rule_across_all_phm_layers(rewritten):
    arch, model, _ = rewritten
    keys = [k for k in model.state_dict() if k.endswith(".rule")]
    assert sorted(k.split(".")[2] for k in keys) == ["compacter", "compacterpp"]   # one per adapter set
    for name, count in (("compacter", 2 * 2 * 2), ("compacterpp", 2 * 2)):
        layers = [m for m in model.surgery_adapters.adapters[name].modules() if isinstance(m, PHMLayer)]
        assert len(layers) == count
        assert len({id(layer.phm_rule) for layer in layers}) == 1
    surgery.set_active(model, "compacter")
    rule = model.surgery_adapters.adapters["compacter"]["attention_adapter"].get_submodule(
        next(iter(model.surgery_adapters.adapters["compacter"]["attention_adapter"]))).phm_rule.rule
    assert rule.requires_grad and rule.shape == (4, 4, 4)
    rule.grad = None
    run(arch, model, token_ids()).square().sum().backward()
    assert rule.grad is not None and rule.grad.abs().sum() > 0
    model.zero_grad()


# ------------------------------------------------------------------------------------------------ bad input

def test_flags_that_need_the_sublayer_action_are_refused(rewritten):
    arch, model, _ = rewritten
    before = state(model)
    spec = {"rules": [{"match": {"role": "ffn.out"}, "action": "insert_after", "through": ["dropout"],
                       "module": {"kind": "bottleneck", "original_ln_before": True}}]}
    with pytest.raises(surgery.RewriteError, match="sublayer"):
        surgery.apply(model, spec, name="broken")
    assert_same_state(before, state(model))
    spec["rules"][0]["module"] = {"kind": "bottleneck", "phm_layer": True, "bottleneck_size": 6}
    with pytest.raises(surgery.RewriteError, match="divisible by phm_dim"):
        surgery.apply(model, spec, name="broken")
    assert_same_state(before, state(model))


def test_stochastic_depth_drops_whole_samples_in_training():
    from surgery.modules.bottleneck import BottleneckAdapter
    torch.manual_seed(0)
    adapter = BottleneckAdapter(32, 4, init_weights="houlsby", stochastic_depth=0.5, scaling="channel")
    z = torch.randn(64, 5, 32)
    adapter.eval()
    kept = adapter.bottleneck(z)
    adapter.train()
    dropped = adapter.bottleneck(z)
    zero = [bool((dropped[i] == 0).all()) for i in range(64)]
    assert 0 < sum(zero) < 64                              # whole samples, some of them
    for i in range(64):
        if not zero[i]:
            torch.testing.assert_close(dropped[i], kept[i] / 0.5)
