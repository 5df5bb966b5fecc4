"""The `surgery` command line: inspect, demo (more subcommands register here)."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

from surgery.errors import SurgeryError


def load_model(ref: str):
    """`package.module:factory_or_class` (called with no arguments) or a directory transformers can load offline."""
    if ":" in ref and not Path(ref).exists():
        module_name, _, attr = ref.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise SurgeryError(f"cannot load model {ref!r}: {exc}") from None
        model = factory()
        example = model.example_inputs() if hasattr(model, "example_inputs") else None
        return model, example
    path = Path(ref)
    if path.is_dir():
        try:
            from transformers import AutoModel
        except ImportError:
            raise SurgeryError("loading a model directory needs transformers (pip install surgery[transformers])") from None
        return AutoModel.from_pretrained(str(path), local_files_only=True), None
    raise SurgeryError(f"MODEL must be package.module:factory or a model directory, not {ref!r}")


def format_table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns), "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def cmd_inspect(args) -> int:
    import surgery
    model, example = load_model(args.model)
    matches = surgery.plan(model, args.spec, example_inputs=example)
    print(format_table([m.as_row() for m in matches], ["rule", "layer", "role", "module", "node"]))
    base_trainable, total = surgery.trainable_parameters(model)
    surgery.apply(model, args.spec, example_inputs=example)
    trainable, total = surgery.trainable_parameters(model)
    print(f"\n{len(matches)} site(s); trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    return 0


def cmd_demo(args) -> int:
    """The quick start: Houlsby adapters on the seed's MiniGPT, a few training steps on a copy task."""
    import surgery
    from surgery.example_models import minigpt
    spec = args.spec or str(Path(__file__).resolve().parent.parent / "specs" / "houlsby.yaml")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="surgery", description="Declarative model surgery for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="print the sites a spec matches and the trainable parameter count")
    p.add_argument("model", help="package.module:factory or a transformers model directory")
    p.add_argument("--spec", required=True)
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("demo", help="apply a spec to the built-in MiniGPT and train a few steps")
    p.add_argument("--spec", default=None)
    p.add_argument("--steps", type=int, default=20)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SurgeryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
