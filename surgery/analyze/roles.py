"""Roles from data flow, not from architecture names.

The anchors are the ops every transformer has: weight-bearing ops (`linear`, `addmm`, `mm`, x @ W.T, a grouped
matmul on a 3-D expert parameter; convolutions and embedding lookups for `wrap`), the attention op (SDPA, or a
softmax whose input is any score arithmetic on a product of two values, times a third), adds, norms and embedding
lookups. From each attention op we walk back through view-like and rotary ops to the projections that feed it
(q, k, v, or a packed projection sliced by the columns each operand reads: a range, or an index set where q, k
and v are interleaved head by head, found by evaluating the ops in between on column numbers), forward to the
output projection and on to the residual add; the FFN is the layer's other linears (routers excluded). Layers are the repeated units of
the module tree (numbered children of one type) holding the attention ops, one per call, and every other numbered
child of their containers (a hybrid model's state-space or linear-attention layers, of other types), numbered by
position; their containers are stacks, and attention whose keys come from another value than its queries is
cross-attention.
"""
from __future__ import annotations

import functools
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import fx

from surgery.modules.columns import Columns, columns
from surgery.trace.export import Boundary, Traced

VIEW_LIKE = {
    "view", "reshape", "_unsafe_view", "transpose", "permute", "contiguous", "clone", "expand", "unsqueeze",
    "squeeze", "flatten", "unflatten", "select", "getitem", "split", "split_with_sizes", "chunk", "slice",
    "_to_copy", "to", "alias", "detach", "type_as", "expand_as", "t", "dropout", "lift_fresh_copy",
    "repeat_interleave", "repeat", "unbind", "native_dropout", "_assert_tensor_metadata", "broadcast_to",
}
ROTARY_LIKE = {"mul", "add", "cat", "neg", "sub", "stack", "float", "type"}
LINEAR_OPS = {"linear", "addmm", "mm", "matmul", "bmm"}
NORM_OPS = {"layer_norm", "rms_norm", "group_norm", "native_layer_norm"}
QK_NORM = NORM_OPS | {"mean", "pow", "rsqrt", "sqrt", "var_mean", "sub"}   # per-head q/k norms (QK-norm)
_OPERAND_PATH = VIEW_LIKE | ROTARY_LIKE | QK_NORM | {"div", "index"}   # from an attention operand up to its projection


def op_name(node: fx.Node) -> str:
    if node.op != "call_function":
        return node.op
    target = node.target
    name = getattr(target, "_opname", None) or getattr(target, "__name__", str(target))
    return name


def stack_paths(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [path for path, _ in stack.values()]


@dataclass
class LinearInfo:
    """A linear-like op reading a parameter: y = x W^T + b (layout out_in) or x W + b (layout in_out)."""

    node: fx.Node
    value: fx.Node          # the node holding the op's result (addmm is followed by a view back to 3-D)
    x: fx.Node
    weight: str             # qualified parameter name
    bias: str | None
    layout: str             # "out_in" (nn.Linear) or "in_out" (GPT-2 Conv1D, x @ W)
    rows: tuple[int, int] | None   # slice of the output dimension when the weight is packed (MHA in_proj)
    bias_rows: tuple[int, int] | None
    in_features: int
    out_features: int
    experts: int | None = None     # a 3-D parameter [experts, out, in] read by a grouped matmul (MoE experts)
    kind: str = "linear"    # "linear", "conv" (aten conv1d/2d/3d/convolution) or "embedding" (a table lookup)
    op_args: dict = field(default_factory=dict)   # conv: stride, padding, dilation, groups, dims, kernel;
    #                                              embedding: padding_idx

    @property
    def owner(self) -> str:
        return self.weight.rpartition(".")[0]


@dataclass(slots=True)
class Site:
    """One place a pattern can match: a node with a role (or none), its layer and the module it comes from."""

    node: fx.Node
    role: str | None
    layer: int | None
    module: str
    op: str
    linear: LinearInfo | None = None
    extra: dict = field(default_factory=dict)
    stack: str | None = None     # the container of the site's layer (e.g. "encoder.block", "model.layers")


@dataclass
class Analysis:
    traced: Traced
    role_sites: list[Site]
    by_role: dict[str, list[Site]]
    blocks: list[str]
    linears: dict[fx.Node, LinearInfo]
    hidden_size: int | None
    stacks: list[str] = field(default_factory=list)       # the stack (container path) of each layer
    block_calls: list[int] = field(default_factory=list)  # which call of the block module each layer is
    # every call_function node without a role, as a site: built on first use (op patterns, the candidates an
    # error names), not by every apply
    generic_sites: Callable[[], list[Site]] = field(default=list, repr=False)

    @functools.cached_property
    def sites(self) -> list[Site]:
        """The role sites first, then every other call_function node."""
        return self.role_sites + self.generic_sites()

    @functools.cached_property
    def by_op(self) -> dict[str, list[Site]]:
        """Op name -> one site per node computing it: its site with the weight-bearing op's facts where it has one
        (an embedding's output that is also layer 0's residual input is the embedding a module or op pattern
        wraps), else its first."""
        first_site: dict[fx.Node, Site] = {}
        for s in self.sites:
            held = first_site.get(s.node)
            if held is None or (held.linear is None and s.linear is not None):
                first_site[s.node] = s
        by_op: dict[str, list[Site]] = defaultdict(list)
        for s in first_site.values():
            by_op[s.op].append(s)
        return dict(by_op)

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def boundaries(self, node: fx.Node) -> list[Boundary]:
        return self.traced.boundaries.get(node, [])

    def calls(self, module: str) -> int:
        return self.traced.calls.get(module, 0)


def _shape(node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


_PARAMETRIZED = re.compile(r"(?:(.*)\.)?parametrizations\.([^.]+)\.original")


def _unparametrized(name: str) -> str:
    """A parametrized weight's name as its module's attribute: `attn.parametrizations.in_proj_weight.original`
    (what the export names the parameter under a parametrization, e.g. an earlier adapter set's on a weight it
    adapts) is `attn.in_proj_weight`, so the op's module is `attn`, not the parametrization list. (A user's
    weight_norm keeps original0/original1: no single original weight.)"""
    m = _PARAMETRIZED.fullmatch(name)
    return name if m is None else (f"{m.group(1)}.{m.group(2)}" if m.group(1) else m.group(2))


def _resolve_param(node, traced: Traced) -> tuple[str, tuple[int, int] | None] | None:
    """Follow a weight argument back to its parameter, tracking a row slice (chunk/split/slice on dim 0)."""
    rows = None
    for _ in range(4):
        if not isinstance(node, fx.Node):
            return None
        if node.op == "placeholder":
            name = traced.params.get(node.name)
            return (_unparametrized(name), rows) if name else None
        op = op_name(node)
        if op == "getitem" and isinstance(node.args[0], fx.Node):
            parent, index = node.args[0], node.args[1]
            pop = op_name(parent)
            full = _shape(parent.args[0])
            if full is None:
                return None
            dim = parent.args[2] if len(parent.args) > 2 else parent.kwargs.get("dim", 0)
            if dim != 0:
                return None
            if pop == "chunk":
                n = parent.args[1]
                size = full[0] // n
                rows = (index * size, (index + 1) * size)
            elif pop in ("split", "split_with_sizes"):
                sizes = parent.args[1]
                if isinstance(sizes, int):
                    sizes = [sizes] * (full[0] // sizes)
                start = sum(sizes[:index])
                rows = (start, start + sizes[index])
            else:
                return None
            node = parent.args[0]
        elif op == "slice" and (node.args[1] if len(node.args) > 1 else 0) == 0:
            start = node.args[2] if len(node.args) > 2 else 0
            end = node.args[3] if len(node.args) > 3 else None
            full = _shape(node.args[0])
            rows = (start or 0, min(end, full[0]) if end is not None else full[0])
            node = node.args[0]
        else:
            return None
    return None


CONV_OPS = {"conv1d", "conv2d", "conv3d", "convolution"}
GROUPED_MM_OPS = {"grouped_mm_fallback", "_grouped_mm", "grouped_mm"}
_LINEAR_INFO_OPS = {"linear", "addmm", "mm", "matmul"} | GROUPED_MM_OPS    # the ops _linear_info reads
_WEIGHT_OP_INFO_OPS = CONV_OPS | {"embedding"}                            # the ops _weight_op_info reads


def _linear_info(node: fx.Node, traced: Traced) -> LinearInfo | None:
    op = op_name(node)
    if op == "linear":
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        layout = "out_in"
    elif op == "addmm":
        b, x, w = node.args[0], node.args[1], node.args[2]
        layout = "in_out"
    elif op in ("mm", "matmul"):
        x, w, b = node.args[0], node.args[1], None
        layout = "in_out"
        if op_name(w) in ("numpy_T", "t") or (op_name(w) == "transpose" and sorted(
                d % 2 for d in w.args[1:3]) == [0, 1] and len(_shape(w) or ()) == 2):
            w, layout = w.args[0], "out_in"      # x @ W.T on a [out, in] parameter (Falcon's linear)
    elif op in GROUPED_MM_OPS:
        return _experts_info(node, traced)
    else:
        return None
    wref = _resolve_param(w, traced)
    if wref is None:
        return None
    bref = _resolve_param(b, traced) if b is not None else None
    wshape = _shape(w)
    if wshape is None or len(wshape) != 2:
        return None
    out_f, in_f = wshape if layout == "out_in" else (wshape[1], wshape[0])
    value = node
    users = list(node.users)
    if layout == "in_out" and len(users) == 1 and op_name(users[0]) in ("view", "_unsafe_view", "reshape"):
        value = users[0]
    if bref is None and op in ("mm", "matmul"):
        # x @ W.T + b (Falcon's FalconLinear with a bias): the module's own bias vector added to the product alone
        # is the linear's bias, and the sum its result (what the module returns, what IA3 scales)
        bref, value = _own_bias(value, wref, out_f, traced) or (None, value)
    return LinearInfo(node=node, value=value, x=x, weight=wref[0], bias=bref[0] if bref else None,
                      layout=layout, rows=wref[1], bias_rows=bref[1] if bref else None,
                      in_features=in_f, out_features=out_f)


def _own_bias(value: fx.Node, wref: tuple, out_features: int, traced: Traced):
    """(bias reference, the sum) when the product's one use adds a [out_features] parameter of the weight's own
    module (and of the same rows, for a packed weight); else None."""
    users = list(value.users)
    if len(users) != 1 or op_name(users[0]) != "add" or len(users[0].args) != 2:
        return None
    add = users[0]
    other = add.args[1] if add.args[0] is value else add.args[0] if add.args[1] is value else None
    bref = _resolve_param(other, traced) if isinstance(other, fx.Node) else None
    if bref is None or _shape(other) != (out_features,) or _shape(add) != _shape(value) \
            or bref[0].rpartition(".")[0] != wref[0].rpartition(".")[0] or bref[1] != wref[1]:
        return None
    return bref, add


def _experts_info(node: fx.Node, traced: Traced) -> LinearInfo | None:
    """MoE experts stored as one parameter [experts, out, in], read (transposed) by a grouped matmul."""
    w = node.args[1]
    transposed = op_name(w) in ("transpose", "t", "permute")
    source = w.args[0] if transposed else w
    if not isinstance(source, fx.Node) or source.op != "placeholder" or source.name not in traced.params:
        return None
    shape = _shape(source)
    if shape is None or len(shape) != 3:
        return None
    experts, a, b = shape
    out_f, in_f = (a, b) if transposed else (b, a)
    return LinearInfo(node=node, value=node, x=node.args[0], weight=_unparametrized(traced.params[source.name]), bias=None,
                      layout="out_in" if transposed else "in_out", rows=None, bias_rows=None, in_features=in_f,
                      out_features=out_f, experts=experts)


def _weight_op_info(node: fx.Node, traced: Traced) -> LinearInfo | None:
    """A convolution (not transposed) or an embedding lookup reading a parameter, as a weight-bearing op.

    conv: weight (out, in/groups, *kernel) in layout out_in, in_features = in channels; embedding: the table
    (num_embeddings, dim) in layout in_out (a lookup is one-hot(ids) @ W), x the ids.
    """
    op = op_name(node)
    if op in CONV_OPS:
        args = list(node.args)
        if op == "convolution":   # input, weight, bias, stride, padding, dilation, transposed, output_padding, groups
            if len(args) < 9 or args[6]:
                return None
            stride, padding, dilation, groups = args[3], args[4], args[5], args[8]
        else:                     # input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1
            args += [None] * (7 - len(args))
            stride, padding, dilation, groups = args[3] or 1, args[4] if args[4] is not None else 0, args[5] or 1, \
                args[6] or 1
        x, w, b = args[0], args[1], args[2]
        wshape = _shape(w)
        wref = _resolve_param(w, traced)
        if wref is None or wref[1] is not None or wshape is None or len(wshape) < 3:
            return None
        bref = _resolve_param(b, traced) if isinstance(b, fx.Node) else None
        return LinearInfo(node=node, value=node, x=x, weight=wref[0], bias=bref[0] if bref else None, layout="out_in",
                          rows=None, bias_rows=None, in_features=int(wshape[1]) * int(groups),
                          out_features=int(wshape[0]), kind="conv",
                          op_args={"stride": stride, "padding": padding, "dilation": dilation, "groups": int(groups),
                                   "dims": len(wshape) - 2, "kernel": tuple(int(k) for k in wshape[2:])})
    if op == "embedding":
        w, ids = node.args[0], node.args[1]
        wref, wshape = _resolve_param(w, traced), _shape(w)
        if wref is None or wref[1] is not None or wshape is None or len(wshape) != 2:
            return None
        padding_idx = node.args[2] if len(node.args) > 2 else -1
        return LinearInfo(node=node, value=node, x=ids, weight=wref[0], bias=None, layout="in_out", rows=None,
                          bias_rows=None, in_features=int(wshape[0]), out_features=int(wshape[1]), kind="embedding",
                          op_args={"padding_idx": None if padding_idx in (None, -1) else int(padding_idx)})
    return None


def _walk_back(start, stop, allowed: set[str], limit: int = 64) -> list[fx.Node]:
    """Breadth-first from `start` over tensor args through `allowed` ops; return nodes where `stop` holds."""
    found, seen, frontier = [], set(), [start]
    while frontier and limit > 0:
        nxt = []
        for node in frontier:
            if not isinstance(node, fx.Node) or node in seen:
                continue
            seen.add(node)
            limit -= 1
            if stop(node):
                found.append(node)
                continue
            if op_name(node) in allowed:
                nxt.extend(a for a in node.all_input_nodes if a.op != "placeholder")
        frontier = nxt
    return found


def _cat_along_positions(node: fx.Node) -> bool:
    """A `cat` of whole sequences end to end: along a dimension other than the last (features: rotary halves,
    MLA's rope and no-rope parts of a key)."""
    if op_name(node) != "cat":
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    val = node.meta.get("val")
    ndim = val.dim() if isinstance(val, torch.Tensor) else None
    return isinstance(dim, int) and ndim is not None and dim % ndim != ndim - 1


def _stream_sources(arg, is_linear, linears) -> list[fx.Node]:
    """The projections of an attention operand laid end to end along the positions from several streams (joint
    attention: SD3's and Flux's image and text streams), one per stream module; [] for any other operand."""
    cats = _walk_back(arg, _cat_along_positions, _OPERAND_PATH - {"cat"}, 64)
    if len(cats) != 1:
        return []
    found = []
    for part in cats[0].args[0] if isinstance(cats[0].args[0], (list, tuple)) else ():
        hits = _walk_back(part, is_linear, _OPERAND_PATH, 64)
        if hits and hits[0] not in found:
            found.append(hits[0])
    owners = {linears[h].owner for h in found}
    return found if len(found) > 1 and len(owners) == len(found) else []


def _walk_forward(start, stop, allowed: set[str], limit: int = 64) -> list[fx.Node]:
    found, seen, frontier = [], set(), list(start.users)
    while frontier and limit > 0:
        nxt = []
        for node in frontier:
            if node in seen:
                continue
            seen.add(node)
            limit -= 1
            if stop(node):
                found.append(node)
                continue
            if op_name(node) in allowed:
                nxt.extend(node.users)
        frontier = nxt
    return found


PRODUCTS = {"matmul", "bmm", "baddbmm", "einsum"}
NORMALIZATIONS = {"softmax", "_softmax", "_safe_softmax"}
SDPA_OPS = {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"}
ACTIVATIONS = {"gelu", "relu", "silu", "tanh", "sigmoid", "erf", "pow", "mul", "add", "div", "sub", "neg", "exp",
               "log1p", "softplus", "leaky_relu", "elu", "hardtanh", "hardswish", "mish", "rsub", "clamp", "glu"}


def _product_operands(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """The two tensors a product multiplies (the bias of `baddbmm(bias, a, b)` is score arithmetic)."""
    op = op_name(node)
    if op == "baddbmm":
        return node.args[1], node.args[2]
    if op in ("matmul", "bmm"):
        return node.args[0], node.args[1]
    if op == "einsum" and len(node.args) > 1 and isinstance(node.args[1], (list, tuple)) and len(node.args[1]) == 2:
        return node.args[1][0], node.args[1][1]
    return None


def _last2(node) -> tuple | None:
    shape = _shape(node)
    return tuple(shape[-2:]) if shape is not None and len(shape) >= 2 else None


def _attention_ops(graph: fx.Graph) -> list[tuple[fx.Node, fx.Node, fx.Node, fx.Node]]:
    """(op node, q, k, v) for SDPA and for eager attention.

    Eager attention is a normalization over the last axis (softmax) whose input is score arithmetic on a product
    of two values, and whose output multiplies a third. Whatever sits between the product and the normalization
    (a scale, ALiBi or T5's relative bias, a tanh soft-cap, DeBERTa's position terms, a mask) is recognized by what
    it is, a value of the scores' shape derived from the product, not from a list of ops: the scores product is
    the nearest product upstream whose output has the scores' [query, key] shape.
    """
    found = []
    for node in graph.nodes:
        op = op_name(node)
        if op in SDPA_OPS:
            found.append((node, node.args[0], node.args[1], node.args[2]))
            continue
        if op not in NORMALIZATIONS or not isinstance(node.args[0], fx.Node):
            continue
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", -1)
        shape = _shape(node)
        if shape is None or len(shape) < 2 or dim not in (-1, len(shape) - 1):
            continue
        scores = _last2(node)
        products = _walk_back(node.args[0], lambda n: op_name(n) in PRODUCTS and _scores_of(_last2(n), scores),
                              _SCORE_PATH, 32)
        outs = _walk_forward(node, lambda n: op_name(n) in ("matmul", "bmm", "einsum"), VIEW_LIKE | {"type_as"}, 8)
        if not products or not outs or _product_operands(products[0]) is None or _product_operands(outs[0]) is None:
            continue
        q, k = _product_operands(products[0])
        out = outs[0]
        while op_name(k) in ("transpose", "permute", "div", "mul") and isinstance(k.args[0], fx.Node):
            k = k.args[0]
        found.append((out, q, k, _product_operands(out)[1]))
    return found


def _scores_of(product: tuple | None, normalized: tuple) -> bool:
    """A product's [query, key] output feeds a normalization over `normalized` = [query, key + extra]: the same
    queries, and keys the normalization may extend with extra columns (GPT-OSS's per-head attention sinks,
    concatenated to the scores before the softmax and sliced off after it)."""
    return product is not None and product[0] == normalized[0] and product[1] <= normalized[1]


class _AnyScoreOp(set):
    """Score arithmetic: any op (the walk stops at products and is bounded)."""

    def __contains__(self, item) -> bool:
        return item not in PRODUCTS and item not in LINEAR_OPS and item not in ("placeholder", "get_attr")


_SCORE_PATH = _AnyScoreOp()


def _loc_order(loc: tuple) -> tuple:
    """Positional inputs/items first, by index; then keywords."""
    if not loc:
        return (0, 0, "")
    kind, key = loc
    return (0, key, "") if isinstance(key, int) else (1, 0, str(key))


def stack_entries(node: fx.Node) -> list[tuple[str, int]]:
    """(module path, call index) of every module the node runs in, outermost first. torch.export marks the
    n-th call of a module with an `@n` suffix in the stack's keys."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for key, (path, _) in stack.items():
        _, at, call = key.rpartition("@")
        out.append((path, int(call) if at and call.isdigit() else 0))
    return out


def _numbered_children(module_types: dict[str, type]) -> dict[str, list[type]]:
    """Container path -> the types of its numbered children."""
    out: dict[str, list[type]] = defaultdict(list)
    for name, t in module_types.items():
        parent, _, index = name.rpartition(".")
        if index.isdigit():
            out[parent].append(t)
    return out


def _repeated_unit(path: str, module_types: dict[str, type], numbered: dict | None = None) -> bool:
    """A numbered child of a container whose numbered children all have one type (a ModuleList of layers).
    `numbered`: `_numbered_children(module_types)`, computed once for many paths."""
    parent, _, index = path.rpartition(".")
    if not index.isdigit():
        return False
    kind = module_types.get(path)
    siblings = (numbered if numbered is not None else _numbered_children(module_types)).get(parent, [])
    return kind is not None and all(t is kind for t in siblings)


def _packed_columns(linear_value: fx.Node, operand: fx.Node, constants: dict) -> tuple[tuple[int, int] | Columns | None, bool]:
    """Which output columns of a packed projection reach `operand`: evaluate the shape ops on the path from the
    projection's output on a tensor of column indices. (start, stop) for a contiguous range, a `Columns` index set
    for columns interleaved with the other operands' (BLOOM's [q_h, k_h, v_h] per head), None for all of them or
    when the path is not made of shape ops alone. Second: whether the operand holds them in ascending order (head
    by head, each head's features in order), so projecting new tokens on those columns gives the operand's
    layout (LLaMA-Adapter's prompts)."""
    val = linear_value.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None, True
    width = val.shape[-1]
    current, ordered = _columns_by_flow(linear_value, operand, constants)
    path = _path_back(operand, linear_value) if current is None else []
    if path is None:
        return None, True
    if current is None:   # one path's shape ops, up to the first other op
        current = torch.arange(width).expand(*val.shape).clone()
    for node in path:
        if not isinstance(node, _SplitItem) and op_name(node) not in _COLUMN_OPS:
            break
        try:
            if isinstance(node, _SplitItem):
                result = node.take(current)
            else:
                args = [current if a is node.all_input_nodes[0] else _constant(a, constants) for a in node.args]
                if _has_node(args) or _has_node(list(node.kwargs.values())):
                    break
                result = node.target(*args, **node.kwargs)
        except Exception:  # noqa: BLE001 - an op we cannot replay on indices: stop here
            break
        if isinstance(result, (tuple, list)):
            break
        current = result
    flat = current.flatten()
    cols, inverse = torch.unique(flat, return_inverse=True)
    if cols.numel() == width:
        return None, True
    first = torch.full((cols.numel(),), flat.numel()).scatter_reduce(0, inverse, torch.arange(flat.numel()), "amin")
    return columns(cols.tolist()), ordered and bool((first.argsort() == torch.arange(cols.numel())).all())


_COLUMN_OPS = {"view", "reshape", "_unsafe_view", "transpose", "permute", "contiguous", "clone", "select", "slice",
               "unflatten", "flatten", "expand", "unsqueeze", "squeeze", "alias", "getitem", "index", "t",
               "narrow", "detach", "lift_fresh_copy", "_to_copy", "to", "broadcast_to"}


def _columns_by_flow(linear_value: fx.Node, operand: fx.Node, constants: dict,
                     limit: int = 256) -> tuple[torch.Tensor | None, bool]:
    """The operand as a tensor of the projection's column numbers: the ops between the two evaluated on indices.
    Shape ops (view, transpose, slice, split, index, cat, expand) are replayed; any other op whose output has the
    shape of (or broadcasts from) its first input from the projection passes that input's columns on (rotary
    embedding, a per-head norm, a dtype cast: each position keeps the column it comes from). So a partial rotary
    that slices each head into a rotated and a passed part and concatenates them (GPT-NeoX) keeps every column of
    the head. None when the ops between are not all of this kind. Second: False when an op other than those
    replayed and the elementwise ones passed columns on (it may reorder them: a flip, a gather)."""
    between, frontier = {operand}, [operand]
    while frontier and limit > 0:           # ancestors of the operand down to the projection (bounded)
        node = frontier.pop()
        limit -= 1
        if node is linear_value:
            continue
        for a in node.all_input_nodes:
            if a not in between and a.op != "placeholder":
                between.add(a)
                frontier.append(a)
    if linear_value not in between or limit <= 0:
        return None, False
    derived, frontier = {linear_value}, [linear_value]
    while frontier:                          # ... that the projection's output reaches
        for user in frontier.pop().users:
            if user in between and user not in derived:
                derived.add(user)
                frontier.append(user)
    values = {linear_value: torch.arange(linear_value.meta["val"].shape[-1]).expand(*linear_value.meta["val"].shape)}
    order, seen, stack = [], set(), [operand]
    while stack:                             # in order, inputs first
        node = stack[-1]
        pending = [a for a in node.all_input_nodes if a in derived and a not in seen and a is not linear_value]
        if pending:
            stack.append(pending[0])
            continue
        stack.pop()
        if node not in seen:
            seen.add(node)
            order.append(node)
    ordered = True
    for node in order:
        if not any(a in values for a in node.all_input_nodes):
            continue
        try:
            values[node], replayed = _column_step(node, values, constants)
        except Exception:  # noqa: BLE001 - an op we cannot replay on indices
            return None, False
        if values[node] is None:
            return None, False
        ordered = ordered and (replayed or op_name(node) in _ELEMENTWISE)
    out = values.get(operand)
    return (out, ordered) if isinstance(out, torch.Tensor) else (None, False)


# ops that keep each position's meaning (a per-head norm mixes within the head, not its order)
_ELEMENTWISE = (ROTARY_LIKE - {"cat", "stack"}) | QK_NORM | {
    "div", "neg", "type_as", "dropout", "native_dropout", "to", "_to_copy", "contiguous", "clone", "scalar_tensor"}


def _column_step(node: fx.Node, values: dict, constants: dict):
    """One op of `_columns_by_flow` on index tensors (see there): (its value, whether it was replayed); value None
    when it cannot be followed."""
    op = op_name(node)

    def sub(a):
        if isinstance(a, (list, tuple)):
            return type(a)(sub(x) for x in a)
        if isinstance(a, fx.Node) and a in values:
            return values[a]
        return _constant(a, constants)

    if op == "getitem" and isinstance(values.get(node.args[0]), (tuple, list)):
        return values[node.args[0]][node.args[1]], True
    if op in _COLUMN_OPS or op in ("cat", "split", "split_with_sizes", "chunk", "unbind", "stack"):
        args, kwargs = sub(list(node.args)), sub(dict(node.kwargs)) if node.kwargs else {}
        if not _has_node(args) and not _has_node(list(kwargs.values())):
            return node.target(*args, **kwargs), True
    first = next(values[a] for a in node.all_input_nodes if a in values)
    shape = _shape(node)
    if not isinstance(first, torch.Tensor) or shape is None:
        return None, False
    if tuple(first.shape) == shape:
        return first, False
    try:
        return first.broadcast_to(shape), False
    except RuntimeError:
        return None, False


def _path_back(start: fx.Node, target: fx.Node, limit: int = 64) -> list[fx.Node] | None:
    """The nodes on a shortest path from `target` (exclusive) down to `start` (inclusive), in forward order,
    following each node's first tensor input. getitem of split/chunk is replayed as a slice by its parent."""
    chain, node = [], start
    while node is not target and limit > 0:
        if not isinstance(node, fx.Node) or not node.all_input_nodes:
            return None
        op = op_name(node)
        if op == "getitem" and op_name(node.args[0]) in ("split", "split_with_sizes", "chunk", "unbind"):
            parent = node.args[0]
            chain.append(_SplitItem(parent, node.args[1]))
            node = parent.args[0]
        else:
            chain.append(node)
            node = node.all_input_nodes[0]
        limit -= 1
    return list(reversed(chain)) if node is target else None


def _constant(arg, constants: dict):
    """A lifted tensor constant (e.g. Falcon's index [-2]) by value; anything else unchanged."""
    if isinstance(arg, (list, tuple)):
        return type(arg)(_constant(a, constants) for a in arg)
    if isinstance(arg, fx.Node):
        source = arg.args[0] if op_name(arg) == "lift_fresh_copy" else arg
        if isinstance(source, fx.Node) and source.name in constants:
            return constants[source.name]
    return arg


def _has_node(args) -> bool:
    return any(_has_node(a) if isinstance(a, (list, tuple)) else isinstance(a, fx.Node) for a in args)


class _SplitItem:
    """One item of a split/chunk/unbind, replayable on a tensor of indices."""

    def __init__(self, parent: fx.Node, index: int):
        self.parent, self.index = parent, index

    def take(self, tensor):
        return self.parent.target(tensor, *self.parent.args[1:], **self.parent.kwargs)[self.index]


def _operand_width(operand, info: LinearInfo) -> float:
    """Features per token an attention operand holds (heads x head_dim, whatever its layout), from the number of
    tokens the projection reads. A projection no wider than this is the operand's own (partial rotary slices the
    head dim without packing anything)."""
    shape, x_shape = _shape(operand), _shape(info.x)
    if not shape or not x_shape or not info.in_features:
        return float("inf")
    tokens = 1
    for d in x_shape:
        tokens *= int(d)
    tokens //= info.in_features
    size = 1
    for d in shape:
        size *= int(d)
    return size / tokens if tokens else float("inf")


def _base_value(node):
    """The value a chain of shape-only ops starts from."""
    while isinstance(node, fx.Node) and op_name(node) in VIEW_LIKE and node.all_input_nodes:
        node = node.all_input_nodes[0]
    return node


def _keeps_rank(value: fx.Node, rank: int, allowed: set[str], limit: int = 32) -> bool:
    """Whether some path from `value` to the graph's output through `allowed` ops keeps `rank` dimensions all
    the way (a sequence axis reaches the output)."""
    seen, frontier = set(), [value]
    while frontier and limit > 0:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        limit -= 1
        for user in node.users:
            if user.op == "output":
                return True
            shape = _shape(user)
            if op_name(user) in allowed and shape is not None and len(shape) >= rank:
                frontier.append(user)
    return False


class Ancestors:
    """The first `limit` nodes a depth-first walk up from `value` visits, walked only as far as membership tests
    need: `x in ancestors` answers as the whole set would."""

    def __init__(self, value: fx.Node, limit: int, stop: frozenset = frozenset()):
        self.seen: set[fx.Node] = set()
        self.frontier = [value]
        self.limit = limit
        self.stop = stop        # nodes walked to but not through

    def __contains__(self, x) -> bool:
        seen, frontier, stop = self.seen, self.frontier, self.stop
        while x not in seen and frontier and len(seen) < self.limit:
            node = frontier.pop()
            if node in seen or not isinstance(node, fx.Node):
                continue
            seen.add(node)
            if node not in stop:
                frontier.extend(node.all_input_nodes)
        return x in seen


def analyze(traced: Traced) -> Analysis:
    graph = traced.graph
    nodes = [n for n in graph.nodes if n.op == "call_function"]
    ops = {n: op_name(n) for n in nodes}
    linears = {}
    for node in nodes:
        info = _linear_info(node, traced) if ops[node] in _LINEAR_INFO_OPS else None
        if info is not None:
            linears[node] = info
    # convolutions and embedding lookups: weight-bearing ops a rule may wrap, but not linears for the roles above
    weight_ops = {n: info for n in nodes if n not in linears and ops[n] in _WEIGHT_OP_INFO_OPS
                  and (info := _weight_op_info(n, traced)) is not None}

    def is_linear(n):
        return n in linears

    attention = _attention_ops(graph)
    # per module stack (the nodes of one module call share theirs), not per node
    entries_memo: dict[int, list[tuple[str, int]]] = {}

    def entries_of(node: fx.Node) -> list[tuple[str, int]]:
        key = id(node.meta.get("nn_module_stack"))
        entries = entries_memo.get(key)
        if entries is None:
            entries = entries_memo[key] = stack_entries(node)
        return entries

    def innermost(node: fx.Node) -> str:
        entries = entries_of(node)
        return entries[-1][0] if entries else ""

    # Layers: the repeated units of the module tree (a numbered child of a container whose numbered children share
    # one type) holding the attention ops, one per call (a module called N times is N layers); for a model without
    # attention, the outermost such units holding weight-bearing ops. A layer's stack is its container.
    types = traced.module_types
    unit_cache: dict[str, bool] = {}
    numbered = _numbered_children(types)

    def is_unit(path):
        if path not in unit_cache:
            unit_cache[path] = _repeated_unit(path, types, numbered)
        return unit_cache[path]

    blocks_at: list[tuple[str, int]] = []
    for op_node, *_ in attention:
        entries = entries_of(op_node)
        units = [e for e in entries if is_unit(e[0])]
        if not units:
            # a hybrid stack: numbered layers of several types (attention layers between state-space ones)
            units = [e for e in entries if e[0].rpartition(".")[2].isdigit()]
        if units and units[-1] not in blocks_at:
            blocks_at.append(units[-1])
    if attention and blocks_at:
        # every numbered child of a stack holding attention is a layer, with attention or without (a hybrid
        # model's state-space layers): layers are numbered by position in the stack, in call order
        containers = {path.rpartition(".")[0] for path, _ in blocks_at}
        ordered: list[tuple[str, int]] = []
        seen: set[tuple[str, int]] = set()
        stacks_seen: set[int] = set()
        for node in nodes:
            key = id(node.meta.get("nn_module_stack"))
            if key in stacks_seen:
                continue
            stacks_seen.add(key)
            for entry in entries_of(node):
                parent, _, index = entry[0].rpartition(".")
                if parent in containers and index.isdigit() and entry not in seen:
                    seen.add(entry)
                    ordered.append(entry)
        blocks_at = ordered + [b for b in blocks_at if b not in seen]
    if not attention:
        # linears, convolutions, embedding lookups: a plain residual conv stack's blocks are layers too
        for node in (n for n in nodes if n in linears or n in weight_ops):
            units = [e for e in entries_of(node) if is_unit(e[0])]
            if units and units[0] not in blocks_at:
                blocks_at.append(units[0])
    block_index = {b: i for i, b in enumerate(blocks_at)}
    blocks = [path for path, _ in blocks_at]
    stacks = [path.rpartition(".")[0] for path in blocks]
    stack_layer: dict[int, int | None] = {}     # per module stack, as entries_of

    def layer_of(node) -> int | None:
        key = id(node.meta.get("nn_module_stack"))
        if key not in stack_layer:
            layer = None
            for entry in reversed(entries_of(node)):
                if entry in block_index:
                    layer = block_index[entry]
                    break
            stack_layer[key] = layer
        return stack_layer[key]

    role_sites: list[Site] = []
    taken_linear: set[fx.Node] = set()

    def add(node, role, layer, module=None, linear=None, **extra):
        role_sites.append(Site(node=node, role=role, layer=layer, module=module if module is not None else innermost(node),
                               op=op_name(node), linear=linear, extra=extra,
                               stack=stacks[layer] if layer is not None else None))

    def add_linear(info: LinearInfo, role, layer, **extra):
        taken_linear.add(info.node)
        add(info.node, role, layer, module=info.owner, linear=info, **extra)

    def ancestors(value: fx.Node, limit: int = 400, stop: frozenset = frozenset()) -> "Ancestors":
        return Ancestors(value, limit, stop)

    def close_sublayer(branch_value, prefix, layer):
        """The residual add closing a sub-layer: the first add downstream of the branch whose other operand is a
        value the branch was computed from (the residual stream), with the add's shape."""
        up = ancestors(branch_value)

        def closes(n):
            if op_name(n) != "add" or len(n.all_input_nodes) != 2:
                return False
            a, b = n.args[0], n.args[1]
            other = b if a in down else a
            if (a in down) == (b in down) or _shape(other) != _shape(n):
                return False
            # the residual stream; the stream plus a sibling branch computed from the same input (a parallel block
            # adding its branches one by one: Cohere's residual + attention + mlp); or the stream times a constant
            # (MiniMax's residual * alpha + branch * beta)
            if other in up:
                return True
            inputs = other.all_input_nodes
            if op_name(other) == "add":
                return any(x in up and _shape(x) == _shape(n) for x in inputs)
            return (op_name(other) == "mul" and len(inputs) == 1 and inputs[0] in up
                    and _shape(inputs[0]) == _shape(n))
        down: set[fx.Node] = set()
        frontier, add_node, budget = [branch_value], None, 96
        while frontier and budget > 0 and add_node is None:
            nxt = []
            for node in frontier:
                if node in down:
                    continue
                down.add(node)
                budget -= 1
                for user in node.users:
                    if closes(user):
                        add_node = user
                        break
                    nxt.append(user)
                if add_node is not None:
                    break
            frontier = nxt
        if add_node is None:
            return
        a, b = add_node.args[0], add_node.args[1]
        residual = b if a in down else a
        branch = a if residual is b else b
        if residual not in up:
            # a parallel block's partial sum (residual + attention), or a scaled stream: the sub-layer's residual
            # is the stream the branch was computed from
            residual = next(x for x in residual.all_input_nodes if x in up and _shape(x) == _shape(add_node))
        norm = None
        users = list(add_node.users)
        # a post-sub-layer norm (BERT's) is the layer's own; the norm after a pre-LN stack's last layer (GPT-2's
        # ln_f) reads the last add alone too, but belongs to no layer
        if len(users) == 1 and op_name(users[0]) in NORM_OPS and layer_of(users[0]) == layer:
            norm = users[0]
        add(add_node, f"{prefix}.residual_add", layer, branch=branch, residual=residual, norm=norm)
        if isinstance(residual, fx.Node):
            add(residual, f"{prefix}.residual", layer, extra_of=add_node.name)

    hidden = None
    attention_nodes = frozenset(op_node for op_node, _, _, _ in attention)
    for op_node, q, k, v in attention:
        layer = layer_of(op_node)
        srcs, streams = {}, {}
        for role, arg in (("q", q), ("k", k), ("v", v)):
            hits = _walk_back(arg, is_linear, _OPERAND_PATH, 64)
            srcs[role] = hits[0] if hits else None
            # several projections reach the operand: a joint attention's streams, or parts of one operand
            streams[role] = _stream_sources(arg, is_linear, linears) if len(set(hits)) > 1 else []
        q_src, k_src = srcs["q"], srcs["k"]
        # cross-attention: keys computed from another value than the queries (the encoder's output), not one
        # computed from the other on the way (Segformer/PVT: keys from a strided conv and norm of the queries'
        # hidden state; Funnel: queries from the pooled hidden state of the keys): still self-attention. The
        # walk up does not pass an attention op: a later decoder layer's queries come from the encoder's output
        # too, through the cross-attention of the layers before
        cross = False
        if q_src is not None and k_src is not None and q_src is not k_src:
            q_in, k_in = _base_value(linears[q_src].x), _base_value(linears[k_src].x)
            cross = (q_in is not k_in and q_in not in ancestors(linears[k_src].x, 64, attention_nodes)
                     and k_in not in ancestors(linears[q_src].x, 64, attention_nodes))
        prefix = "cross_attention" if cross else "attention"
        add(op_node, f"{prefix}.op", layer, q=q, k=k, v=v)
        # one projection feeding several operands is packed (GPT-2's c_attn, Falcon's query_key_value): a qkv site,
        # and each operand's site is the columns it reads; a projection wider than what reaches its one operand is
        # packed too (Persimmon's query_key_value when q and k pass a layer norm)
        operands = {"q": q, "k": k, "v": v}
        found = [src for src in srcs.values() if src is not None]
        shared = {src for src in found if found.count(src) > 1}
        for src in dict.fromkeys(found):
            if src in shared:
                add_linear(linears[src], f"{prefix}.qkv", layer)
        for role, src in srcs.items():
            if src is None:
                continue
            info = linears[src]
            wider = src in shared or info.out_features > _operand_width(operands[role], info)
            cols, in_order = _packed_columns(info.value, operands[role], traced.constants) if wider else (None, True)
            if cols is None:
                if src not in shared:
                    add_linear(info, f"{prefix}.{role}", layer)
                continue
            taken_linear.add(info.node)
            add(info.node, f"{prefix}.{role}", layer, module=info.owner, linear=info, packed=cols,
                **({"interleaved": True} if isinstance(cols, Columns) else {}),
                **({} if in_order else {"permuted": True}))
        # joint attention (SD3, Flux): each stream's own q, k and v projections, laid end to end along the
        # positions before the op, are that operand's (the walk above reached one stream's only)
        for role, sources in streams.items():
            for src in sources:
                info = linears[src]
                if src is not srcs[role] and info.out_features <= _operand_width(operands[role], info):
                    add_linear(info, f"{prefix}.{role}", layer)
        outs = _walk_forward(op_node, is_linear, VIEW_LIKE, 32)
        # joint attention (SD3, Flux): one op over two streams laid end to end, its output split back, each part
        # through its stream's own output projection; every one is an attention output
        split = len(outs) > 1 and len({linears[o].owner for o in outs}) == len(outs)
        for out in (outs if split else outs[:1]):
            info = linears[out]
            add_linear(info, f"{prefix}.output", layer)
            if not cross:
                hidden = hidden or info.out_features
            close_sublayer(info.value, prefix, layer)

    # Routers: a linear whose output selects experts (top-k over its softmax) or gates a branch through a sigmoid
    # of one value per token. They are not FFN projections.
    for node, info in linears.items():
        layer = layer_of(node)
        if layer is None or node in taken_linear:
            continue
        selects = _walk_forward(info.value, lambda n: op_name(n) in ("topk", "argmax", "sort"),
                                VIEW_LIKE | {"softmax", "_softmax", "sigmoid", "to", "_to_copy"}, 8)
        gates = info.out_features == 1 and _walk_forward(info.value, lambda n: op_name(n) == "sigmoid", VIEW_LIKE, 4)
        if selects or gates:
            add_linear(info, "ffn.router", layer)

    # FFN: the block's other linears. An output projection is one no other FFN linear reads from; its inputs are
    # the linears upstream through activations (gate/up told apart by which one passes a non-linearity).
    # linears inside an attention module that are not its q/k/v/output (DeBERTa's relative-position projections)
    # belong to the attention, not to the FFN
    attention_modules = {innermost(op_node) for op_node, *_ in attention} - set(blocks) - {""}
    per_layer: dict[int, list[LinearInfo]] = defaultdict(list)
    for node, info in linears.items():
        layer = layer_of(node)
        owner = info.owner.split(".")
        if layer is not None and node not in taken_linear and not any(
                ".".join(owner[:i]) in attention_modules for i in range(1, len(owner))):
            per_layer[layer].append(info)
    ins_of: dict[int, list[tuple[tuple, fx.Node]]] = defaultdict(list)
    outs_of: dict[int, list[tuple[tuple, fx.Node]]] = defaultdict(list)
    for value, bs in traced.boundaries.items():
        shape = _shape(value)
        if shape is None or len(shape) < 2:
            continue
        for bd in bs:
            layer = block_index.get((bd.module, bd.call))
            if layer is not None:
                (ins_of if bd.side == "in" else outs_of)[layer].append((_loc_order(bd.loc), value))

    def reaches_output(value, budget=4000) -> bool:
        seen, frontier = set(), [value]
        while frontier and budget > 0:
            node = frontier.pop()
            if node in seen:
                continue
            seen.add(node)
            budget -= 1
            if node.op == "output":
                return True
            frontier.extend(node.users)
        return False

    # two streams through the blocks (SD3's and Flux's image and text tokens): the hidden state is the stream the
    # last layer returns to the model's output (Flux's last block also returns the text tokens, which are dropped),
    # and in every other layer the one of its shape
    def _ordered(table, layer):
        return [v for _, v in sorted(table.get(layer, []), key=lambda t: t[0])]

    last_outs = [o for o in _ordered(outs_of, len(blocks) - 1) if len(_shape(o) or ()) >= 2] if blocks else []
    kept = [o for o in last_outs if reaches_output(o)]
    stream = _shape(kept[0]) if len(kept) == 1 else None
    block_io: dict[int, tuple] = {}
    for layer in range(len(blocks)):
        ins = _ordered(ins_of, layer)
        outs = _ordered(outs_of, layer)
        # the hidden state: the first input with the shape of an output (not a mask or a position bias)
        pair = next(((i, o) for i in ins for o in outs if _shape(i) == _shape(o) == stream), None) if stream else None
        pair = pair or next(((i, o) for i in ins for o in outs if _shape(i) == _shape(o)), None)
        block_io[layer] = pair if pair else (ins[0] if ins else None, outs[0] if outs else None)
    block_width = {layer: _shape(v)[-1] for layer, (v, _) in block_io.items() if v is not None}
    for layer, infos in per_layer.items():
        nodes_here = {i.node for i in infos}
        feeds = {i.node: _walk_forward(i.value, lambda n: n in nodes_here, VIEW_LIKE | ACTIVATIONS |
                                       {"chunk", "split", "getitem", "index", "to", "_to_copy"}, 32)
                 for i in infos}
        width = block_width.get(layer, hidden)
        outs = [i for i in infos if not feeds[i.node] and (width is None or i.out_features == width)]
        for out in outs:
            add_linear(out, "ffn.out", layer, **({"experts": out.experts} if out.experts else {}))
            ins = _walk_back(out.x, lambda n: n in nodes_here and n is not out.node,
                             VIEW_LIKE | ACTIVATIONS | {"chunk", "split", "getitem", "to", "_to_copy", "index"}, 64)
            act_value = out.x
            while op_name(act_value) in VIEW_LIKE | {"to", "_to_copy"} and act_value.args:
                act_value = act_value.args[0]
            add(act_value, "ffn.act", layer)
            if len(ins) >= 2 and op_name(act_value) == "mul":
                direct = set(act_value.all_input_nodes)
                for n in ins:
                    info = linears[n]
                    role = "ffn.in" if (info.value in direct or n in direct) else "ffn.gate"
                    add_linear(info, role, layer)
            else:
                for n in ins:
                    add_linear(linears[n], "ffn.in", layer)
            close_sublayer(out.value, "ffn", layer)

    module_output: dict[str, fx.Node] = {}     # module -> the first value marked as its output
    for value, bs in traced.boundaries.items():
        for b in bs:
            if b.side == "out":
                module_output.setdefault(b.module, value)
    for node in nodes:
        op = ops[node]
        if op in NORM_OPS:
            add(node, "norm", layer_of(node))
        elif op == "embedding":
            add(node, "embedding", layer_of(node), linear=weight_ops.get(node))
        elif op == "rsqrt":
            # a decomposed RMSNorm: the norm is the output of the module that computes the rsqrt
            module = innermost(node)
            if module in module_output:
                value = module_output[module]
                add(value, "norm", layer_of(value), module=module)

    # Block inputs and outputs: the hidden state entering and leaving each layer's call. A block returning a
    # tuple (hidden, attention weights, ...) has as its output the element of the input's shape.
    for layer in range(len(blocks)):
        path = blocks[layer]
        value_in, value_out = block_io[layer]
        if value_in is not None:
            add(value_in, "block.input", layer, module=path)
            if layer == 0:     # the model's input sequence (an encoder-decoder's encoder input)
                add(value_in, "embedding.output", None, module=path)
        if value_out is not None:
            add(value_out, "block.output", layer, module=path)

    # Heads: a linear outside every layer, after the last one, whose result is returned. One whose result keeps a
    # sequence axis is the LM head; one on a pooled value ([batch, features]), or whose per-position result is
    # pooled on its way out (GPT2ForSequenceClassification's score, indexed at each row's last real token), is a
    # classification head.
    head_path = VIEW_LIKE | {"_to_copy", "float", "to", "div", "tanh", "mul", "add", "index", "gather"}
    for node, info in linears.items():
        if layer_of(node) is None and node not in taken_linear and blocks:
            reaches = _walk_forward(info.value, lambda n: n.op == "output", head_path, 16)
            shape = _shape(info.value)
            if reaches and info.out_features != hidden and shape is not None:
                pooled = len(shape) < 3 or not _keeps_rank(info.value, len(shape), head_path)
                add_linear(info, "head" if pooled else "lm_head", None)

    def generic_sites() -> list[Site]:
        # nodes with a role site, but a weight-bearing op's node none of whose role sites carries its facts (a
        # linear whose output is read as ffn.act or a residual) get one role-less site with them: what an `op:`
        # or `module:` pattern wraps (Analysis.by_op prefers it)
        role_nodes = {id(s.node) for s in role_sites if s.linear is not None or (
            s.node not in linears and s.node not in weight_ops)}
        generic = []
        for n in nodes:
            if id(n) not in role_nodes:
                info = linears.get(n) or weight_ops.get(n)
                layer = layer_of(n)
                generic.append(Site(node=n, role=None, layer=layer, module=info.owner if info else innermost(n),
                                    op=ops[n], linear=info, stack=stacks[layer] if layer is not None else None))
        return generic

    by_role: dict[str, list[Site]] = defaultdict(list)
    for s in role_sites:
        if s.role:
            by_role[s.role].append(s)
    return Analysis(traced=traced, role_sites=role_sites, by_role=dict(by_role), blocks=blocks, linears=linears,
                    hidden_size=hidden, stacks=stacks, block_calls=[c for _, c in blocks_at],
                    generic_sites=generic_sites)
