"""The rewritten model stays the user's model (issue 12): generate() with the KV cache, left-padded batches,
every forward argument, gradient checkpointing, the HF Trainer, torch.compile(fullgraph=True).

One model per architecture is shared by the per-spec tests: each case applies a spec, perturbs the adapters (so
they matter), checks, and removes the spec again (the traced analysis stays cached on the model).
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from conftest import SPECS

import surgery
from models import VOCAB, applied, make_bert, make_gpt2, make_llama, perturb, token_ids

HIDDEN = 128        # Compacter's PHM layers need a bottleneck (d / 32) divisible by phm_dim 4
LAYERS = 2
NEW_TOKENS = 16
LONG, SHORT = 7, 4  # prompt lengths of the left-padded batch

# Cases that fail until the engine changes described in the report of issue 12 land: (spec, arch) -> why. They run
# as xfail(strict=True), so the limit shows in every run and a fix is noticed.
PENDING = {
    ("unipelt", "gpt2"): "gates average over the whole call: not causal, padding included",
    ("unipelt", "llama"): "gates average over the whole call: not causal, padding included",
}
PENDING_FORWARD = {   # the forward-argument checks
    ("unipelt", "gpt2"): PENDING[("unipelt", "gpt2")],
    ("unipelt", "llama"): PENDING[("unipelt", "llama")],
}


def _spec_cases(pending):
    """Every shipped spec on LLaMA (GQA, rotary, no biases); on GPT-2 (packed c_attn Conv1D, absolute positions,
    tied LM head) every spec that brings an (action, module kind) pair no earlier GPT-2 case had. Specs that only
    select parameters change nothing in the forward: they run once, on GPT-2, which has biases to select."""
    cases, seen = [], set()
    for path in sorted(SPECS.glob("*.yaml")):
        spec = surgery.load_spec(path)
        pairs = {(r.action, r.module.kind if r.module is not None else None) for r in spec.rules}
        train_only = all(r.action == "train" for r in spec.rules)
        archs = []
        if train_only or not pairs <= seen:
            archs.append("gpt2")
            seen |= pairs
        if not train_only:
            archs.append("llama")
        for arch in archs:
            reason = pending.get((path.stem, arch), pending.get(path.stem))
            # a known limit runs as a strict xfail: it shows in every run, and a fix (an XPASS) fails the suite
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            cases.append(pytest.param(path.stem, arch, id=f"{path.stem}-{arch}", marks=marks))
    return cases


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hosts():
    """Lazily built models by architecture, shared across cases (each case removes what it applied)."""
    built = {}

    def get(arch):
        if arch not in built:
            model = {"gpt2": make_gpt2, "llama": make_llama}[arch](layers=LAYERS, hidden=HIDDEN).eval()
            model.generation_config.eos_token_id = None   # always NEW_TOKENS tokens, so rows compare whole
            model.generation_config.pad_token_id = 0
            built[arch] = model
        return built[arch]
    return get


def greedy_without_cache(model, ids: torch.Tensor, steps: int, with_logits: bool = False):
    """Greedy decoding by repeated full forwards, no KV cache: the reference for generate() (and each step's
    last-position logits, with_logits=True)."""
    steps_logits = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, use_cache=False).logits
            steps_logits.append(logits[:, -1])
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return (ids, torch.stack(steps_logits, dim=1)) if with_logits else ids


def left_padded(*rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    return ids, mask


# ---------------------------------------------------------------- generate()

@pytest.mark.parametrize("spec_name,arch", _spec_cases(PENDING))
def test_generate_with_cache_equals_full_forwards_and_padding_is_invisible(spec_name, arch, hosts):
    model = hosts(arch)
    long, short = token_ids(1, LONG, seed=11), token_ids(1, SHORT, seed=12)
    batch, mask = left_padded(long[0], short[0])
    with applied(model, spec_name):
        if any(True for _ in model.surgery_adapters.parameters()):
            with torch.no_grad(), surgery.disable(model):
                base = model(input_ids=long).logits
            with torch.no_grad():
                assert (model(input_ids=long).logits - base).abs().max() > 1e-3, "the adapters change nothing"

        reference_long, reference_logits = greedy_without_cache(model, long, NEW_TOKENS, with_logits=True)
        reference_short = greedy_without_cache(model, short, NEW_TOKENS)
        out = model.generate(long, attention_mask=torch.ones_like(long), max_new_tokens=NEW_TOKENS,
                             do_sample=False, output_logits=True, return_dict_in_generate=True)
        assert torch.equal(out.sequences, reference_long), "generate() with the cache != greedy without it"
        # the logits too: tiny random models keep their argmax under errors of 0.1 (a prompt prepended again
        # at every decode step went unnoticed by the tokens alone)
        _close(torch.stack(out.logits, dim=1), reference_logits, "generate()'s logits vs full forwards")

        padded = model.generate(batch, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert torch.equal(padded[0], reference_long[0]), "the longer prompt changed in a padded batch"
        assert torch.equal(padded[1, LONG - SHORT:], reference_short[0]), "the left-padded prompt != itself alone"


# ---------------------------------------------------------------- forward arguments

def _close(a, b, what):
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda m: f"{what}: {m}")


def _causal_lm_loss(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


@pytest.mark.parametrize("spec_name,arch", _spec_cases(PENDING_FORWARD))
def test_forward_takes_every_argument_in_combination(spec_name, arch, hosts):
    model = hosts(arch)
    ids = token_ids(2, 9, seed=21)
    with applied(model, spec_name), torch.no_grad():
        plain = model(input_ids=ids).logits
        assert plain.shape == (2, 9, VOCAB)
        _close(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, plain, "all-ones attention_mask")
        _close(model(input_ids=ids, use_cache=False).logits, plain, "use_cache=False")

        out = model(input_ids=ids, labels=ids)
        _close(out.logits, plain, "logits with labels")
        _close(out.loss, _causal_lm_loss(plain, ids), "loss from labels")

        embeds = model.get_input_embeddings()(ids)
        _close(model(inputs_embeds=embeds).logits, plain, "inputs_embeds")

        first = model(input_ids=ids[:, :5], use_cache=True)
        rest = model(input_ids=ids[:, 5:], past_key_values=first.past_key_values, use_cache=True)
        _close(torch.cat([first.logits, rest.logits], dim=1), plain, "logits through the KV cache in two calls")

        states = model(input_ids=ids, output_hidden_states=True)
        _close(states.logits, plain, "logits with output_hidden_states")
        assert len(states.hidden_states) == LAYERS + 1
        assert all(h.shape[0] == 2 and h.shape[-1] == HIDDEN for h in states.hidden_states)

        loss, logits = model(input_ids=ids, labels=ids, return_dict=False)[:2]
        _close(logits, plain, "return_dict=False logits")
        _close(loss, out.loss, "return_dict=False loss")

        # all at once: a left-padded batch with labels ignoring the padding, positions as generate() passes them,
        # hidden states, tuple output; the padded row's real positions equal that sequence alone
        padded, mask = left_padded(ids[0], ids[1, 3:])
        labels = padded.masked_fill(mask == 0, -100)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        loss, logits, *rest = model(input_ids=padded, attention_mask=mask, position_ids=positions, labels=labels,
                                    output_hidden_states=True, use_cache=False, return_dict=False)
        _close(loss, _causal_lm_loss(logits, labels), "loss over a padded batch")
        _close(logits[0], plain[0], "unpadded row of a padded batch")
        _close(logits[1, 3:], model(input_ids=ids[1:, 3:]).logits[0], "left-padded row vs the sequence alone")
        assert len(rest[-1]) == LAYERS + 1


@pytest.mark.parametrize("spec_name,arch", _spec_cases({}))
def test_positional_input_ids_are_the_keyword_ones(spec_name, arch, hosts):
    model = hosts(arch)
    ids = token_ids(2, 9, seed=22)
    with applied(model, spec_name), torch.no_grad():
        _close(model(ids).logits, model(input_ids=ids).logits, "model(ids) vs model(input_ids=ids)")


# ---------------------------------------------------------------- gradient checkpointing

@pytest.mark.parametrize("spec_name", ["lora", "houlsby", "parallel", "pfeiffer", "prefix", "llama_adapter",
                                       "loreft", "houlsby_inv", "mam"])
def test_gradient_checkpointing_gives_the_same_gradients(spec_name, hosts):
    """Checkpointed layers recompute their forward (hooks and attention functions included) in backward."""
    model = hosts("llama")
    ids = token_ids(2, 9, seed=23)
    padded, mask = left_padded(ids[0], ids[1, 3:])
    labels = padded.masked_fill(mask == 0, -100)
    layer = model.model.layers[0]
    first_calls = []
    handle = layer.self_attn.register_forward_pre_hook(lambda *a: first_calls.append(1))

    def gradients():
        for p in model.parameters():
            p.grad = None
        torch.manual_seed(0)   # the same dropout masks in both runs (checkpointing replays the RNG state)
        model(input_ids=padded, attention_mask=mask, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    try:
        with applied(model, spec_name):
            model.train()
            plain = gradients()
            model.gradient_checkpointing_enable()
            first_calls.clear()
            checkpointed = gradients()
            assert len(first_calls) == 2, "the layer was not recomputed: checkpointing is off"
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            assert plain.keys() == checkpointed.keys() == trainable
            assert any(g.abs().max() > 0 for g in plain.values())
            for name in plain:
                _close(checkpointed[name], plain[name], f"gradient of {name}")
    finally:
        handle.remove()
        model.gradient_checkpointing_disable()
        model.disable_input_require_grads()


# ---------------------------------------------------------------- HF Trainer

TRAINER_CASES = {
    # spec, extra rules, weight decay
    "houlsby+head": ("houlsby", [{"name": "head", "match": {"module": "classifier"}, "action": "train",
                                  "params": ["all"]}], 0.0),
    "lora": ("lora", [], 0.0),
    "loreft-weight-decay": ("loreft", [], 0.1),   # decay must not erase LoReFT's orthonormal R
}


@pytest.mark.parametrize("case", list(TRAINER_CASES))
def test_trainer_trains_only_what_the_spec_trains(case, tmp_path):
    from transformers import BertForSequenceClassification, Trainer, TrainingArguments
    spec_name, extra_rules, decay = TRAINER_CASES[case]
    model = make_bert(cls=BertForSequenceClassification)
    spec = surgery.load_spec(SPECS / f"{spec_name}.yaml").model_dump(by_alias=True, exclude_none=True)
    spec["rules"] += extra_rules
    surgery.apply(model, spec)
    ids = token_ids(32, 10, seed=4)
    labels = (ids[:, 1] > VOCAB // 2).long()      # learnable from one token
    data = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": y} for i, y in zip(ids, labels)]

    def loss():
        model.eval()
        with torch.no_grad():
            return model(input_ids=ids, labels=labels).loss.item()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    start = loss()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=4,
                             learning_rate=2e-2, weight_decay=decay, report_to=[], use_cpu=True, save_strategy="no",
                             logging_strategy="no", disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data).train()
    assert loss() < start - 0.02

    trains_head = bool(extra_rules)
    allowed = lambda k: k.startswith("surgery_adapters.") or (trains_head and k.startswith("classifier."))  # noqa: E731
    changed = {k for k in before if not torch.equal(before[k], model.state_dict()[k])}
    assert changed and all(allowed(k) for k in changed), sorted(k for k in changed if not allowed(k))
    assert any(k.startswith("surgery_adapters.") for k in changed)
    assert trains_head == any(k.startswith("classifier.") for k in changed)
    for module in model.surgery_adapters.modules():
        if spec_name == "loreft" and hasattr(module, "projection"):
            R = module.projection.weight
            _close(R @ R.t(), torch.eye(R.shape[0]), "LoReFT's R after training with weight decay")


# ---------------------------------------------------------------- torch.compile

COMPILE_SPEC = {"rules": [r for name in ("lora", "houlsby", "prefix")
                          for r in surgery.load_spec(SPECS / f"{name}.yaml").model_dump(by_alias=True,
                                                                                           exclude_none=True)["rules"]]}


def _compiled_vs_eager(model, backend):
    ids = token_ids(2, 9, seed=24)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch.no_grad():
        for kwargs in ({"input_ids": ids}, {"input_ids": ids, "attention_mask": mask}):
            eager = model(**kwargs).logits
            torch.testing.assert_close(compiled(**kwargs).logits, eager, atol=1e-5, rtol=0)


def test_fullgraph_capture_of_lora_houlsby_and_prefix_together():
    """Dynamo captures the whole rewritten LLaMA in one graph (hooks, parametrizations, the registered attention
    function); aot_eager runs that graph without code generation, so this stays fast."""
    model = make_llama(hidden=HIDDEN).eval()
    surgery.apply(model, COMPILE_SPEC)
    perturb(model, 0.3)
    _compiled_vs_eager(model, "aot_eager")


class PlainAttention(torch.nn.Module):
    """Attention as nanoGPT-style code writes it: projections and a direct F.scaled_dot_product_attention call."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (torch.nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class PlainLM(torch.nn.Module):
    def __init__(self, dim=32):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, dim)
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(dim) for _ in range(2))
        self.attns = torch.nn.ModuleList(PlainAttention(dim) for _ in range(2))
        self.head = torch.nn.Linear(dim, VOCAB)

    def forward(self, ids):
        x = self.embed(ids)
        for norm, attn in zip(self.norms, self.attns):
            x = x + attn(norm(x))
        return self.head(x)


def test_attention_adapters_of_plain_models_compile_or_say_why_not():
    """Without transformers' attention registry the attention call is routed inside the module's forward: a
    direct F.scaled_dot_product_attention call and nn.MultiheadAttention (MiniGPT) compile with fullgraph=True
    and give the eager outputs; F.scaled_dot_product_attention itself is never replaced."""
    from models import make_minigpt
    plain_sdpa = F.scaled_dot_product_attention
    torch.manual_seed(0)
    model = PlainLM().eval()
    ids = token_ids(2, 7, seed=26)
    spec = {"rules": [{"match": {"role": "attention.op"}, "action": "attend",
                       "module": {"kind": "prefix", "prefix_length": 3, "flat": True}, "expect": "every_layer"}]}
    with torch.no_grad():
        base = model(ids)
    surgery.apply(model, spec, example_inputs=(ids,))
    perturb(model, 0.3)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(ids)
        assert (eager - base).abs().max() > 1e-3
        torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="aot_eager")(ids), eager,
                                   atol=1e-5, rtol=0)

    minigpt = make_minigpt().eval()
    surgery.apply(minigpt, spec, example_inputs=minigpt.example_inputs())
    perturb(minigpt, 0.3)
    assert F.scaled_dot_product_attention is plain_sdpa
    torch._dynamo.reset()
    with torch.no_grad():
        eager = minigpt(token_ids(2, 7))
        torch.testing.assert_close(torch.compile(minigpt, fullgraph=True, backend="aot_eager")(token_ids(2, 7)),
                                   eager, atol=1e-5, rtol=0)
    surgery.remove(minigpt)
    surgery.remove(model)
    assert F.scaled_dot_product_attention is plain_sdpa


@pytest.mark.slow
@pytest.mark.parametrize("spec_name", ["lora", "houlsby", "prefix"])
def test_inductor_fullgraph_equals_eager(spec_name):
    model = make_llama(hidden=HIDDEN).eval()
    surgery.apply(model, SPECS / f"{spec_name}.yaml")
    perturb(model, 0.3)
    _compiled_vs_eager(model, "inductor")


# ---------------------------------------------------------------- prefix MLP reuse while decoding

def test_prefix_outputs_without_gradients_follow_every_parameter_change():
    """Prefix tuning's MLP output is reused across calls without gradients (decoding): it must be recomputed
    after an optimizer step, a load_state_dict, or a parameter replaced in place."""
    model = make_llama(hidden=HIDDEN).eval()
    surgery.apply(model, SPECS / "prefix.yaml")
    perturb(model, 0.3)
    ids = token_ids(1, 6, seed=25)

    def both():
        with torch.no_grad():
            reused = model(input_ids=ids).logits
        fresh = model(input_ids=ids).logits.detach()
        _close(reused, fresh, "no-grad (reused prefixes) vs grad (recomputed)")
        return reused
    first = both()
    mlp = model.surgery_adapters.adapters["default"]["prefix"]["shared"]["prefix_mlp"]
    optimizer = torch.optim.SGD(mlp.parameters(), lr=0.5)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    stepped = both()
    assert (stepped - first).abs().max() > 1e-4
    mlp.load_state_dict({k: v + 0.1 for k, v in mlp.state_dict().items()})
    loaded = both()
    assert (loaded - stepped).abs().max() > 1e-4
    mlp.control_trans[0].weight = torch.nn.Parameter(mlp.control_trans[0].weight.detach() * 2)
    assert (both() - loaded).abs().max() > 1e-4


class _RenamedCache(torch.nn.Module):
    """A host whose forward calls the KV cache something else (as transformers 5.24 renamed `past_key_values` to
    `cache`): surgery must recognize the cache by what it is."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config
        import inspect
        params = inspect.signature(inner.forward).parameters
        self.cache_name = "cache" if "cache" in params else "past_key_values"

    def forward(self, input_ids=None, attention_mask=None, kv_state=None, use_cache=False):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache,
                          **{self.cache_name: kv_state})


@pytest.mark.parametrize("spec_name", ["prompt", "loreft"])
def test_decode_step_is_recognized_by_the_cache_value_not_its_argument_name(spec_name):
    """A decode step (a non-empty cache passed under any name) is not a first call: prompts are not prepended again
    and interventions at the last prompt token are not applied to the new token."""
    model = _RenamedCache(make_llama(layers=2, hidden=64)).eval()
    surgery.apply(model, SPECS / f"{spec_name}.yaml", example_inputs={"input_ids": token_ids(2, 6)})
    perturb(model, scale=0.3)
    ids = token_ids(1, 7, seed=3)

    def step(disabled_step=False):
        cache = model(input_ids=ids[:, :-1], use_cache=True).past_key_values
        with surgery.disable(model) if disabled_step else contextlib.nullcontext():
            return model(input_ids=ids[:, -1:], kv_state=cache, use_cache=True).logits[:, -1]
    with torch.no_grad():
        cached = step()
        if spec_name == "prompt":
            reference = model(input_ids=ids).logits[:, -1]        # the prompt is in front of the whole sequence
        else:
            reference = step(disabled_step=True)                  # ReFT acts on the prompt's positions only
    torch.testing.assert_close(cached, reference, atol=1e-5, rtol=1e-4)
