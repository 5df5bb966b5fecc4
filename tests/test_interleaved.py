"""q, k and v interleaved head by head in one packed projection (issue 16).

BLOOM's, GPT-NeoX's and Persimmon's `query_key_value` write [q_h, k_h, v_h] per head; Falcon's new decoder
architecture writes [q_g0 .. q_g(n-1), k_g, v_g] per KV group; CodeGen's `qkv_proj` writes [q, v, k] per model-
parallel chunk. `attention.q/k/v` are the columns each attention operand reads (surgery/modules/columns.py), and
every adapter on them changes exactly those columns: checked against the layouts the models' own code defines,
against a hand computation of LoRA, and for merge, unmerge, save/load, PEFT and generate() with the KV cache.
"""
from __future__ import annotations

import copy

import pytest
import torch

import surgery
from surgery.modules.columns import Columns, indices
from surgery.rewrite.host import store_of

VOCAB, HIDDEN, HEADS, HEAD_DIM = 96, 64, 4, 16


def _model(arch: str):
    import transformers
    base = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS,
                intermediate_size=128, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    name, cfg = {
        "bloom": ("Bloom", dict(n_layer=2, n_head=HEADS)),
        "gpt_neox": ("GPTNeoX", {}),      # rotary_pct 0.25: each head is sliced into a rotated and a passed part
        "falcon": ("Falcon", dict(new_decoder_architecture=True, num_kv_heads=2, bias=False)),
        "falcon_mqa": ("Falcon", {}),     # multi-query: [q | k | v], contiguous ranges (the fast special case)
        "persimmon": ("Persimmon", {}),
        "codegen": ("CodeGen", dict(n_embd=HIDDEN, n_layer=2, n_head=HEADS, n_positions=64, rotary_dim=8)),
    }[arch]
    base.update(cfg)
    config = getattr(transformers, f"{name}Config")(**base)
    torch.manual_seed(0)
    model = getattr(transformers, f"{name}ForCausalLM")(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _expected(arch: str) -> dict[str, list[int]]:
    """The columns of q, k and v in the packed output of one layer, as each model's code lays them out."""
    d, h = HEAD_DIM, HEADS
    span = lambda start, n: list(range(start, start + n))   # noqa: E731
    if arch in ("bloom", "gpt_neox", "persimmon"):           # per head [q_h, k_h, v_h]
        return {r: sum((span(i * 3 * d + o * d, d) for i in range(h)), []) for o, r in enumerate("qkv")}
    if arch == "falcon":                                     # per KV group [q_g0, q_g1, k_g, v_g]
        groups, n = 2, h // 2
        width = (n + 2) * d
        return {"q": sum((span(g * width, n * d) for g in range(groups)), []),
                "k": sum((span(g * width + n * d, d) for g in range(groups)), []),
                "v": sum((span(g * width + (n + 1) * d, d) for g in range(groups)), [])}
    if arch == "falcon_mqa":
        return {"q": span(0, h * d), "k": span(h * d, d), "v": span(h * d + d, d)}
    if arch == "codegen":                                    # 4 model-parallel chunks of [q, v, k], one head each
        chunk = 3 * h * d // 4
        return {r: sum((span(m * chunk + o * d, d) for m in range(4)), []) for o, r in enumerate("qvk")}
    raise KeyError(arch)


def _ids(seed=0, length=8):
    return torch.randint(3, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


_BASES: dict[str, torch.nn.Module] = {}


def _base(arch):
    if arch not in _BASES:
        _BASES[arch] = _model(arch)
    return copy.deepcopy(_BASES[arch])


def _packed_path(model) -> str:
    return next(n for n, m in model.named_modules() if n.endswith(("query_key_value", "qkv_proj")) and ".0." in n)


def _projection_io(model, path, ids):
    """The packed projection's input and output in the forward on `ids`."""
    seen = {}
    handle = model.get_submodule(path).register_forward_hook(
        lambda mod, args, out: seen.update(x=args[0].detach(), y=out.detach()))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        handle.remove()
    return seen["x"], seen["y"], logits


def _randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.surgery_adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


ARCHS = ["bloom", "gpt_neox", "falcon", "falcon_mqa", "persimmon", "codegen"]


@pytest.mark.parametrize("arch", ARCHS)
def test_sites_are_the_columns_each_operand_reads(arch):
    model = _base(arch)
    matches = surgery.plan(model, {"rules": [{"name": "x", "match": {"role": ["attention.q", "attention.k",
                                                                               "attention.v"]},
                                              "action": "train", "expect": "any"}]})
    expected = _expected(arch)
    assert len(matches) == 6
    for m in matches:
        packed = m.site.extra["packed"]
        assert indices(packed, m.site.linear.out_features) == expected[m.role[-1]], (m.role, packed)
        assert isinstance(packed, Columns) == (arch != "falcon_mqa")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("realize", ["auto", "weight"])
def test_lora_on_q_is_the_hand_computation_and_merges(arch, realize, tmp_path):
    """LoRA on attention.q adds x·Aᵀ·Bᵀ·s to q's columns only (k and v bit-identical), on activations (hooks) and
    on the weight (a parametrization); merge equals the unmerged output, unmerge restores the weights exactly,
    and save/load gives the same model."""
    model, ids = _base(arch), _ids()
    base = copy.deepcopy(model)
    path = _packed_path(model)
    spec = {"name": "q", "rules": [{"name": "lora", "match": {"role": "attention.q"}, "action": "wrap",
                                    "module": {"kind": "lora", "r": 2, "alpha": 4}, "realize": realize}]}
    surgery.apply(model, spec)
    _randomize(model)
    site = next(s for s in store_of(model).records["default"].weight_sites if s.owner_path == path)
    assert site.realized == ("activation" if realize == "auto" else "weight")
    x, y0, _ = _projection_io(base, path, ids)
    _, y, logits = _projection_io(model, path, ids)
    q = _expected(arch)["q"]
    others = [i for i in range(y.shape[-1]) if i not in set(q)]
    lora = site.adapter
    delta = (x @ lora.lora_A.detach().t() @ lora.lora_B.detach().t()) * lora.scaling
    expected = y0.clone()
    expected[..., q] += delta
    assert torch.equal(y[..., others], y0[..., others])          # k and v untouched, bit for bit
    assert (y[..., q] - y0[..., q]).abs().max() > 1e-2            # q did change
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)

    surgery.save(model, tmp_path / "q")
    loaded = surgery.load(copy.deepcopy(base), tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, logits, atol=1e-6, rtol=0)

    weights = {k: v.clone() for k, v in base.state_dict().items()}
    surgery.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, logits, atol=1e-5, rtol=1e-5)
    merged = model.state_dict()[f"{path}.weight"]
    w = merged.t() if site.layout == "in_out" else merged
    w0 = weights[f"{path}.weight"]
    w0 = w0.t() if site.layout == "in_out" else w0
    assert torch.equal(w[others], w0[others]) and not torch.equal(w[q], w0[q])
    surgery.unmerge(model)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in weights.items())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["ia3", "dora", "oft", "pissa", "olora", "vera", "boft", "loha", "adalora"])
def test_methods_on_interleaved_columns(kind):
    """Every wrap method on BLOOM's q/k/v columns: identity where the method is, only the matched columns change
    (IA3 on k and v: q untouched; the others on q: k and v untouched), merged == unmerged."""
    model, ids = _base("bloom"), _ids()
    base = copy.deepcopy(model)
    path = _packed_path(model)
    roles = ["attention.k", "attention.v"] if kind == "ia3" else ["attention.q"]
    options = {"ia3": {"scale": "output"}, "dora": {"r": 2}, "oft": {"block_size": 8}, "pissa": {"r": 2, "init": "pissa"},
               "olora": {"r": 2, "init": "olora"}, "vera": {"r": 4}, "boft": {"block_size": 4, "n_butterfly_factor": 1},
               "loha": {"r": 2}, "adalora": {"init_r": 2, "target_r": 2}}[kind]
    module = {"kind": kind if kind not in ("pissa", "olora") else "lora", **options}
    surgery.apply(model, {"rules": [{"name": "m", "match": {"role": roles}, "action": "wrap", "module": module}]})
    _, y0, _ = _projection_io(base, path, ids)
    _, y_init, _ = _projection_io(model, path, ids)
    torch.testing.assert_close(y_init, y0, atol=1e-5, rtol=1e-5)      # every one of these starts at the base
    _randomize(model)
    _, y, logits = _projection_io(model, path, ids)
    cols = sorted(sum((_expected("bloom")[r[-1]] for r in roles), []))
    others = [i for i in range(y.shape[-1]) if i not in set(cols)]
    assert torch.equal(y[..., others], y0[..., others])
    assert (y[..., cols] - y0[..., cols]).abs().max() > 1e-3
    surgery.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, logits, atol=1e-4, rtol=1e-4)
    surgery.unmerge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["persimmon", "codegen"])
def test_generate_with_cache_equals_full_forwards(arch):
    """LoRA on q and v of the interleaved projection: each generate() step's logits with the KV cache equal a
    full forward without it (persimmon and codegen are not in the architecture matrix)."""
    model = _base(arch)
    surgery.apply(model, "lora")
    _randomize(model)
    prompt = _ids(length=6)
    with torch.no_grad():
        out = model.generate(input_ids=prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        for t, step in enumerate(out.logits):
            ref = model(input_ids=out.sequences[:, :prompt.shape[1] + t], use_cache=False).logits[:, -1]
            torch.testing.assert_close(step, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("spec", ["lora", "ia3"])
def test_to_peft_of_interleaved_sites_loads_in_peft(spec, tmp_path):
    """One PEFT LoRA on BLOOM's query_key_value computes our q and v sites: B holds each site's rows (q's and v's
    heads); one IA3 vector holds k's and v's scales with ones on q's heads. PEFT's output equals ours. DoRA on
    part of the projection has no PEFT form: refused, naming it."""
    peft = pytest.importorskip("peft")
    model, ids = _base("bloom"), _ids()
    base = copy.deepcopy(model)
    if spec == "lora":
        dora = copy.deepcopy(model)
        surgery.apply(dora, "dora")
        with pytest.raises(surgery.SurgeryError, match="DoRA on part of a packed weight"):
            surgery.to_peft(dora, tmp_path / "dora")
    surgery.apply(model, spec)
    _randomize(model)
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    surgery.to_peft(model, tmp_path / "peft")
    theirs_model = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    with torch.no_grad():
        theirs = theirs_model(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_llama_adapter_projects_prompts_with_the_k_and_v_columns():
    """LLaMA-Adapter on GPT-NeoX: its prompts go through the layer's own k and v, i.e. the k and v columns of the
    interleaved query_key_value (bias included), and the model is the base at init."""
    model, ids = _base("gpt_neox"), _ids()
    base = copy.deepcopy(model)
    surgery.apply(model, "llama_adapter")
    path = _packed_path(model)
    prompt = next(m for n, m in model.surgery_adapters.named_modules() if type(m).__name__ == "AdaptionPrompt"
                  and "layers_0" in n)
    x = torch.randn(5, HIDDEN)
    full = model.get_submodule(path)(x)
    for proj, role in zip(prompt._proj, "kv"):
        torch.testing.assert_close(proj(x), full[:, _expected("gpt_neox")[role]], atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_insert_after_a_packed_q_acts_on_its_columns():
    """insert_after on attention.q of a packed projection sees q's columns only (it once got GPT-2's whole c_attn
    output, k and v included) and leaves k and v as they were; insert_before (the input q, k and v share) is
    refused."""
    from surgery.errors import RewriteError
    for arch in ("bloom", "falcon_mqa"):
        model, ids = _base(arch), _ids()
        base = copy.deepcopy(model)
        path = _packed_path(model)
        surgery.apply(model, {"rules": [{"name": "b", "match": {"role": "attention.q"}, "action": "insert_after",
                                         "module": {"kind": "bottleneck", "reduction_factor": 16.0}}]})
        _randomize(model)
        downs = [m for n, m in model.surgery_adapters.named_modules() if n.endswith(".down")]
        assert downs and all(m.in_features == HEADS * HEAD_DIM for m in downs)
        _, y0, _ = _projection_io(base, path, ids)
        _, y, _ = _projection_io(model, path, ids)
        q = _expected(arch)["q"]
        others = [i for i in range(y.shape[-1]) if i not in set(q)]
        assert torch.equal(y[..., others], y0[..., others]) and not torch.equal(y[..., q], y0[..., q])
    with pytest.raises(RewriteError, match="packed projection"):
        surgery.apply(_base("bloom"), {"rules": [{"name": "b", "match": {"role": "attention.q"},
                                                  "action": "insert_before", "module": {"kind": "bottleneck"}}]})


@pytest.mark.parametrize("kind", ["dora", "oft"])
def test_adapters_that_keep_the_base_weight_read_the_live_rows(kind):
    """DoRA (and OFT on a packed site) use the base weight on the activation path. q's heads of an interleaved
    projection are no view of the parameter: they are read from it when used, so a base weight changed after
    apply (a merge of another adapter set, load_state_dict) gives the same output on activations as on the weight."""
    model, ids = _base("bloom"), _ids()
    module = {"kind": kind, **({"r": 2} if kind == "dora" else {"block_size": 8})}
    spec = lambda realize: {"rules": [{"name": "m", "match": {"role": "attention.q"}, "action": "wrap",   # noqa: E731
                                       "module": module, "realize": realize}]}
    on_weight = copy.deepcopy(model)
    surgery.apply(model, spec("activation"))
    surgery.apply(on_weight, spec("weight"))
    _randomize(model)
    on_weight.surgery_adapters.load_state_dict(model.surgery_adapters.state_dict())
    path = _packed_path(model)
    with torch.no_grad():
        for m in (model, on_weight):
            weight = dict(m.named_parameters())[f"{path}.weight"] if f"{path}.weight" in dict(m.named_parameters()) \
                else m.get_submodule(path).parametrizations.weight.original
            weight.mul_(1.25)
        torch.testing.assert_close(model(input_ids=ids).logits, on_weight(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


class _Block(torch.nn.Module):
    """Attention over a packed projection laid out [q_h, k_h, v_h] per head, whose keys reach the attention with
    their heads in another order (indexed by a permutation): the same columns, in another order."""

    def __init__(self, d=32, heads=2):
        super().__init__()
        self.qkv, self.out, self.heads = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d), heads
        self.ff = torch.nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, self.heads, 3, d // self.heads).unbind(3)
        k = k[:, :, [1, 0]]
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = x + self.out(a.transpose(1, 2).reshape(b, t, d))
        return h + self.ff(torch.relu(h))


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 32)
        self.layers = torch.nn.ModuleList([_Block(), _Block()])
        self.head = torch.nn.Linear(32, VOCAB)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def test_columns_reordered_on_the_way_are_adapted_but_never_projected_for_new_tokens():
    """k's columns reach the attention in another order (its heads permuted): LoRA on k still changes exactly
    k's columns (the order does not matter to a weight delta), and the site is marked so that nothing projects
    new tokens on those columns expecting the operand's head order (LLaMA-Adapter's prompt keys)."""
    torch.manual_seed(0)
    model, ids = _Net().eval(), _ids()
    matches = surgery.plan(model, {"rules": [{"name": "x", "match": {"role": ["attention.q", "attention.k"]},
                                              "action": "train"}]})
    by_role = {m.role: m.site for m in matches if m.layer == 0}
    k_cols = [h * 48 + 16 + j for h in range(2) for j in range(16)]
    assert indices(by_role["attention.k"].extra["packed"], 96) == k_cols
    assert by_role["attention.k"].extra.get("permuted") and not by_role["attention.q"].extra.get("permuted")
    base = copy.deepcopy(model)
    surgery.apply(model, {"rules": [{"name": "k", "match": {"role": "attention.k"}, "action": "wrap",
                                     "module": {"kind": "lora", "r": 2}}]})
    _randomize(model)
    seen = {}
    for tag, m in (("base", base), ("lora", model)):
        handle = m.layers[0].qkv.register_forward_hook(lambda mod, a, out, tag=tag: seen.update({tag: out.detach()}))
        with torch.no_grad():
            m(ids)
        handle.remove()
    others = [i for i in range(96) if i not in set(k_cols)]
    assert torch.equal(seen["lora"][..., others], seen["base"][..., others])
    assert not torch.equal(seen["lora"][..., k_cols], seen["base"][..., k_cols])


def test_parallel_into_a_packed_q_adds_to_its_columns_only():
    """A parallel branch whose destination is attention.q of an interleaved projection is sized by q's columns
    and added to them only."""
    model, ids = _base("bloom"), _ids()
    base = copy.deepcopy(model)
    path = _packed_path(model)
    surgery.apply(model, {"rules": [{"name": "p", "match": {"role": "attention.q"}, "action": "parallel",
                                     "from": {"role": "attention.residual"},
                                     "module": {"kind": "bottleneck", "reduction_factor": 16.0}}]})
    _randomize(model)
    ups = [m for n, m in model.surgery_adapters.named_modules() if n.endswith(".up")]
    assert ups and all(m.out_features == HEADS * HEAD_DIM for m in ups)
    _, y0, _ = _projection_io(base, path, ids)
    _, y, _ = _projection_io(model, path, ids)
    q = _expected("bloom")["q"]
    others = [i for i in range(y.shape[-1]) if i not in set(q)]
    assert torch.equal(y[..., others], y0[..., others]) and not torch.equal(y[..., q], y0[..., q])
