"""Stage 4: match a spec's patterns against the analyzed graph."""
from surgery.match.pattern import Match, match_rule, match_spec, resolve_layers

__all__ = ["Match", "match_rule", "match_spec", "resolve_layers"]
