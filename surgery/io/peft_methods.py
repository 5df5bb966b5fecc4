"""PEFT directories of VeRA, LoHa, OFT and BOFT adapters, in and out (without importing peft).

PEFT's keys (adapter name dropped, as for LoRA) per adapted module `<path>`:

- VeRA: `base_model.model.<path>.vera_lambda_b` (d_out), `.vera_lambda_d` (r), and once for the whole model
  `base_model.vera_A` (r, max d_in), `base_model.vera_B` (max d_out, r) when `save_projection` (else drawn
  again from `projection_prng_key`).
- LoHa: `.hada_w1_a` (d_out, r), `.hada_w1_b` (r, d_in), `.hada_w2_a`, `.hada_w2_b`; scaling alpha/r
  (`rank_pattern`/`alpha_pattern` per module).
- OFT: `.oft_R.weight` (r or 1, b(b−1)/2): the upper triangles of the skew-symmetric blocks.
- BOFT: `.boft_R` (m, D, H, H), `.boft_s` (d_out, 1).
- AdaLoRA: `.lora_A` (r, d_in), `.lora_B` (d_out, r), `.lora_E` (r, 1), r = `init_r`, or the rank kept by
  `rank_pattern` when PEFT saved a pruned adapter; the scaling still divides by `init_r` (PEFT keeps `ranknum`
  when it resizes), which is the module's `ranknum` here.

`from_peft` dispatches here for these `peft_type`s: the same module selection and checks as LoRA (peft.py), one
rule per distinct option set, then the tensors are copied in. `to_peft` writes them back; a module PEFT holds
one adapter for must carry exactly one site (a slice of a packed weight is an error).
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from surgery.errors import SurgeryError
from surgery.modules.adalora import AdaLoRA
from surgery.modules.loha import LoHa
from surgery.modules.oft import BOFT, OFT
from surgery.modules.vera import VeRA

_COMMON_UNSUPPORTED = {"modules_to_save": None, "bias": "none"}

SUFFIXES = {
    "VERA": {"vera_lambda_b": "vera_lambda_b", "vera_lambda_d": "vera_lambda_d"},
    "LOHA": {"hada_w1_a": "hada_w1_a", "hada_w1_b": "hada_w1_b", "hada_w2_a": "hada_w2_a", "hada_w2_b": "hada_w2_b"},
    "OFT": {"oft_R.weight": "oft_R"},
    "BOFT": {"boft_R": "boft_R", "boft_s": "boft_s"},
    "ADALORA": {"lora_A": "lora_A", "lora_B": "lora_B", "lora_E": "lora_E"},
}
KINDS = {VeRA: "VERA", LoHa: "LOHA", OFT: "OFT", BOFT: "BOFT", AdaLoRA: "ADALORA"}
_ADALORA_SCHEDULE = ("target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step")
VERA_GLOBALS = ("base_model.vera_A", "base_model.vera_B")


def peft_types() -> set[str]:
    return set(SUFFIXES)


def _options(peft_type: str, config: dict, path: str, found: dict, peft_dir: Path) -> dict:
    from surgery.io.peft import PeftFormatError, _pattern_value
    if set(found) != set(SUFFIXES[peft_type].values()):
        raise PeftFormatError(f"{peft_dir}: {path} has {sorted(found)}, not {sorted(SUFFIXES[peft_type].values())}")
    if peft_type == "VERA":
        r = int(config.get("r", 256))
        if found["vera_lambda_d"].shape != (r,):
            raise PeftFormatError(f"{peft_dir}: {path}.vera_lambda_d has shape {tuple(found['vera_lambda_d'].shape)}, "
                                  f"not ({r},) for r={r}")
        return {"kind": "vera", "r": r, "dropout": float(config.get("vera_dropout") or 0.0),
                "d_initial": float(config.get("d_initial", 0.1)),
                "projection_prng_key": int(config.get("projection_prng_key", 0)),
                "save_projection": bool(config.get("save_projection", True))}
    if peft_type == "LOHA":
        r = found["hada_w1_a"].shape[1]
        configured = _pattern_value(config.get("rank_pattern"), path, config.get("r", 8))
        if r != configured:
            raise PeftFormatError(f"{peft_dir}: {path} has rank {r} in its tensors but {configured} in the config")
        alpha = _pattern_value(config.get("alpha_pattern"), path, config.get("alpha", 8))
        return {"kind": "loha", "r": int(r), "alpha": float(alpha),
                "rank_dropout": float(config.get("rank_dropout") or 0.0),
                "module_dropout": float(config.get("module_dropout") or 0.0)}
    if peft_type == "OFT":
        rows, n_elements = found["oft_R"].shape
        block = (1 + math.isqrt(1 + 8 * n_elements)) // 2
        if block * (block - 1) // 2 != n_elements:
            raise PeftFormatError(f"{peft_dir}: {path}.oft_R.weight has {n_elements} columns, not b(b-1)/2 for any b")
        return {"kind": "oft", "r": 0, "block_size": int(block), "block_share": bool(config.get("block_share", False)),
                "module_dropout": float(config.get("module_dropout") or 0.0),
                "use_cayley_neumann": bool(config.get("use_cayley_neumann", True)),
                "num_cayley_neumann_terms": int(config.get("num_cayley_neumann_terms", 5))}
    if peft_type == "ADALORA":
        r = found["lora_E"].shape[0]
        if found["lora_A"].shape[0] != r or found["lora_B"].shape[1] != r or found["lora_E"].shape != (r, 1):
            raise PeftFormatError(f"{peft_dir}: {path}'s lora_A/lora_B/lora_E shapes do not share one rank")
        options = {"kind": "adalora", "init_r": int(r), "ranknum": float(config.get("init_r", 12)),
                   "alpha": float(config.get("lora_alpha", 8)), "dropout": float(config.get("lora_dropout") or 0.0)}
        options.update({k: config[k] for k in _ADALORA_SCHEDULE if config.get(k) is not None})
        return options
    m, d, h, _ = found["boft_R"].shape
    return {"kind": "boft", "block_size": int(h), "block_num": 0, "n_butterfly_factor": int(m),
            "dropout": float(config.get("boft_dropout") or 0.0)}


def from_peft_method(model: nn.Module, peft_dir: Path, config: dict, tensors: dict, peft_type: str, name: str,
                     example_inputs) -> nn.Module:
    """`from_peft` for VERA, LOHA, OFT and BOFT directories (see the module docstring)."""
    from surgery.api import apply, remove
    from surgery.io.peft import (PeftFormatError, _check_supported, _copy, _expand_all_linear, _paths,
                                 _tensors_by_module, _weight_sites)
    from surgery.rewrite.host import store_of
    unsupported = dict(_COMMON_UNSUPPORTED)
    if peft_type == "OFT":
        unsupported["coft"] = False
    _check_supported(config, unsupported, peft_dir)
    tensors = dict(tensors)
    globals_ = {key: tensors.pop(key) for key in VERA_GLOBALS if key in tensors} if peft_type == "VERA" else {}
    if peft_type == "VERA" and config.get("save_projection", True) and len(globals_) != 2:
        raise PeftFormatError(f"{peft_dir}: save_projection is true but {' and '.join(VERA_GLOBALS)} are missing")
    by_module = _tensors_by_module(tensors, SUFFIXES[peft_type], peft_dir)
    config = _expand_all_linear(config, model)
    paths = _paths(config, by_module, model, peft_dir)
    if not paths:
        raise PeftFormatError(f"{peft_dir}: the checkpoint holds no adapter tensors")
    ops = _weight_sites(model, paths, example_inputs)
    packed = [p for p in paths if ops[p][1] != 1]
    if packed:
        raise PeftFormatError(f"{peft_dir}: {peft_type} on {', '.join(packed[:4])}, whose weight is read in row slices "
                              f"(a packed projection such as nn.MultiheadAttention's in_proj), is not supported")

    groups: dict[tuple, list[str]] = defaultdict(list)
    for path in paths:
        options = _options(peft_type, config, path, by_module[path], peft_dir)
        groups[tuple(sorted(options.items()))].append(path)
    if peft_type == "VERA" and len(groups) != 1:
        raise PeftFormatError(f"{peft_dir}: VeRA modules with different options share one projection")
    rules = []
    for index, (options, members) in enumerate(groups.items()):
        module = dict(options)
        rule = module["kind"] if len(groups) == 1 else f"{module['kind']}_{index}"
        rules.append({"name": rule, "match": {"module": members, "op": sorted({ops[p][0] for p in members})},
                      "action": "wrap", "module": module, "expect": len(members)})
    apply(model, {"version": 1, "name": f"peft_{peft_type.lower()}", "rules": rules}, example_inputs=example_inputs,
          name=name)
    try:
        with torch.no_grad():
            projection = None
            for site in store_of(model).records[name].weight_sites:
                found = by_module[site.owner_path]
                for ours, value in found.items():
                    _copy(getattr(site.adapter, ours), value, site.owner_path, ours)
                if peft_type == "VERA":
                    projection = site.adapter._projection[0]
            if globals_:
                for key, attr in zip(VERA_GLOBALS, ("vera_A", "vera_B")):
                    _copy(getattr(projection, attr), globals_[key], "base_model", attr)
    except Exception:
        remove(model, name)
        raise
    return model


def method_type(kinds: set[type]) -> str | None:
    """The PEFT type of an adapter set made of one of these kinds, else None."""
    return KINDS.get(next(iter(kinds))) if len(kinds) == 1 else None


def to_peft_tensors(peft_type: str, record, by_module: dict) -> tuple[dict, dict]:
    """(tensors, config) of a PEFT directory for an adapter set of one of these kinds."""
    from surgery.io.peft import PREFIX
    several = [p for p, sites in by_module.items() if len(sites) != 1 or sites[0].rows is not None]
    if several:
        raise SurgeryError(f"PEFT's {peft_type} holds one adapter per module covering its whole weight; "
                           f"{', '.join(several[:4])} carry a slice of a packed weight or several sites")
    sites = {path: sites[0] for path, sites in by_module.items()}
    adapters = {path: site.adapter for path, site in sites.items()}
    fan_in_fan_out = any(site.layout == "in_out" for site in sites.values())
    config: dict = {"peft_type": peft_type, "target_modules": list(by_module), "modules_to_save": None,
                    "layers_to_transform": None, "layers_pattern": None, "init_weights": True}
    tensors: dict[str, torch.Tensor] = {}
    for path, adapter in adapters.items():
        for suffix, ours in SUFFIXES[peft_type].items():
            tensors[f"{PREFIX}{path}.{suffix}"] = getattr(adapter, ours).detach()
    first = next(iter(adapters.values()))
    if peft_type == "VERA":
        projections = {id(a._projection[0]): a._projection[0] for a in adapters.values()}
        if len(projections) != 1:
            raise SurgeryError("PEFT's VeRA shares one projection pair per adapter; this adapter set has "
                               f"{len(projections)} (one per rule): write one rule")
        projection = next(iter(projections.values()))
        tensors["base_model.vera_A"] = projection.vera_A.detach()
        tensors["base_model.vera_B"] = projection.vera_B.detach()
        config.update({"r": first.r, "d_initial": first.d_initial, "projection_prng_key": projection.key,
                       "save_projection": True, "vera_dropout": _dropout(first.dropout), "bias": "none",
                       "fan_in_fan_out": fan_in_fan_out})
    elif peft_type == "LOHA":
        if fan_in_fan_out:
            raise SurgeryError("PEFT's LoHa reshapes its delta to the stored weight's shape and so cannot adapt a "
                               "transposed (in, out) weight such as GPT-2's Conv1D")
        config.update({"r": first.r, "alpha": first.alpha, "rank_pattern": {}, "alpha_pattern": {},
                       "rank_dropout": first.rank_dropout, "module_dropout": first.module_dropout,
                       "use_effective_conv2d": False})
        if any((a.r, a.alpha) != (first.r, first.alpha) for a in adapters.values()):
            import re
            config["rank_pattern"] = {re.escape(p): a.r for p, a in adapters.items()}
            config["alpha_pattern"] = {re.escape(p): a.alpha for p, a in adapters.items()}
    elif peft_type == "OFT":
        settings = {(a.block_size, a.block_share, a.use_cayley_neumann, a.num_cayley_neumann_terms)
                    for a in adapters.values()}
        if len(settings) != 1:
            raise SurgeryError(f"PEFT's OFT has one block size and Cayley setting per adapter; this one has "
                               f"{sorted(settings)}")
        config.update({"r": 0, "oft_block_size": first.block_size, "block_share": first.block_share,
                       "use_cayley_neumann": first.use_cayley_neumann,
                       "num_cayley_neumann_terms": first.num_cayley_neumann_terms, "coft": False, "eps": 6e-5,
                       "module_dropout": first.module_dropout, "bias": "none", "fan_in_fan_out": fan_in_fan_out})
    elif peft_type == "ADALORA":
        return _adalora_tensors(adapters, config, fan_in_fan_out)
    else:
        settings = {(a.block_size, a.boft_R.shape[0]) for a in adapters.values()}
        if len(settings) != 1:
            raise SurgeryError(f"PEFT's BOFT has one block size and factor count per adapter; this one has "
                               f"{sorted(settings)}")
        config.update({"boft_block_size": first.block_size, "boft_block_num": 0,
                       "boft_n_butterfly_factor": first.boft_R.shape[0], "boft_dropout": first.dropout,
                       "bias": "none", "fan_in_fan_out": fan_in_fan_out})
    return tensors, config


def _dropout(module: nn.Module) -> float:
    return float(module.p) if isinstance(module, nn.Dropout) else 0.0


# ------------------------------------------------------------------ LoRA inits computed from the base weight

# PEFT inits that overwrite the base weight when the adapter is created or loaded (LoraLayer.update_layer), so
# a checkpoint trained with them is only right on the base PEFT recomputes: the same init must run here.
_BASE_MUTATING_INITS = ("corda", "loftq", "lora_ga")
RECOMPUTED_INITS = ("pissa", "olora")     # inits whose residual base from_peft recomputes (module `init`)


def lora_init(config: dict, peft_dir: Path) -> dict:
    """Module options for a LoRA directory's `init_lora_weights`: {"init": "pissa"/"olora"} for the inits whose
    residual base PEFT recomputes at load, {} for inits that only set A and B; an error for base-mutating inits
    this reader cannot recompute the same way (randomized "pissa_niter_k", CorDA, LoftQ, LoRA-GA)."""
    from surgery.io.peft import PeftFormatError
    init = config.get("init_lora_weights", True)
    if not isinstance(init, str):
        return {}
    lowered = init.lower()
    if lowered in ("pissa", "olora"):
        return {"init": lowered}
    if lowered.startswith("pissa_niter_") or lowered.startswith(_BASE_MUTATING_INITS):
        raise PeftFormatError(f"{peft_dir}: init_lora_weights={init!r} replaces the base weight when PEFT loads the "
                              f"adapter (a residual this reader cannot recompute the same way); convert it to a "
                              f"plain LoRA with PEFT's save_pretrained(path_initial_model_for_weight_conversion=...)")
    return {}


def plain_lora_sites(sites: list) -> list:
    """The sites with every PiSSA/OLoRA adapter replaced by the plain LoRA of rank 2r computing the same delta,
    A' = [A; A₀], B' = [B, −B₀], alpha scaled so the scaling is unchanged (PEFT's `subtract_mutated_init`)."""
    import dataclasses

    from surgery.modules.lora import WEIGHT_INITS, LoRA
    out = []
    for site in sites:
        lora = site.adapter
        if getattr(lora, "init", None) not in WEIGHT_INITS:
            out.append(site)
            continue
        alpha = lora.alpha * (math.sqrt(2) if lora.use_rslora else 2)
        plain = LoRA(lora.lora_A.shape[1], lora.lora_B.shape[0], r=2 * lora.r, alpha=alpha,
                     use_rslora=lora.use_rslora)
        with torch.no_grad():
            plain.lora_A.copy_(torch.cat([lora.lora_A, lora.lora_A0]).detach())
            plain.lora_B.copy_(torch.cat([lora.lora_B, -lora.lora_B0], dim=1).detach())
        plain.dropout = lora.dropout
        out.append(dataclasses.replace(site, adapter=plain))
    return out


def _adalora_tensors(adapters: dict, config: dict, fan_in_fan_out: bool) -> tuple[dict, dict]:
    """PEFT's AdaLoRA: every module at rank init_r = ranknum (a site of lower rank, loaded pruned, is padded
    with zero triplets), rank_pattern None, the schedule from the options."""
    from surgery.io.peft import PREFIX
    first = next(iter(adapters.values()))
    settings = {(a.ranknum, a.alpha, tuple(getattr(a.options, k) for k in _ADALORA_SCHEDULE))
                for a in adapters.values()}
    if len(settings) != 1:
        raise SurgeryError(f"PEFT's AdaLoRA has one init_r, lora_alpha and schedule per adapter; this one has "
                           f"{len(settings)} different settings")
    if first.options.total_step is None:
        raise SurgeryError("PEFT's AdaLoraConfig requires total_step: set total_step in the adalora rule's module")
    init_r = int(first.ranknum)
    if init_r != first.ranknum or any(a.r > init_r for a in adapters.values()):
        raise SurgeryError(f"AdaLoRA ranknum {first.ranknum} is not an integer rank at least every site's r")
    tensors = {}
    for path, a in adapters.items():
        pad = init_r - a.r
        tensors[f"{PREFIX}{path}.lora_A"] = torch.cat([a.lora_A.detach(), a.lora_A.new_zeros(pad, a.lora_A.shape[1])])
        tensors[f"{PREFIX}{path}.lora_B"] = torch.cat([a.lora_B.detach(), a.lora_B.new_zeros(a.lora_B.shape[0], pad)],
                                                      dim=1)
        tensors[f"{PREFIX}{path}.lora_E"] = torch.cat([a.lora_E.detach(), a.lora_E.new_zeros(pad, 1)])
    config.update({"init_r": init_r, "lora_alpha": first.alpha, "r": 8, "rank_pattern": None,
                   "lora_dropout": _dropout(first.dropout), "bias": "none", "fan_in_fan_out": fan_in_fan_out,
                   "init_lora_weights": True, "use_dora": False})
    config.pop("init_weights", None)
    config.update({k: getattr(first.options, k) for k in _ADALORA_SCHEDULE})
    return tensors, config
