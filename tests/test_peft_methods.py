"""VeRA, LoHa, OFT, BOFT (issue 22): identity at init, PEFT's outputs for the same weights (from_peft and
to_peft, within 1e-5), PEFT's trainable counts, merge == unmerged and a bit-exact unmerge, save/load."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import surgery
from models import assert_same_state, make_bert, make_gpt2, make_llama, perturb, run, state, token_ids

peft = pytest.importorskip("peft")

FACTORIES = {"llama": make_llama, "bert": make_bert}
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value", "intermediate.dense"]}
ROLES = {"llama": ["attention.q", "attention.v", "ffn.out"], "bert": ["attention.q", "attention.v", "ffn.in"]}


def peft_config(method, arch):
    targets = TARGETS[arch] if method in ("vera", "loha") else TARGETS[arch][:2]
    return {
        "vera": lambda: peft.VeraConfig(r=8, target_modules=targets, d_initial=0.2),
        "loha": lambda: peft.LoHaConfig(r=4, alpha=6, target_modules=targets, rank_pattern={"v_proj": 2}),
        "oft": lambda: peft.OFTConfig(r=0, oft_block_size=16, target_modules=targets),
        "oft_exact": lambda: peft.OFTConfig(r=0, oft_block_size=8, target_modules=targets, use_cayley_neumann=False,
                                            block_share=True),
        "boft": lambda: peft.BOFTConfig(boft_block_size=4, target_modules=targets),
    }[method]()


METHOD_SPECS = {   # our module options for the same adapter as peft_config (rules by role)
    "vera": {"kind": "vera", "r": 8, "d_initial": 0.2},
    "loha": {"kind": "loha", "r": 4, "alpha": 6},
    "oft": {"kind": "oft", "block_size": 16},
    "oft_exact": {"kind": "oft", "block_size": 8, "use_cayley_neumann": False, "block_share": True},
    "boft": {"kind": "boft", "block_size": 4},
}
MARKERS = {"vera": ["vera_lambda"], "loha": ["hada_"], "oft": ["oft_R"], "oft_exact": ["oft_R"],
           "boft": ["boft_R", "boft_s"]}
CASES = [(m, a) for m in METHOD_SPECS for a in FACTORIES]


@pytest.fixture(scope="module")
def bases():
    out = {}
    for arch, factory in FACTORIES.items():
        model = factory().eval()
        out[arch] = {"pristine": copy.deepcopy(model), "model": model, "ids": token_ids(2, 9)}
        out[arch]["out"] = run(arch, model, out[arch]["ids"]).detach()
    return out


def fill(model, markers, seed=3, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(m in name for m in markers):
                p.add_(torch.randn(p.shape, generator=g) * scale)


def spec(method, arch):
    roles = ROLES[arch] if method in ("vera", "loha") else ROLES[arch][:2]
    rules = [{"name": method, "match": {"role": roles}, "action": "wrap", "module": METHOD_SPECS[method],
              "expect": "every_layer"}]
    return {"version": 1, "name": method, "rules": rules}


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("method,arch", CASES)
def test_peft_checkpoint_gives_peft_outputs_and_counts(bases, method, arch, tmp_path):
    base = bases[arch]
    peft_model = peft.get_peft_model(copy.deepcopy(base["pristine"]), peft_config(method, arch)).eval()
    torch.testing.assert_close(run(arch, peft_model, base["ids"]), base["out"], atol=1e-6, rtol=0)
    fill(peft_model, MARKERS[method])
    expected = run(arch, peft_model, base["ids"]).detach()
    assert (expected - base["out"]).abs().max() > 1e-3
    peft_model.save_pretrained(tmp_path)

    model = base["model"]
    surgery.from_peft(model, tmp_path, name="p")
    try:
        torch.testing.assert_close(run(arch, model, base["ids"]), expected, atol=1e-5, rtol=0)
        assert trainable(model) == trainable(peft_model)
        # merged == unmerged, and unmerge gives the base weights back bit for bit
        before = {k: v.clone() for k, v in base["pristine"].state_dict().items()}
        surgery.merge(model)
        torch.testing.assert_close(run(arch, model, base["ids"]), expected, atol=1e-5, rtol=0)
        surgery.unmerge(model)
        with surgery.disable(model):
            for k, v in model.state_dict().items():
                if k in before:
                    assert torch.equal(v, before[k]), k
        torch.testing.assert_close(run(arch, model, base["ids"]), expected, atol=1e-5, rtol=0)
    finally:
        surgery.remove(model, "p")
    torch.testing.assert_close(run(arch, model, base["ids"]), base["out"], atol=0, rtol=0)


@pytest.mark.parametrize("method,arch", CASES)
def test_identity_at_init_to_peft_and_save_load(bases, method, arch, tmp_path):
    base = bases[arch]
    model = base["model"]
    surgery.apply(model, spec(method, arch), name="ours")
    try:
        torch.testing.assert_close(run(arch, model, base["ids"]), base["out"], atol=1e-6, rtol=0)
        peft_model = peft.get_peft_model(copy.deepcopy(base["pristine"]), peft_config(method, arch))
        if method != "loha":     # LoHa's rank_pattern makes PEFT's count differ from the uniform spec
            assert trainable(model) == trainable(peft_model)
        perturb(model, 0.1)
        ours = run(arch, model, base["ids"]).detach()
        assert (ours - base["out"]).abs().max() > 1e-3
        surgery.to_peft(model, tmp_path / "peft")
        surgery.save(model, tmp_path / "ours")
    finally:
        surgery.remove(model, "ours")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base["pristine"]), tmp_path / "peft").eval()
    torch.testing.assert_close(run(arch, loaded, base["ids"]), ours, atol=1e-5, rtol=0)
    fresh = copy.deepcopy(base["pristine"])
    surgery.load(fresh, tmp_path / "ours")
    torch.testing.assert_close(run(arch, fresh.eval(), base["ids"]), ours, atol=0, rtol=0)


def test_vera_projection_is_shared_and_saved_once(tmp_path):
    model = make_llama().eval()
    surgery.apply(model, spec("vera", "llama"))
    adapters = [s.adapter for s in model.surgery_adapters.records["default"].weight_sites]
    assert len({id(a._projection[0]) for a in adapters}) == 1
    projection = adapters[0]._projection[0]
    assert tuple(projection.vera_A.shape) == (8, 128) and tuple(projection.vera_B.shape) == (64, 8)  # max d_in, d_out
    assert not projection.vera_A.requires_grad
    assert trainable(model) == sum(8 + a.out_features for a in adapters)
    surgery.save(model, tmp_path / "a")
    keys = load_file(str(tmp_path / "a" / "adapters.safetensors"))
    assert sum(k.endswith("vera_A") for k in keys) == 1 and sum(k.endswith("vera_B") for k in keys) == 1
    report = surgery.merge(model)
    assert not report.not_merged      # the shared projection folds with its sites
    surgery.unmerge(model)

    # save_projection: false keeps the pair out of the checkpoint; load draws the same pair from the key
    other = make_llama().eval()
    data = spec("vera", "llama")
    data["rules"][0]["module"] = dict(data["rules"][0]["module"], save_projection=False)
    surgery.apply(other, data)
    perturb(other, 0.1)
    ids = token_ids(2, 9)
    out = run("llama", other, ids).detach()
    surgery.save(other, tmp_path / "b")
    assert not any("vera_A" in k for k in load_file(str(tmp_path / "b" / "adapters.safetensors")))
    fresh = surgery.load(make_llama().eval(), tmp_path / "b")
    torch.testing.assert_close(run("llama", fresh, ids), out, atol=0, rtol=0)


@pytest.mark.parametrize("kind,options", [("oft", {"block_size": 16, "use_cayley_neumann": False}),
                                          ("boft", {"block_size": 4, "n_butterfly_factor": 3})])
def test_rotation_on_a_packed_weight_and_butterfly_factors(kind, options):
    """GPT-2's c_attn packs q, k, v: the activation path must rotate only the q and v columns' input (not k's),
    agreeing with the weight path (merge); BOFT with 3 butterfly factors stays orthogonal."""
    model = make_gpt2().eval()
    ids = token_ids(2, 9)
    base = run("gpt2", model, ids).detach()
    rule = {"name": kind, "match": {"role": ["attention.q", "attention.v"]}, "action": "wrap",
            "module": {"kind": kind, **options}, "expect": "every_layer"}
    surgery.apply(model, {"version": 1, "rules": [rule]})
    torch.testing.assert_close(run("gpt2", model, ids), base, atol=1e-6, rtol=0)
    perturb(model, 0.2)
    adapters = [s.adapter for s in model.surgery_adapters.records["default"].weight_sites]
    assert all(a.packed for a in adapters)
    rotation = adapters[0].rotation().detach()
    torch.testing.assert_close(rotation @ rotation.t(), torch.eye(rotation.shape[0]), atol=1e-5, rtol=0)
    out = run("gpt2", model, ids).detach()
    assert (out - base).abs().max() > 1e-3
    surgery.merge(model)
    torch.testing.assert_close(run("gpt2", model, ids), out, atol=1e-5, rtol=0)
    surgery.unmerge(model)
    with pytest.raises(surgery.SurgeryError, match="one adapter per module"):
        surgery.to_peft(model, "/nonexistent/never_written")


def test_block_size_that_does_not_divide_is_an_error_and_leaves_the_model():
    model = make_llama().eval()
    before = state(model)
    rule = {"name": "oft", "match": {"role": "attention.q"}, "action": "wrap", "module": {"kind": "oft",
                                                                                          "block_size": 24}}
    with pytest.raises(surgery.SurgeryError, match="does not divide the op's input size 64"):
        surgery.apply(model, {"version": 1, "rules": [rule]})
    assert_same_state(before, state(model))


def test_shipped_specs_apply():
    model = make_llama().eval()
    ids = token_ids(2, 9)
    base = run("llama", model, ids).detach()
    for name in ("vera", "loha", "oft", "boft"):
        surgery.apply(model, f"specs/{name}.yaml", name=name)
        torch.testing.assert_close(run("llama", model, ids), base, atol=1e-6, rtol=0)
        surgery.remove(model, name)


# ------------------------------------------------------------------ PEFT's counts on real configurations

def _counts(model_factory, config, spec_data):
    peft_model = peft.get_peft_model(model_factory(), config)
    ours = model_factory()
    surgery.apply(ours, spec_data)
    return trainable(peft_model), trainable(ours)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["vera", "loha", "oft", "boft", "adalora", "pissa"])
def test_counts_equal_peft_on_real_minilm_and_a_llama_config(method):
    from models import make_minilm
    peft_configs = {"vera": lambda t: peft.VeraConfig(r=8, target_modules=t),
                    "loha": lambda t: peft.LoHaConfig(target_modules=t),
                    "oft": lambda t: peft.OFTConfig(target_modules=t),
                    "boft": lambda t: peft.BOFTConfig(target_modules=t),
                    "adalora": lambda t: peft.AdaLoraConfig(target_modules=t, total_step=10),
                    "pissa": lambda t: peft.LoraConfig(target_modules=t, init_lora_weights="pissa")}
    ours = {"vera": {"kind": "vera", "r": 8}, "loha": {"kind": "loha"}, "oft": {"kind": "oft"},
            "boft": {"kind": "boft"}, "adalora": {"kind": "adalora"}, "pissa": {"kind": "lora", "init": "pissa"}}
    rule = {"name": method, "match": {"role": ["attention.q", "attention.v"]}, "action": "wrap",
            "module": ours[method], "expect": "every_layer"}
    theirs, mine = _counts(make_minilm, peft_configs[method](["query", "value"]), {"version": 1, "rules": [rule]})
    assert theirs == mine
    if method == "vera":
        assert mine == 4704           # 12 sites x (8 + 384)
    llama = lambda: make_llama(layers=4, hidden=512, heads=8, kv_heads=4, intermediate=1376)  # noqa: E731
    theirs, mine = _counts(llama, peft_configs[method](["q_proj", "v_proj"]), {"version": 1, "rules": [rule]})
    assert theirs == mine


@pytest.mark.slow
def test_vera_count_on_bert_base():
    from transformers import BertConfig, BertModel
    rule = {"name": "vera", "match": {"role": ["attention.q", "attention.v"]}, "action": "wrap",
            "module": {"kind": "vera", "r": 256}, "expect": "every_layer"}
    factory = lambda: BertModel(BertConfig())  # noqa: E731
    theirs, mine = _counts(factory, peft.VeraConfig(r=256, target_modules=["query", "value"]),
                           {"version": 1, "rules": [rule]})
    assert theirs == mine == 24576


# ------------------------------------------------------------------ LoRA inits from the base weight: PiSSA, OLoRA

@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_equal_peft_and_leave_the_base_alone(bases, init, tmp_path):
    base = bases["llama"]
    model, ids = base["model"], base["ids"]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init)
    peft_model = peft.get_peft_model(copy.deepcopy(base["pristine"]), config).eval()
    weights_before = {k: v.clone() for k, v in model.state_dict().items()}
    rule = {"name": "lora", "match": {"role": ["attention.q", "attention.v"]}, "action": "wrap",
            "module": {"kind": "lora", "r": 4, "alpha": 8, "init": init}, "expect": "every_layer"}
    surgery.apply(model, {"version": 1, "rules": [rule]}, name="ours")
    try:
        torch.testing.assert_close(run("llama", model, ids), base["out"], atol=1e-5, rtol=0)   # identity at init
        sites = {s.owner_path: s.adapter for s in model.surgery_adapters.records["ours"].weight_sites}
        assert trainable(model) == trainable(peft_model)
        for name, module in peft_model.named_modules():
            path = name.removeprefix("base_model.model.")
            if path in sites:   # the same factors as PEFT's init
                torch.testing.assert_close(sites[path].lora_A, module.lora_A["default"].weight, atol=1e-5, rtol=0)
                torch.testing.assert_close(sites[path].lora_B, module.lora_B["default"].weight, atol=1e-5, rtol=0)
        fill(peft_model, ["lora_"], scale=0.05)
        expected = run("llama", peft_model, ids).detach()
        for name, module in peft_model.named_modules():
            path = name.removeprefix("base_model.model.")
            if path in sites:
                with torch.no_grad():
                    sites[path].lora_A.copy_(module.lora_A["default"].weight)
                    sites[path].lora_B.copy_(module.lora_B["default"].weight)
        torch.testing.assert_close(run("llama", model, ids), expected, atol=1e-5, rtol=0)
        surgery.merge(model)
        torch.testing.assert_close(run("llama", model, ids), expected, atol=1e-5, rtol=0)
        surgery.unmerge(model)
        surgery.save(model, tmp_path / "ours")
        surgery.to_peft(model, tmp_path / "converted")
    finally:
        surgery.remove(model, "ours")
    for k, v in model.state_dict().items():      # the user's base weights were never replaced
        assert torch.equal(v, weights_before[k]), k
    converted = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert converted["r"] == 8 and converted["lora_alpha"] == 16            # rank 2r, same scaling
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base["pristine"]), tmp_path / "converted").eval()
    torch.testing.assert_close(run("llama", loaded, ids), expected, atol=1e-5, rtol=0)
    fresh = surgery.load(copy.deepcopy(base["pristine"]), tmp_path / "ours")
    torch.testing.assert_close(run("llama", fresh.eval(), ids), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_from_peft_recomputes_the_residual_of_an_unconverted_pissa_olora_dir(bases, init, tmp_path):
    """PEFT's plain save of a PiSSA/OLoRA adapter (init_lora_weights kept in the config) holds A, B meant for
    the residual base PEFT recomputes at load; read as plain LoRA on the original base it would be silently off
    by s·B₀A₀."""
    base = bases["llama"]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init)
    peft_model = peft.get_peft_model(copy.deepcopy(base["pristine"]), config).eval()
    fill(peft_model, ["lora_"], scale=0.05)
    expected = run("llama", peft_model, base["ids"]).detach()
    peft_model.save_pretrained(tmp_path)
    model = base["model"]
    surgery.from_peft(model, tmp_path, name="p")
    try:
        torch.testing.assert_close(run("llama", model, base["ids"]), expected, atol=1e-5, rtol=0)
    finally:
        surgery.remove(model, "p")


def test_from_peft_refuses_base_mutating_inits_it_cannot_recompute(tmp_path):
    model = make_llama().eval()
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    before = state(model)
    for init in ("pissa_niter_4", "corda", "loftq", "lora_ga"):
        config_path.write_text(json.dumps(dict(config, init_lora_weights=init)))
        with pytest.raises(surgery.SurgeryError, match="init_lora_weights="):
            surgery.from_peft(model, tmp_path)
        assert_same_state(before, state(model))


# ------------------------------------------------------------------ AdaLoRA

ADALORA = dict(init_r=6, target_r=2, lora_alpha=8, tinit=1, tfinal=1, deltaT=1, orth_reg_weight=0.3, total_step=5)


def _adalora_pair(base):
    """PEFT's AdaLoRA and ours on copies of one base, ours holding PEFT's initial tensors."""
    config = peft.AdaLoraConfig(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", **ADALORA)
    peft_model = peft.get_peft_model(copy.deepcopy(base), config)
    ours = copy.deepcopy(base)
    options = {k: v for k, v in ADALORA.items() if k != "lora_alpha"} | {"alpha": ADALORA["lora_alpha"]}
    rule = {"name": "adalora", "match": {"role": ["attention.q", "attention.v"]}, "action": "wrap",
            "module": {"kind": "adalora", **options}, "expect": "every_layer"}
    surgery.apply(ours, {"version": 1, "rules": [rule]})
    sites = {s.owner_path: s.adapter for s in ours.surgery_adapters.records["default"].weight_sites}
    pairs = {}
    for name, module in peft_model.named_modules():
        path = name.removeprefix("base_model.model.")
        if path in sites:
            with torch.no_grad():
                for t in ("lora_A", "lora_B", "lora_E"):
                    getattr(sites[path], t).copy_(getattr(module, t)["default"])
            pairs[path] = (module, sites[path])
    return peft_model, ours, pairs


def test_adalora_training_and_rank_allocation_follow_peft(tmp_path):
    base = make_llama().eval()
    ids = token_ids(4, 12)
    peft_model, ours, pairs = _adalora_pair(base)
    assert trainable(ours) == trainable(peft_model) == 4 * 6 * (64 + 1) + 2 * 6 * 64 + 2 * 6 * 32
    allocator = surgery.AdaLoRAAllocator(ours)
    optimizers = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=2.0) for m in (peft_model, ours)]
    peft_model.train(), ours.train()
    for step in range(7):
        losses = [m(input_ids=ids, labels=ids).loss for m in (peft_model, ours)]
        torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=0)    # the orthogonality penalty too
        for loss, optimizer in zip(losses, optimizers):
            loss.backward()
            optimizer.step()
        peft_model.base_model.update_and_allocate(step)
        allocator.update_and_allocate(step)
        for optimizer in optimizers:
            optimizer.zero_grad()
        for theirs, mine in pairs.values():
            assert torch.equal(theirs.lora_E["default"] == 0, mine.lora_E == 0), step
    kept = sum(int(a.rank_pattern.sum()) for _, a in pairs.values())
    assert kept == 2 * len(pairs)                     # target_r per site on average
    peft_model.eval(), ours.eval()
    expected = run("llama", peft_model, ids).detach()
    torch.testing.assert_close(run("llama", ours, ids), expected, atol=1e-5, rtol=0)

    # PEFT's save (pruned to rank_pattern, scaling still over init_r) loads with from_peft; to_peft loads in PEFT
    peft_model.save_pretrained(tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["rank_pattern"]
    loaded = surgery.from_peft(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(run("llama", loaded, ids), expected, atol=1e-5, rtol=0)
    surgery.to_peft(loaded, tmp_path / "back")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "back").eval()
    torch.testing.assert_close(run("llama", back, ids), expected, atol=1e-5, rtol=0)
    # merge == unmerged; save/load keeps the allocation
    surgery.merge(ours)
    torch.testing.assert_close(run("llama", ours, ids), expected, atol=1e-5, rtol=0)
    surgery.unmerge(ours)
    allocator.remove()
    surgery.save(ours, tmp_path / "ours")
    fresh = surgery.load(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(run("llama", fresh, ids), expected, atol=0, rtol=0)
    assert {s.owner_path: int(s.adapter.rank_pattern.sum()) for s in fresh.surgery_adapters.records["default"]
            .weight_sites} == {path: int(a.rank_pattern.sum()) for path, (_, a) in pairs.items()}


def test_adalora_allocator_errors():
    model = make_llama().eval()
    with pytest.raises(surgery.SurgeryError, match="no AdaLoRA sites|pass name"):
        surgery.AdaLoRAAllocator(model)
    surgery.apply(model, "specs/adalora.yaml")
    with pytest.raises(surgery.SurgeryError, match="total_step is not set"):
        surgery.AdaLoRAAllocator(model)
    allocator = surgery.AdaLoRAAllocator(model, total_step=10)
    with pytest.raises(surgery.SurgeryError, match="no gradient"):
        allocator.update_and_allocate(0)


@pytest.mark.slow
def test_adalora_callback_in_a_transformers_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments
    model = make_llama()
    data = surgery.load_spec("specs/adalora.yaml").model_dump(by_alias=True, exclude_none=True)
    data["rules"][0]["module"].update(tfinal=2, total_step=6)     # the allocation is fixed at step 4 of 0..5
    surgery.apply(model, data)
    allocator = surgery.AdaLoRAAllocator(model)
    ids = token_ids(8, 12)
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=0.5,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[allocator.callback()]).train()
    sites = [s.adapter for s in model.surgery_adapters.records["default"].weight_sites]
    assert sum(int(a.rank_pattern.sum()) for a in sites) == 8 * len(sites)      # target_r 8 of init_r 12
    assert all(bool((a.lora_E[~a.rank_pattern] == 0).all()) for a in sites)


def test_loftq_corrects_the_nf4_error_of_the_base_it_is_quantized_to():
    pytest.importorskip("torchao")
    model = make_llama().eval()
    ids = token_ids(2, 9)
    dense_out = run("llama", model, ids).detach()
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    rule = {"name": "loftq", "match": {"role": ["attention.q", "attention.v"]}, "action": "wrap",
            "module": {"kind": "lora", "r": 4, "alpha": 8, "init": "loftq"}, "expect": "every_layer"}
    surgery.apply(model, {"version": 1, "rules": [rule]})
    with pytest.raises(surgery.SurgeryError, match="quantize_nf4"):     # the correction on the dense W: refused
        run("llama", model, ids)
    with pytest.raises(surgery.SurgeryError, match="quantize_nf4"):
        surgery.merge(model)
    surgery.quantize_nf4(model)
    for site in model.surgery_adapters.records["default"].weight_sites:
        w = dense[f"{site.owner_path}.weight"]
        q = site.owner.weight.get_original_weight().to(torch.float32)
        corrected = q + site.adapter.delta_weight().detach()
        tail = torch.linalg.svdvals(w - q)[4:].square().sum().sqrt()     # the best rank-4 correction's error
        torch.testing.assert_close(torch.linalg.norm(w - corrected), tail, atol=1e-4, rtol=1e-4)
        assert torch.linalg.norm(w - corrected) < 0.9 * torch.linalg.norm(w - q)
    out = run("llama", model, ids).detach()
    assert (out - dense_out).abs().max() < 0.1
    surgery.dequantize_nf4(model)                   # merging goes through a dense copy of Q
    surgery.merge(model)
    torch.testing.assert_close(run("llama", model, ids), out, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ mixed-adapter batches (PEFT's adapter_names)

def _mixed_model():
    model = make_llama().eval()
    lora = {"name": "lora", "match": {"role": ["attention.q", "attention.v"]}, "action": "wrap",
            "module": {"kind": "lora", "r": 4}}
    surgery.apply(model, {"version": 1, "rules": [lora]}, name="a")
    surgery.apply(model, {"version": 1, "rules": [dict(lora, module={"kind": "vera", "r": 8})]}, name="b")
    surgery.apply(model, "specs/ia3.yaml", name="c")
    surgery.apply(model, "specs/houlsby.yaml", name="d")
    perturb(model, 0.2)
    return model


@pytest.mark.parametrize("rows", [["a", "b", "__base__", "c", "d", "a"],       # scattered rows
                                  ["a", "a", "b", "b", "__base__", "d"]])    # grouped rows
def test_mixed_batch_rows_equal_each_row_run_alone(rows):
    model = _mixed_model()
    ids = token_ids(len(rows), 7, seed=5)
    alone = []
    for i, name in enumerate(rows):
        if name == "__base__":
            with surgery.disable(model):
                alone.append(run("llama", model, ids[i:i + 1]))
        else:
            surgery.set_active(model, name)
            alone.append(run("llama", model, ids[i:i + 1]))
    surgery.set_active(model, surgery.MixedBatch(*rows))
    mixed = run("llama", model, ids)
    torch.testing.assert_close(mixed, torch.cat(alone), atol=1e-5, rtol=0)
    with surgery.disable(model):
        base = run("llama", model, ids)
    for i, name in enumerate(rows):        # every adapter row is changed, base rows are not
        assert ((mixed[i] - base[i]).abs().max() > 1e-3) == (name != "__base__"), (i, name)

    # generate() with the KV cache: each row's greedy continuation is that row's own
    surgery.set_active(model, surgery.MixedBatch(*rows))
    generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    for i, name in enumerate(rows):
        if name == "__base__":
            with surgery.disable(model):
                own = model.generate(ids[i:i + 1], max_new_tokens=4, do_sample=False, pad_token_id=0)
        else:
            surgery.set_active(model, name)
            own = model.generate(ids[i:i + 1], max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(generated[i:i + 1], own), (i, name)
        surgery.set_active(model, surgery.MixedBatch(*rows))


def test_mixed_batch_refuses_what_does_not_act_per_row():
    # prefix, prompt, parallel and sub-layer adapters do act per row: tests/test_mixed_batch.py
    model = make_llama().eval()
    surgery.apply(model, "specs/lora.yaml", name="a")
    surgery.apply(model, "specs/ln_tuning.yaml", name="norms")
    with pytest.raises(surgery.SurgeryError, match="action 'train'"):
        surgery.set_active(model, surgery.MixedBatch("a", "norms"))
    with pytest.raises(surgery.SurgeryError, match="no adapter named 'x'"):
        surgery.set_active(model, surgery.MixedBatch("a", "x"))
    surgery.set_active(model, surgery.MixedBatch("a", "__base__"))
    with pytest.raises(surgery.RewriteError, match="MixedBatch names 2 rows but the batch has 3"):
        run("llama", model, token_ids(3, 5))
