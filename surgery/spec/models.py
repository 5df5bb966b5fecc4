"""The spec format: a list of rules, each a pattern (`match`) and a rewrite (`action` + `module`).

Module options are validated against the option model that each registered module class declares, so
`kind: lora` requires what LoRA requires and nothing else.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, WithJsonSchema, field_validator,
                      model_validator)

from surgery.modules.registry import kind_names as registered_kinds, options_model
from surgery.modules.values import ValueProblem

ROLES = (
    "embedding",            # an embedding lookup
    "embedding.output",     # the value entering the first block
    "block.input",          # the hidden state entering a block
    "block.output",         # the hidden state leaving a block
    "attention.q", "attention.k", "attention.v",   # projections feeding the attention op
    "attention.qkv",        # a packed projection producing q, k and v at once
    "attention.op",         # the attention op itself (SDPA, or softmax(QK^T)V)
    "attention.output",     # the projection after the attention op
    "attention.residual",   # the residual value added to the attention branch
    "attention.residual_add",  # the add closing the attention sub-layer
    "cross_attention.q", "cross_attention.k", "cross_attention.v",   # cross-attention (keys/values from the encoder)
    "cross_attention.qkv", "cross_attention.op", "cross_attention.output",
    "cross_attention.residual", "cross_attention.residual_add",
    "ffn.in", "ffn.gate",   # FFN input projections (gate only in gated FFNs)
    "ffn.act",              # the FFN activation
    "ffn.out",              # the FFN output projection (MoE: the experts' output projection)
    "ffn.router",           # a MoE router (selects experts) or a branch's sigmoid gate; not an FFN projection
    "ffn.residual",         # the residual value added to the FFN branch
    "ffn.residual_add",     # the add closing the FFN sub-layer
    "norm",                 # a normalization (LayerNorm, RMSNorm)
    "lm_head",              # the output projection to the vocabulary (keeps the sequence axis)
    "head",                 # a head on a pooled value (sequence classification, image classification)
)

BLOCKS = ("stack", "average", "batch_split", "split", "parallel", "fuse", "mixed_batch")   # composition blocks (rewrite/compose.py)
# each block's options (the keyword arguments of its class in rewrite/compose.py) and which are required
BLOCK_OPTIONS = {"stack": (), "average": ("weights", "normalize_weights"), "batch_split": ("batch_sizes",),
                 "split": ("splits",), "parallel": (), "fuse": ("name",), "mixed_batch": ()}
BLOCK_REQUIRED = {"batch_split": ("batch_sizes",), "split": ("splits",)}
ACTIONS = ("insert_after", "insert_before", "parallel", "sublayer", "wrap", "replace", "attend", "prepend", "train")

# What each action does, for docs/spec.md and the JSON Schema (a test checks every action has an entry).
ACTION_DOCS = {
    "insert_after": "the matched value v becomes `module(v)` for all its users; `through: [dropout]` first moves "
                    "past those ops",
    "insert_before": "the matched op's input x becomes `module(x)` for that op only",
    "parallel": "the matched value y becomes `y + module(x)`, with x the value matched by `from` in the same layer",
    "sublayer": "a residual sub-layer `out = norm(h + x)`, matched at its residual add, becomes `module(h, x, norm)`",
    "wrap": "a weight-bearing op (linear, Conv1D, conv1d/2d/3d, embedding lookup, packed q/k/v slices, MoE experts stored as one "
            "3-D parameter, per expert) is adapted: `realize: activation` (hooks; for experts, after the model's grouped matmul), "
            "`weight` (a parametrization), or `auto`",
    "replace": "the matched module's forward is replaced by the module",
    "attend": "the module runs at the attention op (role `attention.op`) with its q, k, v and the model's own "
              "attention, e.g. to add learned key/value prefixes",
    "prepend": "the module prepends learned vectors to the sequence at the matched value (soft prompts)",
    "train": "no new module: the parameters the matched nodes read train (`params: [weight, bias, all]`); with "
             "`rows: [...]` only those rows of them (new tokens' embeddings), through a small module of the rows",
}

Names = Union[str, list[str]]

# "all", an index ("3", "-1") or a Python slice ("-2:", "0:4", "::2"); the JSON Schema carries the same pattern.
LAYER_SLICE = re.compile(r"^(all|\s*-?\d*\s*(:\s*-?\d*\s*){0,2})$")

# Roles are validated by `Match._known_role` (with a "did you mean"); the schema lists them so editors complete them.
RoleName = Annotated[str, WithJsonSchema({"type": "string", "enum": list(ROLES)})]
LayerSlice = Annotated[str, WithJsonSchema({"type": "string", "pattern": LAYER_SLICE.pattern})]


class KeyProblem(ValueProblem):
    """A semantic error about one key of a model (e.g. `from` on a rule that is not parallel).

    Raised from model validators; the loader appends `path` to the error's location, so the message points at
    the offending key's line rather than at the start of the rule.
    """


def kind_options(kind: Any):
    """The Options model of a registered module kind; ValueError (with the known kinds) for anything else."""
    if not isinstance(kind, str):
        kinds = ", ".join(sorted(registered_kinds()))
        raise ValueError(f"a module needs `kind`, the name of a registered module kind ({kinds}), not {kind!r}")
    return options_model(kind)


class OptionsProblem(KeyProblem):
    """A module's options that its kind's Options model rejects (the loader reports each error at its own key)."""

    def __init__(self, error: ValidationError):
        details = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        super().__init__(("module",), f"invalid module options: {details}")


class Match(BaseModel):
    """A pattern over graph nodes. Every given field must hold; `inputs` match the node's arguments."""

    model_config = ConfigDict(extra="forbid")

    role: Union[RoleName, list[RoleName], None] = Field(None, description="Semantic role(s) read from the graph, e.g. attention.output.")
    layers: Union[int, list[int], LayerSlice, None] = Field(
        None, description='Layer index, list, or Python slice such as "-2:" or "0:4"; "all" for every layer.')
    leave_out: list[int] | None = Field(
        None, description="Layers to skip (AdapterHub's leave_out); negative indices count from the last layer.")
    module: Names | None = Field(None, description="Glob(s) on the qualified module path the node comes from.")
    stack: Names | None = Field(
        None, description='The stack of layers a site is in: a glob on its container\'s path ("decoder.block") or one '
                          'component of it ("encoder", "decoder"). `layers` then counts within the chosen stacks.')
    op: Names | None = Field(None, description="Op name(s): linear, addmm, add, layer_norm, scaled_dot_product_attention, ...")
    inputs: list[Match] | None = Field(None, description="Patterns for the node's tensor arguments, by position.")
    through: bool = Field(False, description="As an input pattern: walk back through view-like ops to find the node.")
    bind: str | None = Field(None, description="Name this node; a repeated name must be the same node.")

    @field_validator("role")
    @classmethod
    def _known_role(cls, value):
        import difflib
        unknown = []
        for role in [value] if isinstance(value, str) else (value or []):
            if role not in ROLES:
                near = difflib.get_close_matches(role, ROLES, n=1)
                unknown.append(f"{role!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
        if unknown:   # every unknown role of a list, not only the first
            raise ValueError(f"unknown role{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                             f"roles are {', '.join(ROLES)}")
        return value

    @field_validator("layers", "leave_out", mode="before")
    @classmethod
    def _no_booleans(cls, value):
        return _not_bool(value)

    @field_validator("layers")
    @classmethod
    def _layers_syntax(cls, value):
        if isinstance(value, str) and not LAYER_SLICE.match(value):
            raise ValueError(f'layers {value!r} is neither "all", an index list nor a slice like "-2:"')
        if isinstance(value, str) and value.count(":") == 2 and value.rpartition(":")[2].strip() in ("0", "-0"):
            raise ValueError(f"layers {value!r}: a slice step cannot be zero")
        return value


def _not_bool(value):
    """Booleans are not numbers: `layers: true` or `expect: yes` is refused, not read as 1."""
    if isinstance(value, bool) or (isinstance(value, list) and any(isinstance(v, bool) for v in value)):
        raise ValueError(f"{value!r}: a boolean is not a number here")
    return value


# Adapter and rule names: they become keys of module dicts and of saved tensors (`adapter/rule/site/tensor`),
# file names, and Python identifiers in exported graphs, so they use one small character set.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,63}$")
NAME_RULE = "1 to 64 characters of A-Z, a-z, 0-9, _ and - (not starting with -)"
RESERVED_RULE_NAMES = ("trained",)   # `<adapter>/trained/<parameter>` holds the base parameters a spec trains


def name_problem(name: Any, what: str = "name") -> str | None:
    """Why `name` is not a valid adapter or rule name (None when it is)."""
    if not isinstance(name, str):
        return f"a {what} is a string, not {type(name).__name__}"
    if not NAME_PATTERN.match(name):
        return f"{what} {name!r} is not allowed: names are {NAME_RULE}"
    return None


class Rule(BaseModel):
    """One rewrite: where (`match`), what (`action`), with which module (`module`)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str | None = Field(None, description="Rule name; adapter parameters are named after it. 1 to 64 characters "
                                               "of A-Z, a-z, 0-9, _ and - (not starting with -), not `trained`.")
    match: Match = Field(description="Where: the pattern of the sites this rule rewrites.")
    action: Literal[ACTIONS] = Field(description="What to do at each site (see Actions).")  # type: ignore[valid-type]
    module: Any = Field(None, description="The module to insert: `kind` plus that kind's options.")
    from_: Match | None = Field(None, alias="from", description="parallel: the span's input, searched in the same layer.")
    through: list[str] = Field(default_factory=list,
                               description="insert_after: move past these ops (e.g. dropout) before inserting.")
    params: list[Literal["weight", "bias", "all"]] = Field(
        default_factory=lambda: ["all"], description="train: which parameters of the matched nodes train.")
    expect: Union[Annotated[int, Field(ge=0)], Literal["every_layer", "any"], None] = Field(
        None, description="How many sites the rule must match: a number, every_layer, or any (default: at least one).")
    realize: Literal["auto", "activation", "weight"] = Field(
        "auto", description="wrap: compute on activations (hooks) or on the weight (parametrization).")
    rows: Union[list[Annotated[int, Field(ge=0)]], None] = Field(
        None, min_length=1,
        description="train: only these rows (first index) of the selected weights train, e.g. the token ids of new "
                    "tokens in an embedding table and in an LM head tied to it (PEFT's trainable_token_indices); "
                    "the rest stays frozen, only the rows are saved, and merge writes them in.")

    @field_validator("name")
    @classmethod
    def _name_charset(cls, value):
        if value is None:
            return value
        problem = name_problem(value, "rule name")
        if problem:
            raise ValueError(problem)
        if value in RESERVED_RULE_NAMES:
            raise ValueError(f"rule name {value!r} is reserved (saved checkpoints keep trained base parameters "
                             f"under it)")
        return value

    @field_validator("expect", mode="before")
    @classmethod
    def _expect_not_bool(cls, value):
        return _not_bool(value)

    @model_validator(mode="after")
    def _consistent(self):
        given = {"action": self.action, "module": self.module, "from": self.from_, "realize": self.realize,
                 "rows": self.rows}
        if "params" in self.model_fields_set:
            given["params"] = self.params
        problems = rule_problems(given)
        if problems:
            raise problems[0]
        if self.module is not None:
            if isinstance(self.module, BaseModel):
                self.module = self.module.model_dump()
            try:
                self.module = kind_options(self.module.get("kind")).model_validate(self.module)
            except ValidationError as exc:
                raise OptionsProblem(exc) from None
        return self


def rule_problems(rule: dict) -> list[KeyProblem]:
    """Combinations the field types cannot express: which keys go with which action and module kind.

    Works on a rule's raw data (keys as written, `from` not `from_`), so the loader can report these even for
    a rule whose fields have other errors. Values that are themselves invalid are skipped here.
    """
    action = rule.get("action")
    if action not in ACTIONS:
        return []
    module = rule.get("module")
    problems = []
    if action == "train" and module is not None:
        problems.append(KeyProblem(("module",), "action train selects parameters and takes no module"))
    if action != "train" and module is None:
        problems.append(KeyProblem((), f"action {action} needs a module"))
    if action == "parallel" and rule.get("from") is None:
        problems.append(KeyProblem((), "action parallel needs `from`: the pattern of the span's input"))
    if action != "parallel" and rule.get("from") is not None:
        problems.append(KeyProblem(("from",), f"`from` is only for action parallel, not {action}"))
    if action != "train" and rule.get("params") not in (None, ["all"]):
        problems.append(KeyProblem(("params",), f"`params` is only for action train, not {action}"))
    if action != "train" and rule.get("rows") is not None:
        problems.append(KeyProblem(("rows",), f"`rows` is only for action train, not {action}"))
    if action != "wrap" and rule.get("realize", "auto") not in ("auto", None):
        problems.append(KeyProblem(("realize",), f"`realize` is only for action wrap, not {action}"))
    if isinstance(module, BaseModel):
        module = module.model_dump()
    if module is not None and not isinstance(module, dict):
        problems.append(KeyProblem(("module",), "a module is a mapping: `kind` plus that kind's options, "
                                                "e.g. {kind: lora, r: 8}"))
    elif module is not None:
        try:
            kind_actions = kind_options(module.get("kind")).actions()
        except ValueError as exc:
            problems.append(KeyProblem(("module", "kind") if "kind" in module else ("module",), str(exc)))
        else:
            if action not in kind_actions and action != "train":
                problems.append(KeyProblem(("action",), f"module {module.get('kind')!r} supports actions "
                                                        f"{', '.join(sorted(kind_actions))}, not {action}"))
    return problems


def duplicate_rule_names(rules: list) -> list[KeyProblem]:
    """Adapter parameters are named after their rule, so two rules of one spec cannot share a name."""
    problems, seen = [], set()
    for i, rule in enumerate(rules):
        given = rule.get("name") if isinstance(rule, dict) else getattr(rule, "name", None)
        name = given if isinstance(given, str) and given else f"rule{i}"
        if name in seen:
            where = ("rules", i, "name") if name == given else ("rules", i)
            problems.append(KeyProblem(where, f"a rule named {name!r} comes earlier in this spec"))
        seen.add(name)
    return problems


ModuleSpec = BaseModel


def _bool_in(value) -> str | None:
    values = value if isinstance(value, list) else [value]
    return f"{value!r}: a boolean is not a number here" if any(isinstance(v, bool) for v in values) else None


class Spec(BaseModel):
    """A surgery spec: named rules applied in order."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_: str | None = Field(None, alias="$schema",
                                description="JSON Schema reference for editors (JSON specs); ignored by surgery.")
    version: Literal[1] = Field(1, description="Format version.")
    name: str | None = Field(None, description="Spec name, used in error messages.")
    description: str | None = Field(None, description="Free text.")
    include: list[str] = Field(default_factory=list, description="Other spec files (relative paths, under this spec's "
                                                                 "directory) whose rules come first.")
    rules: list[Rule] = Field(default_factory=list, description="The rewrites, applied in order.")
    compose: Union[str, dict[str, Any], None] = Field(
        None, description="How named adapters combine, e.g. {average: [a, b], weights: [0.7, 0.3]} (the base plus the "
                          "weighted adapters' contributions; weights normalized to sum 1 unless normalize_weights: "
                          "false) or {fuse: [a, b]} (AdapterFusion); blocks: stack, average, batch_split, split, "
                          "parallel, fuse, mixed_batch.")

    @field_validator("compose")
    @classmethod
    def _known_block(cls, value):
        _check_block(value)
        return value

    @model_validator(mode="after")
    def _unique_rule_names(self):
        problems = duplicate_rule_names(self.rules)
        if problems:
            raise problems[0]
        return self

    # (rule, RuleOrigin) pairs set by the loader: where each rule was written, for errors found later
    _origins: list = PrivateAttr(default_factory=list)

    def rule_name(self, index: int) -> str:
        return self.rules[index].name or f"rule{index}"

    def origin_of(self, rule: Rule):
        """Where `rule` (one of this spec's rule objects) was written: a loader RuleOrigin, or None."""
        return next((origin for r, origin in self._origins if r is rule), None)


def _check_block(value, where: str = "") -> None:
    """A composition: an adapter name, or one block ({average: [a, b], weights: [...]}) whose children are
    compositions, with only that block's options (a stray `weights` on a stack was ignored), the required ones
    present and `weights` one per child. Raises ValueError naming the block's path (`average.1`)."""
    import difflib
    if isinstance(value, str) or value is None and not where:
        return
    if not isinstance(value, dict):
        raise ValueError(f"{where}a composition is an adapter name or a mapping like {{average: [a, b]}}, "
                         f"not {value!r}")
    kinds = [k for k in value if k in BLOCKS]
    if len(kinds) != 1:
        near = [n for k in value for n in difflib.get_close_matches(str(k), BLOCKS, n=1)]
        hint = f" (did you mean {near[0]!r}?)" if near and not kinds else ""
        raise ValueError(f"{where}a composition names exactly one of {', '.join(BLOCKS)}{hint}")
    kind = kinds[0]
    children = value[kind]
    if not isinstance(children, list) or not children:
        raise ValueError(f"{where}{kind}: a non-empty list of adapter names or blocks, not {children!r}")
    for i, child in enumerate(children):
        _check_block(child, f"{where}{kind}.{i}: ")
    allowed = BLOCK_OPTIONS[kind]
    for key in value:
        if key != kind and key not in allowed:
            near = difflib.get_close_matches(str(key), allowed, n=1)
            takes = f"takes {', '.join(allowed)}" if allowed else "takes no options"
            raise ValueError(f"{where}{kind}: unknown option {key!r} ({kind} {takes})"
                             + (f" (did you mean {near[0]!r}?)" if near else ""))
    for key in BLOCK_REQUIRED.get(kind, ()):
        if key not in value:
            raise ValueError(f"{where}{kind}: needs {key} (one per adapter)")
    from surgery.modules.values import float_problem
    for key in ("weights", "batch_sizes", "splits"):
        if key in value:
            problem = float_problem(value[key]) or _bool_in(value[key])
            if problem:
                raise ValueError(f"{where}{key}: {problem}")
    if "weights" in value and (not isinstance(value["weights"], list) or len(value["weights"]) != len(children)):
        raise ValueError(f"{where}weights: one per adapter of the {kind} ({len(children)}), not {value['weights']!r}")
    if "normalize_weights" in value and not isinstance(value["normalize_weights"], bool):
        raise ValueError(f"{where}normalize_weights: true or false, not {value['normalize_weights']!r}")
