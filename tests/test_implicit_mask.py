"""The mask surgery builds for prefix tuning when the host passed none (surgery/rewrite/attention.py
`implicit_mask`, `registry_causality`) means what the host's own attention function computes without a mask,
for q_len != kv_len too (a static cache's prefill: SDPA's is_causal is top-left aligned), checked against the
functions themselves."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from surgery.rewrite.attention import implicit_mask, registry_causality


def qkv(q_len, k_len, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, q_len, 8, generator=g), torch.randn(2, 4, k_len, 8, generator=g),
            torch.randn(2, 4, k_len, 8, generator=g))


@pytest.mark.parametrize("q_len,k_len", [(5, 5), (5, 9), (1, 9)])
def test_torch_sdpa_is_causal_is_the_top_left_mask(q_len, k_len):
    q, k, v = qkv(q_len, k_len)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    got = F.scaled_dot_product_attention(q, k, v, attn_mask=implicit_mask(q_len, k_len, True, "top_left", q.device))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("q_len,k_len", [(5, 5), (5, 9), (1, 9)])
def test_transformers_functions_without_a_mask(implementation, q_len, k_len):
    """transformers' sdpa and eager attention with attention_mask=None on a causal module."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import eager_attention_forward
    module = nn.Module()
    module.is_causal, module.num_key_value_groups, module.training = True, 1, False
    q, k, v = qkv(q_len, k_len, seed=1)
    function = sdpa_attention_forward if implementation == "sdpa" else eager_attention_forward
    extra = {"is_causal": True} if implementation == "sdpa" else {"scaling": 8 ** -0.5, "dropout": 0.0}
    want, _ = function(module, q, k, v, None, **extra)
    causal, align = registry_causality(implementation, q_len, True)
    mask = implicit_mask(q_len, k_len, causal, align, q.device)
    got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    torch.testing.assert_close(got, want)
