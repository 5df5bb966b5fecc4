"""Roles from data flow, not from architecture names.

The anchors are the ops every transformer has: linear-like ops on a parameter (`linear`, `addmm`, `mm`),
the attention op (`scaled_dot_product_attention`, or softmax between two matmuls), adds, norms and embedding
lookups. From each attention op we walk back through view-like and rotary ops to the projections that feed it
(q, k, v, or one packed qkv), forward to the output projection and on to the residual add; the FFN is what
the block computes between the attention residual and the last residual add. Layers are the repeated
containers (`...layers.3`) that hold one attention op each. Convolutions and embedding lookups reading a
parameter are weight-bearing ops too (`_weight_op_info`): they carry a LinearInfo of kind "conv"/"embedding" on
their sites (and on the `embedding` role) for `wrap`, but take no part in the roles above.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import fx

from surgery.trace.export import Boundary, Traced

VIEW_LIKE = {
    "view", "reshape", "_unsafe_view", "transpose", "permute", "contiguous", "clone", "expand", "unsqueeze",
    "squeeze", "flatten", "unflatten", "select", "getitem", "split", "split_with_sizes", "chunk", "slice",
    "_to_copy", "to", "alias", "detach", "type_as", "expand_as", "t", "dropout", "lift_fresh_copy",
    "repeat_interleave", "repeat", "unbind", "native_dropout", "_assert_tensor_metadata",
}
ROTARY_LIKE = {"mul", "add", "cat", "neg", "sub", "stack", "float", "type"}
SCORE_LIKE = {"div", "mul", "add", "masked_fill", "where", "_softmax", "_to_copy", "to", "sub"}
LINEAR_OPS = {"linear", "addmm", "mm", "matmul", "bmm"}
NORM_OPS = {"layer_norm", "rms_norm", "group_norm", "native_layer_norm"}


def op_name(node: fx.Node) -> str:
    if node.op != "call_function":
        return node.op
    target = node.target
    name = getattr(target, "_opname", None) or getattr(target, "__name__", str(target))
    return name


def stack_paths(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [path for path, _ in stack.values()]


def innermost(node: fx.Node) -> str:
    paths = stack_paths(node)
    return paths[-1] if paths else ""


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
    kind: str = "linear"    # "linear", "conv" (aten conv1d/2d/3d/convolution) or "embedding" (a table lookup)
    op_args: dict = field(default_factory=dict)   # conv: stride, padding, dilation, groups, dims, kernel;
    #                                              embedding: padding_idx

    @property
    def owner(self) -> str:
        return self.weight.rpartition(".")[0]


@dataclass
class Site:
    """One place a pattern can match: a node with a role (or none), its layer and the module it comes from."""

    node: fx.Node
    role: str | None
    layer: int | None
    module: str
    op: str
    linear: LinearInfo | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class Analysis:
    traced: Traced
    sites: list[Site]                      # role sites first, then every other call_function node
    by_role: dict[str, list[Site]]
    by_op: dict[str, list[Site]]
    blocks: list[str]
    linears: dict[fx.Node, LinearInfo]
    hidden_size: int | None

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


def _int(x):
    try:
        return int(x)
    except (TypeError, ValueError):
        return None


def _resolve_param(node, traced: Traced) -> tuple[str, tuple[int, int] | None] | None:
    """Follow a weight argument back to its parameter, tracking a row slice (chunk/split/slice on dim 0)."""
    rows = None
    for _ in range(4):
        if not isinstance(node, fx.Node):
            return None
        if node.op == "placeholder":
            name = traced.params.get(node.name)
            return (name, rows) if name else None
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
    return LinearInfo(node=node, value=value, x=x, weight=wref[0], bias=bref[0] if bref else None,
                      layout=layout, rows=wref[1], bias_rows=bref[1] if bref else None,
                      in_features=in_f, out_features=out_f)


CONV_OPS = {"conv1d", "conv2d", "conv3d", "convolution"}


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


def _attention_ops(graph: fx.Graph) -> list[tuple[fx.Node, fx.Node, fx.Node, fx.Node]]:
    """(op node, q, k, v) for SDPA and for eager softmax(q k^T) v attention."""
    found = []
    for node in graph.nodes:
        op = op_name(node)
        if op in ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
                  "_scaled_dot_product_efficient_attention"):
            found.append((node, node.args[0], node.args[1], node.args[2]))
        elif op in ("softmax", "_softmax"):
            scores = _walk_back(node.args[0], lambda n: op_name(n) in ("matmul", "bmm"), SCORE_LIKE, 16)
            outs = _walk_forward(node, lambda n: op_name(n) in ("matmul", "bmm"), {"dropout", "_to_copy", "to", "type_as"}, 8)
            if scores and outs:
                qk, out = scores[0], outs[0]
                k = qk.args[1]
                if op_name(k) in ("transpose", "permute"):
                    k = k.args[0]
                found.append((out, qk.args[0], k, out.args[1]))
    return found


def analyze(traced: Traced) -> Analysis:
    graph = traced.graph
    nodes = [n for n in graph.nodes if n.op == "call_function"]
    linears = {}
    for node in nodes:
        info = _linear_info(node, traced)
        if info is not None:
            linears[node] = info
    # convolutions and embedding lookups: weight-bearing ops a rule may wrap, but not linears for the roles above
    weight_ops = {n: info for n in nodes if n not in linears and (info := _weight_op_info(n, traced)) is not None}

    def is_linear(n):
        return n in linears

    attention = _attention_ops(graph)
    block_re = re.compile(r"(^|\.)\d+$")
    blocks: list[str] = []
    for op_node, *_ in attention:
        candidates = [p for p in stack_paths(op_node) if block_re.search(p)]
        if candidates and candidates[-1] not in blocks:
            blocks.append(candidates[-1])
    block_index = {b: i for i, b in enumerate(blocks)}
    path_layer: dict[str, int | None] = {}

    def layer_of(node) -> int | None:
        for path in reversed(stack_paths(node)):
            if path not in path_layer:
                layer = None
                parts = path.split(".")
                for k in range(len(parts), 0, -1):
                    prefix = ".".join(parts[:k])
                    if prefix in block_index:
                        layer = block_index[prefix]
                        break
                path_layer[path] = layer
            if path_layer[path] is not None:
                return path_layer[path]
        return None

    role_sites: list[Site] = []
    taken_linear: set[fx.Node] = set()

    def add(node, role, layer, module=None, linear=None, **extra):
        role_sites.append(Site(node=node, role=role, layer=layer, module=module if module is not None else innermost(node),
                               op=op_name(node), linear=linear, extra=extra))

    def add_linear(info: LinearInfo, role, layer, **extra):
        taken_linear.add(info.node)
        add(info.node, role, layer, module=info.owner, linear=info, **extra)

    def residual_add_after(value: fx.Node):
        adds = _walk_forward(value, lambda n: op_name(n) == "add" and len(n.all_input_nodes) == 2,
                             VIEW_LIKE, 16)
        return adds[0] if adds else None

    def other_operand(add_node, branch):
        a, b = add_node.args[0], add_node.args[1]
        # the residual is the operand the branch value does not reach
        reach = _walk_back(a, lambda n: n is branch, VIEW_LIKE, 16)
        return b if reach else a

    def close_sublayer(branch_value, prefix, layer):
        add_node = residual_add_after(branch_value)
        if add_node is None:
            return
        residual = other_operand(add_node, branch_value)
        branch = add_node.args[1] if residual is add_node.args[0] else add_node.args[0]
        norm = None
        users = list(add_node.users)
        if len(users) == 1 and op_name(users[0]) in NORM_OPS:
            norm = users[0]
        add(add_node, f"{prefix}.residual_add", layer, branch=branch, residual=residual, norm=norm)
        if isinstance(residual, fx.Node):
            add(residual, f"{prefix}.residual", layer, extra_of=add_node.name)

    hidden = None
    for op_node, q, k, v in attention:
        layer = layer_of(op_node)
        add(op_node, "attention.op", layer)
        srcs = {}
        for role, arg in (("attention.q", q), ("attention.k", k), ("attention.v", v)):
            hits = _walk_back(arg, is_linear, VIEW_LIKE | ROTARY_LIKE, 64)
            srcs[role] = hits[0] if hits else None
        if srcs["attention.q"] is not None and srcs["attention.q"] is srcs["attention.k"] is srcs["attention.v"]:
            info = linears[srcs["attention.q"]]
            add_linear(info, "attention.qkv", layer)
            for i, role in enumerate(("attention.q", "attention.k", "attention.v")):
                third = info.out_features // 3
                add(info.node, role, layer, module=info.owner, linear=info, packed=(i * third, (i + 1) * third))
        else:
            for role, src in srcs.items():
                if src is not None:
                    add_linear(linears[src], role, layer)
        outs = _walk_forward(op_node, is_linear, VIEW_LIKE, 32)
        if outs:
            info = linears[outs[0]]
            add_linear(info, "attention.output", layer)
            hidden = hidden or info.out_features
            close_sublayer(info.value, "attention", layer)

    # FFN: the block's linears after the attention output; the last one is the output projection.
    per_layer: dict[int, list[LinearInfo]] = defaultdict(list)
    for node, info in linears.items():
        layer = layer_of(node)
        if layer is not None and node not in taken_linear:
            per_layer[layer].append(info)
    for layer, infos in per_layer.items():
        out = infos[-1]
        add_linear(out, "ffn.out", layer)
        ins = _walk_back(out.x, lambda n: n in linears and n is not out.node,
                         VIEW_LIKE | {"mul", "gelu", "relu", "silu", "tanh", "sigmoid", "add", "pow", "erf", "div"}, 64)
        act_value = out.x
        while op_name(act_value) in VIEW_LIKE and act_value.args:
            act_value = act_value.args[0]
        add(act_value, "ffn.act", layer)
        if len(ins) >= 2 and op_name(act_value) == "mul":
            # gated FFN: the input whose path to the product passes a non-linearity is the gate
            direct = {a for a in act_value.all_input_nodes}
            for n in ins:
                info = linears[n]
                role = "ffn.in" if (info.value in direct or n in direct) else "ffn.gate"
                add_linear(info, role, layer)
        else:
            for n in ins:
                add_linear(linears[n], "ffn.in", layer)
        close_sublayer(out.value, "ffn", layer)

    for node in nodes:
        op = op_name(node)
        if op in NORM_OPS:
            add(node, "norm", layer_of(node))
        elif op == "embedding":
            add(node, "embedding", layer_of(node), linear=weight_ops.get(node))
        elif op == "rsqrt":
            # a decomposed RMSNorm: the norm is the output of the module that computes the rsqrt
            module = innermost(node)
            for value, bs in traced.boundaries.items():
                if any(b.module == module and b.side == "out" for b in bs):
                    add(value, "norm", layer_of(value), module=module)
                    break

    seen_block: set[tuple[int, str]] = set()
    for value, bs in traced.boundaries.items():
        if value.op == "placeholder" or (_shape(value) is None) or len(_shape(value)) < 2:
            continue
        for bd in bs:
            b_index = block_index.get(bd.module)
            if b_index is None or (b_index, bd.side) in seen_block:
                continue
            seen_block.add((b_index, bd.side))
            if bd.side == "in":
                add(value, "block.input", b_index, module=bd.module)
                if b_index == 0:
                    add(value, "embedding.output", None, module=bd.module)
            else:
                add(value, "block.output", b_index, module=bd.module)

    # LM head: a linear outside every block, after the last block, whose result is returned.
    for node, info in linears.items():
        if layer_of(node) is None and node not in taken_linear and blocks:
            reaches = _walk_forward(info.value, lambda n: n.op == "output", VIEW_LIKE | {"_to_copy", "float"}, 16)
            if reaches and info.out_features != hidden:
                add_linear(info, "lm_head", None)

    role_nodes = {id(s.node) for s in role_sites}
    generic = []
    for n in nodes:
        if id(n) not in role_nodes:
            info = linears.get(n) or weight_ops.get(n)
            generic.append(Site(node=n, role=None, layer=layer_of(n), module=info.owner if info else innermost(n),
                                op=op_name(n), linear=info))
    sites = role_sites + generic
    by_role: dict[str, list[Site]] = defaultdict(list)
    by_op: dict[str, list[Site]] = defaultdict(list)
    for s in sites:
        if s.role:
            by_role[s.role].append(s)
    first_site: dict[fx.Node, Site] = {}
    for s in sites:
        first_site.setdefault(s.node, s)
    for s in first_site.values():
        by_op[s.op].append(s)
    return Analysis(traced=traced, sites=sites, by_role=dict(by_role), by_op=dict(by_op), blocks=blocks,
                    linears=linears, hidden_size=hidden)
