"""The spec format: a list of rules, each a pattern (`match`) and a rewrite (`action` + `module`).

Module options are validated against the option model that each registered module class declares, so
`kind: lora` requires what LoRA requires and nothing else.
"""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from surgery.modules.registry import options_model

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
    "ffn.in", "ffn.gate",   # FFN input projections (gate only in gated FFNs)
    "ffn.act",              # the FFN activation
    "ffn.out",              # the FFN output projection
    "ffn.residual",         # the residual value added to the FFN branch
    "ffn.residual_add",     # the add closing the FFN sub-layer
    "norm",                 # a normalization (LayerNorm, RMSNorm)
    "lm_head",              # the output projection to the vocabulary
)

ACTIONS = ("insert_after", "insert_before", "parallel", "sublayer", "wrap", "replace", "attend", "prepend", "train")

Names = Union[str, list[str]]


class Match(BaseModel):
    """A pattern over graph nodes. Every given field must hold; `inputs` match the node's arguments."""

    model_config = ConfigDict(extra="forbid")

    role: Names | None = Field(None, description="Semantic role(s) read from the graph, e.g. attention.output.")
    layers: Union[int, list[int], str, None] = Field(
        None, description='Layer index, list, or Python slice such as "-2:" or "0:4"; "all" for every layer.')
    module: Names | None = Field(None, description="Glob(s) on the qualified module path the node comes from.")
    op: Names | None = Field(None, description="Op name(s): linear, addmm, add, layer_norm, scaled_dot_product_attention, ...")
    inputs: list[Match] | None = Field(None, description="Patterns for the node's tensor arguments, by position.")
    through: bool = Field(False, description="As an input pattern: walk back through view-like ops to find the node.")
    bind: str | None = Field(None, description="Name this node; a repeated name must be the same node.")

    @field_validator("role")
    @classmethod
    def _known_role(cls, value):
        for role in [value] if isinstance(value, str) else (value or []):
            if role not in ROLES:
                import difflib
                near = difflib.get_close_matches(role, ROLES, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ValueError(f"unknown role {role!r}{hint}; roles are {', '.join(ROLES)}")
        return value

    @field_validator("layers")
    @classmethod
    def _layers_syntax(cls, value):
        if isinstance(value, str) and value != "all":
            parts = value.split(":")
            if len(parts) > 3 or not all(p.strip().lstrip("-").isdigit() or p.strip() == "" for p in parts):
                raise ValueError(f'layers {value!r} is neither "all", an index list nor a slice like "-2:"')
        return value


class Rule(BaseModel):
    """One rewrite: where (`match`), what (`action`), with which module (`module`)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str | None = Field(None, description="Rule name; adapter parameters are named after it.")
    match: Match
    action: Literal[ACTIONS]  # type: ignore[valid-type]
    module: Any = Field(None, description="The module to insert: `kind` plus that kind's options.")
    from_: Match | None = Field(None, alias="from", description="parallel: the span's input, searched in the same layer.")
    through: list[str] = Field(default_factory=list,
                               description="insert_after: move past these ops (e.g. dropout) before inserting.")
    params: list[Literal["weight", "bias", "all"]] = Field(
        default_factory=lambda: ["all"], description="train: which parameters of the matched nodes train.")
    expect: Union[int, Literal["every_layer", "any"], None] = Field(
        None, description="How many sites the rule must match: a number, every_layer, or any (default: at least one).")
    realize: Literal["auto", "activation", "weight"] = Field(
        "auto", description="wrap: compute on activations (hooks) or on the weight (parametrization).")

    @model_validator(mode="after")
    def _consistent(self):
        if self.action == "train":
            if self.module is not None:
                raise ValueError("action train selects parameters and takes no module")
        elif self.module is None:
            raise ValueError(f"action {self.action} needs a module")
        if self.action == "parallel" and self.from_ is None:
            raise ValueError("action parallel needs `from`: the pattern of the span's input")
        if self.module is not None:
            kind = self.module.get("kind")
            model = options_model(kind)  # raises ValueError for unknown kinds
            self.module = model.model_validate(self.module)
            if self.action not in model.actions():
                raise ValueError(f"module {kind!r} supports actions {sorted(model.actions())}, not {self.action!r}")
        return self


ModuleSpec = BaseModel


class Spec(BaseModel):
    """A surgery spec: named rules applied in order."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    name: str | None = None
    description: str | None = None
    include: list[str] = Field(default_factory=list, description="Other spec files (relative paths) whose rules come first.")
    rules: list[Rule] = Field(default_factory=list)

    def rule_name(self, index: int) -> str:
        return self.rules[index].name or f"rule{index}"
