"""Attention adapters (`attend`) at an attention op the module computes itself: "shadow scores".

Some attention classes compute softmax attention with their own tensor ops instead of SDPA or transformers'
attention registry: DeBERTa-v2's disentangled attention, GPT-Neo, BLOOM's ALiBi `baddbmm`, Falcon's eager path,
any hand-written `softmax(q @ k^T * scale + mask) @ v`. There, surgery runs the module's forward inside a
torch-function mode (per thread, lexically scoped to that forward, like rewrite/attention.py's SDPA intercept)
that records the forward's tensor ops. When the product `probs @ v` runs, whose first operand comes from a
softmax over the last axis, the mode knows from the recorded ops:

- the score product (the nearest product upstream of the softmax whose output has the scores' [query, key]
  shape: `matmul`, `bmm`, `baddbmm`, a two-operand `einsum`), its q operand and its k operand;
- the score program: every op from the score product to the softmax input (scale, mask add, `masked_fill`,
  `where`, ALiBi or relative-position terms, a soft-cap, views), with its other operands;
- the key chain and the value chain: the layout and scalar ops (transposes, views, head repeats, a scale, a
  dtype cast) from the keys and values in [batch, heads, positions, head_dim] to the products' operands;
- the probability chain: the ops from the softmax to the `probs @ v` operand (dtype casts, dropout, views).

The adapters are then called as everywhere else, `adapter(query, key, value, attend)` with key and value in
[batch, heads, positions, head_dim] (surgery/modules/attention.py). `attend(q, k, v, prefix)` with `prefix`
added keys in front is computed exactly, with no second pass over the model's keys: the added keys' scores
S_p are the score product of q with the added keys (through the key chain), replayed through the score program
with every score-shaped operand replaced by its value for a visible key that has no position (a mask: attend;
an additive bias: 0; a multiplicative one: 1); scalars and broadcast operands are kept, and views re-targeted to
the added length. The softmax over [S_p, S] is the model's own probabilities P rescaled per row,
r = Z / (Z + Z_p), plus the added keys' probabilities exp(S_p) / (Z + Z_p); so

    attend(q, [k_p, k], [v_p, v]) = r * (P @ v, as the model computed it) + chain(exp(S_p) / (Z + Z_p)) @ v_p

with the probability chain (dropout too) applied to the added probabilities as the model applies it to its
own. `attend(q, k_p, v_p, prefix=all)` (LLaMA-Adapter's separate softmax over its prompts) is
chain(softmax(S_p)) @ v_p. An op the replay does not understand on any of these paths raises a RewriteError
naming it: the adapters are never skipped silently.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from surgery.errors import RewriteError
from surgery.rewrite import mixed
from surgery.rewrite.attention import chain, wrap_forward
from surgery.rewrite.host import _ADAPTER_DEPTH

_SHADOW_ATTR = "_surgery_shadow"

# how an op is named once its variants are folded: __iadd__, add_, __radd__ -> add; __truediv__ -> div
_RENAME = {"truediv": "div", "true_divide": "div", "divide": "div", "multiply": "mul", "subtract": "sub",
           "swapaxes": "transpose", "swapdims": "transpose"}
_PRODUCTS = {"matmul", "bmm", "baddbmm", "einsum"}
# ops from the keys/values in [batch, heads, positions, head_dim] to a product's operand
_LAYOUT = {"transpose", "mT", "permute", "view", "reshape", "contiguous", "clone", "expand", "to", "float", "half",
           "bfloat16", "double", "type", "type_as", "detach", "repeat_interleave"}
_SCALAR = {"div", "mul"}
# score arithmetic the replay understands (elementwise, key axis last)
_ADDITIVE = {"add", "sub", "rsub"}
_MULTIPLICATIVE = {"mul", "div"}
# elementwise bounds whose other operand is a scalar or broadcasts over the keys (XGLM's
# torch.max(scores, finfo.min)); torch.max/min only in their two-tensor form (not a reduction over an axis)
_BOUNDS = {"maximum", "minimum", "fmax", "fmin", "clamp_min", "clamp_max", "max", "min"}
_SCORE_OPS = _ADDITIVE | _MULTIPLICATIVE | _BOUNDS | {"where", "masked_fill", "tanh", "clamp", "clip", "neg", "to",
                                                      "float", "half", "bfloat16", "double", "type", "type_as",
                                                      "contiguous", "clone", "view", "reshape", "detach"}
# ops from the softmax to the probabilities' product
_PROB_OPS = {"to", "float", "half", "bfloat16", "double", "type", "type_as", "contiguous", "clone", "view",
             "reshape", "dropout", "mul", "div", "detach"}
_RESHAPES = {"view", "reshape", "expand"}


def op_name(func) -> str:
    name = getattr(func, "__name__", "") or ""
    if name == "__get__":     # a property: x.mT, x.T
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        if name[:1] == "i" and name[1:] in ("add", "sub", "mul", "truediv", "div", "matmul"):
            name = name[1:]
        elif name in ("radd", "rmul"):
            name = name[1:]
    elif name.endswith("_") and not name.startswith("_"):
        name = name[:-1]
    return _RENAME.get(name, name)


def _out_of_place(func):
    """The out-of-place twin of an in-place op (replays never write into the adapters' tensors)."""
    name = getattr(func, "__name__", "")
    if name.startswith("__i") and name.endswith("__"):
        return getattr(torch.Tensor, "__" + name[3:], func)
    if name.endswith("_") and not name.startswith("_"):
        return getattr(torch.Tensor, name[:-1], func)
    return func


class _Node:
    """One recorded call: the function, its arguments, its output and the nodes that made its tensor arguments."""

    __slots__ = ("func", "name", "args", "kwargs", "out", "inputs", "index")

    def __init__(self, func, args, kwargs, out, inputs, index):
        self.func, self.name, self.args, self.kwargs, self.out = func, op_name(func), args, kwargs, out
        self.inputs, self.index = inputs, index     # inputs: {id(tensor argument): producing node}

    def tensors(self):
        """(path, tensor) of every tensor argument; path: ("a", i), ("a", i, j) in a list, or ("k", name)."""
        for i, a in enumerate(self.args):
            if isinstance(a, torch.Tensor):
                yield ("a", i), a
            elif isinstance(a, (list, tuple)):
                for j, b in enumerate(a):
                    if isinstance(b, torch.Tensor):
                        yield ("a", i, j), b
        for k, v in self.kwargs.items():
            if isinstance(v, torch.Tensor):
                yield ("k", k), v

    def producer(self, tensor):
        return self.inputs.get(id(tensor))


def _substitute(node: _Node, values: dict) -> tuple[tuple, dict]:
    """The node's arguments with the tensors at the paths in `values` replaced."""
    args, kwargs = list(node.args), dict(node.kwargs)
    for path, value in values.items():
        if path[0] == "k":
            kwargs[path[1]] = value
        elif len(path) == 2:
            args[path[1]] = value
        else:
            inner = list(args[path[1]])
            inner[path[2]] = value
            args[path[1]] = type(node.args[path[1]])(inner) if isinstance(node.args[path[1]], tuple) else inner
    return tuple(args), kwargs


def _shape_args(node: _Node) -> tuple[str, list] | None:
    """Where a view/reshape/expand keeps its target shape: ("var", sizes) for varargs, ("seq", sizes) for one
    sequence argument, ("kw", sizes) for a `size`/`shape` keyword."""
    for key in ("size", "shape"):
        if key in node.kwargs:
            return "kw:" + key, list(node.kwargs[key])
    rest = node.args[1:]
    if len(rest) == 1 and isinstance(rest[0], (list, tuple, torch.Size)):
        return "seq", list(rest[0])
    if rest and all(isinstance(r, (int, torch.SymInt)) or (isinstance(r, torch.Tensor) and r.dim() == 0)
                    for r in rest):   # symbolic sizes (torch.export), traced sizes (torch.jit.trace)
        return "var", list(rest)
    return None


def _with_shape(node: _Node, x: torch.Tensor, axis: int, length: int) -> torch.Tensor:
    """Replay a view/reshape/expand on `x` with the size at `axis` of its target shape set to `length`."""
    where, sizes = _shape_args(node)
    if not (isinstance(sizes[axis], int) and sizes[axis] == -1):
        sizes[axis] = length
    func = _out_of_place(node.func)
    if func is torch.Tensor.view:     # the same values; the added keys' tensor may not be viewable (an expand)
        func = torch.Tensor.reshape
    if where == "var":
        return func(x, *sizes)
    if where == "seq":
        return func(x, sizes)
    return func(x, **{**{k: v for k, v in node.kwargs.items()}, where[3:]: sizes})


def _view_axis(in_shape, out_shape, ax_out: int) -> int | None:
    """The input axis a view/reshape maps to output axis `ax_out`, when that axis is kept whole (not merged)."""
    pre = math.prod(out_shape[:ax_out])
    size = out_shape[ax_out]
    found = [i for i in range(len(in_shape)) if math.prod(in_shape[:i]) == pre and in_shape[i] == size]
    return found[-1] if found else None


def _einsum(args) -> tuple[str, list, str] | None:
    """(input subscripts, operands, output subscripts) of a two-operand einsum without an ellipsis."""
    if not args or not isinstance(args[0], str):
        return None
    operands = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
    spec = args[0].replace(" ", "")
    if "->" not in spec or "." in spec or len(operands) != 2:
        return None
    inputs, output = spec.split("->")
    return inputs.split(","), operands, output


def _elementwise_bound(node: "_Node") -> bool:
    """torch.max/min of two tensors (the elementwise maximum/minimum), not a reduction along an axis."""
    other = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    return isinstance(other, torch.Tensor) and not {"dim", "keepdim"} & set(node.kwargs)


class ShadowError(RewriteError):
    """An attention op surgery's shadow replay cannot follow (the adapters would otherwise be skipped)."""


def _refuse(module_name: str, what: str) -> ShadowError:
    return ShadowError(f"{module_name}: attention adapters at an attention op computed by the module itself: {what}; "
                       f"the adapters would be skipped, so surgery refuses")


class ShadowMode(torch.overrides.TorchFunctionMode):
    """Entered by one call of an attention module's forward: records its tensor ops and, at `probs @ v`,
    returns the adapters' attention instead of the model's (see the module docstring)."""

    def __init__(self, adapters: list, module_name: str):
        super().__init__()
        self.adapters, self.module_name = adapters, module_name
        self.producers: dict[int, _Node] = {}
        self.count = 0
        self.handled = 0

    # ---------------------------------------------------------------- recording

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = op_name(func)
        if name in _PRODUCTS and self.adapters:
            found = self._probabilities_operand(func, args, kwargs)
            if found is not None:
                out = func(*args, **kwargs)
                out = self._attend(found, func, args, kwargs, out)
                self._record(func, args, kwargs, out)
                self.handled += 1
                return out
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            self._record(func, args, kwargs, out)
        return out

    def _record(self, func, args, kwargs, out):
        inputs = {}
        for a in list(args) + list(kwargs.values()):
            items = a if isinstance(a, (list, tuple)) else (a,)
            for t in items:
                if isinstance(t, torch.Tensor) and id(t) in self.producers:
                    inputs[id(t)] = self.producers[id(t)]
        node = _Node(func, args, kwargs, out, inputs, self.count)
        self.count += 1
        self.producers[id(out)] = node

    # ---------------------------------------------------------------- the attention op

    def _operands(self, func, args, kwargs):
        """(input, left, right) of a product (input: baddbmm's added term, else None)."""
        name = op_name(func)
        if name == "einsum":
            parsed = _einsum(args)
            return (None, None, None) if parsed is None else (None, *parsed[1])
        if name == "baddbmm":
            named = dict(zip(("input", "batch1", "batch2"), args))
            named.update({k: v for k, v in kwargs.items() if k in ("input", "batch1", "batch2")})
            return named.get("input"), named.get("batch1"), named.get("batch2")
        left = args[0] if args else kwargs.get("input")
        right = args[1] if len(args) > 1 else kwargs.get("other", kwargs.get("mat2"))
        return None, left, right

    def _probabilities_operand(self, func, args, kwargs):
        """For `probs @ v` (its left operand made from a softmax over the last axis through the probability
        chain): (softmax node, probability chain nodes, left, right); else None."""
        if op_name(func) == "baddbmm":
            return None
        _, left, right = self._operands(func, args, kwargs)
        if not isinstance(left, torch.Tensor) or not isinstance(right, torch.Tensor):
            return None
        if op_name(func) == "einsum":   # probs' last axis (the keys) summed against the values'
            (lp, rp), _, outp = _einsum(args)
            if lp[-1] in outp or lp[-1] not in rp:
                return None
        node, path = self.producers.get(id(left)), []
        while node is not None and node.name != "softmax":
            made = [(p, t) for p, t in node.tensors() if id(t) in node.inputs]
            if not made:
                return None
            if node.name not in _PROB_OPS:
                self._unfollowed(node)
                return None
            p, t = made[0]
            path.append((node, p))
            node = node.producer(t)
        if node is None or not self._last_axis_softmax(node):
            return None
        return node, path[::-1], left, right

    def _unfollowed(self, op: _Node):
        """A product whose left operand comes from a softmax over the last axis through `op`, which the replay does
        not follow: refused, naming the op."""
        node = op
        for _ in range(16):
            made = [t for _, t in node.tensors() if id(t) in node.inputs]
            if not made:
                return
            node = node.producer(made[0])
            if node.name in _PRODUCTS:     # another product's output (the attention's own, then the output linear)
                return
            if node.name == "softmax" and self._last_axis_softmax(node):
                raise _refuse(self.module_name, f"the op {op.name!r} between the softmax and its product with the "
                                                f"values is not one the replay understands")

    @staticmethod
    def _last_axis_softmax(node: _Node) -> bool:
        x = node.args[0] if node.args else node.kwargs.get("input")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return isinstance(x, torch.Tensor) and isinstance(dim, int) and dim in (-1, x.dim() - 1)

    def _attend(self, found, func, args, kwargs, out):
        softmax, prob_chain, probs_operand, v_operand = found
        scores = softmax.args[0]
        score_node = self._score_product(softmax)
        _, q_operand, k_operand = self._operands(score_node.func, score_node.args, score_node.kwargs)
        program = self._program(score_node, softmax)
        k_axis, v_axis = k_operand.dim() - 1, v_operand.dim() - 2
        if score_node.name == "einsum":
            (_, kp), _, outp = _einsum(score_node.args)
            if outp[-1] not in kp:
                raise _refuse(self.module_name, f"the einsum {score_node.args[0]!r} does not put the keys last")
            k_axis = kp.index(outp[-1])
        if op_name(func) == "einsum":
            (pp, vp), _, _ = _einsum(args)
            v_axis = vp.index(pp[-1])
        k_canon, k_chain = self._canonical(k_operand, k_axis, "key")
        v_canon, v_chain = self._canonical(v_operand, v_axis, "value")
        for node, _ in prob_chain:
            if node.name in _MULTIPLICATIVE:
                self._check_broadcast(node, scores.shape[-1], "after the softmax")
        dtype = softmax.kwargs.get("dtype") or next((a for a in softmax.args[2:] if isinstance(a, torch.dtype)), None)
        main_scores = scores if dtype is None else scores.to(dtype)
        replay = _Replay(self, score_node, program, k_chain, v_chain, prob_chain, (func, args, kwargs), dtype,
                         main_scores, q_operand)

        def attend(q, k, v, prefix=0):
            if q is not q_operand:
                raise _refuse(self.module_name, "an adapter changed the queries, which this path cannot replay")
            main = k.shape[2] - prefix
            if main not in (0, k_canon.shape[2]) or v.shape[2] != k.shape[2]:
                raise _refuse(self.module_name, f"keys of {k.shape[2]} positions with {prefix} added do not extend "
                                                f"the model's {k_canon.shape[2]}")
            if not prefix:
                return out
            return replay(k[:, :, :prefix], v[:, :, :prefix], out if main else None)

        # the adapters and the replay are no calls of the host's: a functional intercept around this module
        # (host.py: the n-th F.dropout of a forward) must not count their dropout
        depth = getattr(_ADAPTER_DEPTH, "depth", 0)
        _ADAPTER_DEPTH.depth = depth + 1
        try:
            return chain(self.adapters, attend)(q_operand, k_canon, v_canon)
        finally:
            _ADAPTER_DEPTH.depth = depth

    def _score_product(self, softmax: _Node) -> _Node:
        """The nearest product upstream of the softmax whose output has the scores' [query, key] shape."""
        scores = softmax.args[0]
        want = tuple(scores.shape[-2:])
        start = softmax.producer(scores)
        frontier, seen = [start] if start is not None else [], set()
        for _ in range(64):
            nxt = []
            for node in frontier:
                if node is None or id(node) in seen:
                    continue
                seen.add(id(node))
                if node.name in _PRODUCTS and node.out.dim() >= 2 and tuple(node.out.shape[-2:]) == want:
                    return node
                nxt.extend(node.inputs.values())
            frontier = nxt
            if not frontier:
                break
        raise _refuse(self.module_name, "no product of queries and keys found upstream of the softmax")

    def _program(self, score_node: _Node, softmax: _Node) -> list[_Node]:
        """The recorded ops from the score product to the softmax input, in call order."""
        end = softmax.producer(softmax.args[0])
        ancestors, stack = set(), [end]
        while stack:
            node = stack.pop()
            if node is None or id(node) in ancestors or node.index < score_node.index:
                continue
            ancestors.add(id(node))
            stack.extend(node.inputs.values())
        if id(score_node) not in ancestors:
            raise _refuse(self.module_name, "the softmax input is not computed from the score product")
        nodes = {}
        stack = [end]
        while stack:
            node = stack.pop()
            if node is None or id(node) in nodes or id(node) not in ancestors:
                continue
            nodes[id(node)] = node
            stack.extend(node.inputs.values())
        program = []
        on_path = {id(score_node)}
        for node in sorted(nodes.values(), key=lambda n: n.index):
            if node is score_node:
                continue
            if not any(id(p) in on_path for p in node.inputs.values()):
                continue     # a co-operand computed after the product (e.g. from its shape): not score arithmetic
            on_path.add(id(node))
            if node.name not in _SCORE_OPS or (node.name in ("max", "min") and not _elementwise_bound(node)):
                raise _refuse(self.module_name, f"the op {node.name!r} between the score product and the softmax "
                                                f"is not one the replay understands")
            program.append(node)
        return program

    def _canonical(self, operand: torch.Tensor, axis: int, what: str):
        """Walk back from a product's operand through layout and scalar ops to the first value in
        [batch, heads, positions, head_dim]; return it and the chain [(node, axis of its output)] from it."""
        tensor, chain_, node = operand, [], self.producers.get(id(operand))
        # the first [batch, positions, heads, head_dim] value on the way (Funnel's k_head, read by einsum
        # 'bind,bjnd->bnij'): where no [batch, heads, positions, head_dim] one comes before the projection, the
        # adapters see it with the heads first, and their keys go back to its layout
        heads_second = None
        while not (tensor.dim() == 4 and axis == 2):
            if heads_second is None and tensor.dim() == 4 and axis == 1:
                heads_second = (tensor, len(chain_))
            if node is None or node.name not in _LAYOUT | _SCALAR:
                if heads_second is not None:
                    tensor, kept = heads_second
                    canonical = tensor.transpose(1, 2)
                    chain_ = chain_[:kept] + [(_Node(torch.transpose, (canonical, 1, 2), {}, tensor, {}, -1), 1,
                                               canonical)]
                    return canonical, chain_[::-1]
                op = node.name if node is not None else "a value made outside the module's forward"
                raise _refuse(self.module_name, f"the {what}s reach the attention product through {op!r} before "
                                                f"any [batch, heads, positions, head_dim] value")
            source = node.args[0] if node.args and isinstance(node.args[0], torch.Tensor) else None
            if node.name in _SCALAR:
                tensors = [t for _, t in node.tensors()]
                main = [t for t in tensors if t.dim() > 0]
                if len(main) != 1:
                    raise _refuse(self.module_name, f"the {what}s are scaled by a tensor ({node.name!r})")
                source = main[0]
            if source is None:
                raise _refuse(self.module_name, f"{node.name!r} on the {what}s")
            in_axis = self._axis_back(node, source, axis, what)
            chain_.append((node, axis, source))
            tensor, axis, node = source, in_axis, node.producer(source)
        return tensor, chain_[::-1]

    def _axis_back(self, node: _Node, source: torch.Tensor, axis: int, what: str) -> int:
        name, out = node.name, node.out
        if name == "transpose":
            a, b = [d % out.dim() for d in node.args[1:3]]
            return b if axis == a else a if axis == b else axis
        if name == "mT":
            a, b = out.dim() - 2, out.dim() - 1
            return b if axis == a else a if axis == b else axis
        if name == "permute":
            dims = node.args[1:] if len(node.args) > 2 else node.args[1]
            return [d % out.dim() for d in dims][axis]
        if name in ("view", "reshape"):
            found = _view_axis(tuple(source.shape), tuple(out.shape), axis)
            if found is None or _shape_args(node) is None:
                raise _refuse(self.module_name, f"a {name} merges the {what}s' positions with another axis")
            return found
        if name == "expand":
            if _shape_args(node) is None:
                raise _refuse(self.module_name, f"an expand of the {what}s without explicit sizes")
            return axis - (out.dim() - source.dim())
        if name == "repeat_interleave":
            dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else None)
            if dim is None or dim % out.dim() == axis:
                raise _refuse(self.module_name, f"a repeat_interleave along the {what}s' positions")
            return axis
        return axis       # elementwise and dtype ops keep the axes

    def _check_broadcast(self, node: _Node, keys: int, where: str):
        for _, t in node.tensors():
            if t is not node.args[0] and t.dim() >= 1 and t.shape[-1] == keys and keys > 1:
                raise _refuse(self.module_name, f"a {node.name!r} by a value of the scores' shape {where}")


class _Replay:
    """attend(q, [k_p, k], [v_p, v], prefix) for one call of the attention op (see the module docstring)."""

    def __init__(self, mode: ShadowMode, score_node, program, k_chain, v_chain, prob_chain, call, dtype,
                 main_scores, q_operand):
        self.mode, self.score_node, self.program = mode, score_node, program
        self.k_chain, self.v_chain, self.prob_chain = k_chain, v_chain, prob_chain
        self.call = call       # (func, args, kwargs) of the model's probs @ v
        self.dtype, self.main_scores, self.q_operand = dtype, main_scores, q_operand

    def refuse(self, what):
        return _refuse(self.mode.module_name, what)

    def along(self, chain_, x, length):
        for node, axis, source in chain_:
            if node.name in _RESHAPES:
                x = _with_shape(node, x, axis, length)
            else:
                path = next(p for p, t in node.tensors() if t is source)
                args, kwargs = _substitute(node, {path: x})
                x = _out_of_place(node.func)(*args, **kwargs)
        return x

    def scores(self, pk: torch.Tensor) -> torch.Tensor:
        length = pk.shape[2]
        keys = self.main_scores.shape[-1]
        pk_operand = self.along(self.k_chain, pk, length)
        node = self.score_node
        bias, _, k_operand = self.mode._operands(node.func, node.args, node.kwargs)
        paths = list(node.tensors())
        # the keys are the last operand (q @ k^T; baddbmm(bias, q, k^T)), also where q and k are one tensor
        values = {[p for p, t in paths if t is k_operand][-1]: pk_operand}
        if bias is not None and paths[0][1] is bias and bias.dim() > 0 and bias.shape[-1] == keys:
            values[paths[0][0]] = self.neutral(bias, 0, keys)   # baddbmm's added term (ALiBi): none for added keys
        args, kwargs = _substitute(node, values)
        shadow = {id(node): _out_of_place(node.func)(*args, **kwargs)}
        self.check(node, shadow[id(node)], length)
        for node in self.program:
            shadow[id(node)] = self.step(node, shadow, keys, length)
        end = self.program[-1] if self.program else self.score_node
        return shadow[id(end)]

    def step(self, node: _Node, shadow: dict, keys: int, length: int) -> torch.Tensor:
        tracked = {p: shadow[id(node.inputs[id(t)])] for p, t in node.tensors()
                   if id(t) in node.inputs and id(node.inputs[id(t)]) in shadow}
        if node.name in ("view", "reshape"):
            if tuple(node.out.shape[-1:]) != (keys,):
                raise self.refuse(f"a {node.name} of the scores that moves the key axis")
            source = tracked.get(("a", 0))
            if source is None:
                raise self.refuse(f"a {node.name} of a score-shaped value")
            out = _with_shape(node, source, node.out.dim() - 1, length)
        else:
            values = dict(tracked)
            for path, t in node.tensors():
                if path in values or t.dim() == 0 or t.shape[-1] != keys:
                    continue      # scalars and operands broadcast along the keys are kept
                values[path] = self.co_operand(node, path, t, tracked, keys)
            args, kwargs = _substitute(node, values)
            out = _out_of_place(node.func)(*args, **kwargs)
        self.check(node, out, length)
        return out

    def co_operand(self, node: _Node, path, t: torch.Tensor, tracked: dict, keys: int) -> torch.Tensor:
        """A score-shaped operand's value for keys that are visible to every query and have no position."""
        name = node.name
        if name in _ADDITIVE:
            return self.neutral(t, 0, keys)
        if name == "mul" or (name == "div" and path != ("a", 0)):
            return self.neutral(t, 1, keys)
        if name == "masked_fill" and path in (("a", 1), ("k", "mask")):
            return self.neutral(t, False, keys)
        if name == "where" and path in (("a", 0), ("k", "condition")):
            if ("a", 1) in tracked or ("k", "input") in tracked:
                return self.neutral(t, True, keys)
            if ("a", 2) in tracked or ("k", "other") in tracked:
                return self.neutral(t, False, keys)
        raise self.refuse(f"{name!r} of the scores with another value of their shape ({tuple(t.shape)}), which has no "
                          f"known value for added keys")

    @staticmethod
    def neutral(t: torch.Tensor, value, keys: int) -> torch.Tensor:
        make = torch.ones if value else torch.zeros    # value: 0, 1, False or True
        return make((*t.shape[:-1], 1), dtype=t.dtype, device=t.device)

    def check(self, node: _Node, out: torch.Tensor, length: int):
        want = tuple(node.out.shape[:-1])
        if not isinstance(out, torch.Tensor) or tuple(out.shape[:-1]) != want or out.shape[-1] != length:
            raise self.refuse(f"the replay of {node.name!r} on the added keys' scores gave "
                              f"{tuple(getattr(out, 'shape', ()))}, not {want + (length,)}")

    def probabilities(self, probs: torch.Tensor, length: int, elementwise: bool) -> torch.Tensor:
        """The probability chain on `probs` (of `length` keys); without its dropout and products
        (`elementwise` False) for the per-row rescale of the model's own output."""
        for node, path in self.prob_chain:
            if node.name in ("dropout", "mul", "div") and not elementwise:
                continue
            if node.name in ("view", "reshape"):
                probs = _with_shape(node, probs, node.out.dim() - 1, length)
                continue
            args, kwargs = _substitute(node, {path: probs})
            if node.name == "dropout":     # never in place: the added probabilities feed autograd
                args, kwargs = args[:3], {k: v for k, v in kwargs.items() if k != "inplace"}
            probs = _out_of_place(node.func)(*args, **kwargs)
        return probs

    def product(self, probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The model's probs @ v call on other probabilities and values."""
        func, args, kwargs = self.call
        _, left, right = self.mode._operands(func, args, kwargs)
        node = _Node(func, args, kwargs, None, {}, -1)
        paths = list(node.tensors())
        values_path = [p for p, t in paths if t is right][-1]
        probs_path = next(p for p, t in paths if t is left and p != values_path)
        args, kwargs = _substitute(node, {probs_path: probs, values_path: values})
        return func(*args, **kwargs)

    def __call__(self, pk: torch.Tensor, pv: torch.Tensor, main_out: torch.Tensor | None) -> torch.Tensor:
        length = pk.shape[2]
        s_p = self.scores(pk)
        if self.dtype is not None:
            s_p = s_p.to(self.dtype)
        pv_operand = self.along(self.v_chain, pv, length)
        if main_out is None:
            p_p = torch.softmax(s_p, dim=-1)
            return self.product(self.probabilities(p_p, length, True), pv_operand)
        s_m = self.main_scores
        lse_m = torch.logsumexp(s_m, dim=-1, keepdim=True)
        lse = torch.logaddexp(lse_m, torch.logsumexp(s_p, dim=-1, keepdim=True))
        r = self.probabilities(torch.exp(lse_m - lse).to(s_p.dtype), 1, False)
        p_p = self.probabilities(torch.exp(s_p - lse), length, True)
        if op_name(self.call[0]) == "einsum":    # its output need not keep the queries' rows last but one
            _, probs, values = self.mode._operands(*self.call)
            return self.product(probs * r, values) + self.product(p_p, pv_operand)
        return r * main_out + self.product(p_p, pv_operand)


# ---------------------------------------------------------------- attaching to a module

def _shadow_forward(self, *args, **kwargs):
    """The module's own forward, inside a mode that realizes the active attention adapters on its attention."""
    entries = [(adapter, on) for adapter, on in self.__dict__[_SHADOW_ATTR] if on()]
    if not entries:
        return type(self).forward(self, *args, **kwargs)
    if mixed.block_of(entries) is not None:
        # the replay prepends every live adapter's keys to every row: per-row routing (MixedBatch, a BatchSplit
        # of names) would silently be a Stack here
        raise _refuse(type(self).__name__, "a MixedBatch or BatchSplit of attention adapters is not routed per row "
                                           "on an attention the model computes itself (its own softmax); run one "
                                           "adapter per call (set_active) or use Stack")
    active = [adapter for adapter, _ in entries]
    mode = ShadowMode(active, type(self).__name__)
    with mode:
        out = type(self).forward(self, *args, **kwargs)
    if not mode.handled:
        raise _refuse(type(self).__name__, "its forward made no product of softmax probabilities and values that "
                                           "surgery could follow")
    return out


class _ShadowForward:
    """`module.forward` of a module whose attention is realized by shadow scores (picklable, deep-copyable)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return _shadow_forward(self.module, *args, **kwargs)


def attach_shadow(module: nn.Module, adapter: Callable, gate: Callable[[], bool]) -> Callable[[], None]:
    """While `module`'s forward runs, its softmax attention goes through the adapters (composed in attach
    order, the first attached innermost, as at the other attention ops). Nothing outside the module changes."""
    return wrap_forward(module, _SHADOW_ATTR, _ShadowForward, adapter, gate, "adapt its attention")


# ---------------------------------------------------------------- at apply: the traced attention op

# the traced (aten) names of what the replay follows
_TRACED_SCORE_OPS = (_SCORE_OPS - {"max", "min"}) | {"_to_copy", "_unsafe_view", "alias", "lift_fresh_copy",
                                                      "masked_fill_", "copy"}
_TRACED_PROB_OPS = _PROB_OPS | {"_to_copy", "_unsafe_view", "alias", "native_dropout", "getitem", "expand"}


def _traced_name(node) -> str:
    from surgery.analyze import roles
    name = roles.op_name(node)
    return name[:-1] if name.endswith("_") and not name.startswith("_") else name


def _traced_bound(node) -> bool:
    """aten.max.other / aten.min.other: torch.max/min of two tensors, elementwise (not max.dim, a reduction)."""
    return _traced_name(node) in ("max", "min") and getattr(node.target, "_overloadname", None) == "other"


def check_traced(out_node, module: str) -> None:
    """Refuse at apply, naming the op, an eager attention op whose traced score or probability path has an op the
    shadow replay does not follow (the same test runs again on every call, on the ops the forward really runs)."""
    from surgery.analyze import roles
    node, seen = roles._product_operands(out_node)[0], 0
    while roles.op_name(node) not in roles.NORMALIZATIONS:
        name = _traced_name(node)
        if name not in _TRACED_PROB_OPS or seen > 16:
            raise _refuse(module, f"the op {name!r} between the softmax and its product with the values is not one "
                                  f"the replay understands")
        node, seen = next(a for a in node.all_input_nodes), seen + 1
    scores, want = node.args[0], roles._last2(node)
    products = roles._walk_back(scores, lambda n: roles.op_name(n) in roles.PRODUCTS and roles._last2(n) == want,
                                roles._SCORE_PATH, 32)
    if not products:
        raise _refuse(module, "no product of queries and keys found upstream of the softmax")
    product = products[0]
    if roles.op_name(product) not in _PRODUCTS:
        raise _refuse(module, f"the scores are a {roles.op_name(product)!r}, which the replay does not follow")
    ancestors, stack = set(), [scores]
    while stack:
        n = stack.pop()
        if n in ancestors or n.op != "call_function":
            continue
        ancestors.add(n)
        stack.extend(n.all_input_nodes)
    on_path = {product}
    for n in out_node.graph.nodes:
        if n in ancestors and n is not product and any(a in on_path for a in n.all_input_nodes):
            on_path.add(n)
            if _traced_name(n) not in _TRACED_SCORE_OPS and not _traced_bound(n):
                raise _refuse(module, f"the op {_traced_name(n)!r} between the score product and the softmax is not "
                                      f"one the replay understands")
