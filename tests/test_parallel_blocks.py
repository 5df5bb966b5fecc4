"""Values no module boundary carries, reached by intercepting the torch-level call that makes them (issue 16).

In a parallel block (GPT-J, GPT-NeoX with use_parallel_residual, Phi) the sum of the attention and MLP outputs
is computed in the block's forward (`attn + mlp + residual`); in a DiT block the FFN branch is `gate * ff(x)`.
Neither is any module's input or output, so sub-layer adapters (Pfeiffer, Adapter+, UniPELT's bottleneck) had
no anchor and were refused. Now the call is intercepted in that forward (surgery/rewrite/torchcalls.py).

The placement checked is AdapterHub's for GPT-J (`GPTJBlockWithAdapters`: `attention_adapters(attn, residual)`
then `output_adapters(mlp, that)`): the output adapter reads residual + attn + mlp, the block's whole output,
and Pfeiffer's (SeqBn, pre-LN, no norm) result is z + A(z) with z that sum.
"""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import surgery
from architectures import ARCHITECTURES
from models import perturb
from surgery.errors import RewriteError


def _adapters(model, rule="ffn_adapter"):
    return dict(model.surgery_adapters.adapters["default"][rule].items())


def _record(model, blocks):
    """Each block's call (args, kwargs) and output during one forward."""
    seen = {}

    def pre(name, mod, args, kwargs):
        seen.setdefault(name, {})["call"] = (args, kwargs)

    def post(name, mod, args, kwargs, out):
        seen[name]["out"] = out[0] if isinstance(out, tuple) else out

    handles = []
    for name in blocks:
        block = model.get_submodule(name)
        handles.append(block.register_forward_pre_hook(functools.partial(pre, name), with_kwargs=True))
        handles.append(block.register_forward_hook(functools.partial(post, name), with_kwargs=True))
    return seen, handles


def _inputs(inputs):
    return dict(inputs, use_cache=False) if "input_ids" in inputs else dict(inputs)


@pytest.mark.parametrize("arch", ["gptj", "gpt_neox", "phi", "dit", "gpt2", "llama"])
def test_pfeiffer_reads_the_sublayer_sum(arch):
    """Each block's output is z + A(z), z the base block's output (residual + branch), and the adapter's input
    is z: AdapterHub's SeqBn on a pre-LN sub-layer, where the branch is the parallel sum (or a DiT's gated FFN).
    GPT-2 (sequential) checks the other kind: the last block's adapter must not take the stack's final norm
    (ln_f, the last add's only user) for a post-sub-layer norm (it read ln_f(z) and ln_f was applied twice)."""
    model, inputs, facts = ARCHITECTURES[arch]()
    surgery.apply(model, "pfeiffer", example_inputs=facts["apply_inputs"])
    perturb(model)
    adapters = _adapters(model)
    assert len(adapters) == facts["num_layers"]
    down_inputs = []
    hooks = [a.down.register_forward_pre_hook(lambda m, args: down_inputs.append(args[0]))
             for a in adapters.values()]
    seen, handles = _record(model, facts["blocks"])
    with torch.no_grad():
        model(**_inputs(inputs))
    for h in hooks + handles:
        h.remove()
    assert len(down_inputs) == facts["num_layers"]
    for i, name in enumerate(facts["blocks"]):
        args, kwargs = seen[name]["call"]
        with torch.no_grad(), surgery.disable(model):
            z = model.get_submodule(name)(*args, **kwargs)
        z = z[0] if isinstance(z, tuple) else z
        adapter = adapters[name.replace(".", "_") + "__ffn_residual_add"]
        torch.testing.assert_close(down_inputs[i], z, atol=1e-6, rtol=0)
        with torch.no_grad():
            expected = z + adapter.up(adapter.act(adapter.down(z)))     # SeqBn, no norm: z + A(z)
        torch.testing.assert_close(seen[name]["out"], expected, atol=1e-5, rtol=0)
        assert (seen[name]["out"] - z).abs().max() > 1e-4     # the adapter changed the block


def test_gptj_adapter_input_is_residual_plus_attention_plus_mlp():
    """GPT-J: the Pfeiffer adapter of block 0 reads residual + attn(ln_1(x)) + mlp(ln_1(x)), computed here from
    the block's own modules (AdapterHub's GPTJBlockWithAdapters: the output adapter's input)."""
    model, inputs, facts = ARCHITECTURES["gptj"]()
    surgery.apply(model, "pfeiffer")
    perturb(model)
    block = model.transformer.h[0]
    adapter = list(_adapters(model).values())[0]
    got, call = [], {}
    h1 = adapter.down.register_forward_pre_hook(lambda m, args: got.append(args[0]))
    h2 = block.register_forward_pre_hook(lambda m, args, kwargs: call.update(args=args, kwargs=kwargs),
                                         with_kwargs=True)
    with torch.no_grad():
        model(**inputs, use_cache=False)
    h1.remove(), h2.remove()
    x = call["args"][0] if call["args"] else call["kwargs"]["hidden_states"]
    kwargs = {k: v for k, v in call["kwargs"].items() if k != "hidden_states"}
    with torch.no_grad(), surgery.disable(model):
        normed = block.ln_1(x)
        attn = block.attn(normed, **{k: v for k, v in kwargs.items()
                                     if k in ("attention_mask", "position_ids", "position_embeddings",
                                              "cache_position")})[0]
        mlp = block.mlp(normed)
    torch.testing.assert_close(got[0], x + attn + mlp, atol=1e-6, rtol=0)


def test_gptj_pfeiffer_generate_equals_full_forwards():
    """With the intercept in the block's forward, generate() with the KV cache gives each step's logits of a
    full forward without it (the intercepted call is found by its line, not by how many adds ran before)."""
    model, inputs, facts = ARCHITECTURES["gptj"]()
    surgery.apply(model, "pfeiffer")
    perturb(model)
    prompt = inputs["input_ids"][:, :6]
    with torch.no_grad():
        out = model.generate(input_ids=prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        for t, logits in enumerate(out.logits):
            ref = model(input_ids=out.sequences[:, :6 + t], use_cache=False).logits[:, -1]
            torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)
        with surgery.disable(model):
            base = model(input_ids=prompt, use_cache=False).logits
        assert (model(input_ids=prompt, use_cache=False).logits - base).abs().max() > 1e-4


# ---------------------------------------------------------------- the mechanism on a plain module

class Parallel(nn.Module):
    """A parallel block written by hand: one norm, two branches summed in the forward, a residual add on the
    same line, and an unrelated add that runs only when `extra` is set (so counting every add of the call would
    pick the wrong one)."""

    def __init__(self, d=16):
        super().__init__()
        self.norm, self.a, self.b = nn.LayerNorm(d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x, extra: bool = False):
        h = self.norm(x)
        if extra:
            h = h + 0.0
        return self.a(h) + self.b(h) + x


class Net(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.blocks = nn.ModuleList([Parallel(d), Parallel(d)])

    def forward(self, x, extra: bool = False):
        for block in self.blocks:
            x = block(x, extra)
        return x


def _branch_node(analysis, block):
    """The traced `a(h) + b(h)` of a block: the add whose operands are both linear outputs."""
    from surgery.analyze.roles import op_name, stack_paths
    for node in analysis.traced.graph.nodes:
        if node.op == "call_function" and op_name(node) == "add" and stack_paths(node)[-1:] == [block] and \
                all(op_name(a) == "linear" for a in node.all_input_nodes):
            return node
    raise AssertionError("no branch add")


def _double(value):
    return value * 2


def test_intercepted_add_is_found_by_its_line_and_order():
    """An elementwise value inside a forward: hook_value on it changes that value only, in that block only,
    whatever other adds the forward runs first; a traced shape that no longer holds is an error, not a
    silently wrong value."""
    from surgery.api import _analysis
    from surgery.rewrite.host import Gate, functional_anchor, hook_value, store_of

    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(2, 5, 16)
    analysis = _analysis(net, {"x": x}, stack_traces=True)   # source lines: what an intercept needs
    node = _branch_node(analysis, "blocks.1")
    anchor = functional_anchor(node)
    assert anchor is not None and anchor.module == "blocks.1" and anchor.op.endswith(".add") and anchor.index == 0
    store = store_of(net, create=True)
    undo = hook_value(net, anchor, _double, Gate(store.runtime, "default"))
    with torch.no_grad():
        b0, b1 = net.blocks
        y0 = b0.a(b0.norm(x)) + b0.b(b0.norm(x)) + x
        want = 2 * (b1.a(b1.norm(y0)) + b1.b(b1.norm(y0))) + y0
        torch.testing.assert_close(net(x), want)
        torch.testing.assert_close(net(x, extra=True), want)   # an extra add earlier in the call: same value
        undo()
        torch.testing.assert_close(net(x), b1.a(b1.norm(y0)) + b1.b(b1.norm(y0)) + y0)


def test_intercepted_call_with_another_shape_is_refused_at_run_time():
    from surgery.api import _analysis
    from surgery.rewrite.host import FunctionalAnchor, Gate, functional_anchor, hook_value, store_of

    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(2, 5, 16)
    anchor = functional_anchor(_branch_node(_analysis(net, {"x": x}, stack_traces=True), "blocks.0"))
    wrong = FunctionalAnchor(**{**anchor.__dict__, "shape": (3, 99)})
    store = store_of(net, create=True)
    hook_value(net, wrong, _double, Gate(store.runtime, "default"))
    with pytest.raises(RewriteError, match="traced"):
        net(x)


@pytest.mark.slow
def test_torch_compile_runs_intercepted_blocks_eagerly():
    """Dynamo cannot trace the source-line check: without fullgraph it runs those forwards eagerly (same logits);
    with fullgraph it fails rather than compiling the blocks without their adapters."""
    model, inputs, facts = ARCHITECTURES["gptj"]()
    surgery.apply(model, "pfeiffer")
    perturb(model)
    with torch.no_grad():
        eager = model(**inputs, use_cache=False).logits
        compiled = torch.compile(model, backend="eager")(**inputs, use_cache=False).logits
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
        torch._dynamo.reset()
        with pytest.raises(Exception):
            torch.compile(model, backend="eager", fullgraph=True)(**inputs, use_cache=False)
    torch._dynamo.reset()
