"""generate() in every mode people use, on adapted tiny decoders and encoder-decoders: the truth is the same call
without the KV cache (`use_cache=False`: sequences equal, scores and logits within 1e-4), and for greedy and beam
search a decode by repeated full forwards.

Modes: beam search (the cache reordered between steps, batch x beams rows), `num_return_sequences` (the prompt
batch expanded), seeded sampling with `top_k`, beam sampling, assisted generation (an assistant model, prompt
lookup), a static cache, chunked prefill, Mistral's sliding window, left-padded batches, a cache passed back in
to continue, MixedBatch with named beam rows, and encoder-decoders (T5, BART, Whisper) with beams; no state
leaking between calls or copies, generate() after a training step, after `surgery.eject` and after
`surgery.merge`. Adapters whose state depends on the call or on positions
(prefix tuning, LLaMA-Adapter, LoReFT, MAM, prompt tuning) and controls (LoRA, IA3, Houlsby, parallel).
Contrastive search, DoLa and group/constrained beam search moved out of transformers 5 (hub `custom_generate`
repositories, not reachable offline) and are not covered.

The last section holds defects found by a breaker session, fixed or refused with a SurgeryError. UniPELT's gates
(averaged over the whole call) are a known, documented difference under the cache (tests/test_host_api.py).
"""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import SPECS

import surgery
from models import applied, perturb

V, D, LAYERS = 100, 64, 2
NEW = 8
SLIDING = 4        # Mistral's window, shorter than prompt + NEW


pytestmark = pytest.mark.usefixtures("one_thread")


def make(arch: str):
    import transformers as T
    torch.manual_seed(0)
    common = dict(vocab_size=V, hidden_size=D, intermediate_size=2 * D, num_hidden_layers=LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1,
                  eos_token_id=None, pad_token_id=0)
    if arch == "llama":
        model = T.LlamaForCausalLM(T.LlamaConfig(**common))
    elif arch == "mistral":
        model = T.MistralForCausalLM(T.MistralConfig(**common, sliding_window=SLIDING))
    elif arch == "qwen2":
        model = T.Qwen2ForCausalLM(T.Qwen2Config(**common))
    elif arch == "gemma":
        model = T.GemmaForCausalLM(T.GemmaConfig(**common, head_dim=16))
    elif arch == "gpt2":
        model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_embd=D, n_layer=LAYERS, n_head=4, n_positions=128,
                                               bos_token_id=1, eos_token_id=None, pad_token_id=0))
    elif arch == "t5":
        model = T.T5ForConditionalGeneration(T.T5Config(
            vocab_size=V, d_model=D, d_kv=16, d_ff=2 * D, num_layers=LAYERS, num_decoder_layers=LAYERS, num_heads=4,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    elif arch == "bart":
        model = T.BartForConditionalGeneration(T.BartConfig(
            vocab_size=V, d_model=D, encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=2 * D, decoder_ffn_dim=2 * D, max_position_embeddings=128,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=None,
            forced_eos_token_id=None))
    elif arch == "whisper":
        model = T.WhisperForConditionalGeneration(T.WhisperConfig(
            vocab_size=V, d_model=D, encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=2 * D, decoder_ffn_dim=2 * D, num_mel_bins=8,
            max_source_positions=16, max_target_positions=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            decoder_start_token_id=1, begin_suppress_tokens=None, suppress_tokens=None))
    else:
        raise KeyError(arch)
    model.eval()
    config = model.generation_config
    config.eos_token_id = None        # always NEW tokens, so sequences compare whole
    config.pad_token_id = 0
    for name in ("forced_decoder_ids", "begin_suppress_tokens", "suppress_tokens"):
        if hasattr(config, name):
            setattr(config, name, None)
    return model


@pytest.fixture(scope="module")
def hosts():
    """One model per architecture, shared across tests (each test removes what it applied)."""
    built = {}

    def get(arch):
        if arch not in built:
            built[arch] = make(arch)
        return built[arch]
    return get


def small(spec_name: str):
    """The shipped spec's path."""
    return SPECS / f"{spec_name}.yaml"


def adapted(arch, spec, scale=0.3):
    """A fresh model with the spec applied and perturbed (for tests that change base weights or copy it)."""
    model = make(arch)
    surgery.apply(model, small(spec))
    model.eval()
    perturb(model, scale)
    return model


def ids(batch, length, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, V, (batch, length), generator=g)


def prompt_inputs(arch, batch=1, length=7, pad=0, seed=1):
    """Token ids with an attention mask (the first row padded on the left by `pad` for decoders, on the right for
    encoder-decoders); Whisper gets input features."""
    if arch == "whisper":
        g = torch.Generator().manual_seed(seed)
        return {"input_features": torch.randn(batch, 8, 32, generator=g)}
    x = ids(batch, length, seed)
    mask = torch.ones_like(x)
    if pad:
        side = slice(length - pad, None) if arch in ("t5", "bart") else slice(0, pad)
        x[-1, side], mask[-1, side] = 0, 0
    return {"input_ids": x, "attention_mask": mask}


def generate(model, seed=None, **kwargs):
    if seed is not None:
        torch.manual_seed(seed)
    kwargs.setdefault("max_new_tokens", NEW)
    kwargs.setdefault("min_new_tokens", kwargs["max_new_tokens"])
    with torch.no_grad():
        return model.generate(return_dict_in_generate=True, output_scores=True, output_logits=True, **kwargs)


def assert_same(out, truth, what=""):
    assert torch.equal(out.sequences, truth.sequences), \
        f"{what}: sequences {out.sequences.tolist()} != {truth.sequences.tolist()}"
    for name in ("scores", "logits"):
        got, want = getattr(out, name), getattr(truth, name)
        assert len(got) == len(want), f"{what}: {len(got)} {name} != {len(want)}"
        for step, (a, b) in enumerate(zip(got, want)):
            # a filtered score is -inf in both; compare the finite ones
            assert torch.equal(a.isinf(), b.isinf()), f"{what}: {name} step {step}: filtered tokens differ"
            torch.testing.assert_close(a.nan_to_num(0, 0, 0), b.nan_to_num(0, 0, 0), atol=1e-4, rtol=1e-4,
                                       msg=lambda m, s=step, n=name: f"{what}: {n} step {s}: {m}")
    if getattr(out, "sequences_scores", None) is not None:
        torch.testing.assert_close(out.sequences_scores, truth.sequences_scores, atol=1e-4, rtol=1e-4)


def against_no_cache(model, seed=None, **kwargs):
    """generate() with the cache (and whatever mode `kwargs` say) against the same call without it."""
    out = generate(model, seed=seed, **kwargs)
    plain = {k: v for k, v in kwargs.items()
             if k not in ("cache_implementation", "past_key_values", "assistant_model", "prompt_lookup_num_tokens",
                          "prefill_chunk_size")}
    truth = generate(model, seed=seed, use_cache=False, **plain)
    assert_same(out, truth, "cache vs use_cache=False")
    return out


def assert_adapters_act(model, inputs):
    with torch.no_grad():
        with surgery.disable(model):
            base = generate(model, **inputs).logits[0]
        assert (generate(model, **inputs).logits[0] - base).abs().max() > 1e-3, "the adapters change nothing"


def two_adapters(spec_name):
    model = make("llama")
    surgery.apply(model, small(spec_name), name="a")
    surgery.apply(model, small(spec_name), name="b")
    perturb(model, 0.3)
    return model


def beam_without_cache(model, x, beams, steps):
    """Beam search by full forwards of every beam (no EOS, so no length effects): the `beams` best sequences, best
    first. transformers' beam search keeps the same beams (top `beams` of beams x vocab by summed log-probs)."""
    seqs, scores = x.repeat(beams, 1), torch.full((beams,), float("-inf"))
    scores[0] = 0.0
    with torch.no_grad():
        for _ in range(steps):
            logp = torch.log_softmax(model(input_ids=seqs, use_cache=False).logits[:, -1].float(), dim=-1)
            top = (scores[:, None] + logp).view(-1).topk(beams)
            seqs = torch.cat([seqs[top.indices // V], (top.indices % V)[:, None]], dim=1)
            scores = top.values
    return seqs


# ---------------------------------------------------------------- modes that hold

MODES = {
    "beam": dict(num_beams=3, num_return_sequences=2),
    "sample": dict(do_sample=True, top_k=5, num_return_sequences=2, seed=7),
    "beam_sample": dict(do_sample=True, num_beams=2, seed=7),
    "beam_padded": dict(num_beams=2, _batch=2, _pad=3),
    "sample_padded": dict(do_sample=True, top_k=5, seed=3, _batch=2, _pad=3),
}

# the most informative cells: every position- or call-dependent spec in a mode that reorders or expands the batch,
# on architectures that differ in positions (rotary, learned absolute, GQA, Gemma's scaled embeddings)
MODE_CELLS = [
    ("prefix", "llama", "beam"), ("prefix", "gpt2", "sample"), ("prefix", "qwen2", "beam_padded"),
    ("prompt", "gpt2", "beam"), ("prompt", "llama", "sample_padded"), ("prompt", "gemma", "beam_sample"),
    ("loreft", "qwen2", "beam"), ("loreft", "gpt2", "beam_padded"), ("loreft", "llama", "sample"),
    ("llama_adapter", "gemma", "beam"), ("llama_adapter", "llama", "beam_padded"),
    ("mam", "gpt2", "beam_padded"), ("mam", "llama", "sample"),
    ("lora", "mistral", "beam"), ("ia3", "gemma", "sample_padded"), ("houlsby", "llama", "beam_padded"),
    ("parallel", "qwen2", "beam_sample"),
]


@pytest.mark.parametrize("spec_name,arch,mode", MODE_CELLS, ids=["-".join(c) for c in MODE_CELLS])
def test_generation_mode_with_cache_equals_without(spec_name, arch, mode, hosts):
    options = dict(MODES[mode])
    batch, pad, seed = options.pop("_batch", 1), options.pop("_pad", 0), options.pop("seed", None)
    inputs = prompt_inputs(arch, batch=batch, pad=pad)
    with applied(hosts(arch), spec_name) as model:
        assert_adapters_act(model, {k: v[:1] for k, v in inputs.items()})
        out = against_no_cache(model, seed=seed, **inputs, **options)
        rows = batch * options.get("num_return_sequences", 1)
        assert out.sequences.shape == (rows, inputs["input_ids"].shape[1] + NEW)


@pytest.mark.parametrize("spec_name,arch", [("prefix", "llama"), ("prompt", "gpt2"), ("loreft", "llama"),
                                            ("llama_adapter", "qwen2"), ("houlsby", "gemma")])
def test_beam_search_equals_beams_of_full_forwards(spec_name, arch, hosts):
    x = ids(1, 6, seed=5)
    with applied(hosts(arch), spec_name) as model:
        out = generate(model, input_ids=x, attention_mask=torch.ones_like(x), num_beams=3, num_return_sequences=3)
        assert torch.equal(out.sequences, beam_without_cache(model, x, 3, NEW))


@pytest.mark.parametrize("spec_name,arch,assistant,length", [
    ("prefix", "llama", "model", 7), ("prompt", "qwen2", "model", 7), ("mam", "gpt2", "lookup", 7),
    ("prompt", "llama", "lookup", 7),
    # a 2-token prompt: the drafted tokens are among ReFT's first 3 intervened positions, and rejected drafts
    # are cropped from the cache
    ("loreft", "gpt2", "model", 2), ("loreft", "llama", "adapted", 2), ("llama_adapter", "llama", "adapted", 7)])
def test_assisted_generation_equals_greedy_without_cache(spec_name, arch, assistant, length, hosts):
    x = ids(1, length, seed=5)
    if assistant == "lookup":
        x = torch.cat([x, x, x], dim=1)       # repeats: prompt lookup drafts from them
    with applied(hosts(arch), spec_name) as model:
        if assistant == "lookup":
            how = dict(prompt_lookup_num_tokens=3)
        elif assistant == "adapted":      # the adapted model assists itself (another copy, its own cache)
            how = dict(assistant_model=copy.deepcopy(model))
        else:                             # a different (base) model drafts
            helper = make(arch)
            with torch.no_grad():
                for p in helper.parameters():
                    p.mul_(0.9)
            how = dict(assistant_model=helper)
        against_no_cache(model, input_ids=x, attention_mask=torch.ones_like(x), **how)


@pytest.mark.parametrize("spec_name", ["prefix", "prompt", "loreft", "llama_adapter"])
def test_sliding_window_beyond_the_window(spec_name, hosts):
    """Mistral's window (4) is shorter than the prompt (7) + 8 new tokens: the cache drops keys the adapters'
    positions refer to (prompt tuning's prompt leaves the window)."""
    with applied(hosts("mistral"), spec_name) as model:
        against_no_cache(model, **prompt_inputs("mistral"), num_beams=2)


def continue_from_returned_cache(model, length):
    """Generate 4 tokens, then 5 more from the returned cache (a conversation continued) and from no cache."""
    x = ids(1, length, seed=3)
    first = generate(model, input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=4)
    cache = first.past_key_values
    assert cache is not None and cache.get_seq_length() > 0
    seq = first.sequences
    out = generate(model, input_ids=seq, attention_mask=torch.ones_like(seq), past_key_values=cache, max_new_tokens=5)
    truth = generate(model, input_ids=seq, attention_mask=torch.ones_like(seq), max_new_tokens=5, use_cache=False)
    assert_same(out, truth, "continued from the returned cache")


@pytest.mark.parametrize("spec_name,arch", [("prefix", "gpt2"), ("loreft", "llama"), ("llama_adapter", "qwen2"),
                                            ("lora", "qwen2")])
def test_continue_from_the_returned_cache(spec_name, arch, hosts):
    with applied(hosts(arch), spec_name) as model:
        continue_from_returned_cache(model, 7)


@pytest.mark.parametrize("spec_name,arch", [("prompt", "llama"), ("loreft", "gpt2"), ("prefix", "qwen2")])
def test_chunked_prefill(spec_name, arch, hosts):
    """`prefill_chunk_size=2`: the prompt enters the cache 2 tokens per call (ReFT's first 3 positions span two
    calls; prompt tuning's prompt is in the first)."""
    with applied(hosts(arch), spec_name) as model:
        against_no_cache(model, **prompt_inputs(arch), prefill_chunk_size=2)


@pytest.mark.parametrize("spec_name", ["prefix", "mam"])
def test_ejected_prefix_generates_as_before(spec_name):
    model = adapted("llama", spec_name)
    x = prompt_inputs("llama", batch=2, pad=3)
    before = generate(model, **x, num_beams=2)
    surgery.eject(model)
    assert_same(generate(model, **x, num_beams=2), before, "ejected vs MLP prefix")
    against_no_cache(model, **x, num_beams=2)


@pytest.mark.parametrize("spec_name", ["prefix", "prompt", "loreft"])
def test_no_state_leaks_between_calls_or_copies(spec_name):
    model = adapted("llama", spec_name)
    twin = copy.deepcopy(model)
    inputs = prompt_inputs("llama", batch=2, pad=2, seed=9)
    kwargs = dict(num_beams=2, num_return_sequences=2, output_scores=False, output_logits=False)
    with torch.no_grad():
        first = model.generate(**inputs, max_new_tokens=6, **kwargs)
        other = ids(1, 3, seed=10)     # a different call in between: another batch size and length
        model.generate(other, attention_mask=torch.ones_like(other), max_new_tokens=6, do_sample=True)
        again = model.generate(**inputs, max_new_tokens=6, **kwargs)
        copied = twin.generate(**inputs, max_new_tokens=6, **kwargs)
    assert torch.equal(first, again), "a generate() call changed the next one"
    assert torch.equal(first, copied), "a copy of the adapted model generates differently"


@pytest.mark.parametrize("spec_name,arch", [("prefix", "llama"), ("prompt", "gpt2"), ("loreft", "qwen2"),
                                            ("llama_adapter", "llama")])
def test_generate_after_a_training_step(spec_name, arch, hosts):
    x = prompt_inputs(arch)
    with applied(hosts(arch), spec_name) as model:
        before = generate(model, **x).logits
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        batch = ids(2, 9, seed=4)
        model(input_ids=batch, labels=batch).loss.backward()
        with torch.no_grad():
            for p in params:
                p.sub_(0.5 * p.grad)
                p.grad = None
        model.eval()
        after = against_no_cache(model, **x, num_beams=2).logits
        assert max((a - b).abs().max() for a, b in zip(before, generate(model, **x).logits)) > 1e-4
        assert len(after) == NEW


@pytest.mark.parametrize("spec_name", ["lora", "ia3"])
def test_merged_generates_as_unmerged(spec_name):
    model = adapted("llama", spec_name)
    x = prompt_inputs("llama", batch=2, pad=2)
    unmerged = generate(model, **x, num_beams=2)
    surgery.merge(model)
    assert_same(generate(model, **x, num_beams=2), unmerged, "merged vs unmerged")
    against_no_cache(model, **x, num_beams=2)


@pytest.mark.parametrize("spec_name,arch", [("prefix", "t5"), ("prompt", "bart"), ("loreft", "bart"),
                                            ("mam", "t5"), ("lora", "whisper"), ("prefix", "whisper")])
def test_encoder_decoder_beams(spec_name, arch, hosts):
    inputs = prompt_inputs(arch, batch=2, pad=2)
    with applied(hosts(arch), spec_name) as model:
        assert_adapters_act(model, {k: v[:1] for k, v in inputs.items()})
        against_no_cache(model, **inputs, num_beams=2, num_return_sequences=2)


def test_mixed_batch_with_expanded_rows_is_refused_for_hooked_sites():
    """Beam search expands a MixedBatch's rows: refused with a SurgeryError that says so (a LoRA site)."""
    model = make("llama")
    surgery.apply(model, small("lora"), name="a")
    surgery.apply(model, small("lora"), name="b")
    surgery.set_active(model, surgery.MixedBatch("a", "b"))
    with pytest.raises(surgery.SurgeryError, match="beam search and num_return_sequences expand the batch"):
        generate(model, **prompt_inputs("llama", batch=2), num_beams=2)


@pytest.mark.parametrize("spec_name", ["prefix", "prompt", "lora"])
def test_mixed_batch_with_named_beam_rows(spec_name):
    """Beam search with a MixedBatch naming the expanded rows (rows x beams): each prompt's beams equal that
    prompt alone with its adapter, and the cache changes nothing."""
    model = two_adapters(spec_name)
    inputs = prompt_inputs("llama", batch=2, pad=2, seed=2)
    alone = []
    for row, name in enumerate(["a", "b"]):
        surgery.set_active(model, name)
        alone.append(generate(model, **{k: v[row:row + 1] for k, v in inputs.items()}, num_beams=2).sequences)
    surgery.set_active(model, surgery.MixedBatch("a", "a", "b", "b"))
    out = against_no_cache(model, **inputs, num_beams=2)
    assert torch.equal(out.sequences, torch.cat(alone))


@pytest.mark.parametrize("spec_name,arch", [("llama_adapter", "llama"), ("houlsby", "gpt2"), ("lora", "gemma"),
                                            ("prefix", "mistral")])
def test_static_cache(spec_name, arch, hosts):
    """A static cache where it holds: Mistral's sliding window passes a mask at prefill, so prefix tuning holds
    there (the prefix kind below is the mask-less prefill)."""
    with applied(hosts(arch), spec_name) as model:
        against_no_cache(model, **prompt_inputs(arch), cache_implementation="static")


# ---------------------------------------------------------------- former defects: fixed, or refused clearly

@pytest.mark.parametrize("spec_name,arch", [("prefix", "llama"), ("mam", "gpt2")])
def test_prefix_with_a_static_cache(spec_name, arch, hosts):
    with applied(hosts(arch), spec_name) as model:
        against_no_cache(model, **prompt_inputs(arch), cache_implementation="static")


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_prompt_with_a_static_cache_works_or_is_refused(arch, hosts):
    with applied(hosts(arch), "prompt") as model:
        try:
            against_no_cache(model, **prompt_inputs(arch), cache_implementation="static")
        except surgery.SurgeryError as refusal:
            assert "static" in str(refusal) or "cache" in str(refusal)


@pytest.mark.parametrize("block", ["mixed", "split"])
@pytest.mark.parametrize("spec_name", ["prefix", "prompt"])
def test_mixed_batch_with_expanded_rows_is_refused_for_attention_and_prompts(spec_name, block):
    model = make("llama")
    surgery.apply(model, small(spec_name), name="a")
    surgery.apply(model, small(spec_name), name="b")
    surgery.set_active(model, surgery.MixedBatch("a", "b") if block == "mixed" else
                       surgery.BatchSplit("a", "b", batch_sizes=[1, 1]))
    with pytest.raises(surgery.SurgeryError, match="expand the batch"):
        generate(model, **prompt_inputs("llama", batch=2), num_beams=2)


@pytest.mark.parametrize("spec_name", ["prefix", "prompt"])
def test_batch_split_rows_generate_as_each_adapter_alone(spec_name):
    model = make("llama")
    surgery.apply(model, small(spec_name), name="a")
    surgery.apply(model, small(spec_name), name="b")
    perturb(model, 0.3)
    inputs = prompt_inputs("llama", batch=2, seed=2)
    alone = []
    for row, name in enumerate(["a", "b"]):
        surgery.set_active(model, name)
        alone.append(generate(model, **{k: v[row:row + 1] for k, v in inputs.items()}).sequences)
    surgery.set_active(model, surgery.BatchSplit("a", "b", batch_sizes=[1, 1]))
    assert torch.equal(generate(model, **inputs).sequences, torch.cat(alone))


@pytest.mark.parametrize("arch,length", [("llama", 7), ("gpt2", 12)])
def test_prompt_continues_from_the_returned_cache(arch, length, hosts):
    """Prompt + 4 generated tokens != P (10) tokens: re-fed tokens change the logits (at exactly P tokens the
    off-by-P slice happens to feed the one right token)."""
    with applied(hosts(arch), "prompt") as model:
        continue_from_returned_cache(model, length)


@pytest.mark.parametrize("spec_name", ["prompt", "prefix", "loreft"])
def test_padded_batch_continues_from_the_returned_cache(spec_name, hosts):
    """A left-padded batch continued from its returned cache (the mask over the whole conversation locates the
    tokens generate() feeds again: P of them for prompt tuning)."""
    with applied(hosts("llama"), spec_name) as model:
        x = prompt_inputs("llama", batch=2, pad=3, seed=3)
        first = generate(model, **x, max_new_tokens=4)
        seq = first.sequences
        mask = torch.cat([x["attention_mask"], torch.ones(2, 4, dtype=torch.long)], dim=1)
        out = generate(model, input_ids=seq, attention_mask=mask, past_key_values=first.past_key_values,
                       max_new_tokens=5)
        truth = generate(model, input_ids=seq, attention_mask=mask, max_new_tokens=5, use_cache=False)
        assert_same(out, truth, "a padded batch continued from the returned cache")


@pytest.mark.parametrize("spec_name", ["prefix", "llama_adapter"])
def test_output_attentions_with_attention_adapters(spec_name):
    model = make("llama")
    model.set_attn_implementation("eager")
    base = generate(model, **prompt_inputs("llama"), max_new_tokens=2, output_attentions=True)
    assert all(len(step) == LAYERS for step in base.attentions)     # the base model gives them
    with applied(model, spec_name):
        x = prompt_inputs("llama")
        try:
            out = generate(model, **x, max_new_tokens=2, output_attentions=True)
        except surgery.SurgeryError:
            return                        # a clear refusal is acceptable
        # prefix tuning's maps cover its P prefix keys first (as PEFT's), LLaMA-Adapter's the layer's own keys
        added = next((m.length for m in model.modules() if type(m).__name__ == "PrefixTuning"), 0)
        for step, base_step in zip(out.attentions, base.attentions):   # one [batch, heads, q, keys] map per layer
            assert len(step) == LAYERS, f"{len(step)} attention maps for {LAYERS} layers"
            for probs, base_probs in zip(step, base_step):
                torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))
                assert probs.shape == base_probs.shape[:-1] + (base_probs.shape[-1] + added,)
        if not added:    # the first layer's input is the base model's: its own attention's maps are the base's
            torch.testing.assert_close(out.attentions[0][0], base.attentions[0][0])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_reft_with_a_static_cache_and_left_padding(arch, hosts):
    with applied(hosts(arch), "loreft") as model:
        against_no_cache(model, **prompt_inputs(arch, batch=2, pad=3), cache_implementation="static")


@pytest.mark.parametrize("names,beams", [(("a", "b"), 1), (("a", "a", "b", "b"), 2), ("split", 1)])
def test_mixed_batch_reft_rows_generate_as_alone_with_left_padding(names, beams):
    model = make("llama")
    surgery.apply(model, small("loreft"), name="a")
    surgery.apply(model, small("loreft"), name="b")
    perturb(model, 0.3)
    inputs = prompt_inputs("llama", batch=2, pad=2, seed=2)
    alone = []
    for row, name in enumerate(["a", "b"]):
        surgery.set_active(model, name)
        alone.append(generate(model, **{k: v[row:row + 1] for k, v in inputs.items()}, num_beams=beams).sequences)
    if names == "split":     # BatchSplit hands each adapter its rows the same way
        surgery.set_active(model, surgery.BatchSplit("a", "b", batch_sizes=[1, 1]))
    else:
        surgery.set_active(model, surgery.MixedBatch(*names))     # beams: the expanded rows named
    assert torch.equal(generate(model, **inputs, num_beams=beams).sequences, torch.cat(alone))


def test_parallel_composition_generates_or_is_refused():
    model = two_adapters("houlsby")
    surgery.set_active(model, surgery.Parallel("a", "b"))
    try:
        out = generate(model, **prompt_inputs("llama", batch=2), num_beams=2)
    except surgery.SurgeryError:
        return
    assert out.sequences.shape[0] == 4      # AdapterHub: one output row per adapter and input row


@pytest.mark.parametrize("spec_name,block", [("prompt", "average"), ("prompt", "fuse"), ("lora", "fuse"),
                                             ("prompt", "parallel")])
def test_unsupported_compositions_are_refused_not_crashing(spec_name, block):
    """Refused with a SurgeryError (at the first forward, before the model runs): prompts of the same length
    would otherwise be prepended both, a Stack whatever the block says."""
    model = two_adapters(spec_name)
    x = prompt_inputs("llama", batch=2)
    with torch.no_grad():
        before = model(**x).logits
    with pytest.raises(surgery.SurgeryError):
        if block == "fuse":
            surgery.add_fusion(model, ["a", "b"], name="fusion")
        else:
            surgery.set_active(model, surgery.Average("a", "b") if block == "average" else surgery.Parallel("a", "b"))
        generate(model, **x, max_new_tokens=2)
    surgery.set_active(model, surgery.Stack("a", "b"))
    with torch.no_grad():
        assert torch.equal(model(**x).logits, before), "the refusal changed the model"


def test_prompt_with_a_cache_cut_short_of_its_tokens_is_refused(hosts):
    """A cache cut to an absolute length in tokens that does not count the P prompt positions (what transformers
    5.6's assisted generation and prompt lookup do between steps) misses tokens the next call's positions say it
    holds: a clear refusal, not logits computed without them."""
    with applied(hosts("llama"), "prompt") as model:
        x = ids(1, 7, seed=3)
        out = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=True)
        cache = out.past_key_values
        cache.crop(-(cache.get_seq_length() - (x.shape[1] - 1)))   # to 6 entries, as if it held no prompt
        with pytest.raises(surgery.SurgeryError, match="are missing, cut from the cache"):
            model(input_ids=x[:, -1:], attention_mask=torch.ones_like(x), past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("block", ["average", "parallel", "split"])
def test_a_composition_over_prompts_is_refused_when_chosen(block):
    """set_active itself refuses Average/Parallel/Split over prompt tuning adapters (no forward needed), and what
    was active stays so."""
    model = two_adapters("prompt")
    x = prompt_inputs("llama", batch=2)
    surgery.set_active(model, surgery.Stack("a", "b"))
    with torch.no_grad():
        before = model(**x).logits
    chosen = {"average": surgery.Average("a", "b"), "parallel": surgery.Parallel("a", "b"),
              "split": surgery.Split("a", "b", splits=[1, 1])}[block]
    with pytest.raises(surgery.SurgeryError, match="prompt tuning adapter 'a'"):
        surgery.set_active(model, chosen)
    with torch.no_grad():
        assert torch.equal(model(**x).logits, before)
