"""Exceptions. Every failure a user can cause is a SurgeryError, and the model is left as it was."""
from __future__ import annotations


class SurgeryError(Exception):
    """Base class of every error surgery raises on purpose."""


class SpecError(SurgeryError):
    """A spec that does not validate. Carries where in the source file the problem is."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 column: int | None = None, key: str | None = None, problems: list["SpecError"] | None = None):
        self.message = message
        self.file = file
        self.line = line
        self.column = column
        self.key = key
        self.problems = problems or []
        super().__init__(self.render())

    def render(self) -> str:
        if self.problems:
            return "\n".join(p.render() for p in self.problems)
        where = self.file or "<spec>"
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        key = f" {self.key}:" if self.key else ""
        return f"{where}:{key} {self.message}"


class MatchError(SurgeryError):
    """A rule whose pattern matched fewer sites than it expects."""


class RewriteError(SurgeryError):
    """A matched site that the rewrite cannot be realized at."""


class LimitError(SurgeryError):
    """Work beyond a documented limit (memory an apply would allocate, include depth, nesting), refused before
    it starts."""


class SurgeryWarning(UserWarning):
    """Accepted, but probably not what was meant (e.g. a LoRA rank beyond what the weight can hold)."""
