"""Decode time per new token with the KV cache: LLaMA from a config, without surgery and with each spec, in one run.

    python benchmarks/decode.py [--specs lora houlsby prefix ...] [--new-tokens 64] [--prompt 32] [--rounds 5]
                                [--threads 1] [--hidden 256] [--layers 4]

A rewrite that kept the model's KV cache costs the same per token at token 60 as at token 10; one that
recomputed the whole sequence (or re-prepended prompts) every step grows linearly. Each variant's greedy
generate() is timed token by token (a stopping criterion reads the clock after every step) over several
interleaved rounds; a token's time is its median over rounds. Printed per variant: ms per token over the first
8 and the last 8 decode steps (the prefill excluded), their ratio (goal: below 1.3), and the per-token cost
against the base model in the same run. Adapters are perturbed so that they are active, and the greedy tokens
are checked equal to a no-cache decode before timing. Clock: process CPU time with one intra-op thread (see
benchmarks/common.py: on a busy 2-core machine it is what the wall time would be on an idle one).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import surgery  # noqa: E402
from models import perturb  # noqa: E402

GOAL = 1.3
WINDOW = 8
DEFAULT_SPECS = ("lora", "houlsby", "pfeiffer", "parallel", "ia3", "dora", "prefix", "llama_adapter", "prompt",
                 "loreft", "mam", "unipelt", "houlsby_inv")


def make_llama(hidden: int, layers: int, vocab: int = 512):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 8 * 8,
                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                      max_position_embeddings=1024, bos_token_id=0, eos_token_id=None, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


class StepClock:
    """A stopping criterion that never stops: it records the clock after each generated token."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.stamps.append(time.process_time())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def decode_step_times(model, prompt: torch.Tensor, new_tokens: int) -> list[float]:
    """Seconds of each decode step after the first token (which includes the prefill)."""
    from transformers import StoppingCriteriaList
    clock = StepClock()
    with torch.no_grad():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, do_sample=False,
                       stopping_criteria=StoppingCriteriaList([clock]))
    return [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]


def check_against_full_forwards(model, prompt: torch.Tensor, steps: int) -> bool:
    with torch.no_grad():
        generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps,
                                   do_sample=False)
        ids = prompt
        for _ in range(steps):
            logits = model(input_ids=ids, use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return torch.equal(generated, ids)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--specs", nargs="+", default=list(DEFAULT_SPECS), help="spec names in specs/")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=32, help="prompt length")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.new_tokens < 2 * WINDOW + 2:
        parser.error(f"--new-tokens must be at least {2 * WINDOW + 2}")

    prompt = torch.randint(1, 512, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    variants, notes = {"base": make_llama(args.hidden, args.layers)}, {}
    for name in args.specs:
        model = make_llama(args.hidden, args.layers)
        try:
            surgery.apply(model, ROOT / "specs" / f"{name}.yaml")
            perturb(model, 0.05)
            decode_step_times(model, prompt, 2)
        except Exception as exc:  # noqa: BLE001  (a benchmark reports what fails and goes on)
            notes[name] = f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
            continue
        variants[name] = model
        if not check_against_full_forwards(model, prompt, 12):
            notes[name] = "cached generate() != no-cache greedy"

    steps = {name: [] for name in variants}
    for round_ in range(args.rounds + 1):         # round 0 warms up
        order = list(variants) if round_ % 2 == 0 else list(variants)[::-1]
        for name in order:
            times = decode_step_times(variants[name], prompt, args.new_tokens)
            if round_:
                steps[name].append(times)

    per_token = {name: [statistics.median(r[i] for r in rounds) for i in range(len(rounds[0]))]
                 for name, rounds in steps.items()}
    base_ms = statistics.mean(per_token["base"]) * 1e3
    print(f"LLaMA hidden {args.hidden}, {args.layers} layers, 8 heads (4 KV), prompt {args.prompt}, "
          f"{args.new_tokens} new tokens, {args.rounds} rounds, {args.threads} thread(s), process CPU time")
    header = f"{'variant':14s} {'first 8 ms/tok':>14s} {'last 8 ms/tok':>14s} {'last/first':>11s} {'vs base':>8s}  verdict"
    print(header)
    print("-" * len(header))
    failed = False
    for name, times in per_token.items():
        first, last = statistics.mean(times[:WINDOW]) * 1e3, statistics.mean(times[-WINDOW:]) * 1e3
        ratio = last / first
        failed |= ratio >= GOAL
        verdict = "flat" if ratio < GOAL else "GROWS"
        print(f"{name:14s} {first:14.2f} {last:14.2f} {ratio:11.3f} {statistics.mean(times) * 1e3 / base_ms:7.2f}x"
              f"  {verdict}{'; ' + notes[name] if name in notes else ''}")
    for name, note in notes.items():
        if name not in per_token:
            print(f"{name:14s} {note}")
    print(f"ratios last/first: " + ", ".join(f"{n} {statistics.mean(t[-WINDOW:]) / statistics.mean(t[:WINDOW]):.3f}"
                                             for n, t in per_token.items()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
