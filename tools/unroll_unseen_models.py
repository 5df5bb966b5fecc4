import torch
from torch import nn
import architectures as A
import probe_archs as P

def N(): return A.LAYERS

def swin():
    from transformers import SwinConfig, SwinModel
    cfg = SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[6, 2], num_heads=[2, 4], window_size=4)
    i = P._px()
    return A._hf(SwinModel, cfg, [], "vision", inputs=i, apply_inputs=i, hidden=None)

def convnext():
    from transformers import ConvNextConfig, ConvNextModel
    cfg = ConvNextConfig(hidden_sizes=[16, 32], depths=[6, 5], num_stages=2)
    i = P._px()
    return A._hf(ConvNextModel, cfg, [], "vision", inputs=i, apply_inputs=i, hidden=None, attention=None)

def segformer():
    from transformers import SegformerConfig, SegformerModel
    cfg = SegformerConfig(num_encoder_blocks=2, depths=[5, 6], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                          patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2])
    i = P._px()
    return A._hf(SegformerModel, cfg, [], "vision", inputs=i, apply_inputs=i, hidden=None)

def gemma3_8():
    return A._decoder("Gemma3TextConfig", "Gemma3ForCausalLM", num_key_value_heads=2, head_dim=16, sliding_window=4,
                      num_hidden_layers=14)

def gemma3_7():
    return A._decoder("Gemma3TextConfig", "Gemma3ForCausalLM", num_key_value_heads=2, head_dim=16, sliding_window=4,
                      num_hidden_layers=7)

def qwen3_moe():
    return A._decoder("Qwen3MoeConfig", "Qwen3MoeForCausalLM", num_key_value_heads=2, head_dim=16, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=2, mlp_only_layers=[0],
                      num_hidden_layers=8)

def qwen2_moe_mixed():
    return A._decoder("Qwen2MoeConfig", "Qwen2MoeForCausalLM", num_key_value_heads=2, num_experts=4,
                    num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=128,
                    decoder_sparse_step=1, mlp_only_layers=[0, 1], num_hidden_layers=7)

def deepseek_v3():
    return A._decoder("DeepseekV3Config", "DeepseekV3ForCausalLM", num_key_value_heads=4, n_routed_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=2, n_shared_experts=1,
                      kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                      n_group=2, topk_group=1, num_hidden_layers=6)

def phi3(): return A._decoder("Phi3Config", "Phi3ForCausalLM", num_key_value_heads=2)
def stablelm(): return A._decoder("StableLmConfig", "StableLmForCausalLM", num_key_value_heads=2)
def olmo2(): return A._decoder("Olmo2Config", "Olmo2ForCausalLM", num_key_value_heads=2)
def granite(): return A._decoder("GraniteConfig", "GraniteForCausalLM", num_key_value_heads=2, embedding_multiplier=12.0,
                                 residual_multiplier=0.22, attention_multiplier=0.0078125, logits_scaling=8.0)
def gpt_bigcode(): return A._decoder("GPTBigCodeConfig", "GPTBigCodeForCausalLM", "transformer.h", n_embd=A.HIDDEN,
                                     n_layer=N(), n_head=A.HEADS, n_positions=64, multi_query=True)
def vit(): return A.vit()
def deit():
    from transformers import DeiTConfig, DeiTModel
    cfg = DeiTConfig(image_size=16, patch_size=4, hidden_size=A.HIDDEN, num_hidden_layers=N(), num_attention_heads=A.HEADS,
                     intermediate_size=128)
    i = P._px(16)
    return A._hf(DeiTModel, cfg, [], "vision", inputs=i, apply_inputs=i)
def whisper(): return A.whisper()
def bart(): return A.bart()
def t5(): return A.t5()
def llama(): return A.llama()
def mistral(): return A.mistral()
def gpt2(): return A.gpt2()
def bert(): return A.bert()
def gemma2_8(): return A._decoder("Gemma2Config", "Gemma2ForCausalLM", num_key_value_heads=2, head_dim=16, sliding_window=4, num_hidden_layers=8)
def gpt_neo8():
    return A._decoder("GPTNeoConfig", "GPTNeoForCausalLM", "transformer.h", num_layers=8,
                      attention_types=[[["global", "local"], 4]], window_size=4)
def modernbert8():
    from transformers import ModernBertConfig, ModernBertModel
    cfg = ModernBertConfig(vocab_size=A.VOCAB, hidden_size=A.HIDDEN, num_hidden_layers=9, num_attention_heads=A.HEADS,
                           intermediate_size=128, max_position_embeddings=64, global_attn_every_n_layers=3,
                           local_attention=4, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    return A._hf(ModernBertModel, cfg, [], "encoder")

def minigpt():
    import models
    torch.manual_seed(0)
    m = models.make_minigpt(layers=N()).eval()
    ids = models.token_ids()
    return m, (ids,), {"apply_inputs": (ids,), "run": lambda mm: mm(ids)}

class SeqLayer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln = nn.LayerNorm(d); self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
    def forward(self, x):
        h = self.ln(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.ff(x)

class SeqModel(nn.Module):
    def __init__(self, n=6, d=32):
        super().__init__()
        self.embed = nn.Embedding(50, d)
        self.layers = nn.Sequential(*[SeqLayer(d) for _ in range(n)])
        self.head = nn.Linear(d, 50)
    def forward(self, ids):
        return self.head(self.layers(self.embed(ids)))

IDS = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))
def seq_model():
    torch.manual_seed(0); m = SeqModel(N()).eval()
    return m, (IDS,), {"apply_inputs": (IDS,), "run": lambda mm: mm(IDS)}

class Cfg:
    def __init__(self, types): self.layer_types = types

class TypedLayer(nn.Module):
    def __init__(self, cfg, idx, d=32):
        super().__init__()
        self.config, self.layer_idx = cfg, idx
        self.q = nn.Linear(d, d); self.k = nn.Linear(d, d); self.v = nn.Linear(d, d); self.o = nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        s = q @ k.transpose(-1, -2) / 5.0
        if self.config.layer_types[self.layer_idx] == "local":
            n = x.shape[1]
            mask = torch.ones(n, n, dtype=torch.bool).tril().triu(-1)
            s = s.masked_fill(~mask, float("-inf"))
        x = x + self.o(s.softmax(-1) @ v)
        return x + self.ff(x)

class TypedModel(nn.Module):
    def __init__(self, types, d=32):
        super().__init__()
        cfg = Cfg(types)
        self.embed = nn.Embedding(50, d)
        self.layers = nn.ModuleList(TypedLayer(cfg, i, d) for i in range(len(types)))
        self.head = nn.Linear(d, 50)
    def forward(self, ids):
        x = self.embed(ids)
        for l in self.layers: x = l(x)
        return self.head(x)

def typed_last_global():
    torch.manual_seed(0); m = TypedModel(["local"] * 5 + ["global"]).eval()
    return m, (IDS,), {"apply_inputs": (IDS,), "run": lambda mm: mm(IDS)}
def typed_alt():
    torch.manual_seed(0); m = TypedModel(["local", "global"] * 4).eval()
    return m, (IDS,), {"apply_inputs": (IDS,), "run": lambda mm: mm(IDS)}
def typed_mid():
    torch.manual_seed(0); m = TypedModel(["local"] * 3 + ["global"] + ["local"] * 4).eval()
    return m, (IDS,), {"apply_inputs": (IDS,), "run": lambda mm: mm(IDS)}

BUILDERS = {k: v for k, v in dict(globals()).items() if callable(v) and not k.startswith("_") and getattr(v, "__module__", "") == __name__ and not isinstance(v, type) and k not in ("N",)}

def gemma3_20():
    return A._decoder("Gemma3TextConfig", "Gemma3ForCausalLM", num_key_value_heads=2, head_dim=16, sliding_window=4,
                      num_hidden_layers=20, hidden_size=32, intermediate_size=64)
def qwen2_swa():
    return A._decoder("Qwen2Config", "Qwen2ForCausalLM", num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                      max_window_layers=3, num_hidden_layers=8)
def llama4_text():
    return A._decoder("Llama4TextConfig", "Llama4ForCausalLM", num_key_value_heads=2, head_dim=16, num_local_experts=4,
                      num_experts_per_tok=1, intermediate_size_mlp=128, interleave_moe_layer_step=2, num_hidden_layers=8,
                      attention_chunk_size=4)
def cohere2_12():
    return A._decoder("Cohere2Config", "Cohere2ForCausalLM", num_key_value_heads=2, sliding_window=4, num_hidden_layers=12)
def llama_hidden_states():
    m, i, f = A.llama()
    ii = dict(f["apply_inputs"] or i); ii["output_hidden_states"] = True
    f["apply_inputs"] = ii
    return m, i, f
def llama_train():
    m, i, f = A.llama(); m.train(); return m, i, f
BUILDERS.update({k: v for k, v in dict(globals()).items() if k in ("gemma3_20", "qwen2_swa", "llama4_text", "cohere2_12", "llama_hidden_states", "llama_train")})

def sd3_6():
    return P.sd3(layers=6)


def flux_5():
    return P.flux(layers=5)


BUILDERS.update(sd3_6=sd3_6, flux_5=flux_5)
