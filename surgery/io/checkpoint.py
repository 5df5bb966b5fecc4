"""Saving and loading what a surgery added: adapter tensors as safetensors, the specs, and a manifest.

A saved directory holds

- `adapters.safetensors`: every tensor the surgery added (adapter parameters and persistent buffers) keyed
  `<adapter>/<rule>/<site>/<tensor>` (e.g. `default/lora/model_layers_0_self_attn_q_proj/lora_A`), and every
  base parameter a `train` rule selected keyed `<adapter>/trained/<parameter>` (e.g.
  `default/trained/model.norm.weight`). No other base weight is written, and nothing is pickled.
- `<adapter>.spec.yaml`: the spec applied under each adapter name (a spec file `surgery.load_spec` reads).
- `manifest.json`: the format version, the adapters in the order they were applied, the tensors file's SHA-256
  (`load` refuses a file whose bytes changed), and a fingerprint of the base model (its parameter names and
  shapes), so `load` can tell a base that does not fit before changing it.

`load` re-applies each spec under its name and copies the tensors in; on any failure the model is left as it
was (the adapters it applied are removed, trained base weights restored).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from surgery.api import add_fusion, apply, remove, set_active
from surgery.errors import SurgeryError
from surgery.rewrite.host import STATE_ATTR, store_of
from surgery.spec import Spec, load_spec
from surgery.spec.load import validate_data
from surgery.rewrite import trained
from surgery.rewrite.sites import check_hosts
from surgery.rewrite.wrappers import unwrapping
from surgery.spec.models import NAME_RULE, name_problem

FORMAT = "surgery.adapters"
FORMAT_VERSION = 1
ADAPTERS_FILE = "adapters.safetensors"
MANIFEST_FILE = "manifest.json"
TRAINED = "trained"

_PARAMETRIZED = re.compile(r"\.parametrizations\.([^.]+)\.original\d*$")


class CheckpointError(SurgeryError):
    """A saved adapter directory that cannot be written, read, or applied to the given base model."""


# ---------------------------------------------------------------- names

def base_parameter_name(qualified: str) -> str:
    """The name a base parameter has without surgery's parametrizations (`x.parametrizations.weight.original`
    is `x.weight`), so it is the same whether or not a weight is currently wrapped."""
    return _PARAMETRIZED.sub(r".\1", qualified)


def _base_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The base model's parameters (tied ones once, under their first name), without the adapters."""
    prefix = STATE_ATTR + "."
    return [(base_parameter_name(n), p) for n, p in model.named_parameters() if not n.startswith(prefix)]


def fingerprint(model: nn.Module) -> dict:
    """Parameter names and shapes of the base model: what adapters saved from it depend on."""
    params = {name: list(p.shape) for name, p in _base_parameters(model)}
    digest = hashlib.sha256(json.dumps(list(params.items())).encode()).hexdigest()
    numel = sum(p.numel() for _, p in _base_parameters(model))
    return {"class": type(model).__name__, "parameters": params, "numel": numel, "sha256": digest}


def _module_tensors(prefix: str, module: nn.Module):
    """Tensors of one adapter's module tree: ModuleDict levels (rule, site) become `/`-separated names."""
    if isinstance(module, nn.ModuleDict):
        for key, child in module.items():
            yield from _module_tensors(f"{prefix}/{key}", child)
        return
    for key, value in module.state_dict(keep_vars=True).items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{prefix}: the state entry {key!r} is not a tensor and cannot be saved as "
                                  f"safetensors ({type(value).__name__})")
        yield f"{prefix}/{key}", value


def surgery_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor the surgery added or trained, by its saved name; the live tensors of `model`."""
    store = store_of(model)
    if store is None or not store.records:
        raise CheckpointError("this model has no adapters to save (apply a spec first)")
    base_names = {}
    for name, p in _base_parameters(model):
        base_names.setdefault(id(p), name)
    out: dict[str, torch.Tensor] = {}
    for adapter in store.records:
        for key, value in _module_tensors(adapter, store.adapters[adapter]):
            _put(out, key, value)
        for param, _ in store.records[adapter].trained:
            if id(param) not in base_names:
                raise CheckpointError(f"adapter {adapter!r} trains a parameter that is not a base parameter")
            _put(out, f"{adapter}/{TRAINED}/{base_names[id(param)]}", trained.slot(store, adapter, param),
                 same_ok=True)
    return out


def _put(out: dict, key: str, value: torch.Tensor, same_ok: bool = False) -> None:
    """Two different tensors under one saved name would silently lose one: refuse."""
    if key in out and not (same_ok and out[key] is value):
        raise CheckpointError(f"two tensors would be saved under the same name {key!r} (adapter, rule or module "
                              f"names that differ only in characters the key replaces); rename one")
    out[key] = value


def _dedupe(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """One copy per distinct tensor (tied or shared tensors are saved once); `aliases` maps the other names."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, t in tensors.items():
        if t.device.type == "meta":
            raise CheckpointError(f"{key} is on the meta device and has no values to save")
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        unique[key] = t.detach().to("cpu").contiguous().clone()
    return unique, aliases


# ---------------------------------------------------------------- specs

def _spec_data(spec: Spec) -> dict:
    """The spec as plain data, as the user wrote it (keys left at their defaults stay out, so rules that forbid
    some keys in combination still validate); includes are already resolved into `rules`."""
    data = spec.model_dump(mode="json", by_alias=True, exclude_unset=True)
    data.pop("include", None)
    return data


def _combined_spec(specs: list[Spec]) -> Spec:
    if len(specs) == 1:
        return specs[0]
    rules = [rule for spec in specs for rule in spec.rules]
    return specs[0].model_copy(update={"rules": rules, "include": []})


def _spec_filename(adapter: str, used: set[str]) -> str:
    stem = re.sub(r"[^0-9A-Za-z_-]", "_", adapter) or "adapter"
    name, i = f"{stem}.spec.yaml", 1
    while name in used:
        name, i = f"{stem}.{i}.spec.yaml", i + 1
    used.add(name)
    return name


# ---------------------------------------------------------------- save

def _write_atomic(path: Path, write) -> None:
    """Write through a new temporary file (created exclusively, with a random name, so a pre-existing file or
    symlink is never written through) and rename it over `path` (a rename replaces a symlink, it does not
    follow it)."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()


def _prepare_directory(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"cannot save to {directory}: it is a file, not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create the directory {directory}: {exc.strerror or exc}") from None


@unwrapping
def save(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the model's adapters (and the base parameters its specs train) to `directory`; return it.

    Only what the surgery added or trained is written, as safetensors; the base model's other weights never
    are. Tied base weights (GPT-2's embedding and LM head) are one tensor and are saved once.
    Raises CheckpointError when `directory` is a file or cannot be written (temporary files are created
    exclusively and renamed into place, so no pre-existing file or symlink in the directory is written through).
    """
    if not isinstance(directory, (str, os.PathLike)):
        raise CheckpointError(f"save needs a directory path, not {type(directory).__name__}")
    store = store_of(model)
    if store is not None:
        check_hosts(model, store, "save")
    live = surgery_tensors(model)
    tensors, aliases = _dedupe(live)
    specless = [name for name, record in store.records.items() if not record.specs and record.fusion is None]
    if specless:
        raise CheckpointError(f"adapter {specless[0]!r} has no spec to save: load could not re-create it")
    directory = Path(directory)
    _prepare_directory(directory)

    adapters, used, spec_texts = [], set(), {}
    for name, record in store.records.items():
        if record.fusion is not None:     # add_fusion's set: re-made by add_fusion at load, then its tensors
            prefix = f"{name}/"
            adapters.append({"name": name, "fusion": dict(record.fusion),
                             "tensors": sum(1 for k in live if k.startswith(prefix))})
            continue
        spec = _combined_spec(list(record.specs))
        data = _spec_data(spec)
        try:
            validate_data(json.loads(json.dumps(data)))
        except SurgeryError as exc:
            raise CheckpointError(f"the spec of adapter {name!r} does not survive a round trip through YAML: "
                                  f"{exc}") from exc
        filename = _spec_filename(name, used)
        spec_texts[filename] = (f"# spec of adapter {name!r}, written by surgery.save\n"
                                + yaml.safe_dump(data, sort_keys=False))
        prefix = f"{name}/"
        adapters.append({
            "name": name,
            "spec": filename,
            "tensors": sum(1 for k in live if k.startswith(prefix)),
            "trained": [k[len(prefix) + len(TRAINED) + 1:] for k in live if k.startswith(f"{prefix}{TRAINED}/")],
        })

    try:
        _write_all(directory, tensors, aliases, adapters, spec_texts, store, model)
    except OSError as exc:
        raise CheckpointError(f"cannot write to {directory}: {exc.strerror or exc}"
                              + (f" ({exc.filename})" if exc.filename else "")) from None
    return directory


def _block_data(block) -> Any:
    """A composition as the data `set_active` (and a spec's `compose:`) reads: {average: [a, b], weights: [...]}.
    Average's weights are written as they act (already normalized), with normalize_weights false."""
    from surgery.rewrite.compose import BLOCKS, Average
    if isinstance(block, str):
        return block
    kind = next(k for k, cls in BLOCKS.items() if type(block) is cls)
    data = {kind: [_block_data(c) for c in block.children]}
    for key, value in vars(block).items():
        if key != "children" and not key.startswith("_"):
            data[key] = list(value) if isinstance(value, tuple) else value
    if isinstance(block, Average):
        data["normalize_weights"] = False
    return data


def _active_data(runtime) -> Any:
    """What is active: null (every adapter), the names, or the composition block when one is set (the names
    alone would load as a Stack: an Average's weights, a BatchSplit's sizes would be lost)."""
    from surgery.rewrite.compose import Block
    if isinstance(runtime.composition, Block):
        return _block_data(runtime.composition)
    return runtime.active


def _write_all(directory: Path, tensors, aliases, adapters, spec_texts, store, model) -> None:
    from safetensors.torch import save_file
    digest = {}

    def write_tensors(p: Path) -> None:
        save_file(tensors, str(p), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        digest["sha256"] = _sha256(p)   # of the bytes written, before the rename puts them in place

    # tensors first, then the specs, the manifest last: a directory whose manifest is new is complete
    _write_atomic(directory / ADAPTERS_FILE, write_tensors)
    for filename, text in spec_texts.items():
        _write_atomic(directory / filename, lambda p, text=text: p.write_text(text))
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "adapters": adapters,
        "active": _active_data(store.runtime),
        "tensors": {"file": ADAPTERS_FILE, "count": len(tensors), "aliases": aliases,
                    "numel": sum(t.numel() for t in tensors.values()), "sha256": digest["sha256"]},
        "base": fingerprint(model),
    }
    text = re.sub(r"\[[\d,\s]*\]", lambda m: json.dumps(json.loads(m.group())), json.dumps(manifest, indent=1))
    _write_atomic(directory / MANIFEST_FILE, lambda p: p.write_text(text + "\n"))


# ---------------------------------------------------------------- load

def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of a saved directory, checked for a format this version reads and for the type of every
    field `load` uses (a CheckpointError naming the field otherwise). The files it names must be plain names
    inside `directory` (no absolute paths, no `..`, no symlink leading out)."""
    path = Path(directory) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{directory} has no {MANIFEST_FILE}: not a directory written by surgery.save") from None
    except RecursionError:
        raise CheckpointError(f"{path}: nested too deeply to be a surgery manifest") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CheckpointError(f"{path} is not a surgery adapter manifest (format {found!r}, expected {FORMAT!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise CheckpointError(f"{path}: format_version {version!r} is not one this surgery reads "
                              f"(it reads {FORMAT_VERSION}); save it again with a matching surgery version")
    adapters = manifest.get("adapters")
    if not isinstance(adapters, list) or not all(isinstance(a, dict) and "name" in a and ("spec" in a or "fusion" in a)
                                                 for a in adapters):
        raise CheckpointError(f"{path}: `adapters` must be a list of {{name, spec}} (or {{name, fusion}}) entries")
    _check_manifest_types(path, manifest)
    for i, entry in enumerate(adapters):
        if "spec" in entry:
            _inside(Path(directory), entry["spec"], f"{path}: adapters[{i}].spec")
    _inside(Path(directory), manifest.get("tensors", {}).get("file", ADAPTERS_FILE), f"{path}: tensors.file")
    return manifest


def _check_manifest_types(path: Path, manifest: dict) -> None:
    def bad(field: str, expected: str, value) -> CheckpointError:
        return CheckpointError(f"{path}: `{field}` must be {expected}, not {type(value).__name__} {value!r:.80}")

    names = set()
    for i, entry in enumerate(manifest["adapters"]):
        name, spec = entry["name"], entry.get("spec")
        if not isinstance(name, str) or name_problem(name, "adapter name"):
            raise bad(f"adapters[{i}].name", "an adapter name (" + NAME_RULE + ")", name)
        if name in names:
            raise CheckpointError(f"{path}: two adapters named {name!r}")
        if "fusion" in entry:
            fusion = entry["fusion"]
            if not (isinstance(fusion, dict) and isinstance(fusion.get("adapters"), list)
                    and all(isinstance(a, str) and a in names for a in fusion["adapters"])
                    and isinstance(fusion.get("dropout", 0.0), (int, float))
                    and not isinstance(fusion.get("dropout", 0.0), bool)):
                raise bad(f"adapters[{i}].fusion", "{adapters: [names saved before it], dropout: a number}", fusion)
        elif not isinstance(spec, str) or not spec:
            raise bad(f"adapters[{i}].spec", "a file name", spec)
        names.add(name)
    tensors = manifest.get("tensors", {})
    if not isinstance(tensors, dict):
        raise bad("tensors", "a mapping", tensors)
    if not isinstance(tensors.get("file", ADAPTERS_FILE), str):
        raise bad("tensors.file", "a file name", tensors.get("file"))
    digest = tensors.get("sha256")
    if digest is not None and not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise bad("tensors.sha256", "a SHA-256 as 64 lowercase hex digits", digest)
    aliases = tensors.get("aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise bad("tensors.aliases", "a mapping of tensor names to tensor names", aliases)
    base = manifest.get("base", {})
    if not isinstance(base, dict):
        raise bad("base", "a mapping", base)
    params = base.get("parameters", {})
    if not isinstance(params, dict) or not all(
            isinstance(k, str) and isinstance(v, list) and all(isinstance(d, int) and not isinstance(d, bool)
                                                              for d in v) for k, v in params.items()):
        raise bad("base.parameters", "a mapping of parameter names to shapes (lists of ints)", params)
    active = manifest.get("active")
    if active is not None and not isinstance(active, (str, list, dict)):
        raise bad("active", "null, a name, a list of names or a composition", active)
    if isinstance(active, list) and not all(isinstance(a, str) for a in active):
        raise bad("active", "a list of adapter names", active)


def _inside(directory: Path, name: str, what: str) -> Path:
    """`directory / name`, refused unless it is a plain relative name that stays inside `directory`."""
    target = directory / name
    if Path(name).is_absolute() or ".." in Path(name).parts or "\x00" in name:
        raise CheckpointError(f"{what}: {name!r} is not a file name inside the checkpoint directory (absolute "
                              f"paths and '..' are refused)")
    try:
        inside = target.resolve().is_relative_to(directory.resolve())
    except (OSError, RuntimeError, ValueError):
        inside = False
    if not inside:
        raise CheckpointError(f"{what}: {name!r} leads outside the checkpoint directory {directory} (a symlink?)")
    return target


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_tensors(path: Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of `path`; when the manifest recorded the file's SHA-256 (surgery.save does), the file must
    have it: a byte changed in a tensor's data is not seen by safetensors' own header checks."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        tensors = load_file(str(path))
        if sha256 is not None and _sha256(path) != sha256:
            raise CheckpointError(f"{path} is not the file surgery.save wrote: altered, truncated or corrupt (its "
                                  f"SHA-256 differs from the one {MANIFEST_FILE} records)")
        return tensors
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a complete safetensors file (truncated or corrupt): {exc}") from None


def check_fits(manifest: dict, model: nn.Module) -> None:
    """Raise when the base model's parameter names and shapes differ from those the adapters were saved on."""
    saved = {name: tuple(shape) for name, shape in dict(manifest.get("base", {}).get("parameters", {})).items()}
    here = {name: tuple(p.shape) for name, p in _base_parameters(model)}
    other_shape = [n for n in saved if n in here and saved[n] != here[n]]
    missing = [n for n in saved if n not in here]
    extra = [n for n in here if n not in saved]
    if not (other_shape or missing or extra):
        return
    problems = []
    if other_shape:
        n = other_shape[0]
        problems.append(f"{len(other_shape)} parameter(s) of another shape (first: {n} is {list(here[n])} here, "
                        f"{list(saved[n])} in the saved base)")
    if missing:
        problems.append(f"{len(missing)} saved base parameter(s) missing here (first: {missing[0]})")
    if extra:
        problems.append(f"{len(extra)} parameter(s) here that the saved base lacks (first: {extra[0]})")
    raise CheckpointError(f"the base model ({type(model).__name__}) does not fit the saved adapters (saved on "
                          f"{manifest.get('base', {}).get('class', '?')}): " + "; ".join(problems)
                          + ". Pass strict=False to skip this check and only require every saved tensor to fit.")


def _match_tensors(saved: dict[str, torch.Tensor], aliases: dict[str, str],
                   live: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor, str]]:
    """Pair each live tensor of the re-applied surgery with its saved value; raise on any difference."""
    resolved = {key: aliases.get(key, key) for key in live}
    missing = [k for k, src in resolved.items() if src not in saved]
    unexpected = sorted(set(saved) - set(resolved.values()))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) of the re-applied spec are not in the file (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} saved tensor(s) have no place in this model (first: {unexpected[0]})")
        raise CheckpointError("the saved adapters do not fit this model's sites: " + "; ".join(parts))
    pairs = []
    for key, target in live.items():
        value = saved[resolved[key]]
        if tuple(value.shape) != tuple(target.shape):
            raise CheckpointError(f"{key}: saved shape {list(value.shape)} does not fit this model's "
                                  f"{list(target.shape)}")
        if value.dtype.is_floating_point != target.dtype.is_floating_point:
            raise CheckpointError(f"{key}: saved dtype {value.dtype} does not fit this model's {target.dtype}")
        pairs.append((target, value, key))
    return pairs


@unwrapping
def load(base_model: nn.Module, directory: str | os.PathLike, example_inputs: Any = None, *,
         strict: bool = True) -> nn.Module:
    """Re-apply the saved specs to `base_model` under their adapter names, load the saved tensors, return it.

    `example_inputs` are what `surgery.apply` needs for models without a transformers config. With `strict`
    (the default) the base model must have the parameter names and shapes the adapters were saved on; with
    `strict=False` only every saved tensor must fit the re-applied sites. On any error a `SurgeryError` is
    raised and the model is left as it was.
    """
    if not isinstance(directory, (str, os.PathLike)):
        raise CheckpointError(f"load needs a directory path, not {type(directory).__name__}")
    directory = Path(directory)
    manifest = read_manifest(directory)
    specs = []
    for entry in manifest["adapters"]:
        if "fusion" in entry:    # made again by add_fusion over the sets before it
            specs.append((entry["name"], entry["fusion"]))
            continue
        spec_path = _inside(directory, entry["spec"], f"{directory / MANIFEST_FILE}: spec")
        specs.append((entry["name"], load_spec(spec_path)))   # a SpecError names the file, line and column
    saved = _read_tensors(_inside(directory, manifest.get("tensors", {}).get("file", ADAPTERS_FILE),
                                  f"{directory / MANIFEST_FILE}: tensors.file"),
                          manifest.get("tensors", {}).get("sha256"))
    aliases = manifest.get("tensors", {}).get("aliases", {})
    if strict:
        check_fits(manifest, base_model)
    store = store_of(base_model)
    clash = [name for name, _ in specs if store is not None and name in store.records]
    if clash:
        raise CheckpointError(f"the model already has an adapter named {clash[0]!r}; remove it first")
    created_store = store is None

    applied: list[str] = []
    restore: list[tuple[torch.Tensor, torch.Tensor]] = []
    flags = [(p, p.requires_grad) for p in base_model.parameters()]
    modes = [(m, m.training) for m in base_model.modules()]
    try:
        for name, spec in specs:
            if isinstance(spec, dict):
                add_fusion(base_model, list(spec["adapters"]), name=name, dropout=float(spec.get("dropout", 0.0)))
            else:
                apply(base_model, spec, example_inputs=example_inputs, name=name)
            applied.append(name)
            store_of(base_model).adapters[name].train(base_model.training)   # new modules follow the model's mode
        prefixes = tuple(f"{name}/" for name in applied)   # adapters the model had before are not in the file
        live = {k: t for k, t in surgery_tensors(base_model).items() if k.startswith(prefixes)}
        pairs = _match_tensors(saved, aliases, live)
        with torch.no_grad():
            for target, value, key in pairs:
                if f"/{TRAINED}/" in key:
                    restore.append((target, target.detach().clone()))
                target.copy_(value)
        if created_store and manifest.get("active") is not None:
            set_active(base_model, manifest["active"])
    except BaseException as exc:   # Ctrl-C too
        with torch.no_grad():
            for target, original in restore:
                target.copy_(original)
        for name in reversed(applied):
            remove(base_model, name)
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode
        if isinstance(exc, SurgeryError) or not isinstance(exc, Exception):
            raise
        raise CheckpointError(f"loading {directory} failed: {type(exc).__name__}: {exc}") from exc
    return base_model
