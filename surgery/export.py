"""Deploying a rewritten model outside Python (ONNX, TorchScript, pt2) and drawing what the surgery changed.

The rewritten model is the user's own module with hooks and parametrizations, so every exporter sees the
adapters by running it: `torch.export` (pt2, and ONNX through torch's dynamo exporter) and `torch.jit.trace`
(TorchScript) both record the hooks' computation. A small wrapper calls the model with named tensor inputs
and returns plain tensors (a transformers `ModelOutput` becomes its non-None tensors, in order), and
transformers models are exported with `use_cache=False`. The user's model is left exactly as it was.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import os
import re
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

import surgery.api as api
from surgery.analyze.roles import op_name, stack_paths
from surgery.errors import SurgeryError
from surgery.progress import quiet_libraries, stage
from surgery.rewrite.host import STATE_ATTR, _WeightParam, store_of
from surgery.trace import trace
from surgery.trace.export import _split_inputs, derive_example_inputs, rng_devices
from surgery.rewrite.wrappers import unwrapping

FORMATS = ("onnx", "torchscript", "pt2")
BATCH, SEQUENCE = "batch", "sequence"


class ExportError(SurgeryError):
    """A model that cannot be exported as asked, or an export that does not reproduce the model."""


# ---------------------------------------------------------------- inputs and outputs as plain tensors

def _flatten(out: Any, prefix: str) -> list[tuple[str, torch.Tensor]]:
    """Named tensors of a model output: a tensor, a ModelOutput/dict (its non-None fields), or a tuple."""
    if isinstance(out, torch.Tensor):
        return [(prefix, out)]
    if isinstance(out, Mapping):
        items = []
        for key, value in out.items():
            items += _flatten(value, key if prefix == "output" else f"{prefix}_{key}")
        return items
    if isinstance(out, (tuple, list)):
        items = []
        for i, value in enumerate(out):
            items += _flatten(value, f"{prefix}_{i}")
        return items
    return []


class TensorModule(nn.Module):
    """Calls `model` with tensors given positionally (the first `positional` as positional arguments, the rest
    as the named keyword inputs) plus fixed non-tensor keyword inputs, and returns plain tensors."""

    def __init__(self, model: nn.Module, positional: int, keywords: list[str], fixed: dict):
        super().__init__()
        self.model = model
        self.positional = positional
        self.keywords = keywords
        self.fixed = fixed

    def forward(self, *tensors):
        args = tensors[:self.positional]
        kwargs = dict(zip(self.keywords, tensors[self.positional:]))
        tensors_out = [t for _, t in _flatten(self.model(*args, **kwargs, **self.fixed), "output")]
        return tensors_out[0] if len(tensors_out) == 1 else tuple(tensors_out)


class Prepared:
    """The wrapper, its example tensors, their names and dynamic axes, and the output names."""

    def __init__(self, model: nn.Module, example_inputs: Any, dynamic_axes: dict | None):
        if example_inputs is None:   # derived as for tracing (README: API), the model's RNG untouched
            with torch.random.fork_rng(devices=rng_devices(model)):
                example_inputs = derive_example_inputs(model)
        args, kwargs = _split_inputs(example_inputs)
        if any(not isinstance(a, torch.Tensor) for a in args):
            raise ExportError("positional example inputs must be tensors; pass other arguments as keywords")
        config = getattr(model, "config", None)
        if getattr(config, "use_cache", None) is not None and "use_cache" not in kwargs and _takes(model, "use_cache"):
            kwargs["use_cache"] = False   # a cache is not a tensor output, and exported graphs have no state
        tensor_kwargs = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        fixed = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
        self.names = _positional_names(model, len(args)) + list(tensor_kwargs)
        # contiguous: torch.export guards on the example's strides, so a sliced example (`ids[:, :n]`) gave a
        # program that refuses ordinary (contiguous) inputs
        self.tensors = tuple(t.contiguous() for t in tuple(args) + tuple(tensor_kwargs.values()))
        self.module = TensorModule(model, len(args), list(tensor_kwargs), fixed)
        self.axes = dynamic_axes if dynamic_axes is not None else {
            name: _default_axes(t) for name, t in zip(self.names, self.tensors)}
        unknown = set(self.axes) - set(self.names)
        if unknown:
            raise ExportError(f"dynamic_axes names {sorted(unknown)} are not inputs; inputs: {self.names}")
        with torch.no_grad():
            out = model(*args, **kwargs)
        named = _flatten(out, "output")
        if not named:
            raise ExportError(f"{type(model).__name__} returned no tensors to export")
        # an output field named like an input (a diffusers UNet takes and returns `sample`) gets `_output`:
        # ONNX names every value once
        self.output_names = [f"{n}_output" if n in self.names else n for n, _ in named]
        self.reference_shapes = [tuple(t.shape) for _, t in named]

    def dynamic_shapes(self, as_dims: bool) -> dict:
        """`{"tensors": (spec per input)}` for the wrapper's `*tensors`: axis names (ONNX) or Dim.DYNAMIC."""
        specs = []
        for name in self.names:
            axes = self.axes.get(name) or {}
            specs.append({int(d): (torch.export.Dim.DYNAMIC if as_dims else n) for d, n in axes.items()} or None)
        return {"tensors": tuple(specs)}

    def other_shapes(self) -> tuple[torch.Tensor, ...]:
        """The example tiled or cropped to another batch size and sequence length (token ids stay valid), with
        full attention masks (a fully masked query row's output is undefined, and exporters differ there), to
        check that an export is not specialized to the example's shapes."""
        sizes = {}
        for name, t in zip(self.names, self.tensors):
            for d, axis in (self.axes.get(name) or {}).items():
                n = t.shape[int(d)]
                sizes.setdefault(axis, n + 1 if axis == BATCH or n < 3 else n - 1)
        out = []
        for name, t in zip(self.names, self.tensors):
            for d, axis in (self.axes.get(name) or {}).items():
                d, n = int(d), sizes[axis]
                t = torch.cat([t] * -(-n // t.shape[d]), dim=d).narrow(d, 0, n)
            out.append(torch.ones_like(t) if "mask" in name else t.clone())
        return tuple(out)


def _takes(model: nn.Module, name: str) -> bool:
    params = inspect.signature(model.forward).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _positional_names(model: nn.Module, count: int) -> list[str]:
    names = []
    for p in inspect.signature(model.forward).parameters.values():
        if len(names) == count:
            break
        if p.kind is p.VAR_POSITIONAL:
            names += [f"{p.name}_{i}" for i in range(count - len(names))]
        elif p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
    return names + [f"input_{i}" for i in range(len(names), count)]


def _default_axes(t: torch.Tensor) -> dict[int, str]:
    """Dim 0 is the batch of every input; dim 1 the sequence of token-like (integer or bool) 2-D+ inputs."""
    axes = {}
    if t.dim() >= 1:
        axes[0] = BATCH
    if t.dim() >= 2 and not t.is_floating_point():
        axes[1] = SEQUENCE
    return axes


# ---------------------------------------------------------------- the user's model, unchanged

@contextlib.contextmanager
def _exporting(model: nn.Module, merge: bool) -> Iterator[None]:
    """Eval mode (dropout off) and, with `merge`, foldable adapters merged; everything restored afterwards."""
    import surgery
    training = [(m, m.training) for m in model.modules()]
    merge_fn, unmerge_fn = getattr(surgery, "merge", None), getattr(surgery, "unmerge", None)
    store = store_of(model)
    merged: list[str] = []
    model.eval()
    try:
        if merge and store is not None and callable(merge_fn) and callable(unmerge_fn):
            already = store.__dict__.get("merge_states", {})   # adapters the user merged stay merged
            active = store.runtime.active
            composition = store.runtime.composition
            if composition is not None and type(composition).__name__ != "Stack":
                active = []   # a combining block (Average, BatchSplit, ...) is exported as it runs, unmerged
            for name in [n for n in store.records if (active is None or n in active) and n not in already]:
                merge_fn(model, name)
                merged.append(name)
        with torch.no_grad():
            yield
    finally:
        for name in reversed(merged):
            unmerge_fn(model, name)
        for m, flag in training:
            m.training = flag


def _quiet():
    """torch's exporters print progress and warn about tracing; a library call should not."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


@unwrapping
def export(model: nn.Module, path: str | os.PathLike, *, example_inputs: Any = None, format: str = "onnx",
           merge: bool = True, dynamic_axes: dict[str, dict[int, str]] | None = None, verify: bool = True) -> Path:
    """Export the rewritten model to `path` as ONNX, TorchScript or a pt2 archive; return the path.

    - `onnx`: torch's dynamo exporter; inputs named as the model takes them (`input_ids`, `attention_mask`, or
      the forward's positional parameter names), outputs named after the output fields (`logits`, ...; a field
      named like an input gets `_output`, e.g. a diffusers UNet's `sample` → `sample_output`).
    - `torchscript`: `torch.jit.trace`. Tracing records one run: sizes the code reads with tensor ops stay
      symbolic, but anything Python computes from a shape (branches, loops, ints passed to non-tensor code)
      is frozen to the example's shapes. With `verify` such a trace is caught (ExportError); pass
      `verify=False` to keep a module that only runs at the example's shapes.
    - `pt2`: `torch.export.save` of `torch.export.export(..., strict=False)`; load with `torch.export.load`.

    `dynamic_axes` maps input names to `{dim: axis name}`; by default dim 0 of every input is `batch` and dim 1
    of integer inputs (token ids, masks) is `sequence` (exported sizes start at 2: torch specializes 0 and 1).
    `merge=True` folds mergeable adapters (LoRA, IA3) into the base weights first, so the exported graph is
    the base graph with new weights; they are unmerged afterwards. `verify` loads the artifact and checks it
    against the model at another batch size and sequence length (ONNX: with onnxruntime, when installed).
    The model's mode, weights and adapters are left as they were.
    """
    if format not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, not {format!r}")
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"{path} is a directory; export writes a file (e.g. {path / ('model.' + format)})")
    created = _make_parent(path)
    try:
        return _export(model, path, example_inputs, format, merge, dynamic_axes, verify)
    except BaseException:
        for directory in created:     # a failed export leaves no directory it made
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise


def _make_parent(path: Path) -> list[Path]:
    """Create `path`'s missing parent directories; return them, innermost first. ExportError when one cannot
    be made (a file stands where a directory should be, no permission)."""
    missing = [d for d in path.parent.absolute().parents][::-1] + [path.parent.absolute()]
    missing = [d for d in missing if not d.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create the directory {path.parent} for {path.name}: "
                          f"{exc.strerror or exc}") from None
    return missing[::-1]


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _one_line(exc: BaseException) -> str:
    """`Type: first line` of an exception and of its innermost cause (torch.onnx's errors run to dozens of
    lines with terminal colours; the full chain stays on the raised error's __cause__)."""
    def line(e: BaseException) -> str:
        text = _ANSI.sub("", str(e)).strip().splitlines()
        return f"{type(e).__name__}: {text[0][:500] if text else ''}"
    root = exc
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    return line(exc) if root is exc else f"{line(exc)} (caused by {line(root)})"


def _export(model, path: Path, example_inputs, format: str, merge: bool, dynamic_axes, verify: bool) -> Path:
    with stage(f"export {type(model).__name__} as {format} to {path}"), _exporting(model, merge):
        prepared = Prepared(model, example_inputs, dynamic_axes)
        staging = path.parent / f".{path.name}.partial"   # the file keeps its name (ONNX external data refer to it)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            with stage(f"{format} exporter"), quiet_libraries():
                _EXPORTERS[format](prepared, staging / path.name)
            if verify:
                runner = "onnxruntime" if format == "onnx" else "torch"
                with stage(f"verify the {format} file in {runner}"), quiet_libraries():
                    _verify(format, staging / path.name, prepared)
            for produced in staging.iterdir():
                os.replace(produced, path.parent / produced.name)
        except SurgeryError:
            raise
        except Exception as exc:  # noqa: BLE001 - any exporter failure becomes one clear error
            raise ExportError(f"{format} export of {type(model).__name__} failed: {_one_line(exc)}") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return path


def _export_program(prepared: Prepared) -> torch.export.ExportedProgram:
    with _quiet():
        return torch.export.export(prepared.module, prepared.tensors, dynamic_shapes=prepared.dynamic_shapes(True),
                                   strict=False)


def _to_onnx(prepared: Prepared, path: Path) -> None:
    large = sum(p.numel() * p.element_size() for p in prepared.module.parameters()) > 1_500_000_000
    # parametrized weights computed once, before the trace, and exported as the tensors they are: ONNX has no
    # function for some parametrizations' ops (LoReFT's orthonormal R is a QR)
    with _quiet(), parametrize.cached():
        for module in prepared.module.modules():
            if parametrize.is_parametrized(module):
                for name in module.parametrizations:
                    getattr(module, name)
        torch.onnx.export(prepared.module, prepared.tensors, str(path), input_names=prepared.names,
                          output_names=prepared.output_names, dynamic_shapes=prepared.dynamic_shapes(False),
                          dynamo=True, external_data=large, verbose=False)


def _to_torchscript(prepared: Prepared, path: Path) -> None:
    # torch.jit.trace names the traced forward's arguments after the forward's signature; the wrapper's
    # `*tensors` has none, so they would be named after whatever local variable first held each tensor inside
    # the model ("input", "input0"): give the forward the inputs' names for the trace
    module = prepared.module
    names = prepared.names
    if all(n.isidentifier() for n in names) and len(set(names)) == len(names):
        def forward(*tensors):
            return TensorModule.forward(module, *tensors)
        forward.__signature__ = inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names])
        module.forward = forward
    try:
        with _quiet():
            traced = torch.jit.trace(module, prepared.tensors, strict=False, check_trace=False)
            torch.jit.save(traced, str(path))
    finally:
        module.__dict__.pop("forward", None)


def _to_pt2(prepared: Prepared, path: Path) -> None:
    program = _export_program(prepared)
    with _quiet():
        torch.export.save(program, str(path))


_EXPORTERS = {"onnx": _to_onnx, "torchscript": _to_torchscript, "pt2": _to_pt2}


def run_artifact(format: str, path: str | os.PathLike, inputs: tuple[torch.Tensor, ...],
                 names: list[str] | None = None) -> list[torch.Tensor]:
    """Run an exported file on `inputs` and return its outputs as tensors (ONNX needs onnxruntime)."""
    path = str(path)
    if format == "onnx":
        import onnxruntime
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        names = names or [i.name for i in session.get_inputs()]
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)}
        return [torch.from_numpy(o) for o in session.run(None, feeds)]
    with _quiet():
        if format == "torchscript":
            out = torch.jit.load(path)(*inputs)
        elif format == "pt2":
            out = torch.export.load(path).module()(*inputs)
        else:
            raise ExportError(f"unknown format {format!r}")
    return [out] if isinstance(out, torch.Tensor) else list(out)


def _verify(format: str, path: Path, prepared: Prepared, tolerance: float = 1e-4) -> None:
    if format == "onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            warnings.warn("onnxruntime is not installed: the ONNX export was not verified")
            return
    inputs = prepared.other_shapes()
    shapes = ", ".join(f"{n}={list(t.shape)}" for n, t in zip(prepared.names, inputs))
    expected = prepared.module(*inputs)
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    try:
        got = run_artifact(format, path, inputs, prepared.names)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(_specialized(format, shapes, f"fails: {type(exc).__name__}: {str(exc)[:500]}")) from exc
    for name, e, g in zip(prepared.output_names, expected, got):
        if tuple(e.shape) != tuple(g.shape):
            raise ExportError(_specialized(format, shapes, f"gives {name} of shape {list(g.shape)}, "
                                                           f"not {list(e.shape)}"))
        error = (e.float() - g.float()).abs().max().item()
        if not error <= tolerance * max(1.0, e.float().abs().max().item()):
            raise ExportError(_specialized(format, shapes, f"differs from the model by {error:.3g} in {name}"))


def _specialized(format: str, shapes: str, what: str) -> str:
    if format == "torchscript":
        return (f"the TorchScript trace is specialized to the example's shapes: at {shapes} it {what}. "
                f"torch.jit.trace freezes what Python computes from shapes; export with format='onnx' or 'pt2' "
                f"for dynamic shapes, or pass verify=False to keep a module for the example's shapes only")
    return f"the exported {format} model does not reproduce the model: at {shapes} it {what}"


# ---------------------------------------------------------------- drawing one layer, before and after

SHAPE_OPS = {"view", "reshape", "_unsafe_view", "transpose", "permute", "contiguous", "clone", "alias", "expand",
             "unsqueeze", "squeeze", "getitem", "t", "flatten", "unflatten", "_assert_tensor_metadata", "to",
             "_to_copy", "detach", "lift_fresh_copy", "dropout", "split", "chunk", "select", "slice",
             "sym_size", "item", "type_as", "float", "_assert_scalar", "sym_constrain_range_for_size"}


def _adapter_paths(model: nn.Module) -> set[str]:
    """Module paths whose computation is surgery's: the adapter store and surgery's weight parametrizations."""
    return {name for name, m in model.named_modules() if isinstance(m, _WeightParam)} | {STATE_ATTR}


def _in(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def _label(node: fx.Node, block: str) -> tuple[str, bool, str | None]:
    """(label, from surgery?, the adapter's site path or None) of a graph node."""
    paths = stack_paths(node)
    adapter = next((p for p in paths if _in(p, STATE_ATTR)), None)
    where = paths[-1] if paths else ""
    if adapter is not None:
        parts = where.split(".")[2:]   # drop "surgery_adapters.adapters"
        site = ".".join(parts[:3])
        inner = ".".join(parts[3:])
        return f"{op_name(node)}\n{'/'.join(parts[:2])}{' ' + inner if inner else ''}", True, site
    where = where[len(block) + 1:] if where.startswith(block + ".") else where
    return f"{op_name(node)}\n{where}" if where else op_name(node), False, None


def layer_graph(traced, block: str, surgery_paths: set[str]):
    """The ops of one layer as a networkx DiGraph, with shape-only ops contracted and the values entering and
    leaving the layer as `input`/`output` nodes. Node attributes: label, surgery (bool), site, op."""
    import networkx as nx

    weights = set(traced.params) | set(traced.buffers)
    kept = [n for n in traced.graph.nodes
            if n.op == "call_function" and any(_in(p, block) for p in stack_paths(n))]
    names = {n.name for n in kept}
    g = nx.DiGraph()
    for n in kept:
        label, adapter, site = _label(n, block)
        parametrized = any(_in(p, s) for p in stack_paths(n) for s in surgery_paths)
        g.add_node(n.name, label=label, surgery=adapter or parametrized, op=op_name(n),
                   site=site or (_weight_site(n) if parametrized else None))
    for n in kept:
        for src in n.all_input_nodes:
            if src.name in names:
                g.add_edge(src.name, n.name)
            elif src.op != "get_attr" and src.name not in weights:
                entry = f"in:{src.name}"
                g.add_node(entry, label=f"input\n{op_name(src) if src.op == 'call_function' else src.name}", surgery=False, site=None, op="input")
                g.add_edge(entry, n.name)
        if any(u.name not in names for u in n.users):
            g.add_node(f"out:{n.name}", label="output", surgery=False, site=None, op="output")
            g.add_edge(n.name, f"out:{n.name}")
    for node in [n for n, d in g.nodes(data=True) if d["op"] in SHAPE_OPS]:
        for a in list(g.predecessors(node)):
            for b in list(g.successors(node)):
                if a != b:
                    g.add_edge(a, b)
        g.remove_node(node)
    g.remove_nodes_from([n for n in list(g.nodes) if g.degree(n) == 0])
    return g


def _weight_site(node: fx.Node) -> str | None:
    for p in stack_paths(node):
        if ".parametrizations." in p:
            return p.split(".parametrizations.")[0]
    return None


def layer_graphs(model: nn.Module, example_inputs: Any = None, layer: int = 0):
    """(before, after, block path): one layer of the base graph and of the rewritten graph, as networkx graphs."""
    analysis = api._analysis(model, example_inputs)   # the base's, as apply analyzed it (or the trace cache)
    base, blocks = analysis.traced, analysis.blocks
    if not blocks:
        raise SurgeryError(f"{type(model).__name__} has no layers (repeated blocks holding an attention op) to draw")
    if not -len(blocks) <= layer < len(blocks):
        raise SurgeryError(f"layer {layer} is out of range: the model has {len(blocks)} layers")
    block = blocks[layer]
    paths = _adapter_paths(model)
    before = layer_graph(base, block, paths)
    after = layer_graph(trace(model, example_inputs), block, paths) if store_of(model) is not None else before
    return before, after, block


@unwrapping
def draw(model: nn.Module, path: str | os.PathLike, *, example_inputs: Any = None, layer: int = 0,
         backend: str = "auto") -> Path:
    """Draw one layer of the model before and after surgery, surgery's nodes highlighted; return the path.

    The rewritten model is traced with `torch.export`; the layer's ops are kept (shape-only ops contracted)
    and nodes that come from the adapters (their module stack passes through `surgery_adapters` or one of
    surgery's weight parametrizations) are filled orange and grouped by site. The file type follows the
    suffix (.svg, .png, .pdf). `backend`: "graphviz" (needs the `dot` program and `pip install graphviz`),
    "matplotlib" (networkx layout, `pip install matplotlib`), or "auto" (graphviz when available).
    """
    path = Path(path)
    backend = _backend(backend)
    with stage(f"draw layer {layer} of {type(model).__name__} to {path}"):
        before, after, block = layer_graphs(model, example_inputs, layer)
        path.parent.mkdir(parents=True, exist_ok=True)
        title = f"{type(model).__name__} · {block}"
        with stage(f"render with {backend}"), quiet_libraries("matplotlib"):
            if backend == "graphviz":
                _draw_graphviz(before, after, title, path)
            else:
                _draw_matplotlib(before, after, title, path)
    return path


def _backend(backend: str) -> str:
    if backend not in ("auto", "graphviz", "matplotlib"):
        raise SurgeryError(f"backend must be auto, graphviz or matplotlib, not {backend!r}")
    has_graphviz = shutil.which("dot") is not None and _importable("graphviz")
    if backend == "graphviz" and not has_graphviz:
        raise SurgeryError("the graphviz backend needs the `dot` program (e.g. apt-get install graphviz) and the "
                           "Python binding (pip install graphviz)")
    if backend == "auto":
        backend = "graphviz" if has_graphviz else "matplotlib"
    if backend == "matplotlib" and not _importable("matplotlib"):
        raise SurgeryError("drawing needs Graphviz (`dot` and pip install graphviz) or matplotlib "
                           "(pip install matplotlib); neither is available")
    return backend


def _importable(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


SURGERY_FILL, BASE_FILL, IO_FILL = "#f59e0b", "#e5edf7", "#ffffff"


def _draw_graphviz(before, after, title: str, path: Path) -> None:
    import graphviz

    ids: dict[tuple[str, str], str] = {}

    def node_id(prefix: str, n: str) -> str:   # plain ids: dot reads `a:b` as node a, port b
        return ids.setdefault((prefix, n), f"{prefix}{len(ids)}")

    dot = graphviz.Digraph(graph_attr={"label": title, "labelloc": "t", "fontname": "Helvetica", "rankdir": "TB",
                                       "newrank": "true"},
                           node_attr={"shape": "box", "style": "rounded,filled", "fontname": "Helvetica",
                                      "fontsize": "10"},
                           edge_attr={"arrowsize": "0.6"})
    for prefix, g, caption in (("b", before, "before"), ("a", after, "after (surgery highlighted)")):
        with dot.subgraph(name=f"cluster_{prefix}") as view:
            view.attr(label=caption, style="dashed")
            sites: dict[str, list[str]] = {}
            for n, d in g.nodes(data=True):
                fill = SURGERY_FILL if d["surgery"] else IO_FILL if d["op"] in ("input", "output") else BASE_FILL
                shape = "ellipse" if d["op"] in ("input", "output") else "box"
                attrs = {"class": "surgery"} if d["surgery"] else {}
                if d["surgery"] and d["site"]:
                    sites.setdefault(d["site"], []).append(node_id(prefix, n))
                view.node(node_id(prefix, n), d["label"], fillcolor=fill, shape=shape, **attrs)
            for i, (site, members) in enumerate(sites.items()):
                with view.subgraph(name=f"cluster_{prefix}_site{i}") as box:
                    box.attr(label=site, style="rounded", color=SURGERY_FILL, fontsize="9")
                    for member in members:
                        box.node(member)
            for a, b in g.edges:
                view.edge(node_id(prefix, a), node_id(prefix, b))
    fmt = path.suffix.lstrip(".") or "svg"
    path.write_bytes(dot.pipe(format=fmt))


def _draw_matplotlib(before, after, title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig = matplotlib_figure(before, after, title)
    try:
        fig.savefig(path, format=path.suffix.lstrip(".") or "svg")
    finally:
        plt.close(fig)


LABEL_POINTS = 9                      # the labels' font size; the figure grows to fit them
CHAR_INCHES = 0.62 * LABEL_POINTS / 72   # a DejaVu Sans character is about 0.6 em wide
LINE_INCHES = 1.2 * LABEL_POINTS / 72    # matplotlib's default line spacing
PAD_INCHES = 0.3 * LABEL_POINTS / 72     # the label box's padding (boxstyle pad=0.3)
GAP_INCHES, ROW_INCHES, MARGIN_INCHES = 0.3, 0.45, 0.4


def _layout(g) -> tuple[dict, dict, float, float]:
    """Positions in inches (x right, y down from 0): one row per topological generation, boxes of each row side
    by side in the order of their predecessors (fewer crossings), rows centred. Returns (pos, box sizes, width,
    height)."""
    import networkx as nx

    sizes = {n: (max(len(line) for line in d["label"].split("\n")) * CHAR_INCHES + 2 * PAD_INCHES,
                 len(d["label"].split("\n")) * LINE_INCHES + 2 * PAD_INCHES) for n, d in g.nodes(data=True)}
    pos: dict = {}
    rows = [list(r) for r in nx.topological_generations(g)] if len(g) else []
    y, width = 0.0, 0.0
    for row in rows:
        row.sort(key=lambda n: (sum(pos[p][0] for p in g.predecessors(n)) / max(1, g.in_degree(n)), str(n)))
        total = sum(sizes[n][0] for n in row) + GAP_INCHES * (len(row) - 1)
        height = max(sizes[n][1] for n in row)
        x = -total / 2
        for n in row:
            pos[n] = (x + sizes[n][0] / 2, y + height / 2)
            x += sizes[n][0] + GAP_INCHES
        width = max(width, total)
        y += height + ROW_INCHES
    return pos, sizes, width, max(y - ROW_INCHES, 0.0)


def matplotlib_figure(before, after, title: str):
    """The two layer graphs side by side as a matplotlib Figure: labels at LABEL_POINTS in boxes that never
    overlap (the figure is sized in inches to fit them), arrows from box edge to box edge."""
    import matplotlib.pyplot as plt

    layouts = [_layout(before), _layout(after)]
    widths = [max(w, 2.0) for _, _, w, _ in layouts]
    height = max(h for _, _, _, h in layouts) + 2 * MARGIN_INCHES
    fig_w = sum(widths) + 3 * MARGIN_INCHES
    fig_h = height + 1.4   # room for the captions and the title above the graphs
    fig = plt.figure(figsize=(fig_w, fig_h))
    left = MARGIN_INCHES
    for (pos, sizes, _, _), width, g, caption in zip(layouts, widths, (before, after),
                                              ("before", "after (surgery highlighted)")):
        ax = fig.add_axes((left / fig_w, MARGIN_INCHES / fig_h, width / fig_w, height / fig_h))
        ax.set_xlim(-width / 2, width / 2)
        ax.set_ylim(height - MARGIN_INCHES, -MARGIN_INCHES)   # y grows downwards, 1 unit = 1 inch
        ax.axis("off")
        ax.set_title(caption, fontsize=LABEL_POINTS + 2)
        for n, d in g.nodes(data=True):
            fill = SURGERY_FILL if d["surgery"] else IO_FILL if d["op"] in ("input", "output") else BASE_FILL
            style = "round,pad=0.3" if d["op"] in ("input", "output") else "square,pad=0.3"
            ax.text(*pos[n], d["label"], ha="center", va="center", fontsize=LABEL_POINTS, zorder=2,
                               bbox={"boxstyle": style, "facecolor": fill, "edgecolor": "#333333", "linewidth": 0.8})
        for a, b in g.edges:   # from the bottom of a's box to the top of b's (b is in a later row)
            start = (pos[a][0], pos[a][1] + sizes[a][1] / 2)
            end = (pos[b][0], pos[b][1] - sizes[b][1] / 2)
            skips = end[1] - start[1] > ROW_INCHES + 1e-6   # bends around the boxes between (behind them anyway)
            ax.annotate("", xy=end, xytext=start, zorder=1,
                        arrowprops={"arrowstyle": "-|>,head_length=0.5,head_width=0.25", "color": "#555555",
                                    "linewidth": 0.8, "shrinkA": 0, "shrinkB": 0,
                                    "connectionstyle": f"arc3,rad={-0.3 if skips else 0.0}"})
        left += width + MARGIN_INCHES
    fig.suptitle(title, fontsize=LABEL_POINTS + 3, y=1 - 0.25 / fig_h, va="top")
    return fig


def _depth(g) -> int:
    import networkx as nx
    return len(list(nx.topological_generations(g))) if len(g) else 0
