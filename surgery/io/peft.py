"""PEFT adapter directories in and out (LoRA and IA3), without importing peft.

A PEFT directory holds `adapter_config.json` and `adapter_model.safetensors`, whose keys read
`base_model.model.<module path>.lora_A.weight` / `.lora_B.weight` (LoRA, A (r, in), B (out, r), scaling
lora_alpha/r or lora_alpha/√r with use_rslora) or `<module path>.ia3_l` (IA3: (out, 1) scales the output,
(1, in) the input of a feed-forward module).

`from_peft` selects module paths the way PEFT does (target_modules as a list of name suffixes or a regex,
exclude_modules, layers_to_transform), checks them against the checkpoint's tensors, and builds a spec of
`module:` patterns (one rule per rank/alpha or per IA3 side), so the adapters go through the engine like any
other spec; then it copies the tensors in. `to_peft` writes the reverse. One PEFT module holds one A/B pair
(or one vector), so several of our sites on one module's packed weight (GPT-2's q and v columns of `c_attn`)
are written as one LoRA of rank Σr whose A stacks the A's and whose B is block-diagonal in the rows each
site covers, with each site's scaling folded into its block (per-module `rank_pattern`/`alpha_pattern`); IA3
output vectors on row slices become one vector with ones elsewhere. Sites PEFT cannot express (a weight its
module reads without calling the module, such as `nn.MultiheadAttention`'s, where PEFT's own LoRA is wrong)
are an error naming them. Only safetensors are read or written.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from surgery.api import _analysis, apply, plan, remove
from surgery.errors import SurgeryError
from surgery.io import peft_methods
from surgery.modules.base import is_weight_adapter_part
from surgery.modules.ia3 import IA3
from surgery.modules.lora import LoRA
from surgery.rewrite.host import store_of

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
COMMON_LAYER_NAMES = ("layers", "h", "block", "blocks", "layer")

# Config fields whose non-default value changes what the adapter computes in ways this reader does not model.
_LORA_UNSUPPORTED = {"use_dora": False, "lora_bias": False, "bias": "none", "modules_to_save": None,
                     "target_parameters": None, "layer_replication": None, "trainable_token_indices": None,
                     "use_qalora": False, "alora_invocation_tokens": None, "use_bdlora": False}
_IA3_UNSUPPORTED = {"modules_to_save": None}


class PeftFormatError(SurgeryError):
    """A PEFT directory this reader cannot turn into surgery adapters, or a model it does not fit."""


# ------------------------------------------------------------------------------------------------- reading

def _peft_selects(config: dict, key: str) -> bool:
    """Whether PEFT's target matching (check_target_module_exists) selects module `key`."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str) and re.fullmatch(exclude, key):
            return False
        if not isinstance(exclude, str) and (key in exclude or any(key.endswith("." + e) for e in exclude)):
            return False
    targets = config.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith("." + t) for t in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    patterns = config.get("layers_pattern") or []
    patterns = [patterns] if isinstance(patterns, str) else patterns
    if not patterns:
        found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        found = None
        for pattern in patterns:
            found = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if found:
                break
    if not found:
        return False
    index = int(found.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def _pattern_value(patterns: dict, key: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup (get_pattern_key)."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _read(peft_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config_path, weights_path = peft_dir / CONFIG_FILE, peft_dir / WEIGHTS_FILE
    if not config_path.is_file():
        raise PeftFormatError(f"{peft_dir}: no {CONFIG_FILE}")
    if not weights_path.is_file():
        other = "; adapter_model.bin is a pickle, which surgery does not load" if (
            peft_dir / "adapter_model.bin").exists() else ""
        raise PeftFormatError(f"{peft_dir}: no {WEIGHTS_FILE}{other}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise PeftFormatError(f"{config_path}: not valid JSON: {exc}") from None
    return config, load_file(str(weights_path))


def _tensors_by_module(tensors: dict[str, torch.Tensor], suffixes: dict[str, str], peft_dir: Path) -> dict:
    """{module path: {our name: tensor}} from PEFT's keys."""
    by_module: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise PeftFormatError(f"{peft_dir}: tensor {key!r} does not start with {PREFIX!r}")
        rest = key[len(PREFIX):]
        for suffix, ours in suffixes.items():
            if rest.endswith("." + suffix):
                by_module[rest[: -len(suffix) - 1]][ours] = tensor
                break
        else:
            raise PeftFormatError(f"{peft_dir}: tensor {key!r} is not one this reader knows "
                                  f"(expected *.{', *.'.join(suffixes)})")
    return by_module


def _check_supported(config: dict, unsupported: dict, peft_dir: Path) -> None:
    for field_name, default in unsupported.items():
        value = config.get(field_name, default)
        if value not in (None, False, [], {}, default):
            raise PeftFormatError(f"{peft_dir}: {field_name}={value!r} is not supported by from_peft")


def _weight_sites(model: nn.Module, paths: list[str], example_inputs) -> dict[str, str]:
    """{path: op} for modules whose whole weight feeds one weight-bearing op; an error for any other path."""
    matches = plan(model, {"rules": [{"name": "peft", "match": {"module": paths}, "action": "train", "expect": "any"}]},
                   example_inputs=example_inputs)
    ops: dict[str, list[str]] = defaultdict(list)
    for m in matches:
        info = m.site.linear
        if info is not None and info.owner == m.module and info.rows is None and m.site.extra.get("packed") is None:
            ops[m.module].append(m.site.op)
    bad = [p for p in paths if len(ops.get(p, [])) != 1]
    if bad:
        raise PeftFormatError(f"PEFT adapters on {', '.join(bad)} do not map to one weight-bearing op of that module "
                              f"(a packed or functionally read weight, such as nn.MultiheadAttention's, or a module "
                              f"that is not in the traced forward)")
    return {p: ops[p][0] for p in paths}


def _module_names(model: nn.Module) -> set[str]:
    return {name for name, _ in model.named_modules() if name and not name.startswith("surgery_adapters")}


def _paths(config: dict, by_module: dict, model: nn.Module, peft_dir: Path) -> list[str]:
    names = _module_names(model)
    missing = sorted(p for p in by_module if p not in names)
    if missing:
        raise PeftFormatError(f"{peft_dir}: the checkpoint adapts {', '.join(missing[:4])}, which this model does not "
                              f"have (was the PEFT model built on a different class, e.g. a task head around it?)")
    selected = {n for n in names if _peft_selects(config, n)}
    unselected = sorted(set(by_module) - selected)
    if unselected:
        raise PeftFormatError(f"{peft_dir}: tensors for {', '.join(unselected[:4])}, which target_modules "
                              f"{config.get('target_modules')!r} does not select")
    return sorted(by_module, key=list(n for n, _ in model.named_modules()).index)


def from_peft(model: nn.Module, peft_dir, *, name: str = "default", example_inputs=None) -> nn.Module:
    """Apply the LoRA or IA3 adapter saved by PEFT in `peft_dir` to `model` (in place) and return it.

    The adapter gets the name `name`; on any error the model is left as it was.
    """
    peft_dir = Path(peft_dir)
    config, tensors = _read(peft_dir)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type == "LORA":
        _check_supported(config, _LORA_UNSUPPORTED, peft_dir)
        by_module = _tensors_by_module(tensors, {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B"}, peft_dir)
    elif peft_type == "IA3":
        _check_supported(config, _IA3_UNSUPPORTED, peft_dir)
        by_module = _tensors_by_module(tensors, {"ia3_l": "ia3_l"}, peft_dir)
    elif peft_type in peft_methods.peft_types():
        return peft_methods.from_peft_method(model, peft_dir, config, tensors, peft_type, name, example_inputs)
    else:
        raise PeftFormatError(f"{peft_dir}: peft_type {config.get('peft_type')!r} is not supported (LORA, IA3, "
                              f"{', '.join(sorted(peft_methods.peft_types()))})")
    paths = _paths(config, by_module, model, peft_dir)
    if not paths:
        raise PeftFormatError(f"{peft_dir}: the checkpoint holds no adapter tensors")
    ops = _weight_sites(model, paths, example_inputs)

    groups: dict[tuple, list[str]] = defaultdict(list)
    for path in paths:
        found = by_module[path]
        if peft_type == "LORA":
            if set(found) != {"lora_A", "lora_B"}:
                raise PeftFormatError(f"{peft_dir}: {path} has {sorted(found)}, not lora_A and lora_B")
            r = found["lora_A"].shape[0]
            configured = _pattern_value(config.get("rank_pattern"), path, config.get("r", 8))
            if r != configured or found["lora_B"].shape[1] != r:
                raise PeftFormatError(f"{peft_dir}: {path} has rank {r} in its tensors but {configured} in the config")
            alpha = _pattern_value(config.get("alpha_pattern"), path, config.get("lora_alpha", 8))
            groups[("lora", r, float(alpha))].append(path)
        else:
            vector = found["ia3_l"]
            scale_input = vector.dim() == 2 and vector.shape[0] == 1 and vector.shape[1] != 1
            feedforward = config.get("feedforward_modules") or []
            declared = (re.fullmatch(feedforward, path) is not None if isinstance(feedforward, str)
                        else any(path.endswith(t) for t in feedforward))
            if vector.dim() == 2 and vector.shape == (1, 1):
                scale_input = declared
            if scale_input != declared:
                raise PeftFormatError(f"{peft_dir}: {path}'s vector has shape {tuple(vector.shape)}, which disagrees "
                                      f"with feedforward_modules")
            groups[("ia3", scale_input)].append(path)

    rules = []
    for group, members in groups.items():
        match = {"module": members, "op": sorted({ops[p] for p in members})}
        if group[0] == "lora":
            _, r, alpha = group
            rule_name = "lora" if len(groups) == 1 else f"lora_r{r}_alpha{alpha:g}".replace(".", "_")
            module = {"kind": "lora", "r": r, "alpha": alpha, "dropout": float(config.get("lora_dropout") or 0.0),
                      "use_rslora": bool(config.get("use_rslora", False))}
            module.update(peft_methods.lora_init(config, peft_dir))
        else:
            rule_name = "ia3_ffn" if group[1] else "ia3"
            module = {"kind": "ia3", "scale": "input" if group[1] else "output"}
        rules.append({"name": rule_name, "match": match, "action": "wrap", "module": module, "expect": len(members)})
    spec = {"version": 1, "name": f"peft_{peft_type.lower()}", "rules": rules}

    apply(model, spec, example_inputs=example_inputs, name=name)
    try:
        with torch.no_grad():
            for site in store_of(model).records[name].weight_sites:
                found = by_module[site.owner_path]
                if peft_type == "LORA":
                    _copy(site.adapter.lora_A, found["lora_A"], site.owner_path, "lora_A")
                    _copy(site.adapter.lora_B, found["lora_B"], site.owner_path, "lora_B")
                else:
                    _copy(site.adapter.ia3_l, found["ia3_l"].flatten(), site.owner_path, "ia3_l")
    except Exception:
        remove(model, name)
        raise
    return model


def _copy(param: torch.Tensor, value: torch.Tensor, path: str, what: str) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise PeftFormatError(f"{path}.{what}: the checkpoint's shape {tuple(value.shape)} does not fit this model's "
                              f"{tuple(param.shape)}")
    param.copy_(value)


# ------------------------------------------------------------------------------------------------- writing

def _called_as_module(analysis, path: str) -> bool:
    """Whether module `path` is called once and its output is its weight-bearing op's result: PEFT wraps the
    module's forward, so only such a module's op can be adapted by PEFT."""
    if analysis.calls(path) != 1:
        return False
    return any(info.owner == path and info.rows is None and any(
        b.module == path and b.side == "out" and b.loc == () for b in analysis.boundaries(info.value))
        for info in analysis.linears.values())


def _lora_module(sites, out_features: int) -> tuple[torch.Tensor, torch.Tensor, int, float, bool]:
    """One PEFT LoRA (A, B, r, alpha, use_rslora) computing the sum of the sites' deltas on one module."""
    sites = peft_methods.plain_lora_sites(sites)     # PiSSA/OLoRA: rank 2r, as PEFT's weight conversion
    if len(sites) == 1 and sites[0].rows is None:
        lora = sites[0].adapter
        return lora.lora_A.detach(), lora.lora_B.detach(), lora.r, float(lora.alpha), lora.use_rslora
    rank = sum(s.adapter.r for s in sites)
    a_rows, b = [], torch.zeros(out_features, rank, dtype=sites[0].adapter.lora_B.dtype)
    offset = 0
    for site in sites:
        lora = site.adapter
        lo, hi = site.rows if site.rows is not None else (0, out_features)
        a_rows.append(lora.lora_A.detach())
        b[lo:hi, offset:offset + lora.r] = lora.lora_B.detach() * lora.scaling
        offset += lora.r
    return torch.cat(a_rows), b, rank, float(rank), False      # alpha = rank: PEFT's scaling is 1


def _ia3_module(sites, in_features: int, out_features: int, path: str) -> tuple[torch.Tensor, bool]:
    inputs = [s for s in sites if s.adapter.scale_input]
    outputs = [s for s in sites if not s.adapter.scale_input]
    if inputs and outputs:
        raise SurgeryError(f"{path}: IA3 scales both its input and its output; a PEFT IA3 module holds one vector")
    if inputs:
        vector = torch.ones(in_features)
        for site in inputs:
            vector = vector * site.adapter.ia3_l.detach()
        return vector[None, :], True
    vector = torch.ones(out_features)
    for site in outputs:
        lo, hi = site.rows if site.rows is not None else (0, out_features)
        vector[lo:hi] = vector[lo:hi] * site.adapter.ia3_l.detach()
    return vector[:, None], False


def to_peft(model: nn.Module, out_dir, *, name: str | None = None, example_inputs=None) -> Path:
    """Write adapter set `name` (default: the only one) as a PEFT directory that `PeftModel.from_pretrained`
    loads onto the base model. LoRA or IA3 adapters only; anything PEFT cannot express is an error."""
    store = store_of(model)
    if store is None or not store.records:
        raise SurgeryError("this model has no adapters to write")
    if name is None:
        if len(store.records) != 1:
            raise SurgeryError(f"the model has several adapters ({sorted(store.records)}): pass name=")
        name = next(iter(store.records))
    if name not in store.records:
        raise SurgeryError(f"no adapter named {name!r}; adapters: {sorted(store.records)}")
    record = store.records[name]
    wrapped = {id(s.adapter) for s in record.weight_sites}
    others = [f"{rule}/{key}" for rule, modules in store.adapters[name].items()
              for key, module in modules.items() if id(module) not in wrapped and not is_weight_adapter_part(module)]
    if others or record.trained:
        what = others + [f"{len(record.trained)} trained base parameter(s)"] * bool(record.trained)
        raise SurgeryError(f"adapter {name!r} has rewrites PEFT's LoRA/IA3 cannot express: {', '.join(what[:6])}")
    gated = [s.owner_path for s in record.weight_sites if getattr(s.adapter, "gate", None) is not None]
    if gated:
        raise SurgeryError(f"adapter {name!r} has gated LoRA (UniPELT) on {', '.join(gated[:4])}: PEFT's LoRA has "
                           f"no gate")
    kinds = {type(s.adapter) for s in record.weight_sites}
    if kinds == {LoRA}:
        peft_type = "LORA"
    elif kinds == {IA3}:
        peft_type = "IA3"
    elif peft_methods.method_type(kinds) is not None:
        peft_type = peft_methods.method_type(kinds)
    else:
        raise SurgeryError(f"to_peft writes LoRA, IA3, VeRA, LoHa, OFT, BOFT or AdaLoRA adapter sets; {name!r} holds "
                           f"{', '.join(sorted(k.__name__ for k in kinds))}")

    analysis = _analysis(model, example_inputs)
    by_module: dict[str, list] = defaultdict(list)
    for site in record.weight_sites:
        by_module[site.owner_path].append(site)
    wrong = [p for p in by_module if not _called_as_module(analysis, p)]
    if wrong:
        raise SurgeryError(f"PEFT cannot adapt {', '.join(wrong)}: the weight is read without calling that module "
                           f"(e.g. nn.MultiheadAttention), so a PEFT wrapper around the module would not see it")

    tensors: dict[str, torch.Tensor] = {}
    fan_in_fan_out = any(s.layout == "in_out" for s in record.weight_sites)
    if peft_type not in ("LORA", "IA3"):
        tensors, config = peft_methods.to_peft_tensors(peft_type, record, by_module)
    elif peft_type == "LORA":
        modules = {}
        for path, sites in by_module.items():
            a, b, r, alpha, rslora = _lora_module(sites, _out_features(sites[0]))
            modules[path] = (r, alpha, rslora)
            tensors[f"{PREFIX}{path}.lora_A.weight"] = a
            tensors[f"{PREFIX}{path}.lora_B.weight"] = b
        config = _lora_config(modules, record, fan_in_fan_out)
    else:
        feedforward = []
        for path, sites in by_module.items():
            vector, scale_input = _ia3_module(sites, _in_features(sites[0]), _out_features(sites[0]), path)
            if scale_input:
                feedforward.append(path)
            tensors[f"{PREFIX}{path}.ia3_l"] = vector
        config = {"peft_type": "IA3", "target_modules": list(by_module), "feedforward_modules": feedforward,
                  "fan_in_fan_out": fan_in_fan_out, "init_ia3_weights": True, "modules_to_save": None}
    config.update({"task_type": None, "inference_mode": True,
                   "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(out_dir / WEIGHTS_FILE),
              metadata={"format": "pt"})
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


def _out_features(site) -> int:
    weight = _plain_weight(site)
    return weight.shape[1] if site.layout == "in_out" else weight.shape[0]


def _in_features(site) -> int:
    weight = _plain_weight(site)
    return weight.shape[0] if site.layout == "in_out" else weight.shape[1]


def _plain_weight(site) -> torch.Tensor:
    owner, weight_name = site.owner, site.weight_name
    parametrizations = getattr(owner, "parametrizations", None)
    if parametrizations is not None and weight_name in parametrizations:
        return parametrizations[weight_name].original
    return getattr(owner, weight_name)


def _lora_config(modules: dict[str, tuple[int, float, bool]], record, fan_in_fan_out: bool) -> dict:
    """A LoraConfig dict: one r/alpha/rsLoRA for all modules when they agree, else per-module patterns (with
    rsLoRA's √r folded into alpha, since PEFT has one rsLoRA switch)."""
    settings = set(modules.values())
    dropouts = {float(s.adapter.dropout.p) if isinstance(s.adapter.dropout, nn.Dropout) else 0.0
                for s in record.weight_sites}
    config = {"peft_type": "LORA", "target_modules": list(modules), "lora_dropout": max(dropouts),
              "fan_in_fan_out": fan_in_fan_out, "bias": "none", "init_lora_weights": True, "modules_to_save": None,
              "use_dora": False, "layers_to_transform": None, "layers_pattern": None}
    if len(settings) == 1:
        r, alpha, rslora = settings.pop()
        config.update({"r": r, "lora_alpha": alpha, "use_rslora": rslora, "rank_pattern": {}, "alpha_pattern": {}})
        return config
    first = next(iter(modules.values()))
    config.update({"r": first[0], "lora_alpha": first[1] if not first[2] else first[1] * first[0] ** 0.5,
                   "use_rslora": False,
                   "rank_pattern": {re.escape(p): r for p, (r, _, _) in modules.items()},
                   "alpha_pattern": {re.escape(p): (a * r ** 0.5 if rs else a) for p, (r, a, rs) in modules.items()}})
    return config
