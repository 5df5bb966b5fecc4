"""Stage 1: the spec format (pydantic models) and loading it from YAML/JSON with source positions."""
from surgery.spec.models import Match as Pattern, Rule, Spec, ModuleSpec
from surgery.spec.load import load_spec, spec_from

__all__ = ["Pattern", "Rule", "Spec", "ModuleSpec", "load_spec", "spec_from"]
