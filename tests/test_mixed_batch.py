"""Mixed-adapter batches (issue 22, PEFT's `adapter_names=[...]`) for the rewrites that do not act at one hooked
value: prefix tuning (attention keys/values), prompt tuning (positions added at the input), and sub-layer and
parallel bottleneck adapters (values captured earlier in the call). Each row of a mixed batch equals that row run
alone with its adapter ("__base__": the base model), in forward and in generate() with the KV cache."""
import contextlib

import pytest
import torch

import surgery
from models import make_llama, make_minigpt, perturb, run, token_ids

LORA = {"name": "lora", "action": "wrap", "module": {"kind": "lora", "r": 4}}


def prompt_spec(length):
    return {"version": 1, "rules": [{"name": "prompt", "match": {"role": "embedding.output"}, "action": "prepend",
                                     "module": {"kind": "prompt", "prompt_length": length}, "expect": 1}]}


def build(arch):
    model = (make_llama() if arch == "llama" else make_minigpt()).eval()
    kw = {"example_inputs": model.example_inputs()} if arch == "minigpt" else {}
    roles = ["attention.q", "attention.v"] if arch == "llama" else ["ffn.in", "ffn.out"]
    surgery.apply(model, {"version": 1, "rules": [dict(LORA, match={"role": roles})]}, name="lora", **kw)
    surgery.apply(model, "specs/prefix.yaml", name="prefix", **kw)
    surgery.apply(model, prompt_spec(10), name="prompt10", **kw)
    surgery.apply(model, prompt_spec(10 if arch == "minigpt" else 4), name="prompt_b", **kw)
    surgery.apply(model, "specs/pfeiffer.yaml", name="sublayer", **kw)      # action sublayer
    surgery.apply(model, "specs/parallel.yaml", name="parallel", **kw)     # action parallel
    perturb(model, 0.2)
    return model


@pytest.fixture(scope="module")
def llama():
    return build("llama")


@pytest.fixture(scope="module")
def minigpt():
    return build("minigpt")


def use(model, name):
    if name == "__base__":
        return surgery.disable(model)
    surgery.set_active(model, name)
    return contextlib.nullcontext()


def alone(model, arch, rows, ids, **kwargs):
    outs = []
    for i, name in enumerate(rows):
        with use(model, name):
            outs.append(run(arch, model, ids[i:i + 1], **{k: v[i:i + 1] for k, v in kwargs.items()}))
    return torch.cat(outs)


def check_rows(model, arch, rows, ids, **kwargs):
    expected = alone(model, arch, rows, ids, **kwargs)
    surgery.set_active(model, surgery.MixedBatch(*rows))
    mixed = run(arch, model, ids, **kwargs)
    keep = kwargs["attention_mask"].bool() if "attention_mask" in kwargs else torch.ones(ids.shape, dtype=torch.bool)
    torch.testing.assert_close(mixed[keep], expected[keep], atol=1e-5, rtol=0)
    with surgery.disable(model):
        base = run(arch, model, ids, **kwargs)
    for i, name in enumerate(rows):        # the test can fail: every adapter row differs from the base
        assert ((mixed[i][keep[i]] - base[i][keep[i]]).abs().max() > 1e-3) == (name != "__base__"), (i, name)


def check_generate(model, rows, ids):
    """generate() of the mixed batch (greedy, 4 new tokens) gives each row's tokens of that row alone."""
    new = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    own = []
    for i, name in enumerate(rows):
        with use(model, name):
            own.append(model.generate(ids[i:i + 1], **new))
    surgery.set_active(model, surgery.MixedBatch(*rows))
    assert torch.equal(model.generate(ids, **new), torch.cat(own))


LLAMA_ROWS = ["lora", "prefix", "__base__", "prompt10", "sublayer", "prompt_b", "parallel", "prefix"]


def test_llama_rows_equal_each_row_alone(llama):
    check_rows(llama, "llama", LLAMA_ROWS, token_ids(len(LLAMA_ROWS), 7, seed=5))


def test_llama_left_padded_rows_and_generate_with_cache(llama):
    rows = ["prompt10", "prompt_b", "__base__", "prefix", "sublayer", "lora"]
    ids = token_ids(len(rows), 7, seed=6)
    mask = torch.ones_like(ids)
    for i, pad in enumerate([0, 2, 3, 1, 0, 2]):        # left padding, as a tokenizer pads for generation
        mask[i, :pad], ids[i, :pad] = 0, 0
    check_rows(llama, "llama", rows, ids, attention_mask=mask)
    new = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    own = []
    for i, name in enumerate(rows):
        with use(llama, name):
            own.append(llama.generate(ids[i:i + 1], attention_mask=mask[i:i + 1], **new))
    surgery.set_active(llama, surgery.MixedBatch(*rows))
    generated = llama.generate(ids, attention_mask=mask, **new)
    for i, name in enumerate(rows):
        assert torch.equal(generated[i:i + 1], own[i]), (i, name, generated[i], own[i])
    with surgery.disable(llama):       # the continuations differ from the base's, so the check can fail
        base = llama.generate(ids, attention_mask=mask, **new)
    assert not torch.equal(generated, base)


def test_minigpt_rows_equal_each_row_alone(minigpt):
    # nn.MultiheadAttention (prefix through the intercepted F.scaled_dot_product_attention), post-norm sub-layers
    check_rows(minigpt, "minigpt", ["lora", "prefix", "__base__", "sublayer", "parallel", "prefix"],
               token_ids(6, 7, seed=5))
    # prompts of one length need no padding: each row gets its own
    check_rows(minigpt, "minigpt", ["prompt10", "prompt_b", "prompt_b", "prompt10"], token_ids(4, 7, seed=7))


def test_minigpt_refuses_prompts_of_different_lengths(minigpt):
    # MiniGPT takes no attention mask: the padding positions a row without a prompt would need cannot be hidden
    surgery.set_active(minigpt, surgery.MixedBatch("prompt10", "__base__"))
    with pytest.raises(surgery.SurgeryError, match=r"prompts differ in length \(\[0, 10\].*no attention mask"):
        run("minigpt", minigpt, token_ids(2, 5))




def test_gated_prefix_llama_adapter_and_mam_rows():
    # UniPELT's gated prefix reads the attention input (taken at its rows); LLaMA-Adapter projects its prompt
    # with the layer's own k/v projections, which another row's adapter (UniPELT's LoRA) wraps: inside, only the
    # calling adapter's rewrites run, as in its alone-run
    model = make_llama().eval()
    for spec in ("unipelt", "llama_adapter", "mam"):
        surgery.apply(model, f"specs/{spec}.yaml", name=spec)
    perturb(model, 0.2)
    rows = ["unipelt", "__base__", "llama_adapter", "mam", "unipelt", "llama_adapter"]
    ids = token_ids(len(rows), 7, seed=3)
    check_rows(model, "llama", rows, ids)
    check_generate(model, rows, ids)


def test_gpt2_prompts_keep_their_learned_positions():
    # GPT-2's positions are learned absolute embeddings: a padded row must get the position ids it has alone
    from models import make_gpt2
    model = make_gpt2().eval()
    surgery.apply(model, prompt_spec(6), name="p6")
    surgery.apply(model, prompt_spec(3), name="p3")
    surgery.apply(model, "specs/lora.yaml", name="lora")
    perturb(model, 0.3)
    rows = ["p6", "__base__", "p3", "lora", "p6"]
    ids = token_ids(len(rows), 7, seed=2)
    check_rows(model, "gpt2", rows, ids)
    check_generate(model, rows, ids)


def test_functional_dropout_sites_follow_the_composition():
    # OPT's attention output leaves through F.dropout (no module boundary): the intercepted value is routed by
    # the composition as a hooked one is (it applied every active adapter to every row before)
    import architectures
    built = architectures.opt()
    model = built[0] if isinstance(built, tuple) else built
    adapter = {"name": "a", "match": {"role": "attention.output"}, "action": "insert_after", "through": ["dropout"],
               "module": {"kind": "bottleneck", "reduction_factor": 4}}
    surgery.apply(model, {"version": 1, "rules": [adapter]}, name="h")
    surgery.apply(model, "specs/lora.yaml", name="lora")
    perturb(model, 0.3)
    ids = token_ids(4, 6, vocab=architectures.VOCAB)
    check_rows(model, "llama", ["h", "__base__", "lora", "h"], ids)
    surgery.set_active(model, surgery.BatchSplit("h", "lora", batch_sizes=[2, 2]))
    split = run("llama", model, ids)
    torch.testing.assert_close(split, alone(model, "llama", ["h", "h", "lora", "lora"], ids), atol=1e-5, rtol=0)
