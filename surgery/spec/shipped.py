"""The specs shipped with surgery (the repository's `specs/`), found by name from any directory.

A wheel carries them as package data in `surgery/specs/` (setup.py copies them at build time); a source
checkout or an editable install reads `specs/` next to the `surgery` package. `locate_spec` is what
`surgery.load_spec` (and so `surgery.apply`, `plan` and every `--spec` of the command line) calls first.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path

from surgery.errors import SpecError

SPEC_SUFFIXES = (".yaml", ".yml", ".json")


def shipped_specs_dir() -> Path | None:
    """`surgery/specs` in an installed wheel, else `specs/` of the source checkout; None when neither exists."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "specs", package.parent / "specs"):
        if candidate.is_dir():
            return candidate
    return None


def shipped_spec_names() -> list[str]:
    """The shipped specs' names (file stems), sorted: houlsby, lora, ..."""
    shipped = shipped_specs_dir()
    return sorted(p.stem for p in shipped.iterdir() if p.suffix in SPEC_SUFFIXES) if shipped else []


def locate_spec(path: str | os.PathLike) -> Path:
    """`path` when it exists. Otherwise, when `path` is a bare name or `specs/<name>` (as the README writes it):
    the shipped spec of that name (`houlsby`, `houlsby.yaml`, `specs/houlsby.yaml`), wherever the current
    directory is. A bare or specs/ name that is neither raises SpecError naming the nearest shipped spec; any
    other missing path is returned as given (the loader reports it)."""
    path = Path(path)
    if path.exists() or path.is_absolute() or path.parent not in (Path("."), Path("specs")):
        return path
    shipped = shipped_specs_dir()
    name = path.name if path.suffix in SPEC_SUFFIXES else f"{path.name}.yaml"
    if shipped is not None and (shipped / name).is_file():
        return shipped / name
    names = shipped_spec_names()
    near = difflib.get_close_matches(path.stem, names, n=1, cutoff=0.75)
    hint = (f"did you mean the shipped spec {near[0]!r}?" if near else
            f"shipped specs: {', '.join(names)}" if names else "")
    raise SpecError(f"cannot read spec: No such file or directory{f' ({hint})' if hint else ''}", file=str(path))
