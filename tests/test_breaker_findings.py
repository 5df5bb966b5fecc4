"""Findings of a user trying to break the watched module tree (surgery/rewrite/sites.py) and the lazy analysis
sites: each test is one kind of defect. A strict xfail is a defect still open (its reason says where)."""
from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import surgery
from models import make_llama, perturb, token_ids

LORA_QV = "lora"        # specs/lora.yaml: q and v projections of every layer


def _adapted():
    model = make_llama().eval()
    surgery.apply(model, LORA_QV)
    perturb(model)
    return model


def _replace_v_proj(model):
    """Replace layer 1's adapted v_proj by a plain copy of its base weights (what a user's `layer.v_proj =
    nn.Linear(...)` or a quantization pass does): the adapter is gone from the forward."""
    old = model.model.layers[1].self_attn.v_proj
    new = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None)
    new.load_state_dict(old.state_dict())
    model.model.layers[1].self_attn.v_proj = new
    return old


# ---------------------------------------------------------------- a replaced host forgotten by a later record

@pytest.mark.parametrize("then", ["apply_houlsby", "apply_prompt", "remove_other"])
def test_a_replaced_host_is_not_forgotten_by_applying_or_removing_another_adapter(then):
    """A host replaced after apply, then another adapter set applied (or another one removed): the re-record of
    the hosts after that apply/remove used to take the tree as it is, forgetting the replaced host, so the
    forward ran without its adapter, silently."""
    model, ids = _adapted(), token_ids()
    if then == "remove_other":
        surgery.apply(model, "houlsby", name="other")
    _replace_v_proj(model)
    if then == "apply_houlsby":
        surgery.apply(model, "houlsby", name="other")
    elif then == "apply_prompt":
        surgery.apply(model, "prompt", name="other")
    else:
        surgery.remove(model, "other")
    with pytest.raises(surgery.RewriteError, match=r"model\.layers\.1\.self_attn\.v_proj was replaced"):
        model(input_ids=ids)
    with pytest.raises(surgery.RewriteError, match=r"v_proj was replaced"):
        surgery.merge(model)


def test_a_replaced_host_still_raises_after_its_new_module_is_adapted_by_another_set():
    """The new module at the replaced host's path adapted by a second set: the first set's adapter there is still
    lost, so the forward raises until that set is removed (then it runs, with the second set's adapter)."""
    model, ids = _adapted(), token_ids()
    _replace_v_proj(model)
    surgery.apply(model, LORA_QV, name="second")
    with pytest.raises(surgery.RewriteError, match=r"v_proj was replaced"):
        model(input_ids=ids)
    surgery.remove(model, "default")
    model(input_ids=ids)
    assert len(model._forward_pre_hooks) == 0          # nothing armed once every host is in place


def test_a_deleted_layer_stays_missing_after_another_apply_and_comes_back():
    model, ids = _adapted(), token_ids()
    layer = model.model.layers[1]
    del model.model.layers[1]
    replaced = r"model\.layers\.1\.self_attn\.(q|v)_proj was replaced"
    with pytest.raises(surgery.RewriteError, match=replaced):   # the model changed: analyzed again, which refuses
        surgery.apply(model, "prompt", name="other")
    assert set(model.surgery_adapters.records) == {"default"}
    with pytest.raises(surgery.RewriteError, match=replaced):
        model(input_ids=ids)
    model.model.layers.append(layer)
    model(input_ids=ids)
    surgery.apply(model, "prompt", name="other")
    model(input_ids=ids)


# ---------------------------------------------------------------- a part of the model called directly

def test_a_replaced_host_raises_when_an_inner_module_is_called_directly():
    """`model.model(...)` (hidden states of a causal LM, an encoder alone) after a host under it was replaced:
    only the root forward checked, so the inner call ran without the adapter. An edit outside that part (the LM
    head) does not stop it, and once the host is back it runs."""
    model, ids = _adapted(), token_ids()
    with torch.no_grad():
        ref = model.model(input_ids=ids).last_hidden_state
    old = _replace_v_proj(model)
    with pytest.raises(surgery.RewriteError, match=r"model\.layers\.1\.self_attn\.v_proj was replaced"):
        model.model(input_ids=ids)
    with pytest.raises(surgery.RewriteError, match=r"v_proj was replaced"):
        model.model.layers[1](torch.zeros(2, 8, 64), position_embeddings=model.model.rotary_emb(
            torch.zeros(2, 8, 64), torch.arange(8)[None]))
    model.model.layers[1].self_attn.v_proj = old
    model.lm_head = nn.Linear(64, model.lm_head.out_features, bias=False)     # unrelated to the hosts
    with torch.no_grad():
        assert torch.equal(model.model(input_ids=ids).last_hidden_state, ref)
        model(input_ids=ids)
    assert len(model._forward_pre_hooks) == 0
    assert all(len(m._forward_pre_hooks) == 0 for m in (model.model, model.model.layers, model.model.layers[1]))


# ---------------------------------------------------------------- open: a cached analysis of an edited model

def _grow_one_layer(model):
    """Append a fourth fresh decoder layer, as a user growing a model (config kept consistent)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    n = len(model.model.layers)
    model.config.num_hidden_layers = n + 1
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = list(model.config.layer_types) + [model.config.layer_types[-1]]
    model.model.layers.append(LlamaDecoderLayer(model.config, n))


@pytest.mark.parametrize("first", ["plan", "apply"])
def test_an_apply_after_the_model_grew_a_layer_adapts_every_layer(first):
    model = make_llama(layers=2).eval()
    if first == "plan":
        surgery.plan(model, "houlsby")
    else:
        surgery.apply(model, LORA_QV)
    _grow_one_layer(model)
    model(input_ids=token_ids())                     # the grown model runs (and, after apply, nothing was replaced)
    matches = surgery.plan(model, "houlsby")
    assert sorted({m.layer for m in matches}) == [0, 1, 2]


def test_an_embedding_adapter_applied_after_resize_token_embeddings_covers_the_new_tokens():
    model = make_llama().eval()
    surgery.apply(model, LORA_QV)
    vocab = model.config.vocab_size
    model.resize_token_embeddings(vocab + 8, mean_resizing=False)
    spec = {"version": 1, "name": "e", "rules": [{"name": "e", "match": {"role": "embedding"}, "action": "wrap",
                                                  "module": {"kind": "lora", "r": 4, "alpha": 4}}]}
    surgery.apply(model, spec, name="emb")
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[vocab + 5, 3, 4]])).logits.shape == (1, 3, vocab + 8)


def test_to_peft_refuses_a_replaced_host(tmp_path):
    model = _adapted()
    _replace_v_proj(model)
    with pytest.raises(surgery.RewriteError, match=r"v_proj was replaced"):
        surgery.to_peft(model, tmp_path / "peft")


@pytest.mark.parametrize("typo, near", [("addd", "add"), ("Linear", "linear")])
def test_an_unknown_op_name_is_answered_with_the_nearest_op_names(typo, near):
    spec = {"version": 1, "name": "x", "rules": [{"name": "x", "match": {"op": typo}, "action": "insert_after",
                                                  "module": {"kind": "bottleneck", "reduction_factor": 4}}]}
    with pytest.raises(surgery.MatchError) as info:
        surgery.plan(make_llama(), spec)
    assert re.search(rf"\b{near}\b", str(info.value).split("without `op`")[0]), str(info.value)


# ---------------------------------------------------------------- DataParallel's replicas after an edit

def _replicate_on_cpu(monkeypatch, model, n=2):
    """torch.nn.parallel.replicate as DataParallel calls it at every forward, with the tensors' broadcast to
    devices replaced by views on the CPU (the module tree, hooks and dicts are replicated by torch's own code)."""
    import importlib
    rep = importlib.import_module("torch.nn.parallel.replicate")
    monkeypatch.setattr(rep, "_broadcast_coalesced_reshape", lambda tensors, devices, detach=False: [
        [t.detach() if detach else t.view_as(t) for t in tensors] for _ in devices])
    monkeypatch.setattr(rep, "_get_device_index", lambda x, optional=False: x)
    return rep.replicate(model, list(range(n)))


def test_dataparallel_replicas_run_after_an_unrelated_edit_and_refuse_a_replaced_host(monkeypatch):
    """After an edit on a watched path that replaces no host, the check ran in each replica against the
    replica's own copies of the hosts (never the recorded ones), so every DataParallel forward raised, and
    the original model, which DataParallel never calls, stayed armed. The replicas check the model they
    were made from: they run, and a replaced host still raises."""
    model, ids = make_llama().eval(), token_ids()
    surgery.apply(model, "houlsby")
    perturb(model)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        model.model.norm = copy.deepcopy(model.model.norm)    # not a host: nothing lost
        for replica in _replicate_on_cpu(monkeypatch, model):
            torch.testing.assert_close(replica(input_ids=ids).logits, ref, rtol=0, atol=1e-6)
        mlp = model.model.layers[1].mlp
        model.model.layers[1].mlp = type(mlp)(model.config)   # a host of the FFN adapter
        for replica in _replicate_on_cpu(monkeypatch, model):
            with pytest.raises(surgery.RewriteError, match=r"model\.layers\.1\.mlp.* was replaced"):
                replica(input_ids=ids)
            with pytest.raises(surgery.RewriteError, match=r"model\.layers\.1\.mlp.* was replaced"):
                replica.model(input_ids=ids)


def test_mixed_batch_on_a_flattened_site_is_a_surgery_error():
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=120, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32))
    surgery.apply(model, "houlsby", name="a")
    surgery.apply(model, "houlsby", name="b")
    with pytest.raises(surgery.SurgeryError, match="MixedBatch"):
        surgery.set_active(model, surgery.MixedBatch("a", "b"))
        model(input_ids=token_ids())


# ---------------------------------------------------------------- a call that starts below the root

def test_reft_on_the_base_model_called_alone_reads_that_calls_mask():
    """ReFT's positions come from the call's attention mask. The base model called alone (`model.model(...)`)
    read the mask the last root call had left (none here), so a left-padded row was intervened on its padding."""
    model = make_llama().eval()
    surgery.apply(model, "loreft")
    perturb(model, 0.3)
    ids = token_ids(2, 7)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0                                  # row 0 left-padded by 3
    with torch.no_grad():
        padded = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        alone = model.model(input_ids=ids[:1, 3:]).last_hidden_state
    torch.testing.assert_close(padded[0, 3:], alone[0], rtol=0, atol=1e-5)


# ---------------------------------------------------------------- what counts as a host

def test_a_module_whose_forward_the_user_patched_is_no_host():
    """A forward in a module's `__dict__` that is not surgery's (a user's wrapper, accelerate's hooks) made the
    module a host: replacing it later (resize_token_embeddings) raised although no adapter was there."""
    model, ids = make_llama().eval(), token_ids()
    inner = model.lm_head.forward
    model.lm_head.forward = lambda x: inner(x)           # e.g. logging, or accelerate's device hooks
    surgery.apply(model, LORA_QV)
    model.resize_token_embeddings(model.config.vocab_size + 8, mean_resizing=False)
    assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size


def test_a_host_re_attached_by_unmerge_is_watched_again():
    model, ids = _adapted(), token_ids()
    surgery.merge(model)
    surgery.apply(model, "houlsby", name="other")
    surgery.unmerge(model)
    _replace_v_proj(model)
    with pytest.raises(surgery.RewriteError, match=r"v_proj was replaced"):
        model(input_ids=ids)


def test_a_shared_layer_counts_its_calls_from_zero_in_a_base_model_called_alone():
    """ALBERT runs one layer module at every depth; an adapter there is per call (Houlsby on call k adapts depth
    k). The count of calls was reset by the root call only: the base model called alone (`model.albert(...)`)
    counted on from the last call, so its adapters at depth k never ran (each call's output differed)."""
    from transformers import AlbertConfig, AlbertForMaskedLM
    torch.manual_seed(0)
    model = AlbertForMaskedLM(AlbertConfig(vocab_size=100, embedding_size=32, hidden_size=64, num_hidden_layers=3,
                                           num_attention_heads=4, intermediate_size=128)).eval()
    surgery.apply(model, "houlsby")
    perturb(model, 0.3)
    ids = token_ids(2, 8, vocab=100)
    with torch.no_grad():
        through_root = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        alone = [model.albert(input_ids=ids).last_hidden_state for _ in range(2)]
        plain = copy.deepcopy(model)
        surgery.remove(plain)
        base = plain.albert(input_ids=ids).last_hidden_state
    assert (through_root - base).abs().max() > 1e-2          # the adapters change the output
    for out in alone:
        torch.testing.assert_close(out, through_root, rtol=0, atol=1e-5)


FLAT_PREFIX = {"rules": [{"name": "prefix", "match": {"role": "attention.op"}, "action": "attend",
                          "module": {"kind": "prefix", "prefix_length": 4, "flat": True}, "expect": "every_layer"}]}


@pytest.mark.parametrize("spec", [FLAT_PREFIX, "unipelt"], ids=["prefix", "unipelt"])
def test_a_shared_layers_attention_adapter_runs_in_its_own_call_only(spec):
    """ALBERT's one attention module runs at every depth, with one prefix per depth. Every depth's prefix ran in
    every call (chained: depth 0 attended to both depths' prefixes), and UniPELT's gate of depth 1 read its input
    from call 0. Now depth k's adapter runs in call k only: changing depth 1's prefix leaves the first call's
    output as it was."""
    from transformers import AlbertConfig, AlbertModel
    torch.manual_seed(0)
    model = AlbertModel(AlbertConfig(vocab_size=100, embedding_size=32, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128)).eval()
    surgery.apply(model, spec)
    perturb(model, 0.3)
    ids = token_ids(2, 8, vocab=100)
    with torch.no_grad():
        before = model(input_ids=ids, output_hidden_states=True).hidden_states
        depth1 = [p for n, p in model.surgery_adapters.named_parameters() if "call1" in n and "prefix" in n]
        assert depth1
        for p in depth1:
            p.add_(1.0)
        after = model(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(after[1], before[1], rtol=0, atol=1e-6)    # call 0's output
    assert (after[2] - before[2]).abs().max() > 1e-3                        # call 1's
