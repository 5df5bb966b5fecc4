"""The rewritten model survives what users do with models (issue 18): threads, Ctrl-C during apply, deepcopy /
pickle / torch.save, seeded initialization, plain models without example inputs, wrappers (torch.compile, DDP),
modules replaced after apply, and PEFT configs surgery does not implement."""
from __future__ import annotations

import collections
import copy
import io
import pickle
import threading

import pytest
import torch
import torch.nn.functional as F
from conftest import SPECS

import surgery
from models import make_llama, make_minigpt, perturb, token_ids

PREFIX = {"rules": [{"match": {"role": "attention.op"}, "action": "attend",
                     "module": {"kind": "prefix", "prefix_length": 3, "flat": True}, "expect": "every_layer"}]}


def _surgery_attributes(model: torch.nn.Module) -> list[str]:
    """Every attribute surgery may leave on a model or its modules."""
    return [f"{path or '<root>'}.{key}" for path, m in model.named_modules() for key in m.__dict__
            if "surgery" in key.lower()] + [f"{path}.forward" for path, m in model.named_modules()
                                            if "forward" in m.__dict__]


# ---------------------------------------------------------------- kind 2: threads, process-global state

@pytest.mark.slow
def test_attention_adapters_change_nothing_outside_their_model():
    """A prefix-adapted MiniGPT (attention routed inside nn.MultiheadAttention) leaves
    F.scaled_dot_product_attention itself alone: an unadapted model and a user's direct call give their plain
    results, in the same thread and in other threads while the adapted model runs."""
    plain_sdpa = F.scaled_dot_product_attention
    adapted, other = make_minigpt().eval(), make_minigpt().eval()
    ids = token_ids(2, 7, seed=3)
    q = torch.randn(2, 4, 7, 16, generator=torch.Generator().manual_seed(0))
    surgery.apply(adapted, PREFIX, example_inputs=adapted.example_inputs())
    perturb(adapted, 0.3)
    with torch.no_grad():
        other_ref, adapted_ref = other(ids), adapted(ids)
        sdpa_ref = plain_sdpa(q, q, q, is_causal=True)
    assert F.scaled_dot_product_attention is plain_sdpa
    with surgery.disable(adapted), torch.no_grad():
        assert (adapted(ids) - adapted_ref).abs().max() > 1e-3   # the adapters matter

    errors: list[str] = []
    stop = threading.Event()

    def run_adapted():
        with torch.no_grad():
            while not stop.is_set():
                if not torch.equal(adapted(ids), adapted_ref):
                    errors.append("adapted model")

    def run_others():
        with torch.no_grad():
            for _ in range(60):
                if not torch.equal(other(ids), other_ref):
                    errors.append("unadapted model")
                try:
                    if not torch.equal(F.scaled_dot_product_attention(q, q, q, is_causal=True), sdpa_ref):
                        errors.append("direct F.scaled_dot_product_attention")
                except RuntimeError as exc:
                    errors.append(f"direct F.scaled_dot_product_attention: {exc}")
    threads = [threading.Thread(target=run_adapted), threading.Thread(target=run_adapted)]
    for t in threads:
        t.start()
    try:
        run_others()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, f"{len(errors)} wrong results, first: {errors[0]}"


@pytest.mark.slow
def test_one_model_in_two_threads_with_captured_values():
    """Adapters that capture a value earlier in the call (parallel adapters, sub-layer adapters) keep it per
    thread: one LLaMA run from two threads gives each thread its own outputs."""
    model = make_llama(hidden=64).eval()
    surgery.apply(model, SPECS / "parallel.yaml")
    perturb(model, 0.3)
    inputs = [token_ids(2, 5 + i, seed=10 + i) for i in range(2)]
    with torch.no_grad():
        refs = [model(input_ids=x).logits for x in inputs]
    errors: list[str] = []

    def run(i):
        with torch.no_grad():
            for _ in range(40):
                try:
                    if not torch.equal(model(input_ids=inputs[i]).logits, refs[i]):
                        errors.append(f"thread {i}: wrong output")
                except Exception as exc:  # noqa: BLE001 - a value taken from the other thread fails to broadcast
                    errors.append(f"thread {i}: {type(exc).__name__}: {exc}")
    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"{len(errors)} wrong results, first: {errors[0]}"


# ---------------------------------------------------------------- kind 4: deepcopy, pickle, torch.save

@pytest.mark.slow
@pytest.mark.parametrize("arch", ["minigpt", "llama"])
def test_adapted_model_deepcopies_into_an_independent_adapted_model(arch):
    """A deepcopy of an adapted model runs its own adapters (editing the copy's adapters changes the copy only),
    can be disabled, removed and merged on its own, and the original keeps working."""
    model = make_minigpt().eval() if arch == "minigpt" else make_llama(hidden=64).eval()
    ids = token_ids(2, 6, seed=4)
    run = (lambda m: m(ids)) if arch == "minigpt" else (lambda m: m(input_ids=ids).logits)
    example = model.example_inputs() if arch == "minigpt" else None
    spec = {"rules": PREFIX["rules"] + surgery.load_spec(SPECS / "lora.yaml").model_dump(
        by_alias=True, exclude_none=True)["rules"]}
    with torch.no_grad():
        base = run(model)
    surgery.apply(model, spec, example_inputs=example)
    perturb(model, 0.3)
    with torch.no_grad():
        ref = run(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(run(twin), ref, rtol=0, atol=0)
        for p in twin.surgery_adapters.parameters():
            p.add_(0.5)
        changed = run(twin)
        assert (changed - ref).abs().max() > 1e-3, "the copy does not run its own adapters"
        torch.testing.assert_close(run(model), ref, rtol=0, atol=0, msg="editing the copy changed the original")
        with surgery.disable(twin):
            torch.testing.assert_close(run(twin), base, rtol=0, atol=1e-6)
            torch.testing.assert_close(run(model), ref, rtol=0, atol=0)
    surgery.remove(twin)
    with torch.no_grad():
        torch.testing.assert_close(run(twin), base, rtol=0, atol=1e-6)
        torch.testing.assert_close(run(model), ref, rtol=0, atol=0, msg="removing from the copy changed the original")
    assert not _surgery_attributes(twin)


def test_adapted_model_pickles_and_torch_saves():
    model = make_llama(hidden=64).eval()
    surgery.apply(model, SPECS / "prefix.yaml")
    surgery.apply(model, SPECS / "parallel.yaml", name="par")
    perturb(model, 0.3)
    ids = token_ids(2, 6, seed=5)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    for restored in (pickle.loads(pickle.dumps(model)), _torch_roundtrip(model)):
        with torch.no_grad():
            torch.testing.assert_close(restored(input_ids=ids).logits, ref, rtol=0, atol=0)
        surgery.remove(restored, "par")
        surgery.remove(restored)
        assert not _surgery_attributes(restored)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=0, atol=0)


def _torch_roundtrip(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_plan_refused_apply_and_remove_leave_nothing_that_breaks_deepcopy():
    """No analysis (FakeTensors) is left on the model: after plan, a refused apply, and apply + remove, the model
    deep-copies and carries no surgery attribute."""
    model = make_llama(hidden=64)
    surgery.plan(model, SPECS / "lora.yaml")
    assert not _surgery_attributes(model)
    copy.deepcopy(model)
    with pytest.raises(surgery.SurgeryError):
        surgery.apply(model, {"rules": [{"match": {"role": "attention.q", "module": "nothing.*"}, "action": "wrap",
                                         "module": {"kind": "lora", "r": 2}}]})
    assert not _surgery_attributes(model)
    copy.deepcopy(model)
    surgery.apply(model, SPECS / "lora.yaml")
    surgery.merge(model)
    surgery.remove(model)
    assert not _surgery_attributes(model)
    copy.deepcopy(model)


# ---------------------------------------------------------------- kind 3: Ctrl-C during apply

def _hooks_and_parametrizations(model):
    return [(path, len(m._forward_hooks), len(m._forward_pre_hooks), "parametrizations" in m._modules,
             type(m).__name__) for path, m in model.named_modules()]


@pytest.mark.parametrize("arch", ["minigpt", "llama"])
def test_keyboard_interrupt_during_apply_leaves_the_model_as_it_was(arch, monkeypatch):
    """A KeyboardInterrupt at the second site of a spec (LoRA on a packed in_proj parametrization, prefix on the
    attention op) propagates as it is and leaves no hook, parametrization, forward, adapter or flag behind."""
    from surgery.rewrite import actions
    model = make_minigpt().eval() if arch == "minigpt" else make_llama(hidden=64).eval()
    example = model.example_inputs() if arch == "minigpt" else None
    spec = {"rules": surgery.load_spec(SPECS / "lora.yaml").model_dump(by_alias=True, exclude_none=True)["rules"]
            + PREFIX["rules"]}
    before = (_hooks_and_parametrizations(model), {n: p.requires_grad for n, p in model.named_parameters()},
              sorted(model.state_dict()), _surgery_attributes(model))
    original, calls = actions._realize_one, [0]

    def interrupted(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)
    monkeypatch.setattr(actions, "_realize_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        surgery.apply(model, spec, example_inputs=example)
    after = (_hooks_and_parametrizations(model), {n: p.requires_grad for n, p in model.named_parameters()},
             sorted(model.state_dict()), _surgery_attributes(model))
    assert after == before
    monkeypatch.setattr(actions, "_realize_one", original)
    surgery.apply(model, spec, example_inputs=example)   # and the name was not taken
    surgery.remove(model)
    assert _hooks_and_parametrizations(model) == before[0]


# ---------------------------------------------------------------- kind 9: tracing leaves the user's RNG alone

def test_seeded_apply_is_reproducible_whether_or_not_it_traces():
    """The same seed gives the same adapter initialization on the first apply of an architecture (which traces)
    and on later ones (which reuse the analysis); plan() and tracing do not draw from the user's RNG."""
    def lora_a(seed):
        model = make_llama(hidden=48)   # a shape no other test traces: the first call traces
        torch.manual_seed(seed)
        surgery.apply(model, SPECS / "lora.yaml")
        return torch.cat([p.detach().flatten() for n, p in model.surgery_adapters.named_parameters()
                          if "lora_A" in n])
    first, second = lora_a(7), lora_a(7)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    model = make_minigpt()
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    surgery.plan(model, SPECS / "lora.yaml")   # traces with inputs from model.example_inputs()
    torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)


# ---------------------------------------------------------------- kind 11: plain models without example inputs

class _Tokens(torch.nn.Module):
    """A plain LM without example_inputs(): token ids are consumed by an nn.Embedding."""

    def __init__(self, vocab=50, dim=32):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.block = torch.nn.TransformerEncoderLayer(dim, 4, 64, dropout=0.0, batch_first=True)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, ids):
        return self.head(self.block(self.embed(ids)))


class _Features(torch.nn.Module):
    """A plain MLP on [batch, features]."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
        self.norm = torch.nn.BatchNorm1d(3)

    def forward(self, x):
        return self.norm(self.net(x))


class _TwoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x, y):
        return self.a(x) + self.b(y)


def test_plain_models_without_example_inputs():
    """The headline call works on the seed's MiniGPT (its own example_inputs()), and example inputs are derived
    from the module consuming the forward's argument for plain models; where that cannot work, the error says
    why."""
    from examples.models import minigpt
    model = surgery.apply(minigpt(), SPECS / "houlsby.yaml")
    assert len(model.surgery_adapters.adapters["default"]) > 0
    ids = torch.randint(0, 50, (2, 5))
    tokens = _Tokens().eval()
    with torch.no_grad():
        base = tokens(ids)
    surgery.apply(tokens, SPECS / "lora.yaml")
    perturb(tokens, 0.3)
    with torch.no_grad():
        assert (tokens(ids) - base).abs().max() > 1e-3
    features = surgery.apply(_Features(), {"rules": [{"match": {"module": "net.*", "op": "linear"},
                                                      "action": "wrap", "module": {"kind": "lora", "r": 2}}]})
    assert sum(len(rule) for rule in features.surgery_adapters.adapters["default"].values()) == 2
    with pytest.raises(surgery.SurgeryError, match=r"needs 2 arguments \(x, y\)"):
        surgery.apply(_TwoInputs(), SPECS / "lora.yaml")


# ---------------------------------------------------------------- kind 5: wrapped models

@pytest.mark.slow
def test_compiled_and_data_parallel_wrappers(tmp_path):
    """Every public entry point sees through torch.compile's wrapper and DataParallel (DDP and FSDP are found
    the same way, by their `.module`): disable and remove act, and a checkpoint saved through a wrapper carries
    no wrapper prefix, so plain and wrapped bases load it."""
    ids = token_ids(2, 6, seed=8)
    model = make_llama(hidden=64).eval()
    with torch.no_grad():
        base = model(input_ids=ids).logits
    compiled = torch.compile(model, backend="eager")
    assert surgery.apply(compiled, SPECS / "lora.yaml") is compiled
    perturb(model, 0.3)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        assert (adapted - base).abs().max() > 1e-3
        with surgery.disable(compiled):
            torch.testing.assert_close(model(input_ids=ids).logits, base, rtol=0, atol=1e-6)
    surgery.save(compiled, tmp_path / "compiled")
    parallel = torch.nn.DataParallel(model)
    surgery.save(parallel, tmp_path / "parallel")
    for directory in ("compiled", "parallel"):
        text = "".join(p.read_text(errors="ignore") for p in (tmp_path / directory).iterdir())
        assert "_orig_mod" not in text and "module." not in text.replace("surgery_adapters", "")
        for wrap in (lambda m: m, lambda m: torch.compile(m, backend="eager"), torch.nn.DataParallel):
            fresh = make_llama(hidden=64).eval()
            surgery.load(wrap(fresh), tmp_path / directory)
            with torch.no_grad():
                torch.testing.assert_close(fresh(input_ids=ids).logits, adapted, rtol=0, atol=1e-6)
    assert surgery.trainable_parameters(parallel) == surgery.trainable_parameters(model)
    surgery.remove(compiled)
    assert not _surgery_attributes(model)


# ---------------------------------------------------------------- kind 12: PEFT variants from_peft does not know

def test_from_peft_refuses_unknown_variants_by_name(tmp_path):
    """A LoRA directory whose config selects a variant (MiCA through init_lora_weights, a *_config block of a
    method, any field this reader does not know) is refused, naming the field, and the model is unchanged; the
    plain checkpoint loads."""
    import json
    peft = pytest.importorskip("peft")
    model = make_llama(hidden=64).eval()
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    ids = token_ids(2, 5, seed=9)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    for field, value, message in [("init_lora_weights", "mica", "init_lora_weights='mica'"),
                                  ("kasa_config", {"k": 2}, "kasa_config="),
                                  ("a_future_variant", True, "a_future_variant=True")]:
        directory = tmp_path / field
        directory.mkdir()
        (directory / "adapter_model.safetensors").write_bytes((tmp_path / "plain" / "adapter_model.safetensors")
                                                               .read_bytes())
        (directory / "adapter_config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(surgery.SurgeryError, match=message):
            surgery.from_peft(model, directory)
        assert not _surgery_attributes(model)
    surgery.from_peft(model, tmp_path / "plain")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)   # PEFT's B starts at zero


# ---------------------------------------------------------------- kind 6: modules replaced after apply

def test_a_replaced_module_fails_loudly_instead_of_dropping_its_adapter(tmp_path):
    """resize_token_embeddings after LoRA on the LM head swaps the head for a new module: the next forward,
    merge and save raise, naming it; remove still works and the model runs again."""
    model = make_llama(hidden=64).eval()
    model.config.tie_word_embeddings = False
    spec = {"rules": [{"match": {"role": "lm_head"}, "action": "wrap", "module": {"kind": "lora", "r": 2}}]}
    surgery.apply(model, spec)
    ids = token_ids(2, 5, seed=6)
    old_head = model.lm_head
    model.resize_token_embeddings(model.config.vocab_size + 8)
    assert model.lm_head is not old_head
    with pytest.raises(surgery.SurgeryError, match="lm_head was replaced"):
        model(input_ids=ids)
    with pytest.raises(surgery.SurgeryError, match="lm_head was replaced"):
        surgery.merge(model)
    with pytest.raises(surgery.SurgeryError, match="lm_head was replaced"):
        surgery.save(model, tmp_path / "ckpt")
    surgery.remove(model)
    assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size
    surgery.apply(model, spec)   # applied to the new head, it runs
    perturb(model, 0.3)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with surgery.disable(model):
            assert (model(input_ids=ids).logits - adapted).abs().max() > 1e-3


# ---------------------------------------------------------------- kind 8: half precision

@pytest.mark.slow
def test_half_precision_bases_get_float32_adapters_that_train_with_amp():
    """On a float16 base the adapters are float32 (adapter_dtype="base" keeps float16), the model's outputs keep
    the base's dtype, and torch.autocast + GradScaler train them (unscaling float16 gradients would fail)."""
    ids = token_ids(2, 6, seed=12)
    model = make_llama(hidden=64).to(torch.float16)
    surgery.apply(model, SPECS / "lora.yaml")
    surgery.apply(model, SPECS / "houlsby.yaml", name="houlsby")
    assert {p.dtype for p in model.surgery_adapters.parameters()} == {torch.float32}
    assert model(input_ids=ids).logits.dtype == torch.float16
    kept = make_llama(hidden=64).to(torch.bfloat16)
    surgery.apply(kept, SPECS / "lora.yaml", adapter_dtype="base")
    assert {p.dtype for p in kept.surgery_adapters.parameters()} == {torch.bfloat16}

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    before = [p.detach().clone() for p in trainable]
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(input_ids=ids, labels=ids).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any((p - b).abs().max() > 0 for p, b in zip(trainable, before)), "no adapter parameter moved"
    assert losses[-1] < losses[0]


def test_float32_adapters_on_a_bfloat16_base_are_closer_to_the_float32_result():
    """The adapter's contribution on a bfloat16 base, computed in float32, is nearer the all-float32 result than
    the same adapter computed in bfloat16."""
    ids = token_ids(2, 8, seed=13)
    spec = SPECS / "lora.yaml"
    reference = make_llama(hidden=64)
    surgery.apply(reference, spec)
    perturb(reference, 0.05)
    values = {n: p.detach().clone() for n, p in reference.surgery_adapters.named_parameters()}

    def delta(model):
        with torch.no_grad():
            adapted = model(input_ids=ids).logits.float()
            with surgery.disable(model):
                return adapted - model(input_ids=ids).logits.float()
    errors = {}
    for choice in (None, "base"):
        model = make_llama(hidden=64).to(torch.bfloat16)
        surgery.apply(model, spec, adapter_dtype=choice)
        with torch.no_grad():
            for n, p in model.surgery_adapters.named_parameters():
                p.copy_(values[n])
        errors[choice] = (delta(model) - delta(reference)).abs().mean().item()
    assert errors[None] < errors["base"], errors


# ---------------------------------------------------------------- kind 7: trained base parameters per adapter set

def test_each_adapter_set_keeps_its_own_trained_head(tmp_path):
    """Two adapter sets that each train the classifier head (specs/lora_task_head.yaml): set_active switches
    heads, disable gives the base's, save/load keep each set's own head, remove restores the base's."""
    from transformers import BertForSequenceClassification
    from models import make_bert

    def fresh():
        model = make_bert(cls=BertForSequenceClassification).eval()
        return model
    spec = SPECS / "lora_task_head.yaml"
    model = fresh()
    ids = token_ids(2, 6, seed=14)
    head = model.classifier.weight
    base_head = head.detach().clone()
    with torch.no_grad():
        base = model(input_ids=ids).logits
    surgery.apply(model, spec, name="a")
    assert head.requires_grad
    with torch.no_grad():
        head.add_(1.0)   # "training" a's head
    surgery.apply(model, spec, name="b")
    torch.testing.assert_close(head.detach(), base_head, rtol=0, atol=0, msg="b must start from the base's head")
    with torch.no_grad():
        head.add_(2.0)
    outputs = {}
    for name, offset in (("a", 1.0), ("b", 2.0), ("a", 1.0)):
        surgery.set_active(model, name)
        torch.testing.assert_close(head.detach(), base_head + offset, rtol=0, atol=0)
        with torch.no_grad():
            outputs[name] = model(input_ids=ids).logits
        with surgery.disable(model), torch.no_grad():
            torch.testing.assert_close(head.detach(), base_head, rtol=0, atol=0)
            torch.testing.assert_close(model(input_ids=ids).logits, base, rtol=0, atol=1e-6)
        torch.testing.assert_close(head.detach(), base_head + offset, rtol=0, atol=0)
    surgery.save(model, tmp_path / "ab")
    loaded = fresh()
    surgery.load(loaded, tmp_path / "ab")
    for name in ("a", "b"):
        surgery.set_active(loaded, name)
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, outputs[name], rtol=0, atol=1e-6)
    surgery.remove(model, "a")
    surgery.set_active(model, "b")
    torch.testing.assert_close(head.detach(), base_head + 2.0, rtol=0, atol=0)
    surgery.remove(model, "b")
    torch.testing.assert_close(head.detach(), base_head, rtol=0, atol=0, msg="remove must give the base's head back")


# ---------------------------------------------------------------- kind 10: BatchSplit with sub-layer adapters

@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_batch_split_with_sublayer_and_parallel_adapters(arch):
    """BatchSplit over adapters that read values captured earlier in the call (pfeiffer's sub-layer adapters,
    parallel adapters): each row block equals that adapter alone on those rows."""
    from models import make_bert
    model = (make_llama if arch == "llama" else make_bert)(hidden=64).eval()
    ids = token_ids(4, 6, seed=15)

    def run(x):
        out = model(input_ids=x)
        return out.logits if arch == "llama" else out.last_hidden_state
    for spec in ("pfeiffer", "parallel"):
        surgery.apply(model, SPECS / f"{spec}.yaml", name="a")
        surgery.apply(model, SPECS / f"{spec}.yaml", name="b")
        perturb(model, 0.3)
        surgery.set_active(model, surgery.BatchSplit("a", "b", batch_sizes=[1, 3]))
        with torch.no_grad():
            split = run(ids)
            for name, rows in (("a", slice(0, 1)), ("b", slice(1, 4))):
                surgery.set_active(model, name)
                torch.testing.assert_close(split[rows], run(ids[rows]), rtol=0, atol=1e-5)
        surgery.remove(model, "b")
        surgery.remove(model, "a")


def test_a_replaced_ancestor_of_an_adapted_module_is_found_too():
    """Replacing a whole decoder layer (the adapted projections inside it go with it) is caught as well."""
    model = make_llama(hidden=64).eval()
    surgery.apply(model, SPECS / "lora.yaml")
    model.model.layers[1] = copy.deepcopy(make_llama(hidden=64).model.layers[1])
    with pytest.raises(surgery.SurgeryError, match=r"model\.layers\.1\.self_attn\.q_proj was replaced"):
        model(input_ids=token_ids(1, 4))


def test_the_host_check_follows_the_modules_not_the_recorded_ancestors():
    """check_hosts tests the parent -> child links recorded at apply first (each shared prefix once); a changed
    link falls back to walking each host's path, so a new container holding the same adapted modules runs
    (their hooks still run), and a replaced adapted module is still caught, whichever ancestor changed."""
    from surgery.example_models import GPTBlock, minigpt
    model = minigpt(vocab_size=50, hidden_dim=32, n_layers=2, n_heads=2, seq_len=8, dropout=0.0)
    ids = model.example_inputs()[0]
    surgery.apply(model, SPECS / "houlsby.yaml", example_inputs=(ids,))
    perturb(model, 0.3)
    with torch.no_grad():
        expected = model(ids)
        old = model.blocks[0]
        new = GPTBlock(32, 2)                 # a new block around the same adapted modules
        for name in ("attn", "ln1", "ffn", "ln2"):
            setattr(new, name, getattr(old, name))
        model.blocks[0] = new
        torch.testing.assert_close(model(ids), expected, rtol=0, atol=0)
        model.blocks[1].ffn = GPTBlock(32, 2).ffn     # a new FFN: its adapted Linear with it
        with pytest.raises(surgery.SurgeryError, match=r"blocks\.1\.ffn\.3 was replaced"):
            model(ids)


def _houlsby_minigpt():
    from surgery.example_models import minigpt
    model = minigpt(vocab_size=50, hidden_dim=32, n_layers=3, n_heads=2, seq_len=8, dropout=0.0)
    ids = model.example_inputs()[0]
    surgery.apply(model, SPECS / "houlsby.yaml", example_inputs=(ids,))
    perturb(model, 0.3)
    return model, ids


def _edits():
    """Ways to put a new module where an adapted one was, each (description, edit of a Houlsby MiniGPT)."""
    from surgery.example_models import GPTBlock

    def setitem(m):
        m.blocks[1] = GPTBlock(32, 2)

    def private(m):
        m.blocks._modules["1"] = GPTBlock(32, 2)

    def delete(m):
        del m.blocks[0]                      # the later layers move up: each path holds another layer now

    def insert(m):
        m.blocks.insert(1, GPTBlock(32, 2))

    def pop(m):
        m.blocks.pop(2)

    def sequential(m):
        m.blocks[2].ffn[3] = torch.nn.Linear(128, 32)

    def setattr_(m):
        m.blocks[0].attn = torch.nn.MultiheadAttention(32, 2, batch_first=True)

    def add_module(m):
        m.blocks[0].add_module("ffn", torch.nn.Sequential(*list(m.blocks[0].ffn)[:3], torch.nn.Linear(128, 32)))

    def root(m):
        m.blocks = torch.nn.Sequential(*[GPTBlock(32, 2) for _ in range(3)])

    return [setitem, private, delete, insert, pop, sequential, setattr_, add_module, root]


@pytest.mark.parametrize("edit", _edits(), ids=lambda e: e.__name__)
def test_a_model_whose_tree_stays_as_applied_runs_without_a_root_hook_and_any_edit_is_still_caught(edit):
    """Houlsby on MiniGPT reads nothing of the root call, so while the module tree on the adapted modules' paths
    is as apply left it the model has no root pre-hook at all (issue 20: a root hook costs microseconds of cold
    cache per train step); any edit of that tree arms the check, and the next forward raises, naming a replaced
    module, as it did when every forward checked."""
    model, ids = _houlsby_minigpt()
    assert len(model._forward_pre_hooks) == 0
    with torch.no_grad():
        model(ids)
    edit(model)
    with pytest.raises(surgery.SurgeryError, match="was replaced after its adapters were applied"):
        model(ids)
    with pytest.raises(surgery.SurgeryError, match="was replaced"):   # and again: it stays armed
        model(ids)
    surgery.remove(model)
    assert all(type(m._modules) in (dict, collections.OrderedDict) for m in model.modules())
    assert len(model._forward_pre_hooks) == 0
    model(ids)


def test_an_edit_that_keeps_the_adapted_modules_in_place_is_checked_once():
    """A new container around the same adapted modules passes the check at the next forward; the root hook then
    goes again, and the new container is watched like the old one."""
    from surgery.example_models import GPTBlock
    model, ids = _houlsby_minigpt()
    with torch.no_grad():
        expected = model(ids)
        old = model.blocks[0]
        new = GPTBlock(32, 2)
        for name in ("attn", "ln1", "ffn", "ln2"):
            setattr(new, name, getattr(old, name))
        model.blocks[0] = new
        assert len(model._forward_pre_hooks) == 1            # armed
        torch.testing.assert_close(model(ids), expected, rtol=0, atol=0)
        assert len(model._forward_pre_hooks) == 0            # checked: in place
        old.attn = torch.nn.MultiheadAttention(32, 2, batch_first=True)   # the old container: no longer watched
        assert len(model._forward_pre_hooks) == 0
        new.attn = torch.nn.MultiheadAttention(32, 2, batch_first=True)
        with pytest.raises(surgery.SurgeryError, match=r"blocks\.0\.attn was replaced"):
            model(ids)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_watch_their_own_tree(how):
    """A deep copy or an unpickled model has no root hook either, and an edit of one arms that one only."""
    from surgery.example_models import GPTBlock
    model, ids = _houlsby_minigpt()
    twin = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    assert len(twin._forward_pre_hooks) == 0
    with torch.no_grad():
        torch.testing.assert_close(twin(ids), model(ids), rtol=0, atol=0)
        twin.blocks[1] = GPTBlock(32, 2)
        assert len(model._forward_pre_hooks) == 0
        model(ids)
        with pytest.raises(surgery.SurgeryError, match=r"blocks\.1\.attn was replaced"):
            twin(ids)


def test_a_deep_copy_of_an_adapted_layer_does_not_copy_the_model():
    """The watched `_modules` of a layer (and its hooks' runtime) lead back to the model; a deep copy of the layer
    alone copies the layer, not the model through them, and an edit of the copy arms nothing."""
    model, ids = _houlsby_minigpt()
    surgery.apply(model, SPECS / "parallel.yaml", name="parallel")    # a call reader: the runtime has watchers
    memo = {}
    layer = copy.deepcopy(model.blocks[1], memo)
    assert id(model) not in memo and id(model.surgery_adapters) not in memo
    hooks = len(model._forward_pre_hooks)
    layer.attn = torch.nn.MultiheadAttention(32, 2, batch_first=True)
    assert len(model._forward_pre_hooks) == hooks and not model.surgery_adapters.__dict__["armed"]
    with torch.no_grad():
        model(ids)
