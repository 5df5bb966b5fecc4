"""Load a spec from YAML/JSON safely, and report every problem as `file:line:col: key.path: message`."""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel, ValidationError

from surgery.errors import SpecError
from surgery.modules.values import ValueProblem
from surgery.spec.models import (KeyProblem, Match, OptionsProblem, Rule, Spec, duplicate_rule_names, kind_options,
                                 rule_problems)

Positions = dict[tuple, tuple[int, int]]

# Plain data only: any other tag (`!!python/object/apply:...`, `!!binary`, local `!tags`) is refused.
_DATA_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("map", "seq", "str", "int", "float", "bool", "null")}
_MAX_VALUES = 100_000   # bounds alias expansion ("billion laughs")
MAX_NESTING = 32        # mappings/lists inside each other; a spec needs about 8
MAX_INCLUDE_DEPTH = 16  # include chains (a includes b includes c ...)
MAX_INCLUDED_FILES = 256  # distinct files one spec may pull in through includes
MAX_SPEC_BYTES = 512 * 1024   # a spec is a few KB; parsing 512 KiB of YAML takes about 2.5 s of CPU


def _short_tag(tag: str) -> str:
    return "!!" + tag.removeprefix("tag:yaml.org,2002:") if tag.startswith("tag:yaml.org,2002:") else tag


def _compose(text: str, file: str) -> tuple[Any, Positions, list[SpecError]]:
    """Parse with the safe composer, keeping each key's (line, column); constructs plain data only.

    Returns the data, the positions, and the problems found while building it (duplicate keys). Refused tags
    and YAML syntax errors raise: nothing after them can be trusted.
    """
    try:
        _check_nesting(text, file)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.reader.ReaderError as exc:   # a NUL or other control character: no mark, a position
        line, column = _line_col(text, exc.position)
        raise SpecError(f"character {exc.character!r} is not allowed in a spec ({exc.reason})", file=file,
                        line=line, column=column) from None
    except yaml.YAMLError as exc:
        mark, context = getattr(exc, "problem_mark", None), getattr(exc, "context", None)
        opened = getattr(exc, "context_mark", None)
        if context and context.startswith("while") and opened is not None and mark is not None \
                and opened.line != mark.line:
            context += f" that starts at line {opened.line + 1}, column {opened.column + 1}"   # an unclosed { or [
        what = "; ".join(filter(None, (context, getattr(exc, "problem", None)))) or str(exc)
        raise SpecError(f"YAML syntax error: {what}", file=file,
                        line=mark.line + 1 if mark else None, column=mark.column + 1 if mark else None) from None
    except RecursionError:   # a backstop: _check_nesting refuses deep nesting first
        raise SpecError(f"nested too deeply (more than {MAX_NESTING} levels)", file=file) from None
    positions: Positions = {}
    problems: list[SpecError] = []
    refused: list[SpecError] = []
    constructor = yaml.SafeLoader("")
    count = 0
    building: set[int] = set()

    def at(node) -> dict:
        return dict(file=file, line=node.start_mark.line + 1, column=node.start_mark.column + 1)

    def build(node, path):
        nonlocal count
        count += 1
        if count > _MAX_VALUES:
            raise SpecError(f"spec too large: more than {_MAX_VALUES} values (aliases expanding?)", **at(node))
        if id(node) in building:
            raise SpecError("recursive YAML alias: a value contains itself", **at(node))
        positions.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
        if node.tag not in _DATA_TAGS:
            refused.append(SpecError(f"refused YAML tag {_short_tag(node.tag)!r}: specs are plain data (mappings, "
                                     f"lists, strings, numbers, booleans) and cannot construct Python objects",
                                     key=_dotted(path), **at(node)))
            return None
        building.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                constructor.flatten_mapping(node)   # `<<: *defaults` merge keys
                out = {}
                for key_node, value_node in node.value:
                    key = build(key_node, path + ("<key>",))
                    if not isinstance(key, (str, int, float, bool)) and key is not None:
                        problems.append(SpecError("keys are plain strings", key=_dotted(path), **at(key_node)))
                        continue
                    if key in out:
                        problems.append(SpecError(f"duplicate key {key!r} (an earlier one is overridden)",
                                                  key=_dotted(path + (key,)), **at(key_node)))
                    positions[path + (key,)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                    out[key] = build(value_node, path + (key,))
                return out
            if isinstance(node, yaml.SequenceNode):
                return [build(child, path + (i,)) for i, child in enumerate(node.value)]
            return constructor.construct_object(node)
        except (yaml.YAMLError, ValueError) as exc:
            raise SpecError(f"cannot read this value: {getattr(exc, 'problem', None) or exc}", key=_dotted(path),
                            **at(node)) from None
        finally:
            building.discard(id(node))

    data = build(root, ()) if root is not None else {}
    if refused:
        raise SpecError("refused YAML tags", problems=refused)
    return data, positions, problems


def _line_col(text: str | bytes, offset: int) -> tuple[int, int]:
    """1-based line and column of a character (or byte) offset."""
    newline = b"\n" if isinstance(text, bytes) else "\n"
    before = text[:offset]
    return before.count(newline) + 1, offset - (before.rfind(newline) + 1) + 1


def _check_nesting(text: str, file: str) -> None:
    """Refuse mappings/lists nested deeper than MAX_NESTING, from the parser's event stream (iterative, so a
    deeply nested file cannot exhaust the recursive composer's stack first)."""
    depth = 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_NESTING:
                    raise SpecError(f"nested too deeply: more than {MAX_NESTING} levels of mappings and lists",
                                    file=file, line=event.start_mark.line + 1, column=event.start_mark.column + 1)
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
    except yaml.reader.ReaderError:
        raise
    except yaml.YAMLError:
        return   # the composer reports it with its position


def _dotted(path: tuple) -> str | None:
    return ".".join(str(p) for p in path) or None


def _where(positions: Positions, path: tuple) -> tuple[int | None, int | None]:
    while path:
        if path in positions:
            return positions[path]
        path = path[:-1]
    return positions.get((), (None, None))


def _data_path(loc: tuple, data: Any) -> tuple:
    """The part of a pydantic error location that exists in the data (the rest names union members)."""
    path, node = (), data
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            break
        path += (part,)
    return path


def _model_at(path: tuple, data: Any) -> type[BaseModel] | None:
    """The pydantic model that validates the mapping at `path`, for 'did you mean' hints."""
    model, node = Spec, data
    for part in path:
        node = node[part] if isinstance(node, (dict, list)) and _has(node, part) else None
        if isinstance(part, int):
            continue
        if model is Spec and part == "rules":
            model = Rule
        elif (model is Rule and part in ("match", "from")) or (model is Match and part == "inputs"):
            model = Match
        elif model is Rule and part == "module":
            try:
                model = kind_options(node.get("kind") if isinstance(node, dict) else None)
            except ValueError:
                return None
        else:
            return None
    return model


def _has(node, part) -> bool:
    return part in node if isinstance(node, dict) else isinstance(part, int) and 0 <= part < len(node)


def _near(word: Any, choices) -> str:
    near = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


_TYPE_ERRORS = re.compile(r"(_type|_parsing|int_from_float|bool_parsing|missing)$")


def _is_type_mismatch(err: dict) -> bool:
    """True when the value has the wrong type for this alternative (rather than a wrong value of the right type)."""
    if err["type"] == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return not (isinstance(err.get("input"), str) and "'" in expected)
    return bool(_TYPE_ERRORS.search(err["type"]))


def _message(err: dict, data: Any, path: tuple) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        key = path[-1] if path else err["loc"][-1]
        model = _model_at(path[:-1], data)
        fields = [f.alias or n for n, f in model.model_fields.items()] if model else []
        return f"unknown key {key!r}" + _near(key, fields)
    if kind == "missing":
        return f"missing required key {err['loc'][-1]!r}"
    msg = err["msg"].removeprefix("Value error, ").replace("Input should", "input should")
    if kind == "literal_error" and isinstance(err.get("input"), str):
        msg = f"{err['input']!r} is not allowed: {msg}"
        msg += _near(err["input"], re.findall(r"'([^']*)'", err["ctx"]["expected"]))
    if kind in ("string_type", "literal_error") and isinstance(err.get("input"), bool):
        msg += _YAML_BOOLEAN
    return msg


_YAML_BOOLEAN = " (YAML reads an unquoted yes, no, on, off, true or false as a boolean: quote it)"


def _union_message(errors: list[dict]) -> str:
    """One message for a value that fits none of a union's alternatives."""
    kinds = []
    for err in errors:
        text = err["msg"].removeprefix("Input should be ").split(",")[0]
        if text not in kinds:
            kinds.append(text)
    got = errors[0].get("input")
    return f"input should be {' or '.join(kinds)} (got {got!r})" + (_YAML_BOOLEAN if isinstance(got, bool) and
                                                                     "a valid string" in kinds else "")


def _problems_from(exc: ValidationError, data: Any, base: tuple = ()) -> list[tuple[tuple, str]]:
    """(path, message) per problem; the alternatives of one union value are merged into one problem."""
    groups: dict[tuple, list[dict]] = {}
    for err in exc.errors():
        loc = base + tuple(err["loc"])
        error = err.get("ctx", {}).get("error")
        if isinstance(error, OptionsProblem):
            continue   # a module's options: validated on their own first, each error at its own key
        if isinstance(error, ValueProblem):   # KeyProblem, or a module option's plain-value problem
            loc += tuple(error.path)
        path = _data_path(loc, data)
        if err["type"] in ("missing", "extra_forbidden") and len(loc) > len(path):
            path = loc[:len(path) + 1]
        groups.setdefault(path, []).append(err)
    out = []
    for path, errors in groups.items():
        specific = [e for e in errors if not _is_type_mismatch(e)] if len(errors) > 1 else errors
        if specific:
            out.extend((path, _message(e, data, path)) for e in specific)
        else:
            out.append((path, _union_message(errors)))
    return out


def validate_data(data: Any, *, file: str = "<spec>", positions: Positions | None = None) -> Spec:
    """Validate parsed spec data; raise one SpecError listing every problem with its source position."""
    return _validate(data, file, positions or {}, [])


def _validate(data: Any, file: str, positions: Positions, problems: list[SpecError]) -> Spec:
    problems = list(problems)
    reported: set[str | None] = set()

    def add(path: tuple, message: str):
        if _dotted(path) in reported:
            return   # one problem per key: the first found is the most specific
        reported.add(_dotted(path))
        line, col = _where(positions, path)
        problems.append(SpecError(message, file=file, line=line, column=col, key=_dotted(path)))

    def fail():
        problems.sort(key=lambda p: (p.line or 0, p.column or 0))
        return SpecError("invalid spec", problems=problems)

    if not isinstance(data, dict):
        add((), "a spec is a mapping with a `rules` list")
        raise fail()
    known = [f.alias or n for n, f in Spec.model_fields.items()]
    content = ("rules", "compose", "include")   # what a spec does is in one of these
    if (any(key not in known for key in data)
            and not any(isinstance(key, str) and (key in content or _near(key, content)) for key in data)):
        keys = [str(k) for k in data]   # another file format altogether (package.json, a CI workflow)
        add((), f"not a spec: it has no `rules`, `compose` or `include` (its keys: {', '.join(keys[:4])}"
                f"{', ...' if len(keys) > 4 else ''}); a spec is a mapping with a `rules` list")
        raise fail()
    rules = data.get("rules") if isinstance(data.get("rules"), list) else []

    # Module options first: a rule's `module` is checked against its kind's Options, with paths into it.
    for i, rule in enumerate(rules):
        module = rule.get("module") if isinstance(rule, dict) else None
        if not isinstance(module, dict):
            continue
        try:
            model = kind_options(module.get("kind"))
        except ValueError as exc:
            add(("rules", i, "module", "kind") if "kind" in module else ("rules", i, "module"), str(exc))
            continue
        try:
            model.model_validate(module)
        except ValidationError as exc:
            for path, message in _problems_from(exc, data, ("rules", i, "module")):
                add(path, message)

    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        for path, message in _problems_from(exc, data):
            add(path, message)
        # Pydantic stops at a rule's field errors; the combination checks still apply to what was written.
        for i, rule in enumerate(rules):
            for problem in rule_problems(rule) if isinstance(rule, dict) else []:
                add(("rules", i) + problem.path, str(problem))
        for problem in duplicate_rule_names(rules):
            add(problem.path, str(problem))
        raise fail() from None
    if problems:
        raise fail()
    return spec


@dataclass(frozen=True)
class RuleOrigin:
    """Where a rule of a loaded spec was written: its file and index there (includes resolved)."""

    file: str
    index: int
    positions: Positions = field(repr=False, compare=False, default_factory=dict)

    def error(self, message: str, *key: str | int) -> SpecError:
        """A SpecError pointing at this rule (or at `key` inside it)."""
        path = ("rules", self.index) + key
        line, col = _where(self.positions, path)
        return SpecError(message, file=self.file, line=line, column=col, key=_dotted(path))


def load_spec(path: str | Path, *, include_dirs: Iterable[str | Path] = ()) -> Spec:
    """Read a YAML or JSON spec file (safe loading only), resolving `include`s relative to it.

    Included files must lie under the directory of the spec file given here, or under one of `include_dirs`
    (absolute paths, `../` and symlinks leading elsewhere are refused); each file is read once, at most
    MAX_INCLUDE_DEPTH includes deep and MAX_INCLUDED_FILES files in all. A dict or a Spec is accepted too (as
    by `spec_from`). Raises SpecError with `file:line:col` for every problem."""
    if not isinstance(path, (str, os.PathLike)):
        return spec_from(path, include_dirs=include_dirs)
    return load_spec_with_origins(path, include_dirs=include_dirs)[0]


def load_spec_with_origins(path: str | Path, *,
                           include_dirs: Iterable[str | Path] = ()) -> tuple[Spec, list[RuleOrigin]]:
    """`load_spec`, plus where each rule of the result was written (for errors found later, e.g. on a model)."""
    from surgery.spec.shipped import locate_spec   # a shipped spec's name ("houlsby") works from any directory
    path = Path(locate_spec(path))
    context = _Includes(roots=_roots(path.parent, include_dirs))
    spec, origins = _load(path, context, chain=frozenset(), depth=0)
    return _with_origins(spec, origins), origins


def _with_origins(spec: Spec, origins: list[RuleOrigin]) -> Spec:
    """Remember where each rule was written, so errors found later (a MatchError) can point at it."""
    spec._origins = list(zip(spec.rules, origins))
    return spec


def _roots(base: Path, extra: Iterable[str | Path]) -> tuple[Path, ...]:
    return tuple(Path(p).resolve() for p in (base, *extra))


@dataclass
class _Includes:
    """One top-level load: where includes may come from, and every file read so far (each is read once)."""

    roots: tuple[Path, ...]
    done: dict = field(default_factory=dict)   # resolved path -> (spec, origins) or SpecError


def _read(path: Path) -> str:
    """The file's text; at most MAX_SPEC_BYTES are read (a weights file or a device named by mistake is refused
    without reading it all)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise SpecError(f"cannot read spec: {exc.strerror or exc}", file=str(path)) from None
    if len(data) > MAX_SPEC_BYTES:
        try:
            size = os.stat(path).st_size
        except OSError:
            size = 0
        size = f"{size:,} bytes" if size > MAX_SPEC_BYTES else f"more than {MAX_SPEC_BYTES // 1024} KiB"
        raise SpecError(f"not a spec: the file is too large ({size}; a spec is at most {MAX_SPEC_BYTES // 1024} KiB)",
                        file=str(path)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, column = _line_col(data, exc.start)
        raise SpecError(f"not UTF-8 text: {exc.reason} (byte 0x{data[exc.start]:02x} at offset {exc.start})",
                        file=str(path), line=line, column=column) from None
    if path.suffix.lower() == ".json":
        text = text.replace("\t", " ")   # JSON whitespace; JSON strings cannot hold a raw tab
    return text


def _load(path: Path, context: _Includes, chain: frozenset, depth: int) -> tuple[Spec, list[RuleOrigin]]:
    key = path.resolve()
    if key in context.done:
        done = context.done[key]
        if isinstance(done, SpecError):
            raise done
        return done
    file = str(path)
    try:
        data, positions, problems = _compose(_read(path), file)
        spec = _validate(data, file, positions, problems)
        result = _resolve(spec, file, positions, path.parent, context, chain | {key}, depth)
    except SpecError as exc:
        context.done[key] = exc
        raise
    context.done[key] = result
    return result


def _resolve(spec: Spec, file: str, positions: Positions, base: Path, context: _Includes,
             chain: frozenset, depth: int) -> tuple[Spec, list[RuleOrigin]]:
    """Included specs' rules come first; problems in any of them are reported together."""
    own = [RuleOrigin(file, i, positions) for i in range(len(spec.rules))]
    if not spec.include:
        _check_not_empty(spec, file, positions)
        return spec, own
    rules, origins, problems = [], [], {}

    def problem(message: str, j: int):
        line, col = _where(positions, ("include", j))
        err = SpecError(message, file=file, line=line, column=col, key=f"include.{j}")
        problems.setdefault(err.render(), err)

    for j, rel in enumerate(spec.include):
        target = Path(os.path.normpath(base / rel))
        resolved = target.resolve()
        if resolved in chain:
            problem(f"include cycle through {rel}", j)
            continue
        if not any(resolved.is_relative_to(root) for root in context.roots):
            problem(f"included spec {rel!r} lies outside {', '.join(map(str, context.roots))}: includes stay under "
                    f"the spec's directory (pass include_dirs to load_spec to allow more)", j)
            continue
        if depth + 1 > MAX_INCLUDE_DEPTH:
            problem(f"includes nested more than {MAX_INCLUDE_DEPTH} deep (at {rel})", j)
            continue
        if resolved not in context.done and len(context.done) >= MAX_INCLUDED_FILES:
            problem(f"more than {MAX_INCLUDED_FILES} files included (at {rel})", j)
            continue
        if not target.is_file():
            problem(f"included spec {rel!r} not found (looked at {target})", j)
            continue
        try:
            included, included_origins = _load(target, context, chain, depth + 1)
        except SpecError as exc:
            for p in exc.problems or [exc]:
                problems.setdefault(p.render(), p)
            continue
        rules.extend(included.rules)
        origins.extend(included_origins)
    rules.extend(spec.rules)
    origins.extend(own)
    names: dict[str, RuleOrigin] = {}
    for i, (rule, origin) in enumerate(zip(rules, origins)):
        name = rule.name or f"rule{i}"
        if name in names:
            earlier = names[name]
            err = origin.error(f"a rule named {name!r} comes earlier ({earlier.file}, rule {earlier.index}); "
                               f"rule names must be unique after includes (is a file included twice?)",
                               *(("name",) if rule.name else ()))
            problems.setdefault(err.render(), err)
        names[name] = origin
    if problems:
        raise SpecError("invalid spec", problems=list(problems.values()))
    resolved_spec = spec.model_copy(update={"rules": rules, "include": []})
    _check_not_empty(resolved_spec, file, positions)
    return resolved_spec, origins


def _check_not_empty(spec: Spec, file: str, positions: Positions) -> None:
    """A spec with no rules and no composition would change nothing: almost always a mistake (an empty file)."""
    if not spec.rules and spec.compose is None:
        line, col = positions.get(("rules",), (1, 1))
        raise SpecError("the spec has no rules (and no compose): applying it would change nothing", file=file,
                        line=line, column=col, key="rules" if ("rules",) in positions else None)


def spec_from(spec: Any, *, base: Path | None = None, include_dirs: Iterable[str | Path] = ()) -> Spec:
    """Accept a Spec, a dict, or a path to a YAML/JSON file (see `load_spec` for includes)."""
    if isinstance(spec, Spec):
        return spec
    if isinstance(spec, dict):
        base = base or Path.cwd()
        context = _Includes(roots=_roots(base, include_dirs))
        return _resolve(validate_data(spec), "<spec>", {}, base, context, frozenset(), 0)[0]
    if isinstance(spec, (str, os.PathLike)):
        return load_spec(spec, include_dirs=include_dirs)
    raise SpecError(f"a spec is a path, a dict or a surgery.Spec, not {type(spec).__name__}")
