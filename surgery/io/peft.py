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
from surgery.modules import columns as cols
from surgery.modules.base import is_weight_adapter_part
from surgery.modules.dora import DoRA
from surgery.modules.ia3 import IA3
from surgery.modules.lora import LoRA
from surgery.rewrite.host import store_of
from surgery.rewrite.sites import check_hosts
from surgery.rewrite.wrappers import unwrapping

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
COMMON_LAYER_NAMES = ("layers", "h", "block", "blocks", "layer")

# Config fields whose non-default value changes what the adapter computes in ways this reader does not model.
_LORA_UNSUPPORTED = {"lora_bias": False, "bias": "none", "modules_to_save": None,
                     "target_parameters": None, "layer_replication": None, "trainable_token_indices": None,
                     "use_qalora": False, "alora_invocation_tokens": None, "use_bdlora": False}
_IA3_UNSUPPORTED = {"modules_to_save": None}
# Fields this reader models or that do not change what a loaded adapter computes (metadata, data loading,
# runtime options, initializations that the loaded tensors replace). Any other field with a value set is a
# method this reader does not know (a new PEFT variant), refused by name: an allow-list, so the next variant
# PEFT adds is refused too, never loaded as plain LoRA.
_COMMON_KNOWN = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                 "inference_mode", "target_modules", "exclude_modules", "fan_in_fan_out", "layers_to_transform",
                 "layers_pattern"}
_LORA_KNOWN = _COMMON_KNOWN | set(_LORA_UNSUPPORTED) | {
    "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "init_lora_weights", "rank_pattern", "alpha_pattern",
    "megatron_core", "runtime_config", "qalora_group_size", "eva_config", "ensure_weight_tying"}
_IA3_KNOWN = _COMMON_KNOWN | set(_IA3_UNSUPPORTED) | {"feedforward_modules", "init_ia3_weights"}
# init_lora_weights values that only initialize (the loaded tensors replace them); others change the base
# weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) or select a variant (MiCA freezes lora_B)
_LORA_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


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
    except (OSError, UnicodeDecodeError) as exc:
        raise PeftFormatError(f"{config_path}: cannot be read: {exc}") from None
    if not isinstance(config, dict):
        raise PeftFormatError(f"{config_path}: not a PEFT config (a JSON object), but a {type(config).__name__}")
    _check_config_types(config, config_path)
    from safetensors import SafetensorError
    try:
        return config, load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise PeftFormatError(f"{weights_path} is not a complete safetensors file (truncated or corrupt): "
                              f"{exc}") from None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_names(value) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))


# the type of every config field the readers use (a value of another type, e.g. written by hand, is refused by
# name instead of failing deep inside with a TypeError); None is allowed where PEFT allows it
_CONFIG_TYPES = {
    "r": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "lora_alpha": ("a number", _is_number),
    "alpha": ("a number", _is_number),
    "lora_dropout": ("a number", _is_number),
    "target_modules": ("null, a regex or a list of module names", lambda v: v is None or _is_names(v)),
    "exclude_modules": ("null, a regex or a list of module names", lambda v: v is None or _is_names(v)),
    "feedforward_modules": ("null, a regex or a list of module names", lambda v: v is None or _is_names(v)),
    "layers_pattern": ("null, a name or a list of names", lambda v: v is None or _is_names(v)),
    "layers_to_transform": ("null, a layer index or a list of them", lambda v: v is None or (
        isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, list) and all(
            isinstance(i, int) and not isinstance(i, bool) for i in v))),
    # AdaLoRA's rank_pattern maps names to masks (lists of booleans)
    "rank_pattern": ("null or a mapping of patterns to ranks", lambda v: v is None or (isinstance(v, dict) and all(
        isinstance(k, str) and ((isinstance(r, int) and not isinstance(r, bool)) or isinstance(r, list))
        for k, r in v.items()))),
    "alpha_pattern": ("null or a mapping of patterns to numbers", lambda v: v is None or (isinstance(v, dict) and all(
        isinstance(k, str) and _is_number(a) for k, a in v.items()))),
    "use_dora": ("true or false", lambda v: isinstance(v, bool)),
    "use_rslora": ("true or false", lambda v: isinstance(v, bool)),
    "peft_type": ("a name", lambda v: isinstance(v, str)),
}


def _check_config_types(config: dict, path: Path) -> None:
    for field, (expected, ok) in _CONFIG_TYPES.items():
        if field in config and not ok(config[field]):
            raise PeftFormatError(f"{path}: `{field}` must be {expected}, not {type(config[field]).__name__} "
                                  f"{config[field]!r:.80}")


BASE_LAYER = ".base_layer.weight"


def _drop_saved_base_layers(tensors: dict[str, torch.Tensor], model: nn.Module, peft_dir: Path) -> dict:
    """PEFT saves the whole weight of an adapted embedding or LM head (`save_embedding_layers="auto"`, whenever
    `target_modules` names `embed_tokens` or `lm_head`) as `<module>.base_layer.weight`, and its loader copies it
    into the base. Such a tensor equal to this model's weight (after a cast to its dtype) changes nothing and
    is dropped; one that differs (a resized or trained vocabulary) is a base weight surgery does not write:
    PeftFormatError naming it."""
    kept = {}
    for key, tensor in tensors.items():
        if not (key.startswith(PREFIX) and key.endswith(BASE_LAYER)):
            kept[key] = tensor
            continue
        path = key[len(PREFIX):-len(BASE_LAYER)]
        try:
            weight = model.get_submodule(path).weight
        except AttributeError:
            kept[key] = tensor      # no such module here: reported as an unknown tensor below
            continue
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != tuple(tensor.shape):
            shape = list(weight.shape) if isinstance(weight, torch.Tensor) else None
            raise PeftFormatError(f"{peft_dir}: {key} is {path}'s whole weight as PEFT saved it "
                                  f"(save_embedding_layers), of shape {list(tensor.shape)}, but this model's is "
                                  f"{shape}: resize the base model's vocabulary and load that weight into it first")
        if not torch.equal(tensor.to(device=weight.device, dtype=weight.dtype), weight.detach()):
            raise PeftFormatError(f"{peft_dir}: {key} is {path}'s whole weight as PEFT saved it "
                                  f"(save_embedding_layers), and it differs from this model's: a trained or "
                                  f"resized base weight, which from_peft does not write; load it into the base "
                                  f"model first")
    return kept


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


def _check_supported(config: dict, unsupported: dict, peft_dir: Path, known: set[str] = frozenset()) -> None:
    for field_name, default in unsupported.items():
        value = config.get(field_name, default)
        if value not in (None, False, [], {}, default):
            raise PeftFormatError(f"{peft_dir}: {field_name}={value!r} is not supported by from_peft")
    if known:
        for field_name, value in config.items():
            if field_name not in known and value not in (None, False, [], {}, "", 0):
                raise PeftFormatError(f"{peft_dir}: {field_name}={value!r} is a PEFT option this reader does not "
                                      f"know; it may change what the adapter computes, so from_peft refuses it")
    init = config.get("init_lora_weights", True)
    if config.get("peft_type", "").upper() == "LORA" and init not in _LORA_PLAIN_INITS + peft_methods.RECOMPUTED_INITS:
        raise PeftFormatError(f"{peft_dir}: init_lora_weights={init!r} is a LoRA variant or a base-weight "
                              f"rewrite (e.g. MiCA freezes lora_B; PiSSA/OLoRA/CorDA/LoftQ change the base weights) "
                              f"that from_peft does not implement; plain LoRA inits are {list(_LORA_PLAIN_INITS)}")


def _weight_sites(model: nn.Module, paths: list[str], example_inputs) -> dict[str, tuple[str, int]]:
    """{path: (op, number of sites)} for modules whose whole weight feeds one weight-bearing op, or whose row
    slices feed several that together cover it (nn.MultiheadAttention's packed in_proj_weight, which PEFT adapts
    with one LoRA); an error for any other path."""
    matches = plan(model, {"rules": [{"name": "peft", "match": {"module": paths}, "action": "train", "expect": "any"}]},
                   example_inputs=example_inputs)
    ops: dict[str, list] = defaultdict(list)
    for m in matches:
        info = m.site.linear
        if info is not None and info.owner == m.module and m.site.extra.get("packed") is None:
            ops[m.module].append((m.site.op, info))
    found, bad = {}, []
    for p in paths:
        sites = ops.get(p, [])
        whole = [op for op, info in sites if info.rows is None]
        rows = sorted(info.rows for _, info in sites if info.rows is not None)
        if len(sites) == 1 and whole:
            found[p] = (whole[0], 1)
        elif sites and not whole and len({info.weight for _, info in sites}) == 1 and rows[0][0] == 0 and \
                all(a[1] == b[0] for a, b in zip(rows, rows[1:])) and \
                rows[-1][1] == model.get_parameter(sites[0][1].weight).shape[sites[0][1].layout == "in_out"]:
            found[p] = (sites[0][0], len(sites))
        else:
            bad.append(p)
    if bad:
        raise PeftFormatError(f"PEFT adapters on {', '.join(bad)} do not map to one weight-bearing op of that module "
                              f"(a functionally read weight, or a module that is not in the traced forward)")
    return found


def _mha_paths(by_module: dict, model: nn.Module) -> set[str]:
    """PEFT's LoRA on nn.MultiheadAttention `X` keeps the out_proj's LoRA under `X.base_layer.out_proj`: move it to
    `X.out_proj` (in place) and return the moved paths (selected by X's target, not by their own name)."""
    moved = set()
    for path in list(by_module):
        holder, _, rest = path.rpartition(".base_layer.")
        if rest == "out_proj" and isinstance(_get_module(model, holder), nn.MultiheadAttention):
            by_module[f"{holder}.out_proj"] = by_module.pop(path)
            moved.add(f"{holder}.out_proj")
    return moved


def _get_module(model: nn.Module, path: str):
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


SEQ_CLS_HEAD_NAMES = ("score", "classifier")   # PEFT's names for a classifier head, excluded for SEQ_CLS


def _expand_all_linear(config: dict, model: nn.Module) -> dict:
    """PEFT's `target_modules: "all-linear"` as PEFT expands it (`_maybe_include_all_linear_layers`): every
    nn.Linear and transformers Conv1D module, except the output embedding (the LM head) and, for task_type
    SEQ_CLS without one, the classifier head (`score` or `classifier`)."""
    targets = config.get("target_modules")
    if not (isinstance(targets, str) and targets.lower() == "all-linear"):
        return config
    classes: tuple = (nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D
        classes += (Conv1D,)
    except ImportError:
        pass
    linear = {n for n, m in model.named_modules() if isinstance(m, classes) and n
              and not n.startswith("surgery_adapters")}
    exclude = set()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        exclude |= {n for n, m in model.named_modules() if m is head}
    elif str(config.get("task_type") or "").upper() == "SEQ_CLS":
        for attr in SEQ_CLS_HEAD_NAMES:
            found = getattr(model, attr, None)
            if isinstance(found, nn.Module):
                exclude |= {n for n, m in model.named_modules() if m is found}
                break
    return {**config, "target_modules": sorted(linear - exclude)}


def _module_names(model: nn.Module) -> set[str]:
    return {name for name, _ in model.named_modules() if name and not name.startswith("surgery_adapters")}


def _paths(config: dict, by_module: dict, model: nn.Module, peft_dir: Path, implied: set[str] = frozenset()
           ) -> list[str]:
    names = _module_names(model)
    missing = sorted(p for p in by_module if p not in names)
    if missing:
        raise PeftFormatError(f"{peft_dir}: the checkpoint adapts {', '.join(missing[:4])}, which this model does not "
                              f"have (was the PEFT model built on a different class, e.g. a task head around it?)")
    selected = {n for n in names if _peft_selects(config, n)} | set(implied)
    unselected = sorted(set(by_module) - selected)
    if unselected:
        raise PeftFormatError(f"{peft_dir}: tensors for {', '.join(unselected[:4])}, which target_modules "
                              f"{config.get('target_modules')!r} does not select")
    return sorted(by_module, key=list(n for n, _ in model.named_modules()).index)


@unwrapping
def from_peft(model: nn.Module, peft_dir, *, name: str = "default", example_inputs=None) -> nn.Module:
    """Apply the LoRA (also DoRA, `use_dora`) or IA3 adapter saved by PEFT in `peft_dir` to `model` (in place)
    and return it. Linears, transformers' Conv1D, nn.Conv1d/2d/3d and nn.Embedding (`lora_embedding_A/B`) are read.

    PEFT's LoRA on an `nn.MultiheadAttention` (one LoRA on the packed `in_proj_weight`, one on `out_proj`) is
    loaded as LoRA's definition, W + ΔW on both weights. PEFT 0.21 itself computes W + 2ΔW for out_proj (its
    MHA layer folds the out_proj delta and the wrapped out_proj adds it again), so outputs differ from PEFT's by
    that second delta.

    The adapter gets the name `name`; on any error the model is left as it was.
    """
    peft_dir = Path(peft_dir)
    config, tensors = _read(peft_dir)
    tensors = _drop_saved_base_layers(tensors, model, peft_dir)
    peft_type = str(config.get("peft_type", "")).upper()
    dora = bool(config.get("use_dora", False))
    if peft_type == "LORA":
        _check_supported(config, _LORA_UNSUPPORTED, peft_dir, _LORA_KNOWN)
        suffixes = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_embedding_A": "lora_A",
                    "lora_embedding_B": "lora_B"}
        if dora:
            suffixes["lora_magnitude_vector"] = "magnitude"
        by_module = _tensors_by_module(tensors, suffixes, peft_dir)
    elif peft_type == "IA3":
        _check_supported(config, _IA3_UNSUPPORTED, peft_dir, _IA3_KNOWN)
        by_module = _tensors_by_module(tensors, {"ia3_l": "ia3_l"}, peft_dir)
    elif peft_type in peft_methods.peft_types():
        return peft_methods.from_peft_method(model, peft_dir, config, tensors, peft_type, name, example_inputs)
    else:
        raise PeftFormatError(f"{peft_dir}: peft_type {config.get('peft_type')!r} is not supported (LORA, IA3, "
                              f"{', '.join(sorted(peft_methods.peft_types()))})")
    config = _expand_all_linear(config, model)
    implied = _mha_paths(by_module, model)
    paths = _paths(config, by_module, model, peft_dir, implied)
    if not paths:
        raise PeftFormatError(f"{peft_dir}: the checkpoint holds no adapter tensors")
    ops = _weight_sites(model, paths, example_inputs)

    groups: dict[tuple, list[str]] = defaultdict(list)
    for path in paths:
        found = by_module[path]
        if peft_type == "LORA":
            expected = {"lora_A", "lora_B"} | ({"magnitude"} if dora else set())
            if set(found) != expected:
                raise PeftFormatError(f"{peft_dir}: {path} has {sorted(found)}, not {', '.join(sorted(expected))}")
            r = found["lora_A"].shape[0]
            configured = _pattern_value(config.get("rank_pattern"), path, config.get("r", 8))
            b_rank = found["lora_B"].shape[1]   # r/groups for a grouped conv's B (out, r/groups, 1, ...)
            if r != configured or (b_rank != r and (found["lora_B"].dim() <= 2 or r % b_rank)):
                raise PeftFormatError(f"{peft_dir}: {path} has rank {r} in its tensors but {configured} in the config")
            alpha = _pattern_value(config.get("alpha_pattern"), path, config.get("lora_alpha", 8))
            groups[("lora", r, float(alpha))].append(path)
        else:
            vector = found["ia3_l"]
            # a conv's vector is (1, C, 1, ...) on either side: feedforward_modules says which
            scale_input = vector.dim() == 2 and vector.shape[0] == 1 and vector.shape[1] != 1
            feedforward = config.get("feedforward_modules") or []
            declared = (re.fullmatch(feedforward, path) is not None if isinstance(feedforward, str)
                        else any(path.endswith(t) for t in feedforward))
            if vector.dim() > 2 or vector.shape == (1, 1):
                scale_input = declared
            if scale_input != declared:
                raise PeftFormatError(f"{peft_dir}: {path}'s vector has shape {tuple(vector.shape)}, which disagrees "
                                      f"with feedforward_modules")
            groups[("ia3", scale_input)].append(path)

    rules = []
    for group, members in groups.items():
        match = {"module": members, "op": sorted({ops[p][0] for p in members})}
        if group[0] == "lora":
            _, r, alpha = group
            kind = "dora" if dora else "lora"
            rule_name = kind if len(groups) == 1 else f"{kind}_r{r}_alpha{alpha:g}".replace(".", "_")
            module = {"kind": kind, "r": r, "alpha": alpha, "dropout": float(config.get("lora_dropout") or 0.0),
                      "use_rslora": bool(config.get("use_rslora", False))}
            module.update(peft_methods.lora_init(config, peft_dir))
        else:
            rule_name = "ia3_ffn" if group[1] else "ia3"
            module = {"kind": "ia3", "scale": "input" if group[1] else "output"}
        rules.append({"name": rule_name, "match": match, "action": "wrap", "module": module,
                      "expect": sum(ops[p][1] for p in members)})
    spec = {"version": 1, "name": f"peft_{peft_type.lower()}", "rules": rules}

    apply(model, spec, example_inputs=example_inputs, name=name)
    try:
        with torch.no_grad():
            for site in store_of(model).records[name].weight_sites:
                found = by_module[site.owner_path]
                if peft_type == "LORA":
                    lora_b = found["lora_B"]
                    if site.rows is not None:   # one slice (or index set) of a packed weight PEFT adapts whole
                        lora_b = cols.take(lora_b, site.rows)
                    _copy(site.adapter.lora_A, found["lora_A"], site.owner_path, "lora_A")
                    _copy(site.adapter.lora_B, lora_b, site.owner_path, "lora_B")
                    if dora:
                        _copy(site.adapter.magnitude, found["magnitude"].flatten(), site.owner_path,
                              "lora_magnitude_vector")
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
    infos = {id(s.linear): s.linear for s in analysis.sites if s.linear is not None}   # linears, convs, embeddings
    return any(info.owner == path and info.rows is None and any(
        b.module == path and b.side == "out" and b.loc == () for b in analysis.boundaries(info.value))
        for info in infos.values())


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
        a_rows.append(lora.lora_A.detach())
        block = cols.put(b[:, offset:offset + lora.r], site.rows, lora.lora_B.detach() * lora.scaling)
        b[:, offset:offset + lora.r] = block      # B's rows of this site (a slice, or q's heads of BLOOM)
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
        vector = cols.put(vector, site.rows, cols.take(vector, site.rows) * site.adapter.ia3_l.detach())
    return vector[:, None], False


@unwrapping
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
    check_hosts(model, store, "write a PEFT checkpoint")   # adapters the model no longer runs are not written
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
    moe = [f"{s.owner_path}.{s.weight_name}" for s in record.weight_sites if getattr(s.adapter, "experts", None)]
    if moe:
        raise SurgeryError(f"adapter {name!r} adapts MoE experts stored as one 3-D parameter ({', '.join(moe[:2])}"
                           f"{', ...' if len(moe) > 2 else ''}); PEFT holds those as `target_parameters`, which "
                           f"to_peft does not write yet (surgery.save keeps them)")
    kinds = {type(s.adapter) for s in record.weight_sites}
    if kinds in ({LoRA}, {DoRA}):
        peft_type = "LORA"
    elif kinds == {IA3}:
        peft_type = "IA3"
    elif peft_methods.method_type(kinds) is not None:
        peft_type = peft_methods.method_type(kinds)
    else:
        raise SurgeryError(f"to_peft writes LoRA, DoRA, IA3, VeRA, LoHa, OFT, BOFT or AdaLoRA adapter sets; {name!r} holds "
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
    fan_in_fan_out = any(s.layout == "in_out" and getattr(s.adapter, "op_kind", "linear") == "linear"
                         for s in record.weight_sites)   # an embedding's table is (num, dim) without it
    if peft_type not in ("LORA", "IA3"):
        tensors, config = peft_methods.to_peft_tensors(peft_type, record, by_module)
    elif peft_type == "LORA":
        modules = {}
        dora = kinds == {DoRA}
        if dora and any(len(sites) > 1 or sites[0].rows is not None for sites in by_module.values()):
            raise SurgeryError(f"adapter {name!r}: DoRA on part of a packed weight has no PEFT form (PEFT's "
                               f"magnitude covers the whole module)")
        for path, sites in by_module.items():
            a, b, r, alpha, rslora = _lora_module(sites, _out_features(sites[0]))
            modules[path] = (r, alpha, rslora)
            embedding = getattr(sites[0].adapter, "op_kind", "linear") == "embedding"
            tensors[f"{PREFIX}{path}.{'lora_embedding_A' if embedding else 'lora_A.weight'}"] = a
            tensors[f"{PREFIX}{path}.{'lora_embedding_B' if embedding else 'lora_B.weight'}"] = b
            if dora:   # PEFT's shape: (out,) for linears and embeddings, (1, out, 1, ...) for convs
                magnitude = sites[0].adapter.magnitude.detach()
                conv_dims = _plain_weight(sites[0]).dim() - 2 if sites[0].adapter.op_kind == "conv" else 0
                tensors[f"{PREFIX}{path}.lora_magnitude_vector"] = (
                    magnitude.view(1, -1, *[1] * conv_dims) if conv_dims else magnitude)
        config = _lora_config(modules, record, fan_in_fan_out)
        config["use_dora"] = dora
    else:
        feedforward = []
        for path, sites in by_module.items():
            vector, scale_input = _ia3_module(sites, _in_features(sites[0]), _out_features(sites[0]), path)
            if scale_input:
                feedforward.append(path)
            weight = _plain_weight(sites[0])
            if weight.dim() > 2:   # a conv's vector is (1, C, 1, ...) on either side
                vector = vector.flatten().view(1, -1, *[1] * (weight.dim() - 2))
            tensors[f"{PREFIX}{path}.ia3_l"] = vector
        config = {"peft_type": "IA3", "target_modules": list(by_module), "feedforward_modules": feedforward,
                  "fan_in_fan_out": fan_in_fan_out, "init_ia3_weights": True, "modules_to_save": None}
    config.update({"task_type": None, "inference_mode": True,
                   "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None})
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(out_dir / WEIGHTS_FILE),
                  metadata={"format": "pt"})
        (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    except OSError as exc:
        raise SurgeryError(f"cannot write the PEFT directory {out_dir}: {exc.strerror or exc}") from None
    return out_dir


def _out_features(site) -> int:
    weight = _plain_weight(site)
    return weight.shape[1] if site.layout == "in_out" else weight.shape[0]


def _in_features(site) -> int:
    weight = _plain_weight(site)
    if weight.dim() > 2:   # a conv's (out, in/groups, *kernel)
        return weight.shape[1] * getattr(site.owner, "groups", 1)
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
