"""The rewrite vocabulary: insert_after, insert_before, parallel, wrap, replace, train.

Each action turns a matched site into a change on the host model (see host.py), recorded so that it can be
undone. Modules come from the registry; nothing here knows any particular method.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import re

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from surgery.analyze.gradients import without_gradient
from surgery.analyze.roles import SDPA_OPS, Analysis, Ancestors, Site, op_name, stack_entries
from surgery.errors import RewriteError
from surgery.match.pattern import Match
from surgery.rewrite import compose, mixed
from surgery.modules import columns as cols
from surgery.modules.base import SiteContext
from surgery.modules.registry import module_class
from surgery.rewrite.attention import (attach_intercept, attach_registry, keep_off_fast_path, registry_of,
                                       uses_registry)
from surgery.rewrite.meta_build import building_on_meta
from surgery.rewrite.shadow import attach_shadow, check_traced
from surgery.rewrite.host import (AdapterStore, CallGate, Gate, Record, WeightSite, attach_weight_site, capture_anchor,
                                  count_calls, hook_capture, hook_value, input_anchor, install_stack_capture, output_anchor,
                                  value_anchor, wrap_weight)
from surgery.spec.models import Rule


def site_key(match: Match) -> str:
    """A stable, readable key for a site: the module path of a weight-bearing op, else module path and role."""
    key = re.sub(r"[^0-9A-Za-z_]", "_", match.module or "root")
    call = _call_of(match)
    if call:
        key += f"__call{call}"      # a module called several times (a shared layer) has one site per call
    info = match.site.linear
    if info is not None and info.rows is None and match.site.extra.get("packed") is None:
        return key
    return key + "__" + (match.role.replace(".", "_") if match.role else match.node)


def _call_of(match: Match) -> int:
    """Which call of the site's module the matched node belongs to (0 unless the module is called repeatedly)."""
    for path, call in reversed(stack_entries(match.site.node)):
        if path == match.module:
            return call
    return 0


def _dim(node) -> int | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return int(val.shape[-1]) if isinstance(val, torch.Tensor) and val.dim() > 0 else None


def _moe_output(analysis: Analysis, match: Match) -> fx.Node | None:
    """The branch the layer's FFN residual add receives (the MoE block's combined output)."""
    for site in analysis.by_role.get("ffn.residual_add", []):
        if site.layer == match.layer and isinstance(site.extra.get("branch"), fx.Node):
            return site.extra["branch"]
    return None


def _moe_layer_experts(analysis: Analysis, match: Match) -> Site | None:
    """The layer's routed experts (an ffn.out on a 3-D expert parameter), when `match` is an FFN output of a MoE
    layer: the routed experts themselves, or a shared expert whose output the MoE block adds to theirs."""
    if match.role != "ffn.out" or match.layer is None:
        return None
    for site in analysis.by_role.get("ffn.out", []):
        if site.layer == match.layer and site.stack == match.site.stack and site.linear is not None \
                and site.linear.experts:
            return site
    return None


def _site_value(site: Site) -> fx.Node:
    return site.linear.value if site.linear is not None else site.node


def _through(value: fx.Node, ops: list[str]) -> fx.Node:
    while ops:
        users = list(value.users)
        if len(users) == 1 and op_name(users[0]) in ops:
            value = users[0]
        else:
            break
    return value


def _reference_tensor(model: nn.Module) -> torch.Tensor | None:
    for p in model.parameters():
        if p.is_floating_point():
            return p
    return None


def _context(model: nn.Module, analysis: Analysis, match: Match, value: fx.Node, rule: Rule,
             ref: torch.Tensor | None = None) -> SiteContext:
    """What a module is built from at one site. `ref`: the model's first floating-point parameter (its dtype and
    device are the site's where it reads no weight), found once per rule by the caller, else here."""
    ref = ref if ref is not None else _reference_tensor(model)
    ctx = SiteContext(dim=_dim(value), layer=match.layer, role=match.role, module=match.module,
                      num_layers=analysis.num_layers, dtype=ref.dtype if ref is not None else torch.float32,
                      device=ref.device if ref is not None else torch.device("cpu"), model=model)
    info = match.site.linear
    if info is not None:
        packed = match.site.extra.get("packed")
        rows = info.rows or packed
        ctx.in_features = info.in_features
        ctx.out_features = cols.width(rows, info.out_features)
        ctx.op_kind, ctx.op_args = info.kind, dict(info.op_args)
        weight = _base_parameter(model, info.weight)
        ctx.experts = info.experts
        if weight is not None:
            w = weight.transpose(-2, -1) if info.layout == "in_out" else weight   # experts: (experts, out, in)
            ctx.weight = cols.take(w, rows)
            if isinstance(rows, cols.Columns):   # an index set is a copy: adapters that keep W read it live
                ctx.live_weight = cols.LiveRows(weight, rows, transposed=info.layout == "in_out")
        ctx.rows = (rows if isinstance(rows, cols.Columns) else tuple(rows)) if rows else None
        bias = _base_parameter(model, info.bias) if info.bias else None
        if bias is not None:
            brows = info.bias_rows or packed
            ctx.bias = cols.take(bias, brows)
        ctx.dtype, ctx.device = (weight.dtype, weight.device) if weight is not None else (ctx.dtype, ctx.device)
    try:
        ctx.host = model.get_submodule(match.module) if match.module else model
    except AttributeError:
        ctx.host = None
    if match.source is not None:
        ctx.source_dim = _dim(_site_value(match.source))
    if match.role == "attention.op":
        ctx.extra.update(_attention_facts(model, analysis, match))
    if rule.action == "prepend":
        ctx.extra["embed_text"] = _text_embedder(model, analysis)
    return ctx


def _attention_facts(model, analysis: Analysis, match: Match) -> dict:
    """Heads, head size, KV heads and the k/v projection modules of one attention op."""
    q = match.site.extra.get("q", match.site.node.args[0])   # eager attention: the op node is probs @ v
    q_shape = q.meta["val"].shape
    heads, head_dim = int(q_shape[1]), int(q_shape[-1])
    if len(q_shape) != 4 and analysis.hidden_size:
        # heads folded into the batch ([batch * heads, seq, head_dim]: DeBERTa, BLOOM): from the widths
        heads = analysis.hidden_size // head_dim
    facts = {"heads": heads, "head_dim": head_dim, "kv_heads": heads, "hidden": analysis.hidden_size,
             "k_proj": None, "v_proj": None}
    for role in ("attention.k", "attention.v"):
        for site in analysis.by_role.get(role, []):
            if site.layer == match.layer and site.linear is not None and not site.extra.get("permuted"):
                info = site.linear     # (permuted: the operand reorders its columns; new tokens' k/v would not fit)
                facts[role[-1] + "_proj"] = _projection(model, info, site.extra.get("packed"))
                if role == "attention.k":
                    facts["kv_heads"] = cols.width(info.rows or site.extra.get("packed"), info.out_features) // head_dim
                    facts["k_in"] = info.in_features    # what the key projection reads (a stage's own width)
    # the width of the hidden state entering the attention module (a UNet's resolutions differ from layer to
    # layer), and every layer's key width (a prefix MLP shared by layers of several widths lays them end to end)
    entering = _module_input_value(analysis, match.module, match.site.extra.get("q"))
    facts["input_dim"] = int(entering.meta["val"].shape[-1]) if entering is not None else analysis.hidden_size
    facts["kv_widths"] = _kv_widths(analysis, match.role)
    width = facts["kv_widths"].get(match.layer)
    if width and width % head_dim == 0:     # KV heads as the key projection's width says (also where its
        facts["kv_heads"] = width // head_dim   # columns are permuted on the way: JetMoe's kv_proj)
    return facts


def _kv_widths(analysis: Analysis, role: str) -> dict[int, int]:
    """Layer -> the width of its key projection (KV heads x head_dim), for the attention op of `role`."""
    widths: dict[int, int] = {}
    for site in analysis.by_role.get(role.rpartition(".")[0] + ".k", []):
        info, packed = site.linear, site.extra.get("packed")
        if site.layer is None or site.layer in widths or info is None:
            continue
        widths[site.layer] = cols.width(info.rows or packed, info.out_features)   # a range or an index set
    return widths


def _projection(model, info, packed):
    """A callable computing one (slice of a) weight-bearing op on new inputs, with the live base weights."""
    rows = info.rows or packed
    if rows is None:
        return model.get_submodule(info.owner)
    return functools.partial(_project, model, info, packed, rows)


def _project(model, info, packed, rows, x):
    owner = model.get_submodule(info.owner)
    weight = getattr(owner, info.weight.rpartition(".")[2])
    bias = getattr(model.get_submodule(info.bias.rpartition(".")[0]), info.bias.rpartition(".")[2]) if info.bias else None
    if info.layout == "in_out":
        out = x @ cols.take(weight, rows, dim=1)
    else:
        out = x @ cols.take(weight, rows).t()
    if bias is not None:
        brows = info.bias_rows or packed or rows
        out = out + cols.take(bias, brows)
    return out


def _text_embedder(model, analysis: Analysis):
    """For prompt init from text: token ids (given, or from the model's own tokenizer) through the model's
    token embedding table, repeated to the prompt length."""
    table = None
    for site in analysis.by_role.get("embedding", []):
        weight = site.node.args[0]
        if weight.op == "placeholder" and weight.name in analysis.traced.params:
            table = model.get_parameter(analysis.traced.params[weight.name])
            break

    def embed(init: dict, length: int) -> torch.Tensor:
        ids = init.get("ids")
        if ids is None:
            source = init.get("tokenizer") or getattr(getattr(model, "config", None), "_name_or_path", None)
            try:
                from transformers import AutoTokenizer
                tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
            except Exception as exc:  # noqa: BLE001
                raise RewriteError(f"prompt init from text needs a tokenizer ({exc}); pass init: {{ids: [...]}}") from None
            ids = tokenizer(init["text"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor(ids, dtype=torch.long)
        ids = ids.repeat(length // len(ids) + 1)[:length]
        return table.detach()[ids.to(table.device)].clone()
    return embed


def _base_parameter(model: nn.Module, name: str) -> nn.Parameter | None:
    """The parameter `name`; for a weight an earlier site parametrized (a packed q/k/v), its untransformed
    original, so every site of a packed weight sees the base weight."""
    owner_path, _, attr = name.rpartition(".")
    try:
        owner = model.get_submodule(owner_path)
    except AttributeError:
        return None
    if parametrize.is_parametrized(owner, attr):
        return owner.parametrizations[attr].original
    value = getattr(owner, attr, None)
    return value if isinstance(value, nn.Parameter) else None


def _params_of(model: nn.Module, site: Site, analysis: Analysis) -> dict[str, nn.Parameter]:
    """The parameters a node reads: its direct parameter inputs, the resolved weight/bias of a linear op, and
    the module's own parameters for a norm."""
    names = set()
    params = analysis.traced.params
    for arg in site.node.all_input_nodes:
        if arg.op == "placeholder" and arg.name in params:
            names.add(params[arg.name])
    if site.linear is not None:
        names.add(site.linear.weight)
        if site.linear.bias:
            names.add(site.linear.bias)
    if site.role == "norm" and site.module:
        module = model.get_submodule(site.module)
        names.update(f"{site.module}.{n}" for n, _ in module.named_parameters(recurse=False))
    if site.role in ("block.input", "block.output") and site.module:
        # selecting a layer selects the whole block module
        names = {f"{site.module}.{n}" for n, _ in model.get_submodule(site.module).named_parameters()}
    out = {}
    for name in names:
        try:
            out[name] = model.get_parameter(name)
        except AttributeError:
            continue
    return out


def encoder_decoder(analysis: Analysis) -> bool:
    """Whether the layers form an encoder read by the other stacks' cross-attention (T5, BART, Whisper): several
    stacks, the first without cross-attention. A UNet's resolutions are stacks that all cross-attend to a
    conditioning input, not to an encoder's sequence."""
    cross = {s.stack for s in analysis.by_role.get("cross_attention.op", [])}
    return len(set(analysis.stacks)) > 1 and bool(cross) and analysis.stacks[0] not in cross


def _refuse_without_positions(analysis: Analysis, rule: Rule, cls, matches: list[Match]) -> None:
    """Before anything is built: methods acting at token positions of the model's input sequence (prompt
    tuning, ReFT) need one sequence; layers in several stacks that are not an encoder-decoder (a UNet's
    resolutions, on feature maps of several sizes) have none."""
    stacks = sorted(set(analysis.stacks))
    if rule.action == "prepend" or getattr(cls, "input_positions", False):
        # a token sequence is [batch, positions, width]; a conv stem's feature map ([batch, channels, h, w]: a
        # ConvNeXt's layers, a UNet's or a VAE's blocks) has no position axis to prepend to or intervene at
        what = ("prompt tuning prepends positions to" if rule.action == "prepend"
                else f"{rule.module.kind} intervenes at positions of")
        for m in matches:
            val = _site_value(m.site).meta.get("val")
            if isinstance(val, torch.Tensor) and val.dim() != 3:
                raise RewriteError(f"rule {m.rule!r}: {what} a token sequence [batch, positions, width], but "
                                   f"the value at {m.module} ({m.role}) is {list(val.shape)} (a feature map): "
                                   f"the model has no token positions there")
    if matches and len(stacks) > 1 and not encoder_decoder(analysis):
        _refuse_stacks(analysis, rule, cls, matches, stacks)
    if rule.action == "prepend":
        what = "prompt tuning prepends positions to"
        # the prompt's positions are dropped again at the last layer's output: layers that change the number of
        # positions on the way (Funnel's pooling) leave pooled prompt positions in the output
        if not encoder_decoder(analysis):
            first = [s for s in analysis.by_role.get("block.input", []) if s.layer == 0]
            seq = first and first[0].node.meta.get("val")
            sites = [(s.module, s.role, s.node.meta.get("val")) for s in analysis.by_role.get("block.output", [])]
            for module, role, val in sites:
                if (isinstance(seq, torch.Tensor) and isinstance(val, torch.Tensor) and seq.dim() == val.dim() == 3
                        and val.shape[1] != seq.shape[1]):
                    raise RewriteError(f"rule {matches[0].rule!r}: {what} the model's input sequence "
                                       f"({seq.shape[1]} positions entering the first layer), but the value at "
                                       f"{module} ({role}) has {val.shape[1]} positions: its layers change the "
                                       f"sequence (pooling, or another sequence joined to it), so the positions "
                                       f"do not carry through")


def _refuse_stacks(analysis: Analysis, rule: Rule, cls, matches: list[Match], stacks: list[str]) -> None:
    # prompts need one sequence; ReFT reads the root call's positions, unless the stacks cross-attend to another
    # input without being a decoder (a UNet's resolutions read the text encoder's states)
    if not (rule.action == "prepend" or (getattr(cls, "input_positions", False)
                                          and analysis.by_role.get("cross_attention.op"))):
        return
    what = ("prompt tuning prepends positions to" if rule.action == "prepend"
            else f"{rule.module.kind} intervenes at token positions of")
    raise RewriteError(f"rule {matches[0].rule!r}: {what} the model's input sequence, but this model's layers form "
                       f"{len(stacks)} stacks that are not an encoder read by a decoder's cross-attention "
                       f"({', '.join(stacks[:4])}): the model has no token positions, so no single sequence "
                       f"carries them through (a UNet's resolutions)")


def realize(model: nn.Module, analysis: Analysis, store: AdapterStore, record: Record, rule: Rule,
            matches: list[Match], extra: dict | None = None) -> None:
    """Build the rule's module at every match and realize the action on the host. `extra` (the same dict
    for every site of one apply call) is passed to each module in `SiteContext.extra`."""
    name = record.name
    gate = Gate(store.runtime, name)
    if rule.action == "train" and rule.rows is not None:
        _realize_train_rows(model, analysis, store, record, rule, matches, gate)
        return
    if rule.action == "train":
        before = len(record.trained)
        chosen = []
        for match in matches:
            for pname, param in _params_of(model, match.site, analysis).items():
                kind = "bias" if "bias" in pname.rpartition(".")[2].split("_") else "weight"  # in_proj_bias too
                if "all" in rule.params or kind in rule.params:
                    chosen.append((pname, param))
        # read only to select (top-k indices): no gradient. Asked of the chosen parameters only (the question is
        # per parameter; all of a 7B graph's parameters cost 50 ms)
        wanted = {pname for pname, _ in chosen}
        traced = analysis.traced
        selection_only = without_gradient(dataclasses.replace(
            traced, params={k: v for k, v in traced.params.items() if v in wanted})) if wanted else set()
        skipped = []
        for pname, param in chosen:
            if pname in selection_only:
                skipped.append(pname)
                continue
            record.trained.append((param, param.requires_grad))
        if matches and len(record.trained) == before and rule.expect != "any":
            why = (f"; {', '.join(sorted(set(skipped))[:3])} reach the output only through a selection (top-k "
                   f"indices), so no gradient reaches them" if skipped else "")
            what = "" if "all" in rule.params else "/".join(rule.params) + " "
            raise RewriteError(f"rule {matches[0].rule!r} matched {len(matches)} site(s) but they read no "
                               f"{what}parameters to train (e.g. a model without biases, or norms without an affine "
                               f"weight){why}; "
                               f"use expect: any to allow that")
        return
    cls = module_class(rule.module.kind)
    _refuse_without_positions(analysis, rule, cls, matches)
    rule_name = matches[0].rule if matches else (rule.name or "rule")
    modules = nn.ModuleDict()
    nodes_of: dict[str, fx.Node] = {}
    shared = nn.ModuleDict()
    per_adapter = store.adapters[name]
    if rule_name in per_adapter:
        raise RewriteError(f"two rules named {rule_name!r} in adapter {name!r}")
    per_adapter[rule_name] = modules
    record.undo.append(functools.partial(per_adapter.pop, rule_name))
    captured: set[str] = set()
    combined: set = set()     # MoE outputs already adapted by this rule
    ref = _reference_tensor(model)
    for match in matches:
        value = _through(_site_value(match.site), rule.through)
        experts_site = _moe_layer_experts(analysis, match) if rule.action in ("insert_after", "parallel") else None
        moe_key = None
        if experts_site is not None and _moe_output(analysis, match) is not None:
            # MoE: what the FFN adds to the residual stream is the combined output of the routed experts (and of
            # a shared expert, Qwen2-MoE's): one adapter per FFN sub-layer there, not one per expert branch
            value = _moe_output(analysis, match)
            if value in combined:
                continue
            combined.add(value)
            moe_key = re.sub(r"[^0-9A-Za-z_]", "_", experts_site.module or "root")
        if rule.action == "insert_before":   # the module sees the op's input, so it is sized by it
            inputs = match.site.node.all_input_nodes
            value = match.site.linear.x if match.site.linear is not None else (inputs[0] if inputs else value)
        if rule.action == "prepend" and "inputs_embeds" in inspect.signature(model.forward).parameters:
            table = _token_embedding_site(analysis)
            if table is not None:      # prompts go into inputs_embeds: the token embedding's width (ALBERT: 128)
                value = table.node
        packed = match.site.extra.get("packed") if match.site.linear is not None else None
        if packed is not None and rule.action == "insert_before" or (
                packed is not None and rule.action in ("insert_after", "parallel") and value is not match.site.linear.value):
            raise RewriteError(f"rule {match.rule!r}: {match.role} of {match.module} is some of the output columns of "
                               f"a packed projection (q, k and v in one output); {rule.action}"
                               f"{' with through' if rule.through else ''} there would act on the input or output of "
                               f"all of them. Use wrap, or insert_after/parallel (which act on its columns only)")
        if rule.action == "wrap" and match.site.linear is None:
            raise RewriteError(f"rule {match.rule!r}: wrap needs a weight-bearing op (linear, conv1d/2d/3d, "
                               f"embedding), but {match.node} ({match.role or match.site.op}) is not one")
        if rule.action == "wrap" and match.site.linear.kind not in getattr(cls, "op_kinds", ("linear",)):
            raise RewriteError(f"rule {match.rule!r}: {rule.module.kind} adapts "
                               f"{'/'.join(getattr(cls, 'op_kinds', ('linear',)))} ops, but {match.module} is a "
                               f"{match.site.linear.kind} ({match.site.op})")
        if rule.action == "wrap" and match.site.linear.experts and not getattr(cls, "supports_experts", False):
            raise RewriteError(f"rule {match.rule!r}: {match.module}'s {match.site.linear.experts} experts are one 3-D "
                               f"parameter ({match.site.linear.weight}) read by a grouped matmul; {rule.module.kind} "
                               f"does not adapt per-expert weights (lora, ia3, said and sparse do)")
        ctx = _context(model, analysis, match, value, rule, ref)
        if packed is not None and rule.action in ("insert_after", "parallel"):
            ctx.dim = cols.width(packed)     # the module sees the site's columns of the packed output only
        ctx.extra.update(extra or {})
        if getattr(cls, "input_positions", False) and match.site.stack and encoder_decoder(analysis):
            # positions of the stack's own input sequence (generate() calls the encoder directly)
            owner = match.site.stack.rpartition(".")[0]
            ctx.extra["stack_call"] = owner
            if owner not in captured:
                captured.add(owner)
                record.undo.append(install_stack_capture(model.get_submodule(owner), owner, store.runtime))
        if getattr(cls, "input_positions", False):
            record.undo.append(store.runtime.need_call())   # it reads the root call's mask and cache length
        ctx.shared, ctx.runtime, ctx.adapter = shared, store.runtime, per_adapter
        if ctx.device.type == "meta":   # a model without memory: its adapters are built without memory too
            with building_on_meta():
                module = cls.build(rule.module, ctx, rule.action)
        else:
            module = cls.build(rule.module, ctx, rule.action)
        if ctx.device.type != "meta":
            module.to(device=ctx.device)
        elif not _all_meta(module):   # what a module made on another device explicitly (one walk, not a copy)
            module.to_empty(device="meta")
        if ctx.dtype.is_floating_point:
            dtype = _adapter_dtype(ctx.dtype, rule.action, (extra or {}).get("adapter_dtype"))
            module.to(dtype=dtype)
            if dtype != ctx.dtype:
                _compute_in(module, dtype, ctx.dtype)
        module.train(model.training)   # an adapter added to a model in eval mode must not run its dropout
        key = moe_key or site_key(match)
        if rule.action == "wrap" and match.site.linear.experts:   # one module holds several expert parameters
            key += "__" + match.site.linear.weight.rpartition(".")[2]
        if key in modules and key in nodes_of and nodes_of[key] is not match.site.node and not moe_key:
            # another value of the same role in the same module call: Flux's double blocks close an FFN (and an
            # attention output) per stream, two ffn.residual_add in one block; the second gets an ordinal
            n = 2
            while f"{key}__{n}" in modules:
                n += 1
            key = f"{key}__{n}"
        if key in modules:
            raise RewriteError(f"rule {rule_name!r} matched the site {key} twice")
        nodes_of[key] = match.site.node
        modules[key] = module
        _realize_one(model, analysis, store, record, rule, match, value, module, key, gate)
    if len(shared):
        ref = _reference_tensor(model)
        if ref is not None and ref.device.type != "meta":
            shared.to(device=ref.device, dtype=ref.dtype)
        modules["shared"] = shared


def _all_meta(module: nn.Module) -> bool:
    """Every parameter and buffer of `module` is on the meta device."""
    return all(t.is_meta for t in module.parameters()) and all(t.is_meta for t in module.buffers())


def _realize_train_rows(model, analysis, store, record, rule, matches, gate):
    """`train` with `rows`: a TrainableRows module per selected weight, realized as a parametrization on every
    module that holds that weight (an embedding and the LM head tied to it), so both read the same rows."""
    from surgery.modules.rows import TrainableRows
    rule_name = matches[0].rule if matches else (rule.name or "rule")
    per_adapter = store.adapters[record.name]
    if rule_name in per_adapter:
        raise RewriteError(f"two rules named {rule_name!r} in adapter {record.name!r}")
    modules = nn.ModuleDict()
    per_adapter[rule_name] = modules
    record.undo.append(functools.partial(per_adapter.pop, rule_name))
    holders: dict[int, list[tuple[str, str]]] = {}
    for path, owner in model.named_modules():
        for attr in list(owner._parameters) + (list(owner.parametrizations.keys())
                                                if parametrize.is_parametrized(owner) else []):
            param = _base_parameter(model, f"{path}.{attr}" if path else attr)
            if param is not None:
                holders.setdefault(id(param), []).append((path, attr))
    seen: set[int] = set()
    for match in matches:
        for pname, param in _params_of(model, match.site, analysis).items():
            kind = "bias" if "bias" in pname.rpartition(".")[2].split("_") else "weight"
            if not ("all" in rule.params or kind in rule.params) or param.dim() != 2:
                continue
            if max(rule.rows) >= param.shape[0]:
                raise RewriteError(f"rule {match.rule!r}: rows {max(rule.rows)} is out of range for {pname} "
                                   f"with {param.shape[0]} rows")
            key = re.sub(r"[^0-9A-Za-z_]", "_", pname)
            if key in modules or id(param) in seen:
                continue
            seen.add(id(param))
            module = TrainableRows(param, rule.rows)
            modules[key] = module
            for path, attr in holders.get(id(param), [(pname.rpartition(".")[0], pname.rpartition(".")[2])]):
                owner = model.get_submodule(path)
                site = WeightSite(match.rule, key, owner, path, attr, None, "out_in", None, None, module, "weight",
                                  gate=gate)
                attach_weight_site(site)
                record.weight_sites.append(site)
                record.undo.append(site.detach)
    if not len(modules) and rule.expect != "any":
        raise RewriteError(f"rule {rule_name!r} with rows matched {len(matches)} site(s) but they read no 2-D "
                           f"{'/'.join(rule.params)} parameter to select rows of")


def _stacks(adapter) -> bool:
    """Whether a wrap adapter on activations composes with others at its op as merge folds them: it adds f(x) to
    the op's output or scales the output (WeightAdapter.stacks_on_activations)."""
    return bool(getattr(adapter, "stacks_on_activations", False))


def _check_stacked(store, record, site) -> None:
    """Several wraps of one op on activations compute T_b(T_a(W)), what merge folds and `realize: weight`
    computes, only where each adds to the output or scales it: DoRA renormalizes the base weight (not the one
    an earlier adapter made), OFT/BOFT rotate the op's input (which every adapter at the op then reads), a row
    selection replaces rows. Such a stack on activations is refused, not computed as another function."""
    if site.realized != "activation":
        return
    records = list(store.records.values())
    if not any(r is record for r in records):   # the set being applied (in the store once it is complete)
        records.append(record)
    for other_record in records:
        for other in other_record.weight_sites:
            if other is site or other.owner is not site.owner or other.realized != "activation" or not other.attached:
                continue
            if other.call != site.call:
                continue     # other calls of a module called several times (ALBERT's shared layer): other sites
            if other.packed is not None and site.packed is not None and other.packed != site.packed:
                continue     # other output columns of a packed projection (q's and v's): no overlap
            if not (_stacks(other.adapter) and _stacks(site.adapter)):
                first, second = type(other.adapter).__name__, type(site.adapter).__name__
                raise RewriteError(
                    f"{site.owner_path} already carries {first} of adapter {other_record.name!r} on its activations; "
                    f"{second} of {record.name!r} on top would not compute what merge folds ({first} then "
                    f"{second} on the weight). Apply both with `realize: weight` (their weights compose exactly), "
                    f"or adapt another op")


def _realize_one(model, analysis, store, record, rule, match, value, module, key, gate):
    action = rule.action
    packed = match.site.extra.get("packed") if match.site.linear is not None else None
    if action == "insert_after":
        anchor = value_anchor(analysis, value)
        fn = functools.partial(_on_columns, module, packed) if packed is not None else module
        record.undo.append(hook_value(model, anchor, fn, gate))
    elif action == "insert_before":
        node = match.site.node
        arg = node.all_input_nodes[0] if node.all_input_nodes else None
        if match.site.linear is not None:
            arg = match.site.linear.x
        anchor = input_anchor(analysis, arg, users=[node]) if arg is not None else None
        if anchor is None and arg is not None and list(arg.users) == [node]:
            anchor = output_anchor(analysis, arg)
        if anchor is None:
            raise RewriteError(f"the input of {match.module} ({node.name}) is not at a module boundary used only "
                               f"by it; it cannot be changed on the host model")
        record.undo.append(hook_value(model, anchor, module, gate))
    elif action == "parallel":
        source = _site_value(match.source)
        slot = f"{record.name}/{match.rule}/{key}"
        runtime = store.runtime
        record.undo.append(hook_capture(model, capture_anchor(analysis, source), runtime, slot))
        anchor = value_anchor(analysis, value)
        fn = functools.partial(_parallel, module, runtime, slot, record.name)
        if packed is not None:
            fn = functools.partial(_on_columns, fn, packed)
        record.undo.append(hook_value(model, anchor, fn, gate))
    elif action == "sublayer":
        _realize_sublayer(model, analysis, store, record, match, module, key, gate)
    elif action == "wrap":
        if match.site.linear is None:
            raise RewriteError(f"rule {match.rule!r}: wrap needs a weight-bearing op, but {match.node} is "
                               f"{match.site.op}")
        site = wrap_weight(model, analysis, match.site.linear, match.site.extra.get("packed"), module,
                           match.rule, key, gate, rule.realize)
        record.weight_sites.append(site)
        record.undo.append(site.detach)
        _check_stacked(store, record, site)
    elif action == "replace":
        host = model.get_submodule(match.module)
        if "forward" in host.__dict__:
            raise RewriteError(f"{match.module} is already replaced")
        host.forward = _Replaced(host, module, gate)
        record.undo.append(functools.partial(host.__dict__.pop, "forward", None))
    elif action == "attend":
        if match.role != "attention.op":
            raise RewriteError(f"rule {match.rule!r}: attend needs the attention op (role attention.op)")
        host = model.get_submodule(match.module)
        adapter = module
        if analysis.traced.calls.get(match.module, 1) > 1:
            # a module called several times (ALBERT's shared layer): this site's adapter runs in its own call only
            gate = CallGate(store.runtime, gate.name, host, _call_of(match))
            record.undo.append(count_calls(host, store.runtime))
        if getattr(module, "needs_attention_input", False):
            # the module reads the attention module's input (a gate): capture it for this call
            slot = f"{record.name}/{match.rule}/{key}/input"
            anchor = _module_input(analysis, match.module, match.site.extra.get("q"))
            record.undo.append(hook_capture(model, anchor, store.runtime, slot))
            adapter = functools.partial(_with_attention_input, module, store.runtime, slot, record.name)
        registry = registry_of(model)
        if registry is not None and uses_registry(host):
            record.undo.append(attach_registry(model, registry, host, adapter, gate))
        elif op_name(match.site.node) in SDPA_OPS or isinstance(host, nn.MultiheadAttention):
            record.undo.append(attach_intercept(host, adapter, gate))
            record.undo.append(keep_off_fast_path(model, match.module, gate))
        else:   # softmax attention the module computes with its own ops (rewrite/shadow.py)
            check_traced(match.site.node, match.module)
            record.undo.append(attach_shadow(host, adapter, gate))
    elif action == "prepend":
        _realize_prepend(model, analysis, store, record, match, value, module, gate)
    else:
        raise RewriteError(f"action {action!r} is not available")


def _realize_sublayer(model, analysis, store, record, match, module, key, gate):
    """A residual sub-layer `out = norm(h + x)` (norm absent in pre-norm models) becomes `module(h, x, norm)`.

    With a norm after the add, the norm's output is replaced; without one, the add's output if a module
    boundary carries it, else the branch h is replaced by `module(h, x, None) - x` so that the model's own add
    gives the module's result.
    """
    extra = match.site.extra
    if "branch" not in extra:
        raise RewriteError(f"rule {match.rule!r}: sublayer needs a residual add (roles attention.residual_add or "
                           f"ffn.residual_add), not {match.role or match.site.op}")
    branch, residual, norm_node = extra["branch"], extra["residual"], extra["norm"]
    runtime = store.runtime
    slot_h, slot_x = f"{record.name}/{match.rule}/{key}/h", f"{record.name}/{match.rule}/{key}/x"
    record.undo.append(hook_capture(model, capture_anchor(analysis, residual), runtime, slot_x))
    if residual not in match.site.node.args[:2]:
        # a parallel block's add of the branch onto a partial sum (Cohere: residual + attention + mlp): the add's
        # output carries the sibling branch too, so only the branch is replaced, by module(h, x) - x
        if norm_node is not None:
            raise RewriteError(f"rule {match.rule!r}: the sub-layer at {match.node} adds its branch to a partial "
                               f"sum of parallel branches and then normalizes it; not supported")
        record.undo.append(hook_value(model, value_anchor(analysis, branch),
                                      functools.partial(_sublayer_branch, module, runtime, slot_x, record.name), gate))
        return
    if norm_node is not None:
        norm_anchor = output_anchor(analysis, norm_node)
        norm_input = input_anchor(analysis, match.site.node)
        if norm_anchor is None or norm_input is None or norm_anchor.module != norm_input.module:
            raise RewriteError(f"the norm after {match.node} is not a module of its own; cannot rewrite the sub-layer")
        norm = model.get_submodule(norm_anchor.module).forward   # the bare forward: no hooks, no recursion
        record.undo.append(hook_capture(model, capture_anchor(analysis, branch), runtime, slot_h))
        record.undo.append(hook_value(model, norm_anchor,
                                      functools.partial(_sublayer, module, runtime, slot_h, slot_x, norm, record.name), gate))
        return
    anchor = output_anchor(analysis, match.site.node)
    if anchor is not None:
        record.undo.append(hook_capture(model, capture_anchor(analysis, branch), runtime, slot_h))
        record.undo.append(hook_value(model, anchor,
                                      functools.partial(_sublayer, module, runtime, slot_h, slot_x, None, record.name), gate))
        return
    record.undo.append(hook_value(model, value_anchor(analysis, branch),
                                  functools.partial(_sublayer_branch, module, runtime, slot_x, record.name), gate))


_HALF = (torch.float16, torch.bfloat16)


def _adapter_dtype(base: torch.dtype, action: str, requested) -> torch.dtype:
    """float32 adapters on a half-precision base (unless `requested` says otherwise). Modules that call back
    into the host (attend, sublayer, replace, prepend) keep the base dtype: the host expects its own."""
    if requested == "base":
        return base
    if isinstance(requested, torch.dtype):
        return requested
    if requested is not None:
        raise RewriteError(f"adapter_dtype must be a torch.dtype or 'base', not {requested!r}")
    if base in _HALF and action in ("insert_after", "insert_before", "parallel", "wrap"):
        return torch.float32
    return base


def _compute_in(module: nn.Module, dtype: torch.dtype, base: torch.dtype) -> None:
    """The module computes in `dtype` (its parameters') and gives the host its own dtype `base` back."""
    module.register_forward_pre_hook(functools.partial(_cast_inputs, dtype), with_kwargs=True)
    module.register_forward_hook(functools.partial(_cast_output, base))


def _cast(value, dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
        return value.to(dtype)
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    return value


def _cast_inputs(dtype, module, args, kwargs):
    return _cast(args, dtype), {k: _cast(v, dtype) for k, v in kwargs.items()}


def _cast_output(dtype, module, args, out):
    return _cast(out, dtype)


# The functions hooks run are partials of these module-level functions and small classes, never closures: a
# deepcopy of the model then rebinds them to the copy's modules, and the model pickles.

def _on_columns(fn, packed, y):
    """fn on the columns of a packed projection's output that one site covers (q of GPT-2's c_attn, or BLOOM's q
    heads), written back in place of them; the other columns pass unchanged."""
    return cols.put(y, packed, fn(cols.take(y, packed, -1)), -1)


def _parallel(module, runtime, slot, name, y):
    h = module(_my_part(runtime, name, runtime.slots.pop(slot), y))
    if h.shape != y.shape and h.numel() == y.numel() and h.shape[-1] == y.shape[-1]:
        h = h.reshape(y.shape)    # the branch holds the tokens flattened, (tokens, hidden) (a MoE block's experts)
    return y + h


def _sublayer(module, runtime, slot_h, slot_x, norm, name, out):
    h, x = runtime.slots.pop(slot_h), runtime.slots.pop(slot_x)
    return module(_my_part(runtime, name, h, out), _my_part(runtime, name, x, out), norm)


def _sublayer_branch(module, runtime, slot_x, name, h):
    x = _my_part(runtime, name, runtime.slots.pop(slot_x), h)
    return module(h, x, None) - x


def _my_part(runtime, name: str, captured: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The rows (BatchSplit, Parallel) and positions (Split) of a value captured for the whole call that adapter
    `name` sees under the active composition, so it matches `value`, the part the composition hands it."""
    if isinstance(runtime.composition, compose.MixedBatch) and not runtime.disabled:
        return captured[runtime.composition.rows_of(name, captured.device)]    # this adapter's rows
    if captured.shape[:2] == value.shape[:2] or runtime.composition is None:
        return captured
    window = _window(runtime.composition, name, (0, captured.shape[0]), (0, captured.shape[1]))
    if window is None:
        return captured
    (r0, r1), (c0, c1) = window
    return captured[r0:r1, c0:c1]


def _window(block, name: str, rows: tuple[int, int], cols: tuple[int, int]):
    """((row start, end), (position start, end)) of adapter `name`'s part under `block`, or None."""
    if isinstance(block, str):
        return (rows, cols) if block == name else None
    kids = block.children
    if isinstance(block, (compose.BatchSplit, compose.Parallel, compose.Split)):
        along_rows = not isinstance(block, compose.Split)
        lo, hi = rows if along_rows else cols
        if isinstance(block, compose.BatchSplit):
            sizes = list(block.batch_sizes)
        elif isinstance(block, compose.Parallel):
            sizes = [(hi - lo) // len(kids)] * len(kids)
        else:
            sizes = list(block.splits) + [hi - lo - sum(block.splits)]
        start = lo
        for kid, size in zip(kids, sizes):
            part = (start, start + size)
            found = _window(kid, name, part, cols) if along_rows else _window(kid, name, rows, part)
            if found is not None:
                return found
            start += size
        return None
    for kid in kids:
        found = _window(kid, name, rows, cols)
        if found is not None:
            return found
    return None


def _with_attention_input(module, runtime, slot, name, q, k, v, attend):
    captured = runtime.slots[slot]
    return module(q, k, v, attend, attention_input=_my_part(runtime, name, captured, captured)
                  if captured.shape[0] != q.shape[0] else captured)


class _Replaced:
    """`forward` of a module replaced by a `replace` rule: the new module while its adapter is active."""

    def __init__(self, host: nn.Module, module: nn.Module, gate):
        self.host, self.module, self.gate = host, module, gate

    def __call__(self, *args, **kwargs):
        if self.gate():
            return self.module(*args, **kwargs)
        return type(self.host).forward(self.host, *args, **kwargs)


def _hidden_inputs(analysis: Analysis, module: str, reads: fx.Node | None = None) -> list:
    """(value, boundary) of a module's 3-D inputs: first those `reads` (an attention op's queries) is computed
    from, by data flow (BLOOM's and MPT's attention also take ALiBi, [batch * heads, 1, keys] or [heads, 1,
    keys], as wide as the hidden state where the context length is), then those as wide as the hidden state."""
    found = [(value, b) for value, bounds in analysis.traced.boundaries.items() for b in bounds
             if b.module == module and b.side == "in" and isinstance(value.meta.get("val"), torch.Tensor)
             and value.meta["val"].dim() == 3]
    # walked up from `reads` to the module's inputs, not past them: the walk stays inside the module
    upstream = (Ancestors(reads, 4096, frozenset(v for v, _ in found))
                if isinstance(reads, fx.Node) and len(found) > 1 else ())
    return sorted(found, key=lambda vb: (vb[0] not in upstream, vb[0].meta["val"].shape[-1] != analysis.hidden_size))


def _module_input(analysis: Analysis, module: str, reads: fx.Node | None = None):
    """The first hidden-state input ([batch, seq, dim]) of a module (see `_hidden_inputs`)."""
    found = _hidden_inputs(analysis, module, reads)
    if found:
        return found[0][1]
    raise RewriteError(f"cannot find the hidden-state input of {module}")


def _module_input_value(analysis: Analysis, module: str, reads: fx.Node | None = None):
    """The graph value of `_module_input`, or None."""
    found = _hidden_inputs(analysis, module, reads)
    return found[0][0] if found else None


def _realize_prepend(model, analysis, store, record, match, value, module, gate):
    """Positions prepended to the sequence, visible to every later token.

    A model whose forward takes `inputs_embeds` (the transformers convention) gets them where PEFT puts them:
    the root call's token ids are embedded with the model's own table and the prompt goes in front, so the
    model's own masks and position embeddings cover it (prompts take positions 0..P-1). Without an LM head (a
    sequence classifier) this happens at the innermost module taking `inputs_embeds` and `attention_mask`
    that holds the table (GPT2Model, LlamaModel), so the classifier around it still gets the caller's
    `input_ids` and pools the same last real token. Other models get them
    at the matched value (the embedding output). The attention mask is extended; the LM head's input (else the
    last block's output) drops the added positions again, so outputs keep the shape the user expects. With a
    KV cache the positions are added on the first call only; later calls only extend the mask.
    """
    runtime = store.runtime
    record.undo.append(runtime.need_call())   # the hooks below read the root call (runtime.call)
    length = module.length
    # a head reading per-position values (an LM head); a classifier on a pooled vector has no positions to drop
    heads = [h for h in analysis.by_role.get("lm_head", [])
             if isinstance(h.linear.x.meta.get("val"), torch.Tensor) and h.linear.x.meta["val"].dim() >= 3]
    # the prompt goes in front of the model's input sequence; in an encoder-decoder that is the encoder's, whose
    # positions never reach the LM head (the decoder reads them through cross-attention): nothing is dropped
    other_stacks = len(set(analysis.stacks)) > 1      # an encoder-decoder (others are refused before any change)
    strip_anchor = None
    if heads and not other_stacks:
        # drop them where the value reaching the LM head leaves its module (before generate()'s logits_to_keep
        # slice, after any reshape by the input length), else at the head's input
        node, strip_anchor = heads[0].linear.x, None
        while strip_anchor is None and isinstance(node, fx.Node):
            strip_anchor = output_anchor(analysis, node)
            if strip_anchor is None and op_name(node) in ("slice", "view", "reshape", "_unsafe_view", "alias", "to",
                                                          "_to_copy") and node.args:
                node = node.args[0]
            else:
                break
        strip_anchor = strip_anchor or input_anchor(analysis, heads[0].linear.x, users=[heads[0].node])
    table = _token_embedding(model, analysis)
    encoder_host = None
    if other_stacks and table is not None:
        # an encoder-decoder: generate() runs the encoder itself, so the prompt goes in at the encoder module
        encoder_host = _embeds_host(model, table, within=analysis.stacks[0])
    if encoder_host is not None:
        flag = f"{record.name}/{match.rule}/prepended"
        encoder = model.get_submodule(encoder_host)
        record.undo.append(encoder.register_forward_pre_hook(
            functools.partial(_prepend_encoder, module, length, table, gate), with_kwargs=True).remove)
        # the root's attention mask also masks the cross-attention over the encoder's (now longer) output
        record.undo.append(model.register_forward_pre_hook(
            functools.partial(_extend_root_mask, length, gate), with_kwargs=True).remove)
        return
    if heads:   # an LM: the root call (generate() and the KV cache go through it)
        host_path = "" if "inputs_embeds" in inspect.signature(model.forward).parameters else None
    else:
        host_path = _embeds_host(model, table) if table is not None else None
    if host_path is None:
        table = None
    host = model.get_submodule(host_path) if host_path else model
    if not heads and not other_stacks:
        # no LM head (a sequence classifier, an encoder): drop them at the last block's output, or, where the
        # module that embedded the tokens reshapes its hidden states by the input length after that (GPT-2's
        # final view), where it returns them; either way the head (pooling at the last real token of the
        # caller's input_ids, or at the first token) sees the caller's positions
        last = [s for s in analysis.by_role.get("block.output", []) if s.layer == analysis.num_layers - 1]
        strip_anchor = value_anchor(analysis, _site_value(last[0])) if last else None
        out = _module_output(analysis, host_path) if host_path else None
        if out is not None and last and (strip_anchor is None or _reshaped_between(_site_value(last[0]), out[0])):
            strip_anchor = out[1]
    if strip_anchor is None and not other_stacks:
        raise RewriteError("prepend needs the LM head's input or the last block's output to drop the added positions")
    flag = f"{record.name}/{match.rule}/prepended"

    if table is None:
        record.undo.append(hook_value(model, value_anchor(analysis, value),
                                      functools.partial(_prepend, module, runtime, flag), gate))
    if strip_anchor is not None:
        record.undo.append(hook_value(model, strip_anchor, functools.partial(_strip, runtime, flag, length), gate))
        # a mixed-adapter batch's prompts (right-aligned to one width) are dropped for the whole batch at once
        record.undo.append(hook_value(model, strip_anchor, functools.partial(_strip_mixed, runtime),
                                      _MixedGate(runtime)))
    prompts = host.__dict__.setdefault(mixed.PROMPTS_ATTR, [])
    prompts.append((gate, module))
    record.undo.append(functools.partial(_forget_prompt, host, (gate, module)))
    root = functools.partial(_prepend_root, module, runtime, flag, length, table, gate)
    record.undo.append(host.register_forward_pre_hook(root, with_kwargs=True).remove)


class _MixedGate:
    """On while a MixedBatch is active: its functions run once on the whole batch (compose.run)."""

    name = compose.MixedBatch.WHOLE

    def __init__(self, runtime):
        self.runtime = runtime

    def __call__(self) -> bool:
        return not self.runtime.disabled and mixed.row_block(self.runtime.composition) is not None


def _forget_prompt(host, entry) -> None:
    prompts = host.__dict__.get(mixed.PROMPTS_ATTR, [])
    prompts[:] = [e for e in prompts if not (e[0] is entry[0] and e[1] is entry[1])]
    if not prompts:
        host.__dict__.pop(mixed.PROMPTS_ATTR, None)


def _strip_mixed(runtime, hidden):
    width = runtime.call.pop("mixed_strip", 0)
    return hidden[:, width:] if width else hidden


def _prepend_encoder(module, length, table, gate, mod, args, kwargs):
    """An encoder's pre-hook: the prompt in front of its input embeddings; its mask is extended unless the root
    call already did (generate() calls the encoder directly, with the caller's mask)."""
    if not gate():
        return None
    if mixed.row_block(gate.runtime.composition) is not None:
        raise RewriteError("MixedBatch/BatchSplit: prompts at an encoder-decoder's encoder are not routed per row (the encoder "
                           "runs apart from the root call under generate()); run the prompt rows separately")
    kwargs = dict(kwargs)
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
        ids, args = args[0], (None,) + tuple(args[1:])
    else:
        ids = kwargs.pop("input_ids", None)
    embeds = table(ids) if ids is not None else kwargs.get("inputs_embeds")
    if embeds is None:
        return args, kwargs
    seq = embeds.shape[1]
    kwargs["inputs_embeds"] = module(embeds)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] == seq:
        kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], length), mask], dim=1)
    return args, kwargs


def _extend_root_mask(length, gate, mod, args, kwargs):
    mask = kwargs.get("attention_mask")
    if not gate() or not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    return args, {**kwargs, "attention_mask": torch.cat([mask.new_ones(mask.shape[0], length), mask], dim=1)}


def _embeds_host(model: nn.Module, table: nn.Module, within: str | None = None) -> str | None:
    """The innermost module whose forward takes `inputs_embeds` and that holds the token table (LlamaModel
    inside LlamaForCausalLM / LlamaForSequenceClassification, GPT2Model inside GPT2ForSequenceClassification):
    the prompt goes in there, so the modules around it (a classifier pooling at the last non-pad token of
    `input_ids`) still get the caller's inputs. None when no such module exists."""
    best = None
    for path, module in model.named_modules():
        try:
            takes = "inputs_embeds" in inspect.signature(module.forward).parameters
        except (TypeError, ValueError):
            continue
        if within is not None and not (within == path or within.startswith(path + ".")):
            continue
        if takes and "attention_mask" in inspect.signature(module.forward).parameters and \
                any(sub is table for sub in module.modules()):
            if best is None or path.count(".") + bool(path) > best.count(".") + bool(best):
                best = path
    return best


def _module_output(analysis: Analysis, module: str):
    """The hidden-state output ([batch, seq, dim]) of a module: (graph value, boundary), or None."""
    for value, bounds in analysis.traced.boundaries.items():
        val = value.meta.get("val")
        for b in bounds:
            if b.module == module and b.side == "out" and isinstance(val, torch.Tensor) and val.dim() == 3:
                return value, b
    return None


def _reshaped_between(start: fx.Node, end: fx.Node) -> bool:
    """Whether a view/reshape lies on a data path from `start` to `end`."""
    ancestors, stack = set(), [end]
    while stack:
        node = stack.pop()
        if node not in ancestors:
            ancestors.add(node)
            stack.extend(node.all_input_nodes)
    if start not in ancestors:
        return False
    seen, stack = set(), [start]
    while stack:
        node = stack.pop()
        if node in seen or node not in ancestors:
            continue
        seen.add(node)
        if node is not start and op_name(node) in ("view", "reshape", "_unsafe_view"):
            return True
        stack.extend(node.users)
    return False


def _prepend(module, runtime, flag, hidden):
    if runtime.call.get("cached"):
        return hidden
    runtime.call[flag] = True
    return module(hidden)


def _strip(runtime, flag, length, hidden):
    if runtime.call.pop(flag, False):
        return hidden[:, length:]
    return hidden


def _prepend_root(module, runtime, flag, length, table, gate, mod, args, kwargs):
    if not gate():
        return None
    _refuse_unsupported_prompts(runtime, mod, kwargs)
    rows = None if runtime.disabled else mixed.row_block(runtime.composition)
    if rows is not None:     # one adapter per row (MixedBatch, or a BatchSplit of adapter names)
        return _prepend_mixed(runtime, table, rows, mod, args, kwargs)
    kwargs = dict(kwargs)
    if runtime.call.get("cached") and runtime.call.get("cache_counted", True):
        args, kwargs = _skip_cached_tokens(runtime, mod, args, kwargs)
    if table is not None and not runtime.call.get("cached"):
        if args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
            ids, args = args[0], (None,) + tuple(args[1:])   # token ids given positionally
        else:
            ids = kwargs.pop("input_ids", None)
        embeds = kwargs.get("inputs_embeds")
        if ids is not None:
            embeds = table(ids)
        if embeds is not None:
            kwargs["inputs_embeds"] = _prepend(module, runtime, flag, embeds)
            for key in ("position_ids", "token_type_ids"):
                extra = kwargs.get(key)
                if isinstance(extra, torch.Tensor) and extra.dim() == 2:
                    lead = torch.arange(length, device=extra.device) if key == "position_ids" else \
                        torch.zeros(length, dtype=extra.dtype, device=extra.device)
                    kwargs[key] = torch.cat([lead.expand(extra.shape[0], -1),
                                             extra + (length if key == "position_ids" else 0)], dim=1)
    elif runtime.call.get("cached") and isinstance(kwargs.get("position_ids"), torch.Tensor):
        kwargs["position_ids"] = kwargs["position_ids"] + length
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], length), mask], dim=1)
    return args, kwargs


def _refuse_unsupported_prompts(runtime, mod, kwargs) -> None:
    """Prompt tuning adds positions to the sequence; refused (RewriteError, before the model runs) where that
    cannot be done right:

    - a composition that would combine prompts other than by stacking or by row (Average, Fuse, Split, Parallel:
      every live prompt would be prepended to every row, a Stack whatever the block says);
    - a compilable (static) KV cache or a mask given per key ([batch, 1, q, k], or masks per layer type), as
      generate(cache_implementation="static") passes: the cache is sized, and the mask built, for the tokens
      alone, without the P prompt positions, and a mask per key cannot be extended by them here."""
    composition = runtime.composition
    live = [m for g, m in mod.__dict__.get(mixed.PROMPTS_ATTR, ()) if g()]
    if composition is not None and not isinstance(composition, (str, compose.Stack)) and \
            mixed.row_block(composition) is None:
        raise RewriteError(f"{type(composition).__name__} over prompt tuning adapters: prompts add positions to "
                           f"the sequence, which {type(composition).__name__} cannot combine (every prompt would "
                           f"be prepended to every row); use Stack, or MixedBatch/BatchSplit for one prompt per row")
    mask = kwargs.get("attention_mask")
    # a compilable cache sized in positions (a recurrent model's state layers, `is_linear`, hold no positions)
    static = [v for v in kwargs.values() if callable(getattr(v, "get_seq_length", None))
              and getattr(v, "is_compileable", False) and not all(getattr(v, "is_linear", None) or [False])]
    if static or isinstance(mask, dict) or (isinstance(mask, torch.Tensor) and mask.dim() == 4):
        total = sum(m.length for m in live)
        raise RewriteError(f"prompt tuning ({total} prompt positions) with a static KV cache or a 4-D attention "
                           f"mask: generate(cache_implementation='static') sizes the cache and builds the mask for "
                           f"the tokens alone, without the prompt positions; use the default dynamic cache")


def _skip_cached_tokens(runtime, mod, args, kwargs):
    """A call continuing a KV cache that already holds some of the tokens it feeds: drop those tokens.

    The cache holds the P prompt positions besides the tokens, so generate() given a returned cache back
    (`input_ids` = the whole conversation) counts `input_ids.shape[1] - cache.get_seq_length()` tokens still
    to feed, P too few, and feeds P tokens the cache already holds again. The tokens the cache holds are its
    length less the live prompts' (every prompt adapter of this host); where the fed tokens start is told by
    the 2-D attention mask (its columns: every token so far) or, without one, by the position ids (no padding:
    a token's position is its column). The first prompt hook of the call does this once. Feeding nothing new
    is refused (RewriteError)."""
    if runtime.call.get("prompt_cache_checked"):
        return args, kwargs
    runtime.call["prompt_cache_checked"] = True
    positional = bool(args) and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point()
    ids = args[0] if positional else kwargs.get("input_ids")
    first = ids if isinstance(ids, torch.Tensor) else kwargs.get("inputs_embeds")
    if not isinstance(first, torch.Tensor) or first.dim() < 2:
        return args, kwargs
    prompts = sum(m.length for g, m in mod.__dict__.get(mixed.PROMPTS_ATTR, ()) if g())
    held = int(runtime.call.get("cache_length") or 0) - prompts
    seq = first.shape[1]
    mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        start = mask.shape[1] - seq
    elif isinstance(positions, torch.Tensor) and positions.dim() == 2 and positions.shape[-1] == seq:
        start = int(positions[:, 0].max())
    else:
        return args, kwargs
    again = held - start
    if again < 0:
        raise RewriteError(f"prompt tuning: the KV cache holds {held + prompts} entries, but this call's positions "
                           f"say {start} tokens came before it, besides the {prompts} prompt positions: "
                           f"{-again} are missing, cut from the cache to a length that did not count the prompt "
                           f"positions (assisted generation and prompt lookup crop so: transformers 5.6 for the "
                           f"model itself, and for an adapted model used as the assistant); generate without an "
                           f"assistant or prompt lookup, or with the base model (no adapters) as the assistant")
    if again == 0:
        return args, kwargs
    if again >= seq:
        raise RewriteError(f"prompt tuning: the KV cache already holds every token this call feeds ({held} tokens "
                           f"after the {prompts} prompt positions, {seq} fed from position {start}): generate() "
                           f"counts the prompt positions as tokens when given a returned cache; pass only the new "
                           f"tokens with an attention mask over the whole conversation")
    if ids is first:
        if positional:
            args = (ids[:, again:],) + tuple(args[1:])
        else:
            kwargs["input_ids"] = ids[:, again:]
    else:
        kwargs["inputs_embeds"] = first[:, again:]
    for key in ("position_ids", "token_type_ids"):
        extra = kwargs.get(key)
        if isinstance(extra, torch.Tensor) and extra.shape[-1] == seq:
            kwargs[key] = extra[..., again:]
    return args, kwargs


def _prepend_mixed(runtime, table, block, mod, args, kwargs):
    """The root pre-hook under a MixedBatch, for every prompt adapter of the host at once (the first prompt
    adapter's hook of the call does it): each row's own prompt, right-aligned, padding masked, positions as alone."""
    if "mixed_prompts" in runtime.call:
        return None
    modules, lengths = mixed.prompt_lengths(mod, block)
    runtime.call["mixed_prompts"] = lengths
    width, padded = max(lengths), len(set(lengths)) > 1
    if not width:
        return None
    params = inspect.signature(mod.forward).parameters
    if padded and table is None:
        mixed.refuse_padding(mod, lengths, "takes no inputs_embeds, so the prompts go in inside the model, where "
                                          "no attention mask reaches to hide padding positions")
    if padded and not {"attention_mask", "position_ids"} <= set(params):
        mixed.refuse_padding(mod, lengths, "takes no attention_mask and position_ids to hide padding positions and "
                                          "keep each row's positions")
    kwargs = dict(kwargs)
    cached = runtime.call.get("cached")
    positional = bool(args) and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point()
    ids = args[0] if positional else kwargs.get("input_ids")
    first = ids if ids is not None else kwargs.get("inputs_embeds")
    if first is None:
        return args, kwargs
    batch, seq = first.shape[:2]
    mixed.check_rows(block, batch)
    device = first.device
    lead = torch.tensor(lengths, device=device)[:, None]
    positions = kwargs.get("position_ids")
    if table is not None and not cached:
        if positional:
            args = (None,) + tuple(args[1:])
        kwargs.pop("input_ids", None)
        embeds = table(ids) if ids is not None else kwargs["inputs_embeds"]
        kwargs["inputs_embeds"] = mixed.prompted_embeds(modules, block, lengths, embeds)
        runtime.call["mixed_strip"] = width
        if isinstance(positions, torch.Tensor) or padded:
            own = positions if isinstance(positions, torch.Tensor) else torch.arange(seq, device=device)[None]
            kwargs["position_ids"] = torch.cat([mixed.prefix_positions(lengths, device),
                                                own.expand(batch, -1) + lead], dim=1)
        types = kwargs.get("token_type_ids")
        if isinstance(types, torch.Tensor) and types.dim() == 2:
            kwargs["token_type_ids"] = torch.cat([types.new_zeros(batch, width), types], dim=1)
    elif cached:
        if isinstance(positions, torch.Tensor):
            kwargs["position_ids"] = positions + lead
        elif padded:   # alone, a row's positions continue from its own prompt and tokens
            start = runtime.call["cache_length"] - width
            kwargs["position_ids"] = lead + start + torch.arange(seq, device=device)[None]
    mask = kwargs.get("attention_mask")
    if mask is None and padded:
        mask = torch.ones(batch, runtime.call.get("cache_length", 0) - width * bool(cached) + seq, device=device,
                          dtype=torch.long)
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        kwargs["attention_mask"] = torch.cat([mixed.prefix_mask(lengths, mask), mask], dim=1)
    return args, kwargs


def _token_embedding(model, analysis: Analysis) -> nn.Module | None:
    """The embedding module that looks up the model's first input (the token ids)."""
    site = _token_embedding_site(analysis)
    return model.get_submodule(site.module) if site is not None else None


def _token_embedding_site(analysis: Analysis) -> Site | None:
    for site in analysis.by_role.get("embedding", []):
        ids = site.node.args[1] if len(site.node.args) > 1 else None
        # through reshapes and copies to the table's device or dtype (Llama 4: input_ids.to(weight.device))
        while isinstance(ids, fx.Node) and ids.op == "call_function" and op_name(ids) in (
                "view", "reshape", "_unsafe_view", "to", "_to_copy", "alias", "clone", "contiguous"):
            ids = ids.args[0]
        if isinstance(ids, fx.Node) and ids.op == "placeholder" and ids.name not in analysis.traced.params \
                and ids.name not in analysis.traced.buffers and site.module:
            return site
    return None
