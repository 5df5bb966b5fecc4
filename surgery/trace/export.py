"""The front end: `torch.export` (non-strict) of the model, with every module's tensor inputs and outputs marked.

While exporting, temporary hooks wrap each module's top-level tensor inputs and outputs in an identity op
`surgery::mark` tagged with the module path and position. After tracing the marks are folded away and remembered
as `Boundary` records on the value nodes, so analysis knows exactly which graph value is which module's input or
output. That is what lets a rewrite found on the graph be realized on the host model itself.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import json
import os
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from surgery.errors import SurgeryError
from surgery.progress import logger, quiet_libraries, stage
from surgery.trace import unroll


@torch.library.custom_op("surgery::mark", mutates_args=())
def _mark(x: torch.Tensor, tag: str) -> torch.Tensor:
    return x.clone()


@_mark.register_fake
def _(x, tag):
    return torch.empty_like(x)


@dataclass(frozen=True, slots=True)
class Boundary:
    """A value's place at a module boundary: `side` is "in" or "out"; `loc` says where in the call.

    loc: ("arg", i) or ("kwarg", name) for inputs; () for a tensor output, ("item", i) for a tuple element,
    ("key", name) for a dict/ModelOutput field. `call`: which call of the module in one forward (0 for the first;
    a module called N times, such as ALBERT's shared layer, has N boundaries on each side).
    """

    module: str
    side: str
    loc: tuple
    call: int = 0
    calls: int = 1      # how many times the module is called in one forward


@dataclass
class Traced:
    graph: fx.Graph
    boundaries: dict[fx.Node, list[Boundary]]      # value node -> boundaries, innermost module first
    params: dict[str, str]                          # placeholder name -> qualified parameter name
    buffers: dict[str, str]
    calls: dict[str, int]                           # module path -> how many times it was called
    module_types: dict[str, type]
    constants: dict[str, torch.Tensor] = field(default_factory=dict)   # placeholder name -> lifted constant
    stack_traces: bool = True    # nodes carry `stack_trace` (torch.export recorded their source lines)


class NeedsStackTraces(Exception):
    """Raised by a rewrite that needs the nodes' source lines (surgery/rewrite/torchcalls.py) of a graph traced
    without them: `surgery.apply` traces again with them and starts over. Never reaches the user."""


def _is_marked(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _install_marks(model: nn.Module, calls: dict):
    handles = []
    running: dict[str, list[int]] = defaultdict(list)    # module -> call indices of its forwards now running
    for name, module in model.named_modules():
        if not name:
            continue

        def pre(mod, args, kwargs, name=name):
            call = calls[name]
            calls[name] += 1
            running[name].append(call)
            args = tuple(_mark(a, json.dumps([name, "in", ["arg", i], call])) if _is_marked(a) else a
                         for i, a in enumerate(args))
            kwargs = {k: _mark(v, json.dumps([name, "in", ["kwarg", k], call])) if _is_marked(v) else v
                      for k, v in kwargs.items()}
            return args, kwargs

        def post(mod, args, out, name=name):
            call = running[name].pop() if running[name] else 0
            if _is_marked(out):
                return _mark(out, json.dumps([name, "out", [], call]))
            if isinstance(out, tuple) and not hasattr(out, "_fields"):
                return tuple(_mark(o, json.dumps([name, "out", ["item", i], call])) if _is_marked(o) else o
                             for i, o in enumerate(out))
            if isinstance(out, dict):
                for k in list(out.keys()):
                    if _is_marked(out[k]):
                        out[k] = _mark(out[k], json.dumps([name, "out", ["key", k], call]))
            return out

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post))
    return handles


def default_example_inputs(model: nn.Module, batch: int = 2, seq: int = 8):
    """Inputs for models that carry a transformers-style config (token ids, pixels or audio features, by what the
    forward takes and the config says); None when we cannot tell. Drawn from a private generator: the user's RNG
    is not touched."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    generator = torch.Generator().manual_seed(0)

    def floats(*shape):
        return torch.randn(*shape, generator=generator).to(device) if device.type != "meta" else \
            torch.zeros(*shape, device=device)
    vocab = getattr(config, "vocab_size", None)
    kwargs = {}
    if "pixel_values" in params and getattr(config, "image_size", None):
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        kwargs["pixel_values"] = floats(batch, getattr(config, "num_channels", 3), size, size)
    elif "input_features" in params and getattr(config, "num_mel_bins", None):
        frames = 2 * getattr(config, "max_source_positions", seq)
        kwargs["input_features"] = floats(batch, config.num_mel_bins, frames)
    elif "input_values" in params and "input_ids" not in params:
        kwargs["input_values"] = floats(batch, 1024)
    elif vocab:
        kwargs["input_ids"] = (torch.randint(0, vocab, (batch, seq), generator=generator).to(device)
                               if device.type != "meta" else torch.zeros(batch, seq, dtype=torch.long, device=device))
    else:
        return None
    if getattr(config, "is_encoder_decoder", False) and vocab:
        kwargs["decoder_input_ids"] = torch.zeros(batch, max(2, seq // 2), dtype=torch.long, device=device) + 1
    if getattr(config, "use_cache", None) is not None and "use_cache" in params:
        kwargs["use_cache"] = False
    return kwargs


def _without_cache(model: nn.Module, kwargs: dict) -> dict:
    """Tracing never builds a KV cache (torch.export cannot return one): `use_cache=False` where the forward
    takes it and the caller did not say, by name or through `**kwargs` passed on to a model whose config has
    `use_cache` (transformers' GraniteMoE: the head's forward forwards it to the base model's)."""
    if "use_cache" in kwargs:
        return kwargs
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return kwargs
    if "use_cache" in params:
        return {**kwargs, "use_cache": False}
    if (getattr(getattr(model, "config", None), "use_cache", None) is not None
            and any(p.kind is p.VAR_KEYWORD for p in params.values())):
        return {**kwargs, "use_cache": False}
    return kwargs
def derive_example_inputs(model: nn.Module, batch: int = 2, seq: int = 8):
    """Example inputs for a model given none: the model's own `example_inputs()` if it has one; for a model
    with a transformers config, token ids of its vocabulary; else a tensor for the forward's one required
    argument, shaped for the first module (in registration order) that can consume it: an nn.Embedding takes
    token ids [batch, seq], an nn.Linear / nn.LayerNorm a float tensor [batch, seq, in_features], an nn.ConvNd a
    float tensor [batch, in_channels, *spatial]. The candidate is checked by running the model on it.

    Raises SurgeryError saying why when none of this can work (several required arguments, no such module, or
    the model refusing the derived tensor). The user's RNG is not touched (callers fork it)."""
    own = getattr(model, "example_inputs", None)
    if callable(own):
        return own()
    derived = default_example_inputs(model, batch, seq)
    if derived is not None:
        return derived
    import inspect
    name = type(model).__name__
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p.name for p in params if p.default is p.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    ask = (f"pass example_inputs= (a tensor, a tuple of args or a dict of kwargs that {name}.forward takes), or "
           f"give {name} an example_inputs() method")
    if not positional:
        raise SurgeryError(f"example_inputs are required: {name}.forward takes no positional argument to derive "
                           f"an input for; {ask}")
    if len(required) > 1:
        raise SurgeryError(f"example_inputs are required: {name}.forward needs {len(required)} arguments "
                           f"({', '.join(required)}) and surgery derives only the first; {ask}")
    try:
        ref = next(model.parameters())
        device, dtype = ref.device, (ref.dtype if ref.is_floating_point() else torch.get_default_dtype())
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.get_default_dtype()
    generator = torch.Generator().manual_seed(0)
    candidates = []
    for path, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            candidates.append((path, module, [torch.randint(0, module.num_embeddings, (batch, seq),
                                                            generator=generator)]))
        elif isinstance(module, nn.Linear):
            candidates.append((path, module, [torch.randn(batch, seq, module.in_features, generator=generator),
                                              torch.randn(batch, module.in_features, generator=generator)]))
        elif isinstance(module, nn.LayerNorm) and module.normalized_shape:
            candidates.append((path, module, [torch.randn(batch, seq, *module.normalized_shape,
                                                          generator=generator)]))
        elif isinstance(module, nn.modules.conv._ConvNd):
            dims = len(module.kernel_size)
            size = max(32 if dims < 3 else 8, *(k * d for k, d in zip(module.kernel_size, module.dilation)))
            candidates.append((path, module, [torch.randn(batch, module.in_channels, *[size] * dims,
                                                          generator=generator)]))
        if candidates:
            break
    if not candidates:
        raise SurgeryError(f"example_inputs are required: {name} has no nn.Embedding, nn.Linear, nn.LayerNorm or "
                           f"nn.ConvNd to size an input for {positional[0].name!r}; {ask}")
    path, module, tensors = candidates[0]
    errors = []
    was_training = model.training
    try:
        model.eval()
        for tensor in tensors:
            tensor = tensor.to(device=device, dtype=torch.long if not tensor.is_floating_point() else dtype)
            try:
                with torch.no_grad():
                    model(tensor)
                return (tensor,)
            except Exception as exc:  # noqa: BLE001 - the next candidate, or the reason in the error below
                errors.append(f"{list(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}: "
                              f"{type(exc).__name__}: {exc}")
    finally:
        model.train(was_training)
    raise SurgeryError(f"example_inputs are required: surgery sized {positional[0].name!r} for {path} "
                       f"({type(module).__name__}), but {name} refused it ({'; '.join(errors)}); {ask}")


def _split_inputs(example_inputs) -> tuple[tuple, dict]:
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        if len(example_inputs) == 2 and isinstance(example_inputs[0], (tuple, list)) and isinstance(example_inputs[1], dict):
            return tuple(example_inputs[0]), dict(example_inputs[1])
        return tuple(example_inputs), {}
    raise SurgeryError(f"example_inputs must be a tensor, a tuple, a dict or (args, kwargs); got {type(example_inputs).__name__}")


FULL_TRACE_ENV = "SURGERY_FULL_TRACE"


def trace(model: nn.Module, example_inputs=None, *, full: bool | None = None, stack_traces: bool = False) -> Traced:
    """Export `model` with marks and return the canonical graph. The model is not changed, and neither is the
    user's random state (tracing runs the forward: dropout, random example inputs).

    Repeated layers are exported once per kind and unrolled (surgery/trace/unroll.py): the graph is the one a full
    export gives. `full=True`, or the environment variable `SURGERY_FULL_TRACE=1`, exports every layer.
    `stack_traces`: record each node's source lines (`meta["stack_trace"]`, about a quarter of the export's time),
    which only the interception of torch-level calls reads (a rewrite that needs them raises NeedsStackTraces)."""
    if full is None:
        full = os.environ.get(FULL_TRACE_ENV, "") not in ("", "0")
    with torch.random.fork_rng(devices=rng_devices(model)):
        return _trace(model, example_inputs, full, stack_traces)


def rng_devices(model: nn.Module) -> list:
    """The accelerator devices whose RNG a forward of `model` may draw from (fork_rng forks only these). Without
    a CUDA context in this process no tensor can be on a CUDA device: no walk of the model's tensors then."""
    if not torch.cuda.is_initialized():
        return []
    devices = {t.device for m in model.modules() for table in (m._parameters, m._buffers)
               for t in table.values() if t is not None}
    return sorted({d.index or 0 for d in devices if d.type == "cuda"})


def _lazy_graph_modules():
    """Graph modules made while exporting generate their Python code only when run or printed: torch.export
    regenerates the code of the whole graph after each of its passes (about a sixth of the export of a two-layer
    LLaMA), and surgery reads the graph, never that code (the ExportedProgram's own module is still compiled).
    The graph is the same either way. torch's switch for this (what torch.compile uses) is private: where this torch
    lacks it, a no-op. It is torch's process-wide flag for the duration of the export, restored after it (a graph
    module another thread makes meanwhile is lazy too: it generates its code when first run)."""
    try:
        from torch.fx._lazy_graph_module import _use_lazy_graph_module
        return _use_lazy_graph_module(True)
    except (ImportError, AttributeError, TypeError):
        return contextlib.nullcontext()


def _export_marked(model: nn.Module, args, kwargs, what: str, stack_traces: bool = True, watch=None):
    """torch.export of `model` with its module marks: (program, calls). Without `stack_traces` the nodes get no
    `stack_trace` (recording them is about a quarter of the export's time; only torch-call intercepts read them).
    `watch`: a function installing more hooks after the marks' (returns their handles)."""
    calls: dict[str, int] = defaultdict(int)
    was_training = model.training
    containers = _containers(model)
    handles = _install_marks(model, calls)
    if watch is not None:
        handles += watch()
    emitting = torch.fx.config.do_not_emit_stack_traces
    try:
        model.eval()
        torch.fx.config.do_not_emit_stack_traces = emitting or not stack_traces
        with stage(f"trace {type(model).__name__} ({what})"), quiet_libraries(), torch.no_grad(), \
                _lazy_graph_modules():
            program = torch.export.export(model, args, kwargs, strict=False)
    finally:
        torch.fx.config.do_not_emit_stack_traces = emitting
        for h in handles:
            h.remove()
        model.train(was_training)
        _put_back(containers)
    return program, calls



def _containers(model: nn.Module) -> list:
    """The dicts, lists and sets the model's modules hold as attributes, with their contents: torch.export puts
    copies of them back after tracing, which unshares a dict that several modules hold (a state the parent sets
    and the layers read): `_put_back` gives each module its own object again, with the contents it had."""
    out = []
    for module in model.modules():
        for key, value in vars(module).items():
            if key not in unroll.MODULE_STATE and isinstance(value, (dict, list, set)):
                out.append((module, key, value, copy.copy(value)))
    return out


def _put_back(containers: list) -> None:
    for module, key, obj, content in containers:
        try:
            changed = bool(obj != content)     # the same objects inside compare equal without their __eq__
        except Exception:  # noqa: BLE001 - values without a truth value (tensors the forward replaced)
            changed = True
        if changed:      # the forward changed it while tracing (a FrozenDict, which cannot change, did not)
            with contextlib.suppress(Exception):
                if isinstance(obj, list):
                    obj[:] = content
                else:
                    obj.clear()
                    obj.update(content)
        module.__dict__[key] = obj


def _unrolled(model: nn.Module, args, kwargs, stack_traces: bool = True):
    """The graph of `model` from an export of one layer per kind (surgery/trace/unroll.py): (graph, params,
    buffers, calls, constants, marks), or None where the model's layers are not truncated or do not check out."""
    try:
        stacks = unroll.find_stacks(model)
    except Exception as exc:  # noqa: BLE001 - an odd module tree: the full export
        logger.debug("layers not truncated: %s: %s", type(exc).__name__, exc)
        return None
    if not stacks:
        return None
    try:
        with unroll.truncated(stacks):
            program, calls = _export_marked(model, args, kwargs, "torch.export, one layer per kind", stack_traces,
                                            watch=lambda: unroll.watch_layers(stacks))
        unroll.check_watched(stacks)
    except Exception as exc:  # noqa: BLE001 - a model that needs all its layers: the full export says what fails
        logger.debug("layers exported whole: %s: %s", type(exc).__name__, exc)
        return None
    signature = program.graph_signature
    params, buffers = dict(signature.inputs_to_parameters), dict(signature.inputs_to_buffers)
    # the order named_parameters / named_buffers (remove_duplicate=False) give, from one walk
    param_order: dict[str, int] = {}
    buffer_order: dict[str, int] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        prefix = path + "." if path else ""
        for order, table in ((param_order, module._parameters), (buffer_order, module._buffers)):
            for name, t in table.items():
                if t is not None:
                    order[prefix + name] = len(order)
    calls = dict(calls)
    constants = dict(getattr(signature, "inputs_to_lifted_tensor_constants", {}) or {})
    values = {ph: program.constants.get(name) for ph, name in constants.items()}
    try:
        graph, marks = unroll.unroll(program.graph, stacks, params, buffers, calls, param_order, buffer_order,
                                     constants, values)
    except Exception as exc:  # noqa: BLE001 - unroll.Refused, or anything unforeseen: the full export, never a guess
        logger.debug("layers exported whole: %s: %s", type(exc).__name__, exc)
        return None
    return graph, params, buffers, calls, values, marks


def _trace(model: nn.Module, example_inputs, full: bool = False, stack_traces: bool = True) -> Traced:
    if example_inputs is None:
        example_inputs = derive_example_inputs(model)
    args, kwargs = _split_inputs(example_inputs)
    kwargs = _without_cache(model, kwargs)
    result = None if full else _unrolled(model, args, kwargs, stack_traces)
    if result is None:
        try:
            program, calls = _export_marked(model, args, kwargs, "torch.export", stack_traces)
        except Exception as exc:  # noqa: BLE001 - any tracer failure becomes one clear error
            raise SurgeryError(f"torch.export could not trace {type(model).__name__}: {type(exc).__name__}: {exc}") from exc
        signature = program.graph_signature
        lifted = getattr(signature, "inputs_to_lifted_tensor_constants", {}) or {}
        result = (program.graph, dict(signature.inputs_to_parameters), dict(signature.inputs_to_buffers),
                  dict(calls), {ph: program.constants.get(name) for ph, name in lifted.items()}, [])
    graph, params, buffers, calls, constants, marks = result
    boundaries: dict[fx.Node, list[Boundary]] = defaultdict(list)
    for value, module, side, loc, call in marks:     # taken out of the graph by the unroll already
        boundaries[value].append(Boundary(module, side, tuple(loc), call))
    for node in graph.nodes:
        # a mark of a mark whose input does not list it among its users (torch.export leaves M2M-100's
        # embed_positions input mark so): repair the use, else replacing and erasing the inner mark fails
        arg = node.args[0] if node.op == "call_function" and node.target is torch.ops.surgery.mark.default else None
        if isinstance(arg, fx.Node) and node not in arg.users:
            arg.users[node] = None
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.surgery.mark.default:
            value = node.args[0]
            module, side, loc, call = json.loads(node.args[1])
            boundaries[value].append(Boundary(module, side, tuple(loc), call))
            if node in boundaries:  # a mark of a mark: the same value
                boundaries[value].extend(boundaries.pop(node))
            node.replace_all_uses_with(value)
            graph.erase_node(node)
    for value, bs in boundaries.items():
        # innermost first: a module nested in another has the longer path
        bs[:] = [Boundary(b.module, b.side, b.loc, b.call, calls.get(b.module, 1)) for b in bs]
        bs.sort(key=lambda b: -len(b.module))
    module_types = {name: type(m) for name, m in model.named_modules()}
    traced = Traced(graph=graph, boundaries=dict(boundaries), params=params, buffers=buffers, calls=dict(calls),
                    module_types=module_types, stack_traces=stack_traces)
    traced.constants = {ph: value.detach().clone() for ph, value in constants.items()
                        if isinstance(value, torch.Tensor) and value.numel() <= 4096}
    return traced
