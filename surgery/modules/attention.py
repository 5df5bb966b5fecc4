"""Modules that change what attention sees: prefix tuning (Li & Liang 2021), LLaMA-Adapter's gated adaption
prompts (Zhang et al. 2023), and prompt tuning (Lester et al. 2021).

An attention module (action `attend`) is called as `module(query, key, value, attend)` with q/k/v laid out
[batch, heads, seq, head_dim] (keys/values may have fewer heads under GQA) and `attend(q, k, v, prefix=0)`
the model's own attention, which sees `prefix` extra key columns at the front as visible to every query.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import RewriteError
from surgery.modules.base import SiteContext
from surgery.modules.registry import Options, register
from surgery.modules.options import PrefixOptions, AdaptionPromptOptions, PromptOptions  # noqa: F401  (defined without torch: spec validation)


def _as_heads(flat: torch.Tensor, heads: int, head_dim: int, like: torch.Tensor) -> torch.Tensor:
    """[P, heads*head_dim] -> [batch, heads_of(like), P, head_dim], repeating heads for expanded GQA keys."""
    prefix = flat.view(flat.shape[0], heads, head_dim).transpose(0, 1).unsqueeze(0)
    if like.shape[1] != heads:
        prefix = prefix.repeat_interleave(like.shape[1] // heads, dim=1)
    return prefix.expand(like.shape[0], -1, -1, -1).to(like.dtype)


class PrefixMLP(nn.Module):
    """AdapterHub's reparameterization, shared by all layers: Embedding(P, d) -> Linear -> tanh -> Linear(2·L·Hkv·hd)."""

    def __init__(self, length, dim, bottleneck, out, act):
        super().__init__()
        self.wte = nn.Embedding(length, dim)
        self.control_trans = nn.Sequential(nn.Linear(dim, bottleneck), act, nn.Linear(bottleneck, out))
        self._frozen: tuple | None = None   # (parameter versions, output) for calls without gradients

    def forward(self, columns: tuple[int, int] | None = None) -> torch.Tensor:
        """All layers' prefixes, or only `columns` of them. With gradients, a layer computes its own slice of the
        last projection (L layers cost one pass of it per forward, not L). Without gradients (generation), the
        output is computed once and reused until a parameter changes (in place or replaced), so decoding a token
        costs no MLP at all."""
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            key = tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in self.parameters())
            if self._frozen is None or self._frozen[0] != key:
                self._frozen = (key, self.control_trans(self.wte.weight))
            out = self._frozen[1]
            return out if columns is None else out[:, columns[0]:columns[1]]
        if columns is None:
            return self.control_trans(self.wte.weight)
        hidden = self.control_trans[:-1](self.wte.weight)
        last, (a, b) = self.control_trans[-1], columns
        return F.linear(hidden, last.weight[a:b], last.bias[a:b])


@register
class PrefixTuning(nn.Module):
    """Trainable key/value prefixes for one layer, concatenated before that layer's keys and values."""

    Options = PrefixOptions

    def __init__(self, length, kv_heads, head_dim, layer, *, mlp: PrefixMLP | None = None, dropout=0.0, gate_dim=None,
                 offset: int | None = None):
        super().__init__()
        self.length, self.kv_heads, self.head_dim, self.layer = length, kv_heads, head_dim, layer
        # where this layer's columns start in the shared MLP's output (layers of one width: layer x 2·Hkv·hd)
        self.offset = layer * 2 * kv_heads * head_dim if offset is None else offset
        width = kv_heads * head_dim
        if mlp is None:
            self.prefix = nn.Parameter(torch.randn(length, 2 * width))
        self._mlp = [mlp]          # shared with the other layers; registered once under the rule
        self.dropout = nn.Dropout(dropout)
        self.gate = nn.Linear(gate_dim, 1) if gate_dim else None

    @classmethod
    def build(cls, options: PrefixOptions, site: SiteContext, action: str) -> "PrefixTuning":
        head_dim, kv_heads = site.extra["head_dim"], site.extra["kv_heads"]
        mlp = None
        # every layer's key width: layers of several widths (a UNet's resolutions) lie end to end in the MLP's output
        known = site.extra.get("kv_widths") or {}
        widths = [known.get(i, kv_heads * head_dim) for i in range(site.num_layers)]
        if not options.flat:
            act = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}[options.non_linearity]()
            if "prefix_mlp" not in site.shared:
                # the MLP's embedding is as wide as the model (PEFT: token_dim = hidden_size), else as what
                # enters the attention (a model with no attention output projection to read the width from)
                width = site.extra["hidden"] or site.extra.get("input_dim")
                if not width:
                    raise RewriteError(f"prefix tuning's MLP embeds the prefixes at the model's width, which "
                                       f"surgery cannot tell at {site.module}; use `flat: true`")
                site.shared["prefix_mlp"] = PrefixMLP(options.prefix_length, width, options.bottleneck_size,
                                                      2 * sum(widths), act)
            mlp = site.shared["prefix_mlp"]
        layer = site.layer or 0
        return cls(options.prefix_length, kv_heads, head_dim, site.layer, mlp=mlp, dropout=options.dropout,
                   gate_dim=(site.extra.get("input_dim") or site.extra["hidden"]) if options.use_gating else None,
                   offset=2 * sum(widths[:layer]) if layer < len(widths) else None)

    def prefixes(self) -> torch.Tensor:
        """[P, 2·Hkv·hd] for this layer, from the flat parameter or the shared MLP."""
        if self._mlp[0] is None:
            return self.prefix
        width = 2 * self.kv_heads * self.head_dim
        return self._mlp[0]((self.offset, self.offset + width))

    @property
    def needs_attention_input(self) -> bool:
        return self.gate is not None

    def forward(self, query, key, value, attend, attention_input=None):
        flat = self.dropout(self.prefixes())
        width = self.kv_heads * self.head_dim
        pk = _as_heads(flat[:, :width], self.kv_heads, self.head_dim, key)
        pv = _as_heads(flat[:, width:], self.kv_heads, self.head_dim, value)
        if self.gate is not None:   # UniPELT: sigmoid(Linear(h)) averaged over the sequence scales K and V
            g = torch.sigmoid(self.gate(attention_input)).mean(dim=1).to(pk.dtype)[:, :, None, None]
            pk, pv = pk * g, pv * g
        return attend(query, torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2), prefix=self.length)

    @torch.no_grad()
    def eject(self) -> None:
        """Replace the shared MLP by the flat prefixes it produces (same outputs, fewer parameters)."""
        if self._mlp[0] is not None:
            self.prefix = nn.Parameter(self.prefixes().detach().clone())
            self._mlp = [None]


@register
class AdaptionPrompt(nn.Module):
    """LLaMA-Adapter: learned prompts projected by the layer's own (frozen) k/v projections, attended through
    their own softmax and added with a zero-initialized gate, so the model equals the base at init."""

    Options = AdaptionPromptOptions

    def __init__(self, length, dim, kv_heads, head_dim, k_proj, v_proj):
        super().__init__()
        self.adaption_prompt = nn.Parameter(torch.empty(length, dim).normal_())
        self.adaption_gate = nn.Parameter(torch.zeros(1))
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self._proj = [k_proj, v_proj]   # the host's projections: used, not owned

    @classmethod
    def build(cls, options: AdaptionPromptOptions, site: SiteContext, action: str) -> "AdaptionPrompt":
        if site.extra.get("k_proj") is None or site.extra.get("v_proj") is None:
            raise RewriteError(f"LLaMA-Adapter projects its adaption prompts with the layer's own key and value "
                               f"projections, but the attention op at {site.module} has no separate k and v "
                               f"projections surgery can call (none found, or their columns reordered on the way to the attention)")
        # the prompts are read by the layer's key projection: its input width (a hierarchical model's stages,
        # Swin's 16 then 32, differ from the first attention's)
        dim = site.extra.get("k_in") or site.extra["hidden"]
        return cls(options.adapter_len, dim, site.extra["kv_heads"], site.extra["head_dim"],
                   site.extra["k_proj"], site.extra["v_proj"])

    def forward(self, query, key, value, attend):
        out = attend(query, key, value)
        k_proj, v_proj = self._proj
        prompt = self.adaption_prompt.to(query.dtype)
        pk = _as_heads(k_proj(prompt), self.kv_heads, self.head_dim, key)
        pv = _as_heads(v_proj(prompt), self.kv_heads, self.head_dim, value)
        extra = attend(query, pk, pv, prefix=pk.shape[2])
        return out + self.adaption_gate.to(out.dtype) * extra


@register
class PromptTuning(nn.Module):
    """Soft prompts prepended to the embedding output (action `prepend`)."""

    Options = PromptOptions

    def __init__(self, length: int, dim: int):
        super().__init__()
        self.length = length
        self.prompt_embedding = nn.Parameter(torch.zeros(length, dim))

    @classmethod
    def build(cls, options: PromptOptions, site: SiteContext, action: str) -> "PromptTuning":
        module = cls(options.prompt_length, site.dim)
        with torch.no_grad():
            if isinstance(options.init, dict):
                embed = site.extra.get("embed_text")
                if not (options.init.get("text") or options.init.get("ids")) or embed is None:
                    raise ValueError("init from the embedding table takes {text: '...'} (tokenized with the model's "
                                     "tokenizer, or `tokenizer: <dir>`) or {ids: [token ids]}")
                module.prompt_embedding.copy_(embed(options.init, options.prompt_length))
            elif options.init == "normal":
                module.prompt_embedding.normal_()
            else:
                module.prompt_embedding.uniform_(-options.random_uniform_scale, options.random_uniform_scale)
        return module

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        prompt = self.prompt_embedding.to(hidden.dtype).unsqueeze(0).expand(hidden.shape[0], -1, -1)
        return torch.cat([prompt, hidden], dim=1)
