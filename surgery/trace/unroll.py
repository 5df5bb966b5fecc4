"""Trace one layer of each kind, not the whole depth: truncate the layer stacks, export, unroll the graph.

A model's depth is repeated layers (an `nn.ModuleList` of blocks called once each, in order). Exporting all 32 (or
80) of them costs time linear in depth for graphs that are copies of each other. Here each such stack is
temporarily replaced by a prefix of its layers that holds every kind of layer the rest of the stack has twice in
a row (LLaMA: 2 of 32; T5, whose block 0 holds the relative position bias: 3; first-k-dense-then-MoE: k + 2), the
shorter model is exported with its module marks, and the graph of the missing layers j is copied from the
prefix's last layer (the template, same kind): its inputs from the previous layer map to the previous copy's
values, values computed outside the layers (masks, rotary tables) stay shared, its parameter and buffer
placeholders become layer j's, and module paths in the metadata and marks name layer j. The nodes after the
stack then read the last copy. Nodes are finally renamed in graph order, as `torch.export` names them, so the
result is the graph a full export gives.

What is checked, not assumed (any failure: `None`, and the caller exports the whole model):
- a layer's kind is its module tree (types), its parameters' and buffers' names, shapes and dtypes, and its
  modules' plain attributes (an attribute that differs between every layer, such as `layer_idx`, is an index,
  not a kind); parameters shared with anything else, hooks, parametrizations or instance-level forwards on a
  layer keep its stack whole;
- after the export: every kept layer ran exactly once; each stack's layers are contiguous in the graph, in order,
  with nothing else between them; the template and its predecessor are the same graph (same ops, constants,
  shapes, marks, and inputs corresponding: their own nodes at the same positions, the same shared values, or
  their own parameters); nothing outside a stack reads a layer but the last one, and a layer reads only itself,
  its predecessor and values outside the stack.
"""
from __future__ import annotations

import contextlib
import json
import re
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import fx, nn

SCALARS = (int, float, str, bool, type(None), torch.dtype)
MIN_SAVED = 1      # truncate a stack only when it saves at least this many layers


@dataclass
class Stack:
    """A layer container and how much of it is traced: entries [0, keep) run; [keep, length) are copies of
    entry keep - 1 (the template)."""

    path: str            # the container's module path ("model.layers")
    parent: nn.Module
    attr: str
    container: nn.ModuleList
    keep: int
    length: int

    def entry(self, i: int) -> str:
        return f"{self.path}.{i}" if self.path else str(i)


def _plain(value) -> bool:
    if isinstance(value, SCALARS):
        return True
    return isinstance(value, (tuple, list)) and len(value) <= 16 and all(isinstance(v, SCALARS) for v in value)


def _attributes(module: nn.Module) -> dict:
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(module).items()
            if not k.startswith("__") and k != "training" and _plain(v)}


def _hooked(module: nn.Module) -> bool:
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return (any(getattr(module, h, None) for h in hooks) or "forward" in vars(module)
            or bool(getattr(module, "parametrizations", None)))


def _structure(entry: nn.Module, counts: dict) -> tuple | None:
    """The entry's module tree, tensors and hooks (None: never truncate its stack)."""
    modules = []
    for rel, m in entry.named_modules(remove_duplicate=False):
        if _hooked(m):
            return None
        modules.append((rel, type(m).__module__, type(m).__qualname__))
    tensors = []
    for kind, named in (("p", entry.named_parameters(remove_duplicate=False)),
                        ("b", entry.named_buffers(remove_duplicate=False))):
        for rel, t in named:
            if t is None or counts.get(id(t), 0) != 1:     # shared with another layer or with the rest of the model
                return None
            tensors.append((kind, rel, tuple(t.shape), str(t.dtype), t.device.type, bool(t.requires_grad)))
    return tuple(modules), tuple(tensors)


def find_stacks(model: nn.Module) -> list[Stack]:
    """The outermost layer containers worth truncating, with their prefix length."""
    counts: dict[int, int] = defaultdict(int)
    for _, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        if t is not None:
            counts[id(t)] += 1
    stacks: list[Stack] = []
    taken: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(t + ".") for t in taken):
            continue
        if type(module) is not nn.ModuleList or len(module) < 3:
            continue
        keys = list(module._modules)
        if keys != [str(i) for i in range(len(keys))]:
            continue
        entries = list(module)
        if any(e is None or any(e is o for o in entries[:i]) for i, e in enumerate(entries)):
            continue
        structures = [_structure(e, counts) for e in entries]
        if any(s is None for s in structures):
            taken.append(path)
            continue
        attrs = [{(rel, k): v for rel, m in e.named_modules(remove_duplicate=False)
                  for k, v in _attributes(m).items()} for e in entries]
        keys_all = set().union(*attrs)
        # an attribute whose value differs between every two layers (layer_idx) indexes them; others are kinds
        index_like = {k for k in keys_all if len({repr(a.get(k)) for a in attrs}) == len(entries)}
        kinds = [(s, tuple(sorted((k, repr(v)) for k, v in a.items() if k not in index_like)))
                 for s, a in zip(structures, attrs)]
        n = len(entries)
        start = n - 1
        while start > 0 and kinds[start - 1] == kinds[n - 1]:
            start -= 1
        keep = max(start + 2, 2)
        taken.append(path)
        if n - keep < MIN_SAVED:
            continue
        parent_path, _, attr = path.rpartition(".")
        stacks.append(Stack(path=path, parent=model.get_submodule(parent_path), attr=attr, container=module,
                            keep=keep, length=n))
    return stacks


@contextlib.contextmanager
def truncated(stacks: list[Stack]):
    """Each stack's container replaced by a ModuleList of its first `keep` entries; the user's own container
    objects are put back however the block ends (an error, Ctrl-C)."""
    done = []
    try:
        for s in stacks:
            short = nn.ModuleList(list(s.container)[:s.keep])
            short.training = s.container.training
            s.parent._modules[s.attr] = short
            done.append(s)
        yield
    finally:
        for s in done:
            s.parent._modules[s.attr] = s.container


# ------------------------------------------------------------------------------------------------- the graph

def _paths(node: fx.Node) -> list[str]:
    return [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]


def _swap(path: str, old: str, new: str) -> str:
    if path == old:
        return new
    if path.startswith(old + "."):
        return new + path[len(old):]
    return path


def _mark_tag(tag: str, old: str, new: str) -> str:
    name, side, loc, call = json.loads(tag)
    return json.dumps([_swap(name, old, new), side, loc, call])


def _is_mark(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.ops.surgery.mark.default


def _sanitize(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]", "_", name).lower()


def _val_key(val):
    if isinstance(val, torch.Tensor):
        return ("T", tuple(val.shape), val.dtype)
    if isinstance(val, (tuple, list)):
        return tuple(_val_key(v) for v in val)
    return type(val).__name__


class Refused(Exception):
    """The truncated graph does not check out: export the whole model instead."""


def unroll(graph: fx.Graph, stacks: list[Stack], params: dict[str, str], buffers: dict[str, str],
           calls: dict[str, int], param_order: dict[str, int], buffer_order: dict[str, int],
           constants: dict[str, str], values: dict[str, object]) -> dict[str, str]:
    """Copy each stack's template layer into the missing layers' places, in `graph`. `params`/`buffers`
    (placeholder name -> qualified name), `constants` (placeholder name -> the export's name of a lifted constant),
    `values` (placeholder name -> the constant) and `calls` are updated in place. Returns the placeholders' new
    names (lifted constants are numbered in order of use, as the export numbers them), for `renamed`. Raises
    Refused when something does not check out."""
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    placeholders = {n.name: n for n in nodes if n.op == "placeholder"}
    tensor_of = {**params, **buffers}
    # region of each node: (stack index, layer) or None
    entry_region = {s.entry(i): (k, i) for k, s in enumerate(stacks) for i in range(s.keep)}
    region: dict[fx.Node, tuple[int, int]] = {}
    for n in nodes:
        if n.op != "call_function":
            continue
        hits = {entry_region[p] for p in _paths(n) if p in entry_region}
        if len(hits) > 1:
            raise Refused(f"{n.name} runs in two layers")
        if hits:
            region[n] = hits.pop()
    members: dict[tuple[int, int], list[fx.Node]] = defaultdict(list)
    for n in nodes:
        if n in region:
            members[region[n]].append(n)
    for k, s in enumerate(stacks):
        for i in range(s.keep):
            entry = s.entry(i)
            if calls.get(entry) != 1 or not members[(k, i)]:
                raise Refused(f"{entry} ran {calls.get(entry, 0)} times")
        # contiguous and in order, nothing else between the layers
        first, last = position[members[(k, 0)][0]], position[members[(k, s.keep - 1)][-1]]
        expected = [n for i in range(s.keep) for n in members[(k, i)]]
        between = [n for n in nodes[first:last + 1] if n.op == "call_function"]
        if between != expected:
            raise Refused(f"{s.path}: other ops run between its layers")

    # who reads a layer: itself, the next layer, or (the last layer only) anything after the stack
    for n in nodes:
        mine = region.get(n)
        for a in n.all_input_nodes:
            theirs = region.get(a)
            if theirs is None or theirs == mine:
                continue
            k, i = theirs
            if mine is not None and mine[0] == k and mine[1] == i + 1:
                continue
            if mine is None or mine[0] != k:
                if i == stacks[k].keep - 1:
                    continue
            raise Refused(f"{n.name} reads {a.name} of another layer")

    for k, s in enumerate(stacks):
        _check_same(members[(k, s.keep - 2)], members[(k, s.keep - 1)], s.entry(s.keep - 2), s.entry(s.keep - 1),
                    region, tensor_of, k, constants, values)

    new_tensors: list[tuple[str, str, fx.Node, bool]] = []    # (placeholder name, qualified name, template ph, is_param)
    constant_copies: dict[tuple[fx.Node, int], fx.Node] = {}
    replace_after: dict[fx.Node, fx.Node] = {}
    for k, s in enumerate(stacks):
        t = s.keep - 1
        template, previous = members[(k, t)], members[(k, t - 1)]
        old = s.entry(t)
        prev_copy = {n: i for i, n in enumerate(previous)}
        index = {n: i for i, n in enumerate(template)}
        last_nodes = template
        anchor = template[-1]
        for j in range(s.keep, s.length):
            new = s.entry(j)
            env: dict[fx.Node, fx.Node] = {}
            copies: list[fx.Node] = []

            def arg_of(a: fx.Node) -> fx.Node:
                if a in env:
                    return env[a]
                if a in prev_copy:
                    return last_nodes[prev_copy[a]]
                if a.op == "placeholder" and a.name in tensor_of:
                    qual = _swap(tensor_of[a.name], old, new)
                    if qual != tensor_of[a.name]:
                        return _tensor_placeholder(graph, placeholders, tensor_of, new_tensors, a, qual,
                                                   a.name in params)
                if a.op == "placeholder" and a.name in constants:
                    target = _swap(constants[a.name], old, new)
                    if target != constants[a.name]:
                        if (a, j) not in constant_copies:
                            with graph.inserting_before(a):
                                ph = graph.placeholder(f"_surgery_constant_{len(constant_copies)}")
                            ph.meta = dict(a.meta)
                            constants[ph.name], values[ph.name] = target, values.get(a.name)
                            constant_copies[(a, j)] = ph
                        return constant_copies[(a, j)]
                return a
            with graph.inserting_after(anchor):
                pass
            for n in template:
                with graph.inserting_after(anchor):
                    c = graph.node_copy(n, arg_of)
                c.meta = dict(n.meta)
                stack = n.meta.get("nn_module_stack")
                if stack:
                    c.meta["nn_module_stack"] = {_stack_key(key, old, new): (_swap(p, old, new), ty)
                                                 for key, (p, ty) in stack.items()}
                if _is_mark(c):
                    c.args = (c.args[0], _mark_tag(c.args[1], old, new))
                env[n] = c
                copies.append(c)
                anchor = c
            last_nodes = copies
            for m in [m for m in calls if m == old or m.startswith(old + ".")]:
                calls[_swap(m, old, new)] = calls[m]
        # what read the template from outside the stack reads the last copy
        if last_nodes is not template:
            for n in template:
                c = last_nodes[index[n]]
                replace_after[n] = c
    for n, c in replace_after.items():
        k = region[n][0]
        n.replace_all_uses_with(c, delete_user_cb=lambda u, k=k: not (
            (region.get(u) or (None,))[0] == k or _is_copy_of(u, k, stacks)))
    _order_placeholders(graph, new_tensors, params, buffers, param_order, buffer_order)
    names = _number_constants(graph, constants, values) if constant_copies else {}
    for table in (params, buffers):     # in placeholder order, as the export's signature lists them
        ordered = [(n.name, table[n.name]) for n in graph.nodes if n.op == "placeholder" and n.name in table]
        table.clear()
        table.update(ordered)
    return names


def _number_constants(graph: fx.Graph, constants: dict[str, str], values: dict) -> dict[str, str]:
    """Lifted constants numbered in order of first use (`...lifted_tensor_<n>`), their placeholders in that order
    after the parameters and buffers: the names and order of a full export."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    phs = [n for n in graph.nodes if n.op == "placeholder" and n.name in constants]
    first = {n: min((order[u] for u in n.users), default=1 << 30) for n in phs}
    phs.sort(key=lambda n: first[n])
    names, new_constants, new_values = {}, {}, {}
    for count, ph in enumerate(phs):
        target = re.sub(r"lifted_tensor_\d+$", f"lifted_tensor_{count}", constants[ph.name])
        name = "c_" + _sanitize(target)
        if name in new_constants:
            raise Refused(f"constant name {name} taken")
        names[ph.name] = name
        new_constants[name] = target
        if ph.name in values:
            new_values[name] = values[ph.name]
    others = [n for n in graph.nodes if n.op == "placeholder" and n.name not in constants]
    tensors = [n for n in others if n.name.startswith(("p_", "b_"))]
    if others[:len(tensors)] != tensors:
        raise Refused("placeholders out of the export's order")
    anchor = tensors[-1] if tensors else None
    for ph in phs:
        if anchor is None:
            next(iter(graph.nodes)).prepend(ph)
        else:
            anchor.append(ph)
        anchor = ph
    constants.clear()
    constants.update(new_constants)
    values.clear()
    values.update(new_values)
    return names


def _is_copy_of(node: fx.Node, k: int, stacks: list[Stack]) -> bool:
    """A copied layer of stack k (its nodes are not in the region map)."""
    s = stacks[k]
    prefix = s.path + "." if s.path else ""
    for p in _paths(node):
        if p.startswith(prefix):
            rest = p[len(prefix):].split(".", 1)[0]
            if rest.isdigit() and s.keep <= int(rest) < s.length:
                return True
    return False


def _stack_key(key: str, old: str, new: str) -> str:
    base, at, call = key.rpartition("@")
    if not at or not call.isdigit():
        base, at, call = key, "", ""
    for lead in ("L__self__", ""):
        if base.startswith(lead) and _swap(base[len(lead):], old, new) != base[len(lead):]:
            return lead + _swap(base[len(lead):], old, new) + at + call
    return key


def _tensor_placeholder(graph, placeholders, tensor_of, new_tensors, template_ph, qual, is_param) -> fx.Node:
    name = ("p_" if is_param else "b_") + _sanitize(qual)
    if name in placeholders:
        if tensor_of.get(name) != qual:
            raise Refused(f"placeholder name {name} taken")
        return placeholders[name]
    with graph.inserting_before(template_ph):
        ph = graph.placeholder(name)
    if ph.name != name:
        raise Refused(f"placeholder name {name} taken")
    ph.meta = dict(template_ph.meta)
    placeholders[name] = ph
    tensor_of[name] = qual
    new_tensors.append((name, qual, ph, is_param))
    return ph


def _order_placeholders(graph, new_tensors, params, buffers, param_order, buffer_order):
    """Put the new placeholders where a full export puts them: parameters, then buffers, each in the model's
    order, then the rest (constants, user inputs) as they were. Left as they are when the export's own order is
    not that one."""
    for name, qual, _, is_param in new_tensors:
        (params if is_param else buffers)[name] = qual
    if not new_tensors:
        return
    new = {t[2] for t in new_tensors}
    phs = [n for n in graph.nodes if n.op == "placeholder"]

    def key(n):
        if n.name in params:
            return (0, param_order.get(params[n.name], 1 << 30))
        return (1, buffer_order.get(buffers[n.name], 1 << 30))
    tensors = [n for n in phs if n.name in params or n.name in buffers]
    old = [n for n in phs if n not in new]
    old_tensors = [n for n in tensors if n not in new]
    if old[:len(old_tensors)] != old_tensors or old_tensors != sorted(old_tensors, key=key):
        return
    rest = [n for n in phs if n not in set(tensors)]
    first_other = next((n for n in graph.nodes if n.op != "placeholder"), None)
    if first_other is None:
        return
    for n in sorted(tensors, key=key) + rest:
        first_other.prepend(n)


def _check_same(prev: list[fx.Node], tmpl: list[fx.Node], prev_path: str, tmpl_path: str, region, tensor_of, k,
                constants, values):
    """The template layer and its predecessor are one graph: same ops, constants, value shapes and marks, and
    inputs that correspond."""
    if len(prev) != len(tmpl):
        raise Refused(f"{prev_path} and {tmpl_path} differ in size ({len(prev)} / {len(tmpl)} ops)")
    at_prev = {n: i for i, n in enumerate(prev)}
    at_tmpl = {n: i for i, n in enumerate(tmpl)}

    def same(x, y) -> bool:
        if isinstance(x, fx.Node) or isinstance(y, fx.Node):
            if not (isinstance(x, fx.Node) and isinstance(y, fx.Node)):
                return False
            if x in at_prev and y in at_tmpl:
                return at_prev[x] == at_tmpl[y]
            if y in at_prev:                       # the template reads its predecessor
                rx = region.get(x)
                return rx is None or rx[0] != k or rx[1] == region[y][1] - 1
            if x is y:                             # a shared value from outside the stack
                return region.get(x) is None or region[x][0] != k
            if x.op == "placeholder" and y.op == "placeholder" and x.name in tensor_of and y.name in tensor_of:
                return _swap(tensor_of[x.name], prev_path, tmpl_path) == tensor_of[y.name] \
                    and tensor_of[x.name] != tensor_of[y.name]
            if x.op == "placeholder" and y.op == "placeholder" and x.name in constants and y.name in constants:
                vx, vy = values.get(x.name), values.get(y.name)
                return (re.sub(r"lifted_tensor_\d+$", "", _swap(constants[x.name], prev_path, tmpl_path))
                        == re.sub(r"lifted_tensor_\d+$", "", constants[y.name]) and constants[x.name] != constants[y.name]
                        and isinstance(vx, torch.Tensor) and isinstance(vy, torch.Tensor)
                        and vx.dtype == vy.dtype and vx.shape == vy.shape and vx.device == vy.device
                        and (vx.is_meta or bool(torch.equal(vx, vy))))
            return False
        if isinstance(x, (list, tuple)):
            return isinstance(y, (list, tuple)) and type(x) is type(y) and len(x) == len(y) and \
                all(same(a, b) for a, b in zip(x, y))
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(same(x[key], y[key]) for key in x)
        if type(x) is not type(y):
            return False
        if isinstance(x, float) and x != x:
            return y != y
        return x == y

    for a, b in zip(prev, tmpl):
        if a.op != b.op or a.target != b.target:
            raise Refused(f"{prev_path} and {tmpl_path} differ at {a.name} / {b.name}")
        if _val_key(a.meta.get("val")) != _val_key(b.meta.get("val")):
            raise Refused(f"{prev_path} and {tmpl_path} differ in shape at {a.name} / {b.name}")
        args_a = a.args
        if _is_mark(a):
            args_a = (a.args[0], _mark_tag(a.args[1], prev_path, tmpl_path))
        if not same(args_a, b.args) or not same(dict(a.kwargs), dict(b.kwargs)):
            raise Refused(f"{prev_path} and {tmpl_path} differ in the inputs of {a.name} / {b.name}")
        sa = [(_stack_key(key, prev_path, tmpl_path), _swap(p, prev_path, tmpl_path))
              for key, (p, _) in (a.meta.get("nn_module_stack") or {}).items()]
        if sa != [(key, p) for key, (p, _) in (b.meta.get("nn_module_stack") or {}).items()]:
            raise Refused(f"{prev_path} and {tmpl_path} differ in modules at {a.name} / {b.name}")


def renamed(graph: fx.Graph, names: dict[str, str] | None = None) -> fx.Graph:
    """A copy of `graph` whose nodes are named afresh in graph order, as torch.export names them (placeholders
    keep their names): a copied layer's `linear_9` becomes the `linear_37` a full export has."""
    out = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in graph.nodes:
        if n.op == "placeholder":
            name = (names or {}).get(n.name, n.name)
        else:
            m = re.match(r"(.*)_(\d+)$", n.name)
            name = m.group(1) if m else n.name
        target = name if n.op == "placeholder" else n.target
        c = out.create_node(n.op, target, fx.map_arg(n.args, env.__getitem__),
                            fx.map_arg(n.kwargs, env.__getitem__), name=name, type_expr=n.type)
        if n.op == "placeholder" and c.name != name:
            raise Refused(f"placeholder {n.name} renamed")
        c.meta = n.meta
        env[n] = c
    return out
