"""The `surgery` command line: validate, schema, inspect, apply, export, demo.

A user error (a bad spec, a model that cannot be loaded, a rule that matches nothing) prints one line per
problem and exits with 1; a usage error (bad arguments, nothing to check) exits with 2. No traceback, ever:
an unexpected exception is one `error: internal error: ...` line and exit 1 (`SURGERY_DEBUG=1` shows the
traceback). Spec problems read `file:line:col: key.path: message`.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import logging
import os
import sys
from pathlib import Path

from surgery.errors import MatchError, SpecError, SurgeryError
from surgery.progress import logger as progress_logger
from surgery.progress import quiet_libraries, stage

MODEL_HELP = ("package.module:factory_or_class or path/to/file.py:factory_or_class (called with no arguments), or a "
              "transformers model directory")
EXIT_INVALID, EXIT_USAGE = 1, 2


class UsageError(SurgeryError):
    """The command line itself is wrong (exit 2)."""


def load_model(ref: str):
    """`package.module:factory_or_class` (called with no arguments) or a directory transformers can load offline.

    Returns (model, example_inputs); the example comes from the model's `example_inputs()` when it has one.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise UsageError(f"--model/MODEL is empty: give {MODEL_HELP}")
    if ":" in ref and not Path(ref).exists():
        module_name, _, attr = ref.rpartition(":")
        if module_name.endswith(".py") and attr.isidentifier():   # a file: path/to/model.py:factory
            return _from_example(ref, _call_factory(ref, _import_file(ref, Path(module_name)), attr))
        if not module_name or module_name.startswith(".") or not attr.isidentifier():
            raise UsageError(f"MODEL {ref!r}: expected package.module:factory_or_class (an absolute module name and "
                             f"a Python name), or a model directory")
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())   # `surgery` run as a script: find the user's own packages
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise SurgeryError(f"cannot load model {ref!r}: {exc}") from None
        except SyntaxError as exc:
            raise SurgeryError(f"cannot load model {ref!r}: {exc.filename}:{exc.lineno}: syntax error: "
                               f"{exc.msg}") from None
        except Exception as exc:  # noqa: BLE001 - the user's module raised at import
            raise SurgeryError(f"cannot load model {ref!r}: importing {module_name} raised "
                               f"{type(exc).__name__}: {exc}") from None
        return _from_example(ref, _call_factory(ref, module, attr))
    path = Path(ref)
    if path.is_dir():
        return _load_pretrained(path), None
    raise SurgeryError(f"MODEL must be package.module:factory_or_class or a model directory (or "
                       f"path/to/file.py:factory_or_class), not {ref!r}")


def _import_file(ref: str, path: Path):
    """The module of a Python file named on the command line, imported as a script's would be: its directory
    first on sys.path (for its own imports), under its file name's stem (so its classes have a source file, which
    the trace cache's key reads)."""
    import importlib.util
    if not path.is_file():
        raise SurgeryError(f"cannot load {ref!r}: no file {path}")
    name = path.stem if path.stem.isidentifier() else "surgery_model"
    loaded = sys.modules.get(name)
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() == path.resolve():
        return loaded
    if loaded is not None:
        name = f"surgery_model_{name}"   # the stem names another module (`test.py`): keep that one
    directory = str(path.resolve().parent)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        del sys.modules[name]
        raise SurgeryError(f"cannot load {ref!r}: {exc.filename}:{exc.lineno}: syntax error: "
                           f"{exc.msg}") from None
    except Exception as exc:  # noqa: BLE001 - the user's module raised at import
        del sys.modules[name]
        raise SurgeryError(f"cannot load {ref!r}: importing {path} raised {type(exc).__name__}: "
                           f"{exc}") from None
    return module


def _import_module(ref: str):
    """`surgery validate --import`: a Python module (package.module or path/to/file.py) that registers module
    kinds (surgery.register_module) when imported."""
    if ref.endswith(".py"):
        return _import_file(ref, Path(ref))
    if not ref or ref.startswith(".") or not all(part.isidentifier() for part in ref.split(".")):
        raise UsageError(f"--import {ref!r}: expected package.module or path/to/file.py")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(ref)
    except ImportError as exc:
        raise SurgeryError(f"cannot import {ref!r}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the user's module raised at import
        raise SurgeryError(f"cannot import {ref!r}: importing it raised {type(exc).__name__}: {exc}") from None


def _call_factory(ref: str, module, attr: str):
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise SurgeryError(f"cannot load model {ref!r}: module {module.__name__!r} has no callable {attr!r}")
    try:
        model = factory()
    except Exception as exc:  # the user's factory: report, do not crash
        raise SurgeryError(f"cannot load model {ref!r}: {attr}() raised {type(exc).__name__}: {exc}") from None
    import torch
    if not isinstance(model, torch.nn.Module):
        raise SurgeryError(f"cannot load model {ref!r}: {attr}() returned {type(model).__name__}, not a "
                           f"torch.nn.Module")
    return model


def _from_example(ref: str, model):
    """(model, example inputs): the example from the model's `example_inputs()` when it has one."""
    example = None
    if callable(getattr(model, "example_inputs", None)):
        try:
            example = model.example_inputs()
        except Exception as exc:  # noqa: BLE001
            raise SurgeryError(f"cannot load model {ref!r}: its example_inputs() raised "
                               f"{type(exc).__name__}: {exc}") from None
    return model, example


def _load_pretrained(path: Path):
    """The class the directory was saved from (its config's `architectures`), else AutoModel; offline only."""
    try:
        import transformers
    except ImportError:
        raise SurgeryError("loading a model directory needs transformers (pip install surgery[transformers])") from None
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        architectures = getattr(config, "architectures", None) or []
        cls = getattr(transformers, architectures[0], None) if architectures else None
        return (cls or transformers.AutoModel).from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise SurgeryError(f"cannot load the model directory {path}: {exc}") from None


def format_table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns), "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def _problems(exc: SpecError) -> list[SpecError]:
    return exc.problems or [exc]


SPEC_SUFFIXES = (".yaml", ".yml", ".json")


def _spec_files(arguments: list[str]) -> list[str]:
    """The files named, with a directory standing for every YAML/JSON file under it (hidden files and
    directories, such as .git or .github, and virtual environments, left out) and a pattern no shell expanded
    (quoted, or on Windows: `specs/*.yaml`, `specs/**/*.yaml`) for the files it matches."""
    import glob
    files = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            files += _files_under(path)
        elif not path.exists() and glob.has_magic(argument):
            matched = sorted(glob.glob(argument, recursive=True))
            if not matched:
                raise UsageError(f"no file matches {argument!r}")
            files += [f for m in matched for f in (_files_under(Path(m)) if Path(m).is_dir() else [m])]
        else:
            files.append(argument)
    if not files:
        raise UsageError(f"no spec files ({', '.join(SPEC_SUFFIXES)}) in {', '.join(arguments)}: nothing to check")
    unique: dict[str, str] = {}
    for f in files:   # each file once (named and in a directory named too), as first named
        unique.setdefault(os.path.normpath(f), f)
    return list(unique.values())


def _files_under(directory: Path) -> list[str]:
    found = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (Path(root, d) / "pyvenv.cfg").exists())
        found += [str(Path(root, n)) for n in names
                  if not n.startswith(".") and Path(n).suffix in SPEC_SUFFIXES]
    return sorted(found)


def cmd_validate(args) -> int:
    """Every problem of every file, one line each; with --model also every rule's matches and the rewrite."""
    from surgery.spec.load import load_spec_with_origins
    files = _spec_files(args.files)
    if args.model is not None and not args.model.strip():
        raise UsageError(f"--model is empty: give {MODEL_HELP}")
    for module in args.imports or ():   # module kinds registered from Python, before any spec names them
        _import_module(module)
    model_error = model = example = None
    if args.model:   # before the specs: importing the model's module registers the module kinds it defines
        try:
            model, example = load_model(args.model)
        except UsageError:
            raise
        except SurgeryError as exc:   # the model, not a spec: no file line to point at
            model_error = exc
    problems: list[SpecError] = []
    failed: set[str] = set()
    loaded = []
    for file in files:
        try:
            loaded.append((file, *load_spec_with_origins(file)))
        except SpecError as exc:
            problems.extend(_problems(exc))
            failed.add(file)
    counts: dict[str, list[tuple[str, int]]] = {}
    if model is not None and loaded:
        try:
            for file, spec, origins in loaded:
                with stage(f"validate {file} on {args.model}"):
                    found = _check_on_model(model, example, file, spec, origins, args.model,
                                            counts.setdefault(file, []))
                example = None   # traced once: later checks reuse the analysis cached on the model
                problems.extend(found)
                if found:
                    failed.add(file)
        except UsageError:
            raise
        except SurgeryError as exc:   # the model, not a spec: no file line to point at
            model_error = exc
    for problem in problems:
        print(problem.render())
    for file, spec, _ in loaded:
        if file not in failed and model_error is None:
            on = f" on {args.model}" if args.model else ""
            sites = "; sites: " + ", ".join(f"{n} {c}" for n, c in counts[file]) if counts.get(file) else ""
            print(f"{file}: ok ({len(spec.rules)} rule{'s' if len(spec.rules) != 1 else ''}{on}{sites})")
    if model_error is not None:
        print(f"error: {model_error}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem{'s' if len(problems) != 1 else ''} in {len(failed)} "
              f"file{'s' if len(failed) != 1 else ''}", file=sys.stderr)
    return 1 if problems or model_error else 0


def _check_on_model(model, example, file: str, spec, origins, model_ref: str,
                    counts: list | None = None) -> list[SpecError]:
    """Each rule must match on the model (problems point at the rule's `match`); then the whole spec must apply.
    `counts` receives (rule name, sites matched) per rule."""
    import surgery
    problems = []
    surgery.plan(model, spec.model_copy(update={"rules": []}), example_inputs=example)   # trace and analyze once
    for i, (rule, origin) in enumerate(zip(spec.rules, origins)):
        single = spec.model_copy(update={"rules": [rule.model_copy(update={"name": spec.rule_name(i)})]})
        try:
            matched = surgery.plan(model, single)
            if counts is not None:
                counts.append((spec.rule_name(i), len(matched)))
        except MatchError as exc:
            problems.append(origin.error(f"{exc} (on {model_ref})", "match"))
    if problems:
        return problems
    name = "surgery-validate"
    try:
        surgery.apply(model, spec, name=name)
    except SpecError as exc:
        return _problems(exc)
    except SurgeryError as exc:
        message = f"cannot apply on {model_ref}: {exc}"
        culprit = _failing_rule(model, spec, origins, name)
        if culprit is not None:
            return [culprit.error(message)]
        own = [o for o in origins if o.file == str(Path(file))]
        line, column = own[0].positions.get(("rules",), (None, None)) if own else (None, None)
        return [SpecError(message, file=file, line=line, column=column, key="rules")]
    surgery.remove(model, name)
    return []


def _failing_rule(model, spec, origins, name: str):
    """The first rule that fails to apply on its own (None when each applies alone)."""
    import surgery
    for i, (rule, origin) in enumerate(zip(spec.rules, origins)):
        single = spec.model_copy(update={"rules": [rule.model_copy(update={"name": spec.rule_name(i)})]})
        try:
            surgery.apply(model, single, name=f"{name}-{i}")
        except SurgeryError:
            return origin
        surgery.remove(model, f"{name}-{i}")
    return None


def cmd_schema(args) -> int:
    from surgery.spec.schema import render_schema
    sys.stdout.write(render_schema())
    return 0


def _summary(model, matches) -> str:
    import surgery
    trainable, total = surgery.trainable_parameters(model)
    return (f"{len(matches)} site(s); trainable parameters: {trainable:,} of {total:,} "
            f"({100 * trainable / max(total, 1):.3f}%)")


def _applied(args):
    """Load MODEL, apply SPEC (or load the adapters of --adapters DIR), print the sites; returns (model, example_inputs)."""
    import surgery
    if getattr(args, "adapters", None):
        return _loaded(args)
    model, example = load_model(args.model)
    matches = surgery.plan(model, args.spec, example_inputs=example)
    print(format_table([m.as_row() for m in matches], ["rule", "layer", "role", "module", "node"]))
    surgery.apply(model, args.spec, name=getattr(args, "name", None) or None)
    print(f"\n{_summary(model, matches)}")
    return model, example


def _loaded(args):
    """Load MODEL and the adapters saved in --adapters DIR (surgery.load), print their sites; returns
    (model, example_inputs)."""
    import surgery
    from surgery.io.checkpoint import read_manifest
    manifest = read_manifest(args.adapters)
    model, example = load_model(args.model)
    rows = []
    for entry in manifest["adapters"]:
        matches = surgery.plan(model, Path(args.adapters) / entry["spec"], example_inputs=example)
        rows += [{"adapter": entry["name"], **m.as_row()} for m in matches]
    print(format_table(rows, ["adapter", "rule", "layer", "role", "module", "node"]))
    surgery.load(model, args.adapters, example_inputs=example)
    print(f"\n{_summary(model, rows)} (loaded from {args.adapters})")
    return model, example


def cmd_inspect(args) -> int:
    _applied(args)
    return 0


def cmd_apply(args) -> int:
    import surgery
    save = getattr(surgery, "save", None)
    if save is None:
        raise SurgeryError("`surgery apply` saves the adapters with surgery.save, which this installation lacks")
    model, _ = _applied(args)
    out = save(model, args.out)
    written = sorted(p.name for p in Path(out or args.out).iterdir()) if Path(out or args.out).is_dir() else []
    print(f"saved the adapters to {out or args.out}" + (f": {', '.join(written)}" if written else ""))
    return 0


def cmd_export(args) -> int:
    import surgery
    export = getattr(surgery, "export", None)
    if export is None:
        raise SurgeryError("`surgery export` needs surgery.export, which this installation lacks")
    model, example = _applied(args)
    result = export(model, args.out, example_inputs=example, format=args.format, merge=not args.no_merge)
    print(f"exported ({args.format}) to {result or args.out}")
    return 0


def cmd_draw(args) -> int:
    """One layer of the rewritten graph before and after, the inserted modules highlighted (surgery.draw)."""
    import surgery
    if args.adapters:
        model, example = load_model(args.model)
        surgery.load(model, args.adapters, example_inputs=example)
    elif args.spec:
        model, example = _applied(args)
    else:
        raise SurgeryError("draw needs --spec SPEC or --adapters DIR (a directory written by surgery.save)")
    path = surgery.draw(model, args.out, example_inputs=example, layer=args.layer, backend=args.backend)
    print(f"drew layer {args.layer} before and after surgery to {path}")
    return 0


def cmd_demo(args) -> int:
    """The quick start: Houlsby adapters on the seed's MiniGPT, a few training steps on a copy task."""
    import torch

    import surgery
    from surgery.example_models import minigpt
    spec = args.spec or "houlsby"   # the shipped specs/houlsby.yaml
    torch.manual_seed(0)
    model = minigpt(vocab_size=50, hidden_dim=64, n_layers=2, seq_len=32)
    example = model.example_inputs()
    matches = surgery.plan(model, spec, example_inputs=example)
    print(f"spec: {spec}\n")
    print(format_table([m.as_row() for m in matches], ["rule", "layer", "role", "module", "node"]))
    surgery.apply(model, spec, example_inputs=example)
    trainable, total = surgery.trainable_parameters(model)
    print(f"\ntrainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)\n")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    data = torch.randint(0, 50, (16, 16))
    for step in range(args.steps):
        logits = model(data[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), data[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    return 0


SPEC_HELP = ("a spec file (YAML or JSON), or the name of a shipped spec (houlsby, lora, ...: "
             "the files of the package's specs/)")
ADAPTERS_HELP = "a directory of trained adapters written by surgery.save or `surgery apply` (instead of --spec)"
QUIET_HELP = "do not print progress (each long stage and how long it took) on stderr"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="surgery", description="Declarative model surgery for PyTorch.")
    parser.add_argument("-q", "--quiet", action="store_true", default=False, help=QUIET_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check spec files (schema and semantics; with --model, that every rule "
                                        "matches and the spec applies)",
                       description="Print every problem as file:line:col: key.path: message; exit 1 on any.")
    p.add_argument("files", nargs="+", metavar="FILE", help="YAML or JSON spec files")
    p.add_argument("--model", help="also check on this model that every rule matches and each spec applies: "
                                    + MODEL_HELP + " (its module is imported first: module kinds it registers "
                                    "are known)")
    p.add_argument("--import", dest="imports", action="append", metavar="MODULE",
                   help="import this Python module (package.module or path/to/file.py) first, for the module kinds "
                        "it registers with surgery.register_module; repeatable")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("schema", help="print the JSON Schema of the spec format (as in surgery.schema.json)")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("inspect", help="print the sites a spec matches (or saved adapters cover) and the "
                                       "trainable parameter count")
    p.add_argument("model", help=MODEL_HELP)
    _spec_or_adapters(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("apply", help="apply a spec to a model and save the adapters (surgery.save)")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--spec", required=True, help=SPEC_HELP)
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the adapter files")
    p.add_argument("--name", default=None, help="adapter name (default: default)")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("export", help="apply a spec (or load trained adapters) and export the rewritten model "
                                      "(surgery.export)")
    p.add_argument("model", help=MODEL_HELP)
    _spec_or_adapters(p)
    p.add_argument("--format", default="onnx", choices=["onnx", "torchscript", "pt2"],
                   help="onnx (checked in onnxruntime), torchscript (torch.jit.trace) or pt2 (torch.export); "
                        "default: onnx")
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write")
    p.add_argument("--no-merge", action="store_true", help="keep foldable rewrites unmerged")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("draw", help="draw one layer before and after surgery, inserted modules highlighted")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--spec", help=SPEC_HELP)
    p.add_argument("--adapters", metavar="DIR", help=ADAPTERS_HELP)
    p.add_argument("--out", default="surgery.svg", metavar="FILE", help="output file: .svg, .png or .pdf")
    p.add_argument("--layer", type=int, default=0, help="which layer to draw, counted from 0 (negative: from the "
                                                         "end); default: 0")
    p.add_argument("--backend", default="auto", choices=["auto", "graphviz", "matplotlib"],
                   help="graphviz (needs the `dot` program), matplotlib, or auto (graphviz when available)")
    p.set_defaults(func=cmd_draw)

    p = sub.add_parser("demo", help="apply a spec to the built-in MiniGPT and train a few steps")
    p.add_argument("--spec", default=None, help="the spec to apply (default: houlsby, the shipped Houlsby adapters)")
    p.add_argument("--steps", type=int, default=20, help="training steps on a copy task (default: 20)")
    p.set_defaults(func=cmd_demo)

    for p in sub.choices.values():
        for action in p._actions:   # an option given twice is an error, not the last one silently
            if type(action) is argparse._StoreAction and action.option_strings:
                action.__class__ = _StoreOnce
    for p in sub.choices.values():   # -q after the command too; progress logging around every command
        p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=QUIET_HELP)
        p.set_defaults(func=_logging_progress(p.get_default("func")))
    return parser


class _StoreOnce(argparse._StoreAction):
    """`--spec a --spec b` applied b alone; one value per option."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = namespace.__dict__.setdefault("_given", set())
        if self.dest in given:
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)!r}, then {values!r}): it "
                         f"takes one value")
        given.add(self.dest)
        super().__call__(parser, namespace, values, option_string)


def _spec_or_adapters(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--spec", help=SPEC_HELP)
    group.add_argument("--adapters", metavar="DIR", help=ADAPTERS_HELP)


def _logging_progress(func):
    """Run a command with surgery's progress messages (logger "surgery", INFO) on stderr, unless --quiet, and
    without the warnings torch, onnx and torchao print while it runs (e.g. transformers imports torchao when it
    is installed, which logs the CUDA kernels it cannot load)."""
    @functools.wraps(func)
    def run(args) -> int:
        with _progress_on_stderr(quiet=getattr(args, "quiet", False)), quiet_libraries():
            return func(args)
    return run


@contextlib.contextmanager
def _progress_on_stderr(quiet: bool):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("surgery: %(message)s"))
    level = progress_logger.level
    if not quiet:
        progress_logger.addHandler(handler)
        progress_logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        progress_logger.removeHandler(handler)
        progress_logger.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 invalid input, 2 usage, 130 interrupted)."""
    args = build_parser().parse_args(argv)   # argparse prints usage and exits 2 itself
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SpecError as exc:
        for problem in _problems(exc):
            print(problem.render(), file=sys.stderr)
        return EXIT_INVALID
    except SurgeryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - never a traceback: one line, and the way to see more
        if os.environ.get("SURGERY_DEBUG"):
            raise
        text = " ".join(str(exc).split())[:300]
        print(f"error: internal error: {type(exc).__name__}: {text} (SURGERY_DEBUG=1 shows the traceback; "
              f"please report it)", file=sys.stderr)
        return EXIT_INVALID


if __name__ == "__main__":
    sys.exit(main())
