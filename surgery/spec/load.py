"""Load a spec from YAML/JSON safely, and report every problem as `file:line:col: key.path: message`."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from surgery.errors import SpecError
from surgery.modules.registry import options_model
from surgery.spec.models import Spec

Positions = dict[tuple, tuple[int, int]]


def _compose(text: str, file: str) -> tuple[Any, Positions]:
    """Parse with the safe loader, keeping each key's (line, column)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise SpecError(f"YAML syntax error: {getattr(exc, 'problem', exc)}", file=file,
                        line=mark.line + 1 if mark else None, column=mark.column + 1 if mark else None) from None
    positions: Positions = {}

    def build(node, path):
        positions.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
        if isinstance(node, yaml.MappingNode):
            out = {}
            for key_node, value_node in node.value:
                key = build(key_node, path + ("<key>",))
                positions[path + (key,)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                out[key] = build(value_node, path + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [build(child, path + (i,)) for i, child in enumerate(node.value)]
        try:
            return yaml.SafeLoader(" ").construct_object(node)  # scalars only; unsafe tags raise here
        except yaml.constructor.ConstructorError as exc:
            raise SpecError(f"refused YAML tag {node.tag!r}: specs are data and cannot construct Python objects",
                            file=file, line=node.start_mark.line + 1, column=node.start_mark.column + 1) from None

    data = build(root, ()) if root is not None else {}
    return data, positions


def _where(positions: Positions, path: tuple) -> tuple[int | None, int | None]:
    while path:
        if path in positions:
            return positions[path]
        path = path[:-1]
    return positions.get((), (None, None))


def _message(err: dict, data: Any) -> str:
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = f"unknown key {err['loc'][-1]!r}"
    if err["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
    return msg


def _suggest(err: dict, model_fields: list[str]) -> str:
    if err["type"] != "extra_forbidden":
        return ""
    near = difflib.get_close_matches(str(err["loc"][-1]), model_fields, n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


def _fields_at(path: tuple) -> list[str]:
    """Field names valid at a location, for 'did you mean' hints."""
    from surgery.spec.models import Match, Rule
    parent = [p for p in path[:-1] if not isinstance(p, int)]
    if not parent:
        return list(Spec.model_fields)
    if parent[-1] in ("match", "from", "inputs"):
        return list(Match.model_fields)
    if parent[-1] == "rules":
        return [f.alias or n for n, f in Rule.model_fields.items()]
    return []


def validate_data(data: Any, *, file: str = "<spec>", positions: Positions | None = None) -> Spec:
    """Validate parsed spec data; raise one SpecError listing every problem with its source position."""
    positions = positions or {}
    problems: list[SpecError] = []

    def add(path: tuple, message: str):
        line, col = _where(positions, path)
        key = ".".join(str(p) for p in path) or None
        problems.append(SpecError(message, file=file, line=line, column=col, key=key))

    if not isinstance(data, dict):
        add((), "a spec is a mapping with a `rules` list")
        raise SpecError("invalid spec", problems=problems)

    module_checked: set[int] = set()
    for i, rule in enumerate(data.get("rules") or []):
        module = rule.get("module") if isinstance(rule, dict) else None
        if not isinstance(module, dict):
            continue
        module_checked.add(i)
        try:
            model = options_model(module.get("kind"))
        except ValueError as exc:
            add(("rules", i, "module", "kind"), str(exc))
            continue
        try:
            model.model_validate(module)
        except ValidationError as exc:
            for err in exc.errors():
                path = ("rules", i, "module") + tuple(err["loc"])
                hint = ""
                if err["type"] == "extra_forbidden":
                    near = difflib.get_close_matches(str(err["loc"][-1]), list(model.model_fields), n=1)
                    hint = f" (did you mean {near[0]!r}?)" if near else ""
                add(path, _message(err, data) + hint)

    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            path = tuple(err["loc"])
            if len(path) >= 2 and path[0] == "rules" and path[1] in module_checked and (
                    len(path) == 2 or path[2] == "module"):
                if any(p.key and p.key.startswith(f"rules.{path[1]}.module") for p in problems):
                    continue
            add(path, _message(err, data) + _suggest(err, _fields_at(path)))
        raise SpecError("invalid spec", problems=problems) from None
    if problems:
        raise SpecError("invalid spec", problems=problems)
    return spec


def load_spec(path: str | Path) -> Spec:
    """Read a YAML or JSON spec file (safe loading only), resolving `include`s relative to it."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"cannot read spec: {exc.strerror}", file=str(path)) from None
    data, positions = _compose(text, str(path))
    spec = validate_data(data, file=str(path), positions=positions)
    return _resolve_includes(spec, path.parent, seen={path.resolve()})


def _resolve_includes(spec: Spec, base: Path, seen: set) -> Spec:
    if not spec.include:
        return spec
    rules = []
    for rel in spec.include:
        target = (base / rel).resolve()
        if target in seen:
            raise SpecError(f"include cycle through {rel}", file=str(base / rel))
        included = _resolve_includes(load_spec(target), target.parent, seen | {target})
        rules.extend(included.rules)
    return spec.model_copy(update={"rules": rules + list(spec.rules), "include": []})


def spec_from(spec: Any, *, base: Path | None = None) -> Spec:
    """Accept a Spec, a dict, or a path to a YAML/JSON file."""
    if isinstance(spec, Spec):
        return spec
    if isinstance(spec, dict):
        return _resolve_includes(validate_data(spec), base or Path.cwd(), seen=set())
    if isinstance(spec, (str, Path)):
        return load_spec(spec)
    raise SpecError(f"a spec is a path, a dict or a surgery.Spec, not {type(spec).__name__}")
