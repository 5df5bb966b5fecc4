"""The architecture matrix (issues 16 and 17): every architecture of tests/architectures.py x every spec in specs/.

Each cell applies the spec to a fresh copy of a tiny random-weight model and checks, cheaply:

- apply succeeds, or refuses with a SurgeryError that leaves the model as it was;
- identity at init for the methods that say so (the output equals the base model's before apply and under
  `surgery.disable`);
- with the adapters perturbed (so identity cannot hide a bug) the output changes, keeps its shape, and
  `surgery.disable` gives the base output back;
- gradients only on what the spec trains: every trainable parameter gets a gradient, no base parameter trains
  unless a `train` rule selected its module;
- every layer has its sites: each `expect: every_layer` rule matches one site or more in every block
  (the oracle's block paths, tests/architectures.py) and as many distinct layers as the model has;
- no role on an op of the wrong kind: `ffn.out`/`attention.output` write the hidden width, FFN roles sit on no
  attention module and no MoE router, attention projections sit on attention modules;
- for decoders and encoder-decoders, on GENERATE_SPECS: each step's logits of generate() with the KV cache equal a
  full forward without the cache;
- an adapter acts where it sits: with the last layer's adapter parameters moved, every earlier layer's output is
  as it was (ALBERT's shared layer once ran every depth's prefix in every call).

A cell's outcome is `ok`, `refused` (a SurgeryError), `crash` (any other exception, or a RewriteError wrapping
one: "rewrite failed: ...") or `wrong` (a check failed). REFUSALS lists the refusals that are right (the method
needs what the model lacks), each with the regex its message must match. XFAIL lists the cells that fail today
and are engine gaps, with the observed outcome; it is the one table to edit as the engine is fixed
(`python tools/architectures_table.py --run` prints the observed table). docs/architectures.md is rendered from
these tables (tools/architectures_table.py) and test_docs_are_current fails when it is stale.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import surgery
from surgery.modules import columns
from architectures import ARCHITECTURES, kind_of, main_output
from models import perturb

ROOT = Path(__file__).resolve().parent.parent
SPECS_DIR = ROOT / "specs"
SPECS = sorted(p.stem for p in SPECS_DIR.glob("*.yaml"))
ARCHS = list(ARCHITECTURES)

# Methods whose output equals the base model's at initialization (the method's definition: LoRA's B = 0,
# IA3's ones, DoRA's magnitude = |W|, sparse/SAID zero deltas, LLaMA-Adapter's zero gate, selections).
IDENTITY_AT_INIT = {"lora", "qlora", "dora", "krona", "ia3", "said", "sparse", "llama_adapter", "bitfit",
                    "ln_tuning", "top_layers"}
# Specs whose generate() with the KV cache is checked against full forwards (decoders and encoder-decoders).
GENERATE_SPECS = {"prompt", "loreft", "prefix", "lora", "houlsby", "llama_adapter"}
NEW_TOKENS = 3
ATOL = 1e-5
ATOL_GENERATE = 1e-4

ATTENTION_SPECS = ("prefix", "llama_adapter", "mam", "unipelt")              # attend on attention.op
QKV_SPECS = ("lora", "dora", "krona", "ia3")                                 # attention projections only
BOTTLENECK_SPECS = ("houlsby", "pfeiffer", "parallel", "adapterplus", "compacter", "compacterpp",
                    "houlsby_inv", "pfeiffer_inv")


@dataclass(frozen=True)
class Refusal:
    reason: str          # what the model lacks, for docs/architectures.md
    message: str         # a regex the SurgeryError's message must match


def _refusals() -> dict[tuple[str, str], Refusal]:
    table: dict[tuple[str, str], Refusal] = {}

    def refuse(archs, specs, reason, message):
        for a in archs:
            for s in specs:
                table[(a, s)] = Refusal(reason, message)

    no_bias = [a for a in ("llama", "mistral", "mixtral", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text", "olmo",
                           "t5", "cohere", "granitemoe", "minimax")]
    refuse(no_bias, ["bitfit"], "the model has no bias parameters", r"(?i)bias")
    # not refused on Mamba: top_layers (a layer is its whole block, issue 16), qlora/said/sparse (every linear of
    # the blocks: PEFT's usual Mamba targets in_proj/x_proj/out_proj)
    refuse(["mamba"], ATTENTION_SPECS + QKV_SPECS + BOTTLENECK_SPECS + (
               "adalora", "boft", "diffusion_lora", "loha", "lora_task_head", "oft", "olora", "pissa", "vera"),
           "a state-space model has no attention op, and no FFN sub-layer with a residual of its own (use module "
           "globs on in_proj/out_proj/x_proj)",
           r"no attention op \(no softmax between two matmuls, no SDPA\).*nearest alternative: module globs")
    # invertible adapters invert at the LM head: models without one (encoders, pooled heads, vision, diffusion)
    refuse(["olmo", "dit"], ["ln_tuning"], "the model's norms have no parameters (non-affine LayerNorm)",
           r"(?i)no .*param")
    # Compacter's bottleneck is hidden / 32 = 2 at hidden 64: not a multiple of phm_dim 4 (tests/test_host_api.py
    # runs Compacter at hidden 128)
    refuse([a for a in ARCHS if a not in ("mamba",)], ["compacter", "compacterpp"],
           "the bottleneck width (hidden / 32 = 2) is not a multiple of phm_dim 4", r"phm_dim")
    # prompt tuning and invertible adapters act on the token embedding output: models whose input is not tokens
    refuse(["unet"], ["prompt", "direft", "loreft", "noreft"], "no token positions: several stacks of layers (a "
           "UNet's resolutions, on feature maps) that are not an encoder-decoder", r"(?i)stacks .*no token positions")
    # a new task head trained in full needs a head: base models without one (BertModel, CLIP's towers, a UNet)
    headless = ["bert", "roberta", "distilbert", "albert", "deberta-v2", "electra", "xlm-roberta", "clip-text",
                "clip-vision", "wav2vec2", "unet", "dit"]
    refuse(headless + ["funnel"], ["lora_task_head"],
           "the model has no head (a base model without an LM or classification head)", r"rule 'head' .*matched no site")
    # Funnel pools the sequence between blocks: positions of the input do not reach the last layer
    refuse(["funnel"], ["prompt"], "the layers pool the sequence (8 positions in, 4 out): the input's positions "
           "do not carry through", r"8 positions .* has 4 positions|stacks .*no token positions")
    # Flux's single-stream blocks: one proj_out reads the attention and the MLP concatenated
    refuse(["flux"], ["houlsby", "houlsby_inv", "compacter"], "the single-stream blocks have no attention output "
           "projection (one proj_out reads the attention and the MLP concatenated)",
           r"expects a site in every layer but matched none in layers \[1\]: pattern \(role='attention\.output'\)")
    return table


REFUSALS = _refusals()

# What a failure message says, as the kind of gap it shows (for XFAIL's labels and docs/architectures.md's notes).
FAILURE_KINDS = [
    (r"roles present in this model: embedding, (embedding\.output, )?norm", "attention not recognized: no attention, FFN or block roles"),
    (r"roles present in this model: attention\.op, block", "fused query_key_value: attention op found, no q/k/v/output or FFN roles"),
    (r"not the input or output of any module|not at any module boundary",
     "a value no module boundary carries (functional or shared dropout, a shared layer's norm)"),
    (r"writes width \d+, the hidden size|on a router", "MoE: ffn.out on the router or shared-expert gate"),
    (r"ffn\.\w+ on an attention module", "an FFN role on an attention module (MoE: self_attn.o_proj)"),
    (r"matched the site \S+ twice", "one site matched twice (a shared layer, or two roles on one module)"),
    (r"generate\(\) step", "generate() with the KV cache != full forwards at some step"),
    (r"matched layers \[0\]: the model has 2 layers", "a layer module called N times counted as one layer"),
    (r"matched layers .*: the model has \d+ layers", "layers counted by attention ops, not blocks"),
    (r"has no site in block", "a block without the rule's sites"),
    (r"output shape \(2, 0,", "prompt tuning strips positions from the decoder output"),
    (r"mat1 and mat2|is invalid for input of size|must match the size", "a shape error in the rewritten forward"),
    (r"rewrite failed", "an exception inside the rewrite"),
    (r"role='ffn\.(out|residual_add|residual)'\)", "FFN (or its residual) not found"),
    (r"every layer but matched none in layers \[[\d, ]+\]: pattern \(role=\[?'attention",
     "linear attention (no softmax) not recognized: no attention roles in a hybrid model's linear-attention layers"),
    (r"expects a site in every layer but matched none", "block.output missing in some layers"),
    (r"attention function from the registry", "eager-only attention: no attention adapters"),
    (r"change nothing", "adapters bypassed in eval (nn.TransformerEncoderLayer fast path)"),
    (r"get no gradient", "trainable parameters get no gradient"),
    (r"needs the activation path", "LoRA dropout on a weight read functionally (MultiheadAttention in_proj)"),
    (r"Nearest: without `layers`", "no roles inside the blocks (top layers select nothing)"),
    (r"applied \(a refusal expected\)", "applied where a refusal is declared"),
]


def failure_kind(message: str) -> str:
    for pattern, kind in FAILURE_KINDS:
        if re.search(pattern, message):
            return kind
    return message.splitlines()[0][:100] if message else "applied (a refusal expected)"


# Cells that fail on today's engine: (arch, spec) -> (observed outcome, what). Delete entries as the engine
# is fixed; `python tools/architectures_table.py --run` prints the observed table.
XFAIL: dict[tuple[str, str], tuple[str, str]] = {
    ('minimax', 'adalora'): ('refused', "linear attention (no softmax) not recognized: no attention roles in a hybrid model's linear-attention layers"),
    ('minimax', 'boft'): ('refused', "linear attention (no softmax) not recognized: no attention roles in a hybrid model's linear-attention layers"),
    ('minimax', 'compacter'): ('refused', "linear attention (no softmax) not recognized: no attention roles in a hybrid model's linear-attention layers"),
    ('minimax', 'diffusion_lora'): ('refused', "linear attention (no softmax) not recognized: no attention roles in a hybrid model's linear-attention layers"),
    ('minimax', 'dora'): ('refused', "linear attention (no softmax) not recognized: no attention roles in a hybrid model's linear-attention layers"),
    ('minimax', 'houlsby'): ('refused', "linear attention (no softmax) not recognized: no attention roles in a hybrid model's linear-attention layers"),
    ('minimax', 'houlsby_inv'): ('refused', "linear attention (no softmax) not recognized: no attention roles in a hybrid model's linear-attention layers"),
    ('minimax', 'ia3'): ('refused', "linear attention (no softmax) not recognized: no attention roles in a hybrid model's linear-attention layers"),
    ('minimax', 'krona'): ('refused', "linear attention (no softmax) not recognized: no attention roles in a hybrid model's linear-attention layers"),
    ('minimax', 'llama_adapter'): ('refused', "linear attention (no softmax) not recognized: no attention roles in a hybrid model's linear-attention layers"),
    ('minimax', 'loha'): ('refused', "linear attention (no softmax) not recognized: no attention roles in a hybrid model's linear-attention layers"),
    ('minimax', 'lora'): ('refused', "linear attention (no softmax) not recognized: no attention roles in a hybrid model's linear-attention layers"),
    ('minimax', 'lora_task_head'): ('refused', "linear attention (no softmax) not recognized: no attention roles in a hybrid model's linear-attention layers"),
    ('minimax', 'mam'): ('refused', "linear attention (no softmax) not recognized: no attention roles in a hybrid model's linear-attention layers"),
    ('minimax', 'oft'): ('refused', "linear attention (no softmax) not recognized: no attention roles in a hybrid model's linear-attention layers"),
    ('minimax', 'olora'): ('refused', "linear attention (no softmax) not recognized: no attention roles in a hybrid model's linear-attention layers"),
    ('minimax', 'pissa'): ('refused', "linear attention (no softmax) not recognized: no attention roles in a hybrid model's linear-attention layers"),
    ('minimax', 'prefix'): ('refused', "linear attention (no softmax) not recognized: no attention roles in a hybrid model's linear-attention layers"),
    ('minimax', 'unipelt'): ('refused', "linear attention (no softmax) not recognized: no attention roles in a hybrid model's linear-attention layers"),
    ('minimax', 'vera'): ('refused', "linear attention (no softmax) not recognized: no attention roles in a hybrid model's linear-attention layers"),
    ("flux", "prompt"): ("refused", "refused as a UNet's stacks: the single-stream blocks join the text tokens to the image sequence"),
}


# ---------------------------------------------------------------- the cell

class CellRefused(AssertionError):
    """The spec was refused where the matrix expects it to apply (or for another reason than declared)."""


class CellCrash(AssertionError):
    """An exception that is not a deliberate SurgeryError."""


class CellWrong(AssertionError):
    """A numerical or structural check failed."""


OUTCOME_ERRORS = {"refused": CellRefused, "crash": CellCrash, "wrong": CellWrong}


@dataclass
class Result:
    outcome: str         # ok | refused | crash | wrong
    message: str = ""


class Wrong(Exception):
    pass


_BASES: dict[str, dict] = {}


def base(arch: str) -> dict:
    """The pristine model of `arch` (never rewritten, never analyzed: each cell deep-copies it), its inputs, facts
    and base output; built once per process."""
    if arch not in _BASES:
        model, inputs, facts = ARCHITECTURES[arch]()
        assert facts["kind"] == kind_of(arch), arch
        with torch.no_grad():
            out = main_output(model, inputs)
        _BASES[arch] = {"model": model, "inputs": inputs, "facts": facts, "out": out, "generate_ok": None}
    return _BASES[arch]


def _max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def _width(model, match) -> int | None:
    """The output width of a matched site: its module's, else the traced value's last dimension."""
    try:
        mod = model.get_submodule(match.module)
    except AttributeError:
        mod = None
    if isinstance(mod, torch.nn.Linear):
        return mod.out_features
    if type(mod).__name__ == "Conv1D" and hasattr(mod, "nf"):
        return mod.nf
    val = getattr(match.site, "node", None)
    val = val.meta.get("val") if val is not None else None
    return int(val.shape[-1]) if isinstance(val, torch.Tensor) and val.dim() else None


def _within(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def _layer_slice(spec, n: int) -> list[int]:
    """The layers a pattern's `layers` selects out of n (None / "all": every one; an index, a list, a slice)."""
    every = list(range(n))
    if spec is None or spec == "all":
        return every
    if isinstance(spec, int):
        return [every[spec]] if -n <= spec < n else []
    if isinstance(spec, list):
        return sorted({every[i] for i in spec if -n <= i < n})
    parts = [int(p) if p.strip() else None for p in spec.split(":")]
    return every[slice(*parts)] if len(parts) > 1 else _layer_slice(parts[0], n)


def check_sites(model, spec, matches, facts):
    """Every layer has its sites; no role on an op of the wrong kind."""
    n_layers = facts["num_layers"]
    by_rule: dict[str, list] = {r.name: [] for r in spec.rules}
    for m in matches:
        by_rule.setdefault(m.rule, []).append(m)
    per_stack = any(getattr(m, "stack", None) is not None for m in matches)
    for rule in spec.rules:
        rows = by_rule.get(rule.name, [])
        if rule.expect != "every_layer":
            continue
        if per_stack:          # layers numbered within each stack (encoder, decoder): a slice applies per stack
            wanted_blocks, start = [], 0
            for stack, n in facts["layers"].items():
                wanted_blocks += [(stack, i, facts["blocks"][start + i]) for i in _layer_slice(rule.match.layers, n)]
                start += n
            got = {(getattr(m, "stack", None), m.layer) for m in rows if m.layer is not None}
        else:
            wanted_blocks = [(None, i, facts["blocks"][i]) for i in _layer_slice(rule.match.layers, n_layers)]
            got = {(None, m.layer) for m in rows if m.layer is not None}
        if len(got) != len(wanted_blocks):
            shown = sorted(f"{st}:{i}" if st is not None else i for st, i in got) if per_stack else sorted(i for _, i in got)
            raise Wrong(f"rule {rule.name!r} ({rule.match.role}, layers {rule.match.layers}) matched layers "
                        f"{shown}: the model has {n_layers} layers ({facts['layers']}), "
                        f"{len(wanted_blocks)} wanted")
        for _, _, block in wanted_blocks:
            if not any(_within(m.module, block) for m in rows):
                raise Wrong(f"rule {rule.name!r} ({rule.match.role}) has no site in block {block} "
                            f"(sites: {sorted({m.module for m in rows})[:6]})")
    attention = re.compile(facts["attention"]) if facts["attention"] else None
    hidden, experts = facts["hidden"], facts["experts"]

    def inner(path):
        """The path below its block (diffusers' blocks live under `attentions.N`), else the whole path."""
        for block in facts["blocks"]:
            if _within(path, block):
                return path[len(block):]
        return path

    for m in matches:
        role = m.role or ""
        if role in ("ffn.out", "attention.output") and hidden is not None:
            width = _width(model, m)
            if width is not None and width != hidden:
                raise Wrong(f"{role} on {m.module} writes width {width}, the hidden size is {hidden}")
        if role in ("ffn.in", "ffn.gate", "ffn.out"):
            if attention is not None and attention.search(inner(m.module)):
                raise Wrong(f"{role} on an attention module: {m.module}")
            if experts and _width(model, m) in (experts, 1):
                raise Wrong(f"{role} on a router ({m.module}: width {_width(model, m)}, {experts} experts)")
        if role in ("attention.q", "attention.k", "attention.v", "attention.qkv", "attention.output"):
            if attention is not None and not attention.search(inner(m.module)):
                raise Wrong(f"{role} on a module outside attention: {m.module}")


def _tensors(out):
    """Every tensor of a model output (a ModelOutput, a tuple, a tensor), e.g. BERT's pooler output too."""
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, dict):
        for v in out.values():
            yield from _tensors(v)
    elif isinstance(out, (tuple, list)):
        for v in out:
            yield from _tensors(v)


def check_gradients(model, spec, matches, inputs):
    adapter_ids = {id(p) for p in model.surgery_adapters.parameters()} if hasattr(model, "surgery_adapters") else set()
    trains = any(r.action == "train" for r in spec.rules)
    everywhere = any(r.action == "train" and r.match.role is None and r.match.module is None and r.match.op is None
                     for r in spec.rules)         # BitFit: match {} (every bias)
    selected = {m.module for m in matches}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # a tied weight (GPT-2's LM head is its token embedding) is one tensor under every name that holds it
    selected_ids = {id(p) for s in selected if s for _, p in model.get_submodule(s).named_parameters()}
    if not trainable:
        raise Wrong("nothing trains")
    for n, p in trainable:
        if id(p) in adapter_ids:
            continue
        if not trains:
            raise Wrong(f"base parameter {n} trains, and the spec has no train rule")
        owner = n.rpartition(".")[0]
        if not everywhere and id(p) not in selected_ids and not any(_within(owner, s) or _within(s, owner)
                                                                      for s in selected):
            raise Wrong(f"base parameter {n} trains, outside every matched site")
    model.zero_grad(set_to_none=True)
    loss = sum(t.float().pow(2).mean() for t in _tensors(model(**inputs)) if t.is_floating_point())
    loss.backward()
    missing = [n for n, p in trainable if p.grad is None]
    if missing:
        raise Wrong(f"{len(missing)} of {len(trainable)} trainable parameters get no gradient, e.g. {missing[:3]}")
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    if frozen:
        raise Wrong(f"frozen parameters got gradients: {frozen[:3]}")
    if all(p.grad.abs().max().item() == 0 for _, p in trainable):
        raise Wrong("every gradient is zero")
    model.zero_grad(set_to_none=True)


def _generate_inputs(facts, inputs):
    if facts["kind"] == "seq2seq":
        key = facts.get("encoder_input", "input_ids")
        return {key: inputs[key][:, :6] if key == "input_ids" else inputs[key]}
    return {"input_ids": inputs["input_ids"][:, :6]}


def check_generate(model, facts, inputs):
    """Each step's logits of generate() with the KV cache equal a full forward without it."""
    prompt = _generate_inputs(facts, inputs)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        seq = out.sequences
        for t, step_logits in enumerate(out.logits):
            if facts["kind"] == "seq2seq":
                start = seq.shape[1] - len(out.logits)
                ref = model(**prompt, decoder_input_ids=seq[:, :start + t], use_cache=False).logits[:, -1]
            else:
                ref = model(input_ids=seq[:, :prompt["input_ids"].shape[1] + t], use_cache=False).logits[:, -1]
            diff = _max_diff(step_logits, ref)
            if not diff <= ATOL_GENERATE:
                raise Wrong(f"generate() step {t}: logits with the KV cache differ from a full forward by {diff:.2e}")


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    return next((v for v in values if isinstance(v, torch.Tensor)), None)


def check_layer_locality(model, facts, inputs):
    """Move the adapter parameters of the last layer's sites (named after its block path; of a shared layer, its
    last call's): every earlier layer's output (each call's, in order) stays as it was. Last, as it changes them."""
    blocks = facts["blocks"]
    last = len(blocks) - 1
    path = re.sub(r"[^0-9A-Za-z_]", "_", blocks[last])
    shared = blocks.count(blocks[last]) > 1
    own = re.compile(rf"(^|\.){re.escape(path)}(_[^0-9]|\.|$)" + (rf".*__call{last}(_|\.|$)" if shared else ""))
    moved = [p for n, p in model.surgery_adapters.named_parameters() if own.search(n)]
    if not moved:
        return
    outputs, handles = [], []
    for block in dict.fromkeys(blocks):
        handles.append(model.get_submodule(block).register_forward_hook(
            lambda mod, args, out, block=block: outputs.append((block, _first_tensor(out)))))
    try:
        with torch.no_grad():
            main_output(model, inputs)
            before, outputs[:] = list(outputs), []
            g = torch.Generator().manual_seed(3)
            for p in moved:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.1)
            main_output(model, inputs)
    finally:
        for h in handles:
            h.remove()
    calls = 0
    for (block, a), (_, b) in zip(before, outputs):
        if block == blocks[last]:
            calls += 1
            if not shared or calls > last:
                continue
        if a is not None and b is not None and a.shape == b.shape and _max_diff(a, b) > ATOL:
            raise Wrong(f"moving the last layer's adapters ({len(moved)} parameters) changed the output of "
                        f"{block}{f' (call {calls - 1})' if shared else ''} by {_max_diff(a, b):.2e}")


def _hooks_and_flags(model):
    """What a failed apply must leave as it was, besides the weights: hooks, parametrizations, requires_grad, modes."""
    return ([(n, len(m._forward_hooks), len(m._forward_pre_hooks), m.training, hasattr(m, "parametrizations"))
             for n, m in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()])


def _refusal_or_crash(exc: BaseException) -> Result:
    msg = f"{type(exc).__name__}: {exc}".strip()
    if isinstance(exc, surgery.SurgeryError) and not str(exc).startswith("rewrite failed:"):
        return Result("refused", msg)
    return Result("crash", msg)


def run_cell(arch: str, spec_name: str) -> Result:
    """Apply one spec to a fresh copy of one architecture and run the checks; never raises."""
    b = base(arch)
    facts, inputs = b["facts"], b["inputs"]
    model = copy.deepcopy(b["model"])
    spec = surgery.load_spec(SPECS_DIR / f"{spec_name}.yaml")
    if b.get("untraceable"):      # the same model and inputs: the trace fails again (and slowly)
        return b["untraceable"]
    try:
        matches = surgery.plan(model, spec, example_inputs=facts["apply_inputs"])
    except Exception as exc:  # noqa: BLE001 - every exception is an outcome
        result = _refusal_or_crash(exc)
        if "could not trace" in result.message:
            b["untraceable"] = result
        return result
    try:
        check_sites(model, spec, matches, facts)     # a wrong placement is wrong even where apply then refuses
    except Wrong as exc:
        return Result("wrong", str(exc))
    try:
        surgery.apply(model, spec, example_inputs=facts["apply_inputs"])
    except Exception as exc:  # noqa: BLE001 - every exception is an outcome
        result = _refusal_or_crash(exc)
        try:
            with torch.no_grad():
                after = main_output(model, inputs)
            if (hasattr(model, "surgery_adapters") or _max_diff(after, b["out"]) > ATOL
                    or _hooks_and_flags(model) != _hooks_and_flags(b["model"])):
                return Result("wrong", f"a refused apply left the model changed ({result.message[:200]})")
        except Exception as exc2:  # noqa: BLE001
            return Result("wrong", f"a refused apply left the model broken: {type(exc2).__name__}: {exc2}")
        return result
    try:
        model.eval()
        with torch.no_grad():
            out0 = main_output(model, inputs)
        if out0.shape != b["out"].shape:
            raise Wrong(f"output shape {tuple(out0.shape)} != the base model's {tuple(b['out'].shape)}")
        if spec_name in IDENTITY_AT_INIT and _max_diff(out0, b["out"]) > ATOL:
            raise Wrong(f"not identity at init: differs from the base by {_max_diff(out0, b['out']):.2e}")
        has_adapters = any(True for _ in model.surgery_adapters.parameters())
        if has_adapters:
            perturb(model)
        with torch.no_grad():
            out1 = main_output(model, inputs)
            with surgery.disable(model):
                off = main_output(model, inputs)
        if _max_diff(off, b["out"]) > ATOL:
            raise Wrong(f"surgery.disable differs from the base by {_max_diff(off, b['out']):.2e}")
        if has_adapters and _max_diff(out1, b["out"]) < 1e-6:
            raise Wrong("the perturbed adapters change nothing in the output")
        check_gradients(model, spec, matches, inputs)
        if facts["generate"] and spec_name in GENERATE_SPECS and generate_works(arch):
            check_generate(model, facts, inputs)
        check_layer_locality(model, facts, inputs)
    except Wrong as exc:
        return Result("wrong", str(exc))
    except Exception as exc:  # noqa: BLE001
        return Result("crash", f"{type(exc).__name__}: {exc}".strip())
    return Result("ok")


def generate_works(arch: str) -> bool:
    """The base model's own generate() passes the check (else the cell cannot test it)."""
    b = base(arch)
    if b["generate_ok"] is None:
        try:
            check_generate(copy.deepcopy(b["model"]), b["facts"], b["inputs"])
            b["generate_ok"] = True
        except Exception:  # noqa: BLE001
            b["generate_ok"] = False
    return b["generate_ok"]


def base_facts(arch: str) -> str:
    """What docs/architectures.md says about an architecture (without building it)."""
    return kind_of(arch)


def as_declared(arch: str, spec: str, result: Result) -> bool:
    """Whether a cell's result is what the engine should give: ok, or the declared refusal with its message."""
    refusal = REFUSALS.get((arch, spec))
    if refusal is None:
        return result.outcome == "ok"
    return result.outcome == "refused" and re.search(refusal.message, result.message) is not None


def expected(arch: str, spec: str) -> tuple[str, str]:
    """The declared outcome of a cell: (ok | refused | crash | wrong, reason)."""
    if (arch, spec) in XFAIL:
        return XFAIL[(arch, spec)]
    if (arch, spec) in REFUSALS:
        return "refused", REFUSALS[(arch, spec)].reason
    return "ok", ""


# ---------------------------------------------------------------- tests

def _cells():
    cells = []
    for arch in ARCHS:
        for spec in SPECS:
            marks = [pytest.mark.slow] if kind_of(arch) == "diffusion" else []    # the UNet's trace: ~15 s
            if (arch, spec) in XFAIL:
                kind, what = XFAIL[(arch, spec)]
                marks.append(pytest.mark.xfail(strict=True, raises=OUTCOME_ERRORS[kind], reason=f"{kind}: {what}"))
            cells.append(pytest.param(arch, spec, id=f"{arch}-{spec}", marks=marks))
    return cells


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch,spec", _cells())
def test_cell(arch, spec):
    if kind_of(arch) == "diffusion":
        pytest.importorskip("diffusers")
    result = run_cell(arch, spec)
    if not as_declared(arch, spec, result):
        refusal = REFUSALS.get((arch, spec))
        if refusal is not None and result.outcome == "refused":
            raise CellRefused(f"refused, but the message does not say {refusal.reason!r} (/{refusal.message}/): "
                              f"{result.message}")
        if refusal is not None and result.outcome == "ok":
            raise CellWrong(f"expected a refusal ({refusal.reason}); it applied and passed every check")
        raise OUTCOME_ERRORS[result.outcome](result.message)


@pytest.mark.parametrize("arch", [a for a in ARCHS if kind_of(a) in ("decoder", "seq2seq", "ssm")
                                  and not a.endswith("-cls")])      # a pooled head has no generate()
def test_base_generate_is_checkable(arch):
    """The base model's own generate() passes the generate check, so a cell never skips it silently."""
    assert base(arch)["facts"]["generate"], f"{arch}: the matrix would not check its generate()"
    assert generate_works(arch)


def test_tables_name_known_cells():
    for arch, spec in list(REFUSALS) + list(XFAIL):
        assert arch in ARCHITECTURES and spec in SPECS, (arch, spec)
    for kind, what in XFAIL.values():
        assert kind in OUTCOME_ERRORS and what


def test_plan_rows_show_the_role_of_every_site():
    """A user sees on their own model which module got which role: by role, and by module glob too."""
    b = base("llama")
    model = copy.deepcopy(b["model"])
    rows = [m.as_row() for m in surgery.plan(model, SPECS_DIR / "houlsby.yaml")]
    assert rows and all(r["role"] in ("attention.output", "ffn.out") and r["module"] for r in rows)
    by_glob = {"version": 1, "name": "glob", "rules": [
        {"name": "q", "match": {"module": "*.q_proj"}, "action": "wrap", "module": {"kind": "lora", "r": 2}}]}
    rows = [m.as_row() for m in surgery.plan(model, by_glob)]
    assert rows and all(r["role"] == "attention.q" for r in rows), rows


def test_seq2seq_example_inputs_with_a_cache_trace():
    """A user's example inputs for an encoder-decoder rarely say use_cache=False; the model then returns an
    EncoderDecoderCache, which torch.export cannot flatten. The engine traces without the cache itself."""
    b = base("bart")
    model = copy.deepcopy(b["model"])
    inputs = {k: v for k, v in b["facts"]["apply_inputs"].items() if k != "use_cache"}
    assert surgery.plan(model, SPECS_DIR / "lora.yaml", example_inputs=inputs)


def test_docs_are_current():
    """docs/architectures.md is the rendering of the declared tables (tools/architectures_table.py)."""
    import sys
    sys.path.insert(0, str(ROOT / "tools"))
    from architectures_table import render
    path = ROOT / "docs" / "architectures.md"
    assert path.read_text() == render(), "docs/architectures.md is stale: run python tools/architectures_table.py"


@pytest.mark.parametrize("arch", ["falcon", "bloom", "gpt_neox", "gpt2", "llama"])
def test_q_on_a_fused_projection_is_its_columns_never_the_whole_output(arch):
    """The query site of an attention op is the columns its q operand reads (a packed slice, or an index set where
    q, k and v are interleaved head by head); never a whole fused projection, which would adapt k and v as well
    (Falcon's grouped query_key_value was once LoRA'd whole by `attention.q`)."""
    model = ARCHITECTURES[arch]()[0]
    spec = {"rules": [{"name": "q", "match": {"role": "attention.q"}, "action": "wrap",
                       "module": {"kind": "lora", "r": 2}, "expect": "any"},
                      {"name": "op", "match": {"role": "attention.op"}, "action": "attend",
                       "module": {"kind": "prefix", "prefix_length": 2}, "expect": "any"}]}
    rows = surgery.plan(model, spec)
    ops = {m.layer: m.site.node for m in rows if m.role == "attention.op"}
    for m in rows:
        if m.role != "attention.q":
            continue
        query = ops[m.layer].args[0].meta["val"]          # [batch, heads, seq, head_dim] at the op
        packed = m.site.extra.get("packed")
        width = columns.width(packed, m.site.linear.out_features)
        assert width == query.shape[1] * query.shape[-1], (arch, m.module, packed, m.site.linear.out_features)
