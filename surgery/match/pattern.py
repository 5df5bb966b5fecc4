"""Patterns are matched by indexing candidates on role (or op) and checking the rest directly: linear in the
graph size, with no neighbourhood search through shared hub nodes."""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from functools import lru_cache

from torch import fx

from surgery.analyze.roles import VIEW_LIKE, Analysis, Site, op_name
from surgery.errors import MatchError
from surgery.spec.models import Match as Pattern, Rule, Spec


@dataclass(slots=True)
class Match:
    """One site a rule matched. `node` is the fx node name, `module` the qualified module it comes from."""

    rule: str
    node: str
    module: str
    role: str | None
    layer: int | None
    site: Site = field(repr=False)
    source: Site | None = field(default=None, repr=False)   # parallel: the span's input
    bindings: dict[str, fx.Node] = field(default_factory=dict, repr=False)

    def as_row(self) -> dict:
        return {"rule": self.rule, "layer": self.layer, "role": self.role, "module": self.module, "node": self.node}


def stack_matches(stack: str | None, globs) -> bool:
    """A stack path matches a glob on the whole path or a name equal to one of its dotted components."""
    if stack is None:
        return False
    return any(fnmatchcase(stack, g) or g in stack.split(".") for g in _as_list(globs))


def pattern_layers(pattern: Pattern, num_layers: int, stacks: list[str] | None = None) -> set[int] | None:
    """The layers a pattern allows: `layers` (None: any) minus `leave_out`, counted within the stacks the pattern
    names (all layers when it names none)."""
    eligible = list(range(num_layers))
    if getattr(pattern, "stack", None) is not None and stacks is not None:
        eligible = [i for i in eligible if stack_matches(stacks[i], pattern.stack)]
        if pattern.layers is None and not pattern.leave_out:
            return set(eligible)
    layers = resolve_layers(pattern.layers, len(eligible), eligible)
    if pattern.leave_out:
        skip = resolve_layers(list(pattern.leave_out), len(eligible), eligible)
        layers = (set(eligible) if layers is None else layers) - skip
    return layers


def resolve_layers(spec, num_layers: int, everything: list[int] | None = None) -> set[int] | None:
    """None means no layer constraint. Indices count in `everything` (default: 0..num_layers-1)."""
    if spec is None:
        return None
    everything = list(range(num_layers)) if everything is None else everything
    if spec == "all":
        return set(everything)
    if isinstance(spec, int):
        return {everything[spec]} if -num_layers <= spec < num_layers else set()
    if isinstance(spec, list):
        return {everything[i] for i in spec if -num_layers <= i < num_layers}
    parts = [int(p) if p.strip() else None for p in spec.split(":")]
    if len(parts) == 1:
        return resolve_layers(parts[0], num_layers, everything)
    return set(everything[slice(*parts)])


def _as_list(value) -> list:
    return [value] if isinstance(value, str) else list(value or [])


@lru_cache(maxsize=1 << 16)
def _module_matches(module: str, globs: tuple[str, ...]) -> bool:
    """Glob test memoized by module path: a graph has many nodes but few modules (200 layers: 14k nodes, 2k paths)."""
    return any(fnmatchcase(module, g) for g in globs)


def _node_ok(site: Site, pattern: Pattern, analysis: Analysis, layers: set[int] | None, bindings: dict) -> bool:
    if pattern.role is not None and site.role not in _as_list(pattern.role):
        return False
    if pattern.op is not None and site.op not in _as_list(pattern.op):
        return False
    if layers is not None and site.layer not in layers:
        return False
    if pattern.module is not None and not _module_matches(site.module, tuple(_as_list(pattern.module))):
        return False
    if pattern.stack is not None and not stack_matches(site.stack, pattern.stack):
        return False
    if pattern.bind:
        if pattern.bind in bindings and bindings[pattern.bind] is not site.node:
            return False
        bindings[pattern.bind] = site.node
    if pattern.inputs:
        args = [a for a in site.node.args if isinstance(a, fx.Node)]
        if len(pattern.inputs) > len(args):
            return False
        for sub, arg in zip(pattern.inputs, args):
            if not _input_ok(arg, sub, analysis, bindings):
                return False
    return True


def _input_ok(node: fx.Node, pattern: Pattern, analysis: Analysis, bindings: dict) -> bool:
    layers = pattern_layers(pattern, analysis.num_layers, analysis.stacks)
    chain = [node]
    if pattern.through:
        while op_name(chain[-1]) in VIEW_LIKE and chain[-1].all_input_nodes:
            chain.append(chain[-1].all_input_nodes[0])
    for candidate in chain:
        for site in _sites_of(candidate, analysis):
            trial = dict(bindings)
            if _node_ok(site, pattern, analysis, layers, trial):
                bindings.update(trial)
                return True
    return False


def _sites_of(node: fx.Node, analysis: Analysis) -> list[Site]:
    index = getattr(analysis, "_sites_by_node", None)
    if index is None:
        index = {}
        for s in analysis.sites:
            index.setdefault(s.node, []).append(s)
        analysis._sites_by_node = index
    return index.get(node, [])


def _candidates(pattern: Pattern, analysis: Analysis) -> list[Site]:
    if pattern.role is not None:
        return [s for r in _as_list(pattern.role) for s in analysis.by_role.get(r, [])]
    if pattern.op is not None:
        return [s for o in _as_list(pattern.op) for s in analysis.by_op.get(o, [])]
    return [s for sites in analysis.by_op.values() for s in sites]


def find(pattern: Pattern, analysis: Analysis, *, restrict_layer: int | None = None) -> list[tuple[Site, dict]]:
    layers = pattern_layers(pattern, analysis.num_layers, analysis.stacks)
    if restrict_layer is not None:
        layers = {restrict_layer} if layers is None or restrict_layer in layers else set()
    candidates = _candidates(pattern, analysis)
    if (layers is None and pattern.op is None and pattern.module is None and not pattern.bind
            and not pattern.inputs and pattern.stack is None):
        return [(site, {}) for site in candidates]     # a role pattern (candidates are its sites) or `{}`
    found = []
    for site in candidates:
        bindings: dict = {}
        if _node_ok(site, pattern, analysis, layers, bindings):
            found.append((site, bindings))
    return found


def _describe(pattern: Pattern) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in pattern.model_dump(exclude_none=True, exclude_defaults=True).items())


def _similarity(word: str, component: str) -> float:
    """How close a glob's literal word is to one component of a module path: difflib's ratio, or 0.75 when
    the word's first `_`-separated token abbreviates the component (`q_proj` ~ `query`, `k_proj` ~ `key`)."""
    word, component = word.lower(), component.lower()
    score = difflib.SequenceMatcher(None, word, component).ratio()
    head = word.split("_")[0]
    if head and not head.isdigit() and component.startswith(head) and component != word:
        score = max(score, 0.75)
    return score


def nearest_modules(glob: str, modules: list[str], n: int = 3) -> list[str]:
    """The module paths closest to a glob that matches none of them, one per layer-independent name (digits
    stand for any layer): ranked by the best similarity between the glob's words and the path's components."""
    words = [w for w in re.split(r"[.*?\[\]]+", glob) if w and not w.isdigit()]
    if not words:
        return []
    scored = []
    for i, module in enumerate(modules):
        parts = [c for c in module.split(".") if not c.isdigit()]
        score = sum(max((_similarity(w, c) for c in parts), default=0.0) for w in words) / len(words)
        scored.append((-score, i, module))
    out, shapes = [], set()
    for neg, _, module in sorted(scored):
        shape = re.sub(r"\d+", "N", module)
        if -neg < 0.5 or shape in shapes:
            continue
        shapes.add(shape)
        out.append(module)
        if len(out) == n:
            break
    return out


def _nearest(pattern: Pattern, analysis: Analysis) -> str:
    """What the pattern would match with one constraint dropped, or the closest roles/modules. A module glob
    that matches no module at all gets the module names nearest to it (among the sites of the pattern's role,
    when it has one), rather than samples of unrelated sites."""
    hints = []
    globs = _as_list(pattern.module)
    role_sites = [s for r in _as_list(pattern.role) for s in analysis.by_role.get(r, [])] if pattern.role else []
    pool = sorted({s.module for s in (role_sites or analysis.sites) if s.module},
                  key=lambda m: ([int(p) if p.isdigit() else -1 for p in m.split(".")], m))
    unmatched = [g for g in globs if not any(_module_matches(m, (g,)) for m in pool)]
    for glob in unmatched:
        near = nearest_modules(glob, pool)
        hints.append(f"no module{' of role ' + repr(pattern.role) if role_sites else ''} matches {glob!r}"
                     + (f"; nearest module names: {', '.join(near)}" if near else ""))
    ops = sorted(analysis.by_op)
    by_lower = {op.lower(): op for op in ops}
    for op in _as_list(pattern.op):
        if op not in analysis.by_op:
            # an op name the model computes nowhere: a typo (`addd`) or another spelling (`Linear`, `aten.add`)
            near = [by_lower[m] for m in difflib.get_close_matches(str(op).lower().rpartition(".")[2], list(by_lower),
                                                                   n=3, cutoff=0.6)]
            hints.append(f"no op named {op!r} runs in this model"
                         + (f"; nearest op names: {', '.join(near)}" if near else f"; its ops: {', '.join(ops[:12])}"))
    for drop in ("layers", "module", "op", "inputs"):
        if drop == "module" and unmatched and len(unmatched) == len(globs) and not role_sites:
            continue   # every site of every role: not a hint
        if getattr(pattern, drop) is not None:
            relaxed = pattern.model_copy(update={drop: None})
            sites = find(relaxed, analysis)
            if sites:
                sample = ", ".join(f"{s.module or '<root>'} ({s.role or s.op}, layer {s.layer})" for s, _ in sites[:4])
                hints.append(f"without `{drop}` it matches {len(sites)} site(s), e.g. {sample}")
    no_attention = _no_attention_hint(pattern, analysis)
    if no_attention:
        hints.insert(0, no_attention)
    if not hints:
        present = sorted(r for r in analysis.by_role)
        hints.append(f"roles present in this model: {', '.join(present)}" if present else _no_roles_hint(analysis))
    return "; ".join(hints)


def _no_roles_hint(analysis: Analysis) -> str:
    """For a model in which the analysis found no role at all (no attention op, no repeated layers: a plain
    `nn.Sequential` of different modules): what it has instead, its weight-bearing modules and its ops, the
    things a `module:` or `op:` pattern can name."""
    weighted = list(dict.fromkeys(f"{s.module} ({s.linear.kind})" for s in analysis.sites
                                  if s.linear is not None and s.module))
    ops = sorted(analysis.by_op)
    listed = (f"its weight-bearing modules (match them by `module:`): {', '.join(weighted[:8])}"
              + (f" and {len(weighted) - 8} more" if len(weighted) > 8 else "")) if weighted else ""
    return ("no roles in this model (no attention op, no repeated layers: a ModuleList of identical blocks); "
            + (listed + "; " if listed else "") + f"its ops (match them by `op:`): {', '.join(ops[:12])}"
            + (f" and {len(ops) - 12} more" if len(ops) > 12 else ""))


def _no_attention_hint(pattern: Pattern | None, analysis: Analysis, roles: list[str] | None = None) -> str | None:
    """For attention roles, or the residual around an FFN, on a model without any attention op (a state-space
    model, a residual conv stack): say so, and name the nearest alternative, module globs on the linears of its
    layers (its convolutions where they have no linear)."""
    roles = roles if roles is not None else _as_list(pattern.role)
    attention = [r for r in roles if r.split(".")[0] in ("attention", "cross_attention")]
    residual = [r for r in roles if r in ("ffn.residual", "ffn.residual_add") and not analysis.by_role.get(r)]
    if not (attention or residual) or analysis.by_role.get("attention.op") or \
            analysis.by_role.get("cross_attention.op"):
        return None
    order = {n: i for i, n in enumerate(analysis.traced.graph.nodes)}
    globs, linears = [], []
    if analysis.blocks:
        block = analysis.blocks[0]
        container = block.rpartition(".")[0]
        weighted = sorted((s for s in analysis.sites if s.layer == 0 and s.linear is not None
                           and s.linear.kind in ("linear", "conv") and s.module.startswith(block + ".")),
                          key=lambda s: order.get(s.node, 0))
        # the linears, or a conv stack's convolutions where its layers have none
        linears = [s for s in weighted if s.linear.kind == "linear"] or weighted
        for site in linears:
            glob = f"{container}.*{site.module[len(block):]}" if container else f"*{site.module[len(block):]}"
            if glob not in globs:
                globs.append(glob)
    what_ops = "linears" if all(s.linear.kind == "linear" for s in linears) else "convolutions"
    alternative = (f"; nearest alternative: module globs on the {what_ops} of its layers, e.g. "
                   f"{', '.join(globs[:6])}") if globs else ""
    if attention:
        what = f"so no site has the role {' or '.join(attention)}"
    else:
        what = ("so its blocks have no FFN sub-layer beside attention: the linears found as ffn.in/ffn.out are the "
                f"block's only sub-layer (e.g. a state-space model's mixer), with no residual add of its own ({residual[0]})")
    return f"the model has no attention op (no softmax between two matmuls, no SDPA), {what}{alternative}"


_ANY_LAYER = object()


def _positions(site: Site):
    """The leading dimensions (batch, positions) of a site's value, or None where unknown."""
    node = site.linear.value if site.linear is not None else site.node
    val = node.meta.get("val") if hasattr(node, "meta") else None
    return tuple(val.shape[:-1]) if hasattr(val, "shape") and val.dim() >= 2 else None


def _first_by_layer(found: list[tuple[Site, dict]]) -> dict:
    """The first site found in each layer, and the first of all under _ANY_LAYER (for sites outside layers):
    one pass over the sources instead of a search per matched site."""
    first: dict = {}
    for site, _ in found:
        first.setdefault(_ANY_LAYER, site)
        first.setdefault(site.layer, site)
    return first


def match_rule(rule: Rule, index: int, analysis: Analysis, spec_name: str | None = None) -> list[Match]:
    name = rule.name or f"rule{index}"
    found = find(rule.match, analysis)
    if rule.action == "wrap" and rule.match.role is None and rule.match.op is None:
        # a module pattern for wrap means the modules' weight-bearing ops: a conv padding its input first
        # (padding_mode reflect) also computes a pad, which is no site to wrap
        weighted = {site.module for site, _ in found if site.linear is not None}
        found = [(site, b) for site, b in found if site.linear is not None or site.module not in weighted]
    sources = find(rule.from_, analysis) if rule.from_ is not None else None
    sources_by_layer = _first_by_layer(sources) if sources is not None else None
    sources_in_layer: dict = {}
    for s, _ in sources or ():
        sources_in_layer.setdefault(s.layer, []).append(s)
    seen, matches = set(), []
    for site, bindings in found:
        key = (site.node, site.role, site.extra.get("packed"))
        if key in seen:
            continue
        seen.add(key)
        source = None
        if sources_by_layer is not None:
            # what find(rule.from_, analysis, restrict_layer=site.layer) would return first; of several in the
            # layer (Flux's double blocks: one residual per stream), the first over the site's positions
            source = sources_by_layer.get(site.layer if site.layer is not None else _ANY_LAYER)
            if source is not None and site.layer is not None:
                source = next((s for s in sources_in_layer.get(site.layer, ()) if _positions(s) == _positions(site)),
                              source)
            if source is None:
                why = _no_attention_hint(rule.from_, analysis)
                raise MatchError(f"rule {name!r}: `from` ({_describe(rule.from_)}) matches nothing in layer "
                                 f"{site.layer} for the site {site.module} ({site.node.name})"
                                 + (f": {why}" if why else ""))
        # positional: on `match: {}` over a 200-layer graph (13k sites) keywords cost a third of the call
        matches.append(Match(name, site.node.name, site.module, site.role, site.layer, site, source, bindings))
    _check_expect(rule, name, matches, analysis, spec_name)
    return matches


def _check_expect(rule: Rule, name: str, matches: list[Match], analysis: Analysis, spec_name: str | None):
    where = f" in spec {spec_name!r}" if spec_name else ""
    expect = rule.expect
    if expect == "any":
        return
    if not matches:
        raise MatchError(f"rule {name!r}{where} matched no site: pattern ({_describe(rule.match)}). "
                         f"Nearest: {_nearest(rule.match, analysis)}")
    if expect is None or expect == "every_layer":
        _check_operands(rule, name, where, matches, analysis)
    if expect == "every_layer":
        wanted = pattern_layers(rule.match, analysis.num_layers, analysis.stacks) or set(range(analysis.num_layers))
        roles = _as_list(rule.match.role) if rule.match.role is not None else []
        if roles and analysis.stacks and all(r.startswith("cross_attention.") for r in roles):
            # a role only some stacks have (cross-attention: decoder layers) is expected in every layer of those;
            # another role missing from a whole stack is missing (Segformer's first stage, once its attention was
            # read as cross-attention; Flux's single-stream blocks have no attention output projection)
            having = {s.stack for r in roles for s in analysis.by_role.get(r, [])}
            wanted = {i for i in wanted if analysis.stacks[i] in having}
        missing = sorted(wanted - {m.layer for m in matches})
        if missing:
            raise MatchError(f"rule {name!r}{where} expects a site in every layer but matched none in layers "
                             f"{missing}: pattern ({_describe(rule.match)})")
    elif isinstance(expect, int) and len(matches) != expect:
        matched = sorted({m.layer for m in matches if m.layer is not None})
        wanted = pattern_layers(rule.match, analysis.num_layers, analysis.stacks) or set(range(analysis.num_layers))
        missing = sorted(wanted - set(matched)) if matched and len(matches) < expect else []
        without = f"; no site in layers {missing}" if missing else ""
        raise MatchError(f"rule {name!r}{where} expects {expect} site(s) but matched {len(matches)}: "
                         f"pattern ({_describe(rule.match)}); matched layers {matched}{without}")


def _check_operands(rule: Rule, name: str, where: str, matches: list[Match], analysis: Analysis) -> None:
    """Every attention op has queries, keys and values: a q, k or v role of the rule's list that a layer's
    attention has no site for (no one projection computes it: JetMoe's queries are experts' weights, DeepSeek's
    MLA keys join two projections' columns) is refused, not dropped while the rule's other roles match there
    (LoRA [q, v] adapting v alone). Roles a layer may lack (ffn.gate in an ungated FFN) are not checked."""
    roles = _as_list(rule.match.role) if rule.match.role is not None else []
    if len(roles) < 2:
        return
    wanted = pattern_layers(rule.match, analysis.num_layers, analysis.stacks) or set(range(analysis.num_layers))
    for role in roles:
        family, _, operand = role.rpartition(".")
        if operand not in ("q", "k", "v") or family not in ("attention", "cross_attention"):
            continue
        having = {s.layer for s in analysis.by_role.get(f"{family}.op", []) if s.layer in wanted}
        lacking = sorted(having - {m.layer for m in matches if m.role == role})
        if lacking:
            raise MatchError(
                f"rule {name!r}{where}: {role} has no site in layers {lacking}, whose attention ops have it (no one "
                f"projection computes it there; `surgery inspect` shows the roles), while the rule's other roles "
                f"matched. Drop {role} from the list, or set `expect: any` to adapt what matches")


def match_spec(spec: Spec, analysis: Analysis) -> list[list[Match]]:
    """Every rule's matches; a MatchError for a spec read from a file starts with the rule's `file:line:col`."""
    out = []
    for i, rule in enumerate(spec.rules):
        try:
            out.append(match_rule(rule, i, analysis, spec.name))
        except MatchError as exc:
            origin = spec.origin_of(rule)
            if origin is None:
                raise
            located = origin.error(str(exc), "match")
            error = MatchError(located.render())
            error.file, error.line, error.column, error.key = located.file, located.line, located.column, located.key
            raise error from None
    return out
