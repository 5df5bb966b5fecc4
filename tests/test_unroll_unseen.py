"""Truncate and unroll (surgery/trace/unroll.py) on models the matrix of tests/test_unroll.py does not cover:
each case is a way a layer's graph can differ from its template's that the unroll must see (and then trace
that layer, or the whole model), never copy over."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from surgery.analyze import analyze
from surgery.trace import unroll
from test_unroll import _graph_rows, _site_rows, _traced_both

IDS = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))


class _Config:
    def __init__(self, layer_types):
        self.layer_types = list(layer_types)
        self.num_hidden_layers = len(layer_types)


class TypedLayer(nn.Module):
    """A layer that reads its kind from the config it holds at forward time (`config.layer_types[layer_idx]`),
    as some remote-code models do: nothing in its module tree or plain attributes tells a local layer from a
    global one."""

    def __init__(self, config, layer_idx, d=16):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        s = self.q(x) @ self.k(x).transpose(-1, -2)
        if self.config.layer_types[self.layer_idx] == "local":
            n = x.shape[1]
            s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril().triu(-1), float("-inf"))
        return x + self.o(s.softmax(-1) @ self.v(x))


class Typed(nn.Module):
    def __init__(self, layer_types, d=16):
        super().__init__()
        config = _Config(layer_types)
        self.embed = nn.Embedding(50, d)
        self.layers = nn.ModuleList(TypedLayer(config, i, d) for i in range(len(layer_types)))
        self.head = nn.Linear(d, 50)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


@pytest.mark.parametrize("types", [["local"] * 3 + ["global"] + ["local"] * 4,     # one global in the middle
                                   ["local"] * 5 + ["global"],                     # the last one differs
                                   ["local", "global"] * 4])                       # alternating
def test_layer_kind_read_from_config_at_forward_time(types):
    torch.manual_seed(0)
    model = Typed(types).eval()
    full, fast, _ = _traced_both(model, (IDS,))
    assert _graph_rows(fast) == _graph_rows(full)
    assert _site_rows(analyze(fast)) == _site_rows(analyze(full))


def test_per_layer_config_lists_set_the_kinds():
    torch.manual_seed(0)
    assert [(s.keep, s.start, s.period) for s in unroll.find_stacks(Typed(["local"] * 3 + ["global"] + ["local"] * 4))] \
        == [(6, 4, 1)]
    assert [(s.keep, s.period) for s in unroll.find_stacks(Typed(["local", "global"] * 4))] == [(4, 2)]
    assert unroll.find_stacks(Typed(["local"] * 5 + ["global"])) == []
    assert [(s.keep, s.period) for s in unroll.find_stacks(Typed(["local"] * 6))] == [(2, 1)]


@pytest.mark.slow
def test_config_runs_fewer_layers_than_the_container():
    """transformers runs `self.layers[: self.config.num_hidden_layers]`: with a config of fewer layers than the
    container (a user dropping the top layers by config), the truncated prefix runs whole but the model does not.
    The graph must hold the layers that run, and no plan may target the ones that do not."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = LlamaForCausalLM(config).eval()
    model.config.num_hidden_layers = 3
    full, fast, unrolled = _traced_both(model, {"input_ids": IDS})
    assert not unrolled
    assert _graph_rows(fast) == _graph_rows(full)
    assert len(analyze(fast).blocks) == 3



# ------------------------------------------------ what the truncated export cannot see (engine gaps, strict xfail)
# Layer j >= keep never runs in the truncated export: a difference only its own run would show is copied over.

class MaskedLayer(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.q, self.o = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x, mask):
        s = (self.q(x) @ x.transpose(-1, -2)).masked_fill(mask, -1e4)
        return x + self.o(s.softmax(-1) @ x)


class ParentChooses(nn.Module):
    """The parent picks each layer's mask from its own per-layer list (the loop of transformers' Jamba, LFM2,
    Kimi-Linear: `causal_mask_mapping[self.config.layer_types[i]]`), with layers that do not record their kind;
    or leaves the loop early."""

    def __init__(self, types, exit_at=None):
        super().__init__()
        self.types, self.exit_at = types, exit_at
        self.layers = nn.ModuleList(MaskedLayer() for _ in types)

    def forward(self, x):
        n = x.shape[1]
        causal = ~torch.ones(n, n, dtype=torch.bool).tril()
        masks = {"full": causal, "local": causal | ~torch.ones(n, n, dtype=torch.bool).triu(-1)}
        for i, layer in enumerate(self.layers):
            x = layer(x, masks[self.types[i]])
            if i == self.exit_at:
                break
        return x


class LastByIndex(nn.Module):
    def __init__(self, config, layer_idx, d=16):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.f = nn.Linear(d, d)

    def forward(self, x):
        x = x + self.f(x)
        return x * 2 if self.layer_idx == self.config.num_hidden_layers - 1 else x


class LastByIndexModel(nn.Module):
    def __init__(self, n=6):
        super().__init__()
        config = _Config(["full"] * (n + 1))     # no per-layer list of the stack's length
        config.num_hidden_layers = n
        self.layers = nn.ModuleList(LastByIndex(config, i) for i in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("model", [lambda: ParentChooses(["full"] * 3 + ["local"] * 3),
                                   lambda: ParentChooses(["full"] * 6, exit_at=3),
                                   lambda: LastByIndexModel()], ids=["parent_list", "early_exit", "index_branch"])
def test_unseen_layer_differences(model):
    torch.manual_seed(0)
    full, fast, _ = _traced_both(model().eval(), (torch.randn(2, 5, 16),))
    assert _graph_rows(fast) == _graph_rows(full)
