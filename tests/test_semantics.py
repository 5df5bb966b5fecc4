"""Composition, merge and state-dict semantics users rely on (issue 23): each test is one kind of finding."""
import pytest
import torch

import surgery
from models import make_gpt2, make_llama, perturb, state, assert_same_state, token_ids

LORA_QV = {"rules": [{"name": "lora", "match": {"role": ["attention.q", "attention.v"]}, "action": "wrap",
                      "module": {"kind": "lora", "r": 4}}]}
LORA_QV_WEIGHT = {"rules": [{"name": "lora", "match": {"role": ["attention.q", "attention.v"]}, "action": "wrap",
                             "realize": "weight", "module": {"kind": "lora", "r": 4}}]}
IA3_V = {"rules": [{"name": "ia3", "match": {"role": "attention.v"}, "action": "wrap", "module": {"kind": "ia3"}}]}
SEQ_BN = {"rules": [{"name": "adapter", "match": {"role": "ffn.out"}, "action": "insert_after",
                     "module": {"kind": "bottleneck", "reduction_factor": 8}}]}
PAR_BN = {"rules": [{"name": "adapter", "match": {"role": "ffn.out"}, "from": {"role": "ffn.in"},
                     "action": "parallel", "module": {"kind": "bottleneck", "reduction_factor": 8}}]}
SUBLAYER_BN = {"rules": [{"name": "adapter", "match": {"role": "ffn.residual_add"}, "action": "sublayer",
                          "module": {"kind": "bottleneck", "reduction_factor": 8}}]}


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def two(spec_a, spec_b=None, make=make_llama):
    model = make().eval()
    surgery.apply(model, spec_a, name="a")
    surgery.apply(model, spec_b or spec_a, name="b")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.surgery_adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


# ---------------------------------------------------------------- 1. merge folds what the configuration computes

@pytest.mark.parametrize("spec_a,spec_b", [(LORA_QV, LORA_QV), (LORA_QV, IA3_V), (LORA_QV_WEIGHT, LORA_QV)],
                         ids=["lora+lora", "lora+ia3", "weight+activation"])
def test_merge_under_average_folds_the_weighted_contributions(spec_a, spec_b):
    model = two(spec_a, spec_b)
    ids = token_ids(2, 8)
    surgery.set_active(model, surgery.Average("a", "b", weights=[0.7, 0.3]))
    running = logits(model, ids)
    report = surgery.merge(model)
    assert len(report.merged) == 4 + len(surgery.plan(model, spec_b))
    assert not any(m.__dict__.get("_surgery_dispatch") for m in model.modules())   # the base forward
    torch.testing.assert_close(logits(model, ids), running, atol=2e-5, rtol=1e-5)
    surgery.unmerge(model)
    torch.testing.assert_close(logits(model, ids), running, atol=2e-5, rtol=1e-5)


def test_merge_under_stack_folds_the_sum_and_merge_of_one_weighted_adapter_is_refused():
    model = two(LORA_QV)
    ids = token_ids(2, 8)
    surgery.set_active(model, surgery.Stack("a", "b"))
    running = logits(model, ids)
    surgery.merge(model)
    torch.testing.assert_close(logits(model, ids), running, atol=2e-5, rtol=1e-5)
    surgery.unmerge(model)
    surgery.set_active(model, surgery.Average("a", "b", weights=[0.7, 0.3]))
    before = state(model)
    with pytest.raises(surgery.SurgeryError, match="active under Average"):
        surgery.merge(model, "a")
    assert_same_state(before, state(model))


@pytest.mark.parametrize("block,why", [
    (surgery.BatchSplit("a", "b", batch_sizes=[1, 1]), "batch rows"),
    (surgery.Split("a", "b", splits=[3]), "sequence positions"),
    (surgery.Parallel("a", "b"), "once per adapter"),
])
def test_merge_under_a_block_that_is_no_fold_is_refused_with_the_reason(block, why):
    model = two(LORA_QV)
    surgery.set_active(model, block)
    before = state(model)
    with pytest.raises(surgery.SurgeryError, match=why):
        surgery.merge(model)
    assert_same_state(before, state(model))


def test_merge_under_fuse_is_refused():
    model = two(SEQ_BN)
    surgery.apply(model, LORA_QV, name="c")
    surgery.add_fusion(model, ["a", "b"], name="f")
    before = state(model)
    with pytest.raises(surgery.SurgeryError, match="AdapterFusion"):
        surgery.merge(model)
    assert_same_state(before, state(model))


# ---------------------------------------------------------------- 2. Average: normalized weights, contributions

def _site_io(model, spec, ids):
    """The matched module of the first site: its input and output in one forward."""
    path = surgery.plan(model, spec)[0].module
    module = model.get_submodule(path)
    seen = {}
    handle = module.register_forward_hook(lambda m, a, o: seen.update(x=a[0], y=o))
    logits(model, ids)
    handle.remove()
    return seen


@pytest.mark.parametrize("spec", [LORA_QV, LORA_QV_WEIGHT, SEQ_BN, PAR_BN, SUBLAYER_BN],
                         ids=["wrap", "wrap-weight", "insert", "parallel", "sublayer"])
def test_average_is_the_base_plus_the_weighted_mean_of_contributions(spec):
    model = two(spec)
    ids = token_ids(2, 8)
    with surgery.disable(model):
        base = logits(model, ids)
    surgery.set_active(model, "a")
    only_a = logits(model, ids)
    surgery.set_active(model, "b")
    only_b = logits(model, ids)
    # equal weights, normalized: [1, 1] is [0.5, 0.5], never twice the base
    surgery.set_active(model, surgery.Average("a", "b", weights=[1, 1]))
    ones = logits(model, ids)
    surgery.set_active(model, surgery.Average("a", "b"))
    torch.testing.assert_close(ones, logits(model, ids), atol=1e-6, rtol=1e-6)
    # weight 1 on one adapter is that adapter alone
    surgery.set_active(model, surgery.Average("a", "b", weights=[1, 0]))
    torch.testing.assert_close(logits(model, ids), only_a, atol=2e-5, rtol=1e-5)
    # unnormalized zero weights leave the base, not zeros
    surgery.set_active(model, surgery.Average("a", "b", weights=[0, 0], normalize_weights=False))
    torch.testing.assert_close(logits(model, ids), base, atol=2e-5, rtol=1e-5)
    assert (ones - base).abs().max() > 1e-3 and (only_a - only_b).abs().max() > 1e-3
    with pytest.raises(surgery.SurgeryError, match="sum to 0"):
        surgery.set_active(model, {"average": ["a", "b"], "weights": [1, -1]})


def test_average_of_a_wrap_at_one_op_is_w_x_plus_weighted_deltas():
    model = two(LORA_QV)
    ids = token_ids(2, 8)
    surgery.set_active(model, surgery.Average("a", "b", weights=[3, 1]))
    seen = _site_io(model, LORA_QV, ids)
    path = surgery.plan(model, LORA_QV)[0].module
    key = path.replace(".", "_")
    q = model.get_submodule(path)
    la, lb = (model.surgery_adapters.adapters[n]["lora"][key] for n in ("a", "b"))
    wx = torch.nn.functional.linear(seen["x"], q.weight, q.bias)
    expected = wx + 0.75 * (la(seen["x"], wx) - wx) + 0.25 * (lb(seen["x"], wx) - wx)
    torch.testing.assert_close(seen["y"], expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- 3. realize: weight keeps the base's names



@pytest.mark.parametrize("make", [make_llama, make_gpt2], ids=["llama", "gpt2"])
def test_weight_realization_keeps_base_parameter_names_and_round_trips(make, tmp_path):
    model = make().eval()
    base_keys = list(model.state_dict())
    surgery.apply(model, LORA_QV_WEIGHT)
    assert any("parametrizations" in n for n, _ in model.named_parameters())   # realized on the weight
    perturb(model, 0.2)
    with torch.no_grad():   # the trained base differs from a fresh init, so a re-initialized weight would show
        for p in model.parameters():
            if not p.requires_grad:
                p.mul_(1.05)
    keys = list(model.state_dict())
    assert [k for k in keys if not k.startswith("surgery_adapters.")] == base_keys
    assert all(".parametrizations." not in k for k in keys)
    ids = token_ids(2, 8)
    adapted = logits(model, ids)
    with surgery.disable(model):
        base = logits(model, ids)
    # transformers' save_pretrained / from_pretrained of the base
    with surgery.disable(model):
        model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, ids), base, atol=1e-6, rtol=1e-6)
    # load_state_dict: into a fresh adapted model (strict), and into a bare base (strict=False)
    fresh = surgery.apply(make().eval(), LORA_QV_WEIGHT)
    assert not fresh.load_state_dict(model.state_dict()).missing_keys
    torch.testing.assert_close(logits(fresh, ids), adapted, atol=0, rtol=0)
    bare = make().eval()
    result = bare.load_state_dict(model.state_dict(), strict=False)
    assert not result.missing_keys and all(k.startswith("surgery_adapters.") for k in result.unexpected_keys)
    torch.testing.assert_close(logits(bare, ids), base, atol=0, rtol=0)
    # torch.distributed.checkpoint's model state dict (what DCP saves) has the same names and loads back
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    dcp_state = get_model_state_dict(model)
    assert sorted(dcp_state) == sorted(model.state_dict())
    assert not set_model_state_dict(fresh, dcp_state).missing_keys
    # a base checkpoint loads into the adapted model
    missing = model.load_state_dict(bare.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("surgery_adapters.") for k in missing)


# ---------------------------------------------------------------- 4. only the active adapters train

def _trainable(model, name):
    return {n for n, p in model.surgery_adapters.adapters[name].named_parameters() if p.requires_grad}


def test_set_active_switches_which_adapters_train_and_switching_back_restores():
    model = two(LORA_QV)
    bitfit = {"rules": [{"name": "norms", "match": {"role": "norm"}, "action": "train"}]}
    surgery.apply(model, bitfit, name="c")
    norms = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    everything = {n: p.requires_grad for n, p in model.named_parameters()}
    assert norms and all(p.requires_grad for p in norms)
    surgery.set_active(model, "a")
    assert _trainable(model, "a") and not _trainable(model, "b")
    assert not any(p.requires_grad for p in norms)              # c's selected base parameters too
    ids = token_ids(2, 8)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is None for p in model.surgery_adapters.adapters["b"].parameters())
    surgery.set_active(model, surgery.Average("a", "b"))
    assert _trainable(model, "a") and _trainable(model, "b") and not any(p.requires_grad for p in norms)
    surgery.set_active(model, None)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == everything
    # merge/unmerge and remove while one is inactive keep the bookkeeping straight
    surgery.set_active(model, "a")
    surgery.merge(model)
    assert not _trainable(model, "a") and not _trainable(model, "b")
    surgery.unmerge(model)
    assert _trainable(model, "a") and not _trainable(model, "b")
    surgery.remove(model, "c")
    surgery.set_active(model, ["a", "b"])
    assert _trainable(model, "b")
    assert not any(p.requires_grad for p in norms)   # c removed: the user's own flags (frozen by apply)


# ---------------------------------------------------------------- 5. prompt tuning on causal-LM classifiers

def _gpt2_classifier():
    from transformers import GPT2Config, GPT2ForSequenceClassification
    torch.manual_seed(0)
    return GPT2ForSequenceClassification(GPT2Config(vocab_size=120, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                    pad_token_id=0, num_labels=3))


def _llama_classifier():
    from transformers import LlamaConfig, LlamaForSequenceClassification
    torch.manual_seed(0)
    return LlamaForSequenceClassification(LlamaConfig(
        vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, num_labels=3))


def _bert_classifier():
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, pad_token_id=0, num_labels=3))


@pytest.mark.parametrize("make", [_gpt2_classifier, _llama_classifier, _bert_classifier],
                         ids=["gpt2", "llama", "bert-cls-token"])
def test_prompt_on_a_sequence_classifier_pools_the_token_it_pools_without_the_prompt(make):
    model = surgery.apply(make().eval(), "specs/prompt.yaml")
    ids = token_ids(2, 8)
    ids[1, 5:] = 0                       # right padding (pad_token_id 0)
    mask = (ids != 0).long()
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        alone = model(input_ids=ids[1:, :5]).logits
        full = model(input_ids=ids[:1]).logits
        with surgery.disable(model):
            base = model(input_ids=ids, attention_mask=mask).logits
    assert out.logits.shape == (2, 3)
    torch.testing.assert_close(out.logits[1], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits[0], full[0], atol=1e-5, rtol=1e-5)
    assert (out.logits - base).abs().max() > 1e-4          # the prompt is in the forward
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))


# ---------------------------------------------------------------- 8. training only new tokens' rows

NEW_TOKENS = [5, 117, 119]


@pytest.mark.parametrize("make,table", [(make_gpt2, "transformer.wte"), (make_llama, "model.embed_tokens")],
                         ids=["gpt2-tied", "llama"])
def test_train_rows_changes_and_saves_only_those_rows_and_merges_exactly(make, table, tmp_path):
    from safetensors.torch import load_file
    model = make().eval()
    spec = {"rules": [{"name": "new_tokens", "match": {"role": "embedding", "module": table}, "action": "train",
                       "params": ["weight"], "rows": NEW_TOKENS}]}
    surgery.apply(model, spec)
    embedding = model.get_submodule(table)
    head = model.get_output_embeddings()
    base_table = embedding.weight.detach().clone()
    base_head = head.weight.detach().clone()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert [tuple(p.shape) for _, p in trainable] == [(3, 64)]
    ids = token_ids(2, 8)
    ids[0, :3] = torch.tensor(NEW_TOKENS)
    before = logits(model, ids)
    torch.testing.assert_close(before, logits(make().eval(), ids), atol=0, rtol=0)   # identity at init
    opt = torch.optim.Adam([p for _, p in trainable], lr=1e-2)
    model.train()
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    others = [i for i in range(base_table.shape[0]) if i not in NEW_TOKENS]
    changed = (embedding.weight - base_table).abs().amax(dim=1)
    assert (changed[NEW_TOKENS] > 0).all() and torch.equal(embedding.weight[others], base_table[others])
    if make is make_gpt2:   # the tied LM head reads the same new rows
        torch.testing.assert_close(head.weight, embedding.weight, atol=0, rtol=0)
    else:
        torch.testing.assert_close(head.weight, base_head, atol=0, rtol=0)
    surgery.save(model, tmp_path)
    saved = load_file(tmp_path / "adapters.safetensors")
    assert [tuple(t.shape) for t in saved.values()] == [(3, 64)]
    trained = logits(model, ids)
    assert (trained - before).abs().max() > 1e-4
    reloaded = surgery.load(make().eval(), tmp_path)
    torch.testing.assert_close(logits(reloaded, ids), trained, atol=0, rtol=0)
    report = surgery.merge(model)
    assert not report.not_merged and report.stored_bytes < 3 * 64 * 4 + 64
    torch.testing.assert_close(logits(model, ids), trained, atol=0, rtol=0)
    surgery.unmerge(model)
    with surgery.disable(model):
        assert torch.equal(embedding.weight, base_table) and torch.equal(head.weight, base_head)
    torch.testing.assert_close(logits(model, ids), trained, atol=0, rtol=0)


# ---------------------------------------------------------------- 6. NF4: merge names the way out; dtypes follow

def test_merge_into_nf4_names_dequantize_and_dequantize_to_another_dtype_casts_the_model():
    pytest.importorskip("torchao")
    model = make_llama().eval()
    surgery.quantize_nf4(model)
    surgery.apply(model, LORA_QV)
    perturb(model, 0.2)
    ids = token_ids(2, 8)
    unmerged = logits(model, ids)
    codes = {n: p.quantized_data.clone() for n, p in model.named_parameters() if surgery.quantize.is_nf4(p)}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(surgery.SurgeryError, match=r"surgery\.dequantize_nf4"):
        surgery.merge(model)
    assert all(torch.equal(model.get_parameter(n).quantized_data, c) for n, c in codes.items())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    torch.testing.assert_close(logits(model, ids), unmerged, atol=0, rtol=0)
    surgery.dequantize_nf4(model, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = logits(model, ids)   # runs: no dtype mismatch
    assert out.dtype == torch.bfloat16
    assert (out.float() - unmerged).abs().max() < 0.1
    surgery.merge(model)
    torch.testing.assert_close(logits(model, ids), out, atol=0.05, rtol=0.02)


# ---------------------------------------------------------------- 7. from_peft: target_modules "all-linear"

@pytest.mark.parametrize("make", [make_llama, make_gpt2], ids=["llama", "gpt2"])
def test_from_peft_accepts_all_linear_with_peft_meaning(make, tmp_path):
    import copy
    import json
    peft = pytest.importorskip("peft")
    base = make().eval()
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules="all-linear", r=4))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["target_modules"] = "all-linear"        # as written by hand, or by tools that keep the shorthand
    config_file.write_text(json.dumps(config))
    ids = token_ids(2, 8)
    expected = logits(peft_model.eval(), ids)
    model = surgery.from_peft(copy.deepcopy(base), tmp_path)
    adapted = {m.module for m in surgery.plan(model, {"rules": [{"match": {"role": "lm_head"}, "action": "train",
                                                                  "expect": "any"}]})}
    wrapped = {s.owner_path for s in model.surgery_adapters.records["default"].weight_sites}
    assert wrapped and not (wrapped & adapted)    # the LM head is not a target, as in PEFT
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-5)


def test_an_adapter_applied_while_another_is_chosen_neither_runs_nor_trains_until_activated():
    model = make_llama().eval()
    surgery.apply(model, LORA_QV, name="a")
    surgery.set_active(model, "a")
    surgery.apply(model, SEQ_BN, name="b")
    assert not _trainable(model, "b")     # b does not run (set_active chose a), so it does not train
    surgery.set_active(model, ["a", "b"])
    assert _trainable(model, "a") and _trainable(model, "b")
