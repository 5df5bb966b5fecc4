"""Tiny random-weight models of every architecture the architecture matrix covers (tests/test_architectures.py).

Each factory builds one model from a small config (hidden 32-64, 2 layers per stack, vocab 96), seeded, in eval
mode, and returns `(model, example_inputs, facts)`:

- `example_inputs`: a dict of forward kwargs (batch 2, sequence 8; images 16x16 or 32x32; audio 400 samples).
- `facts`: what the test oracle knows about the model, independent of surgery's analysis (test-side knowledge,
  never used by the engine): `kind` (decoder / encoder / seq2seq / vision / audio / diffusion / ssm),
  `hidden` (the residual stream's width), `layers` (blocks per stack, e.g. {"encoder": 2, "decoder": 2}),
  `blocks` (the block module paths, one per layer; a shared block appears once per call), `biases` (whether any
  linear has a bias), `experts` (MoE: number of routed experts, else 0), `generate` (whether generate() with the
  KV cache is checked), `apply_inputs` (the example_inputs surgery.apply needs: None where it builds them from
  the config), `attention` (a regex every attention module path matches, and no FFN module path does).
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

VOCAB = 96
HIDDEN = 64
LAYERS = 2
HEADS = 4
BATCH, SEQ = 2, 8
ATTENTION = r"(?i)(attn|attention)"


def _ids(seed=1, batch=BATCH, seq=SEQ, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=g)


def _facts(kind, layers, blocks, *, hidden=HIDDEN, biases=None, experts=0, generate=None, apply_inputs=None,
           attention=ATTENTION, **extra):
    if isinstance(layers, int):
        layers = {"layers": layers}
    return {"kind": kind, "hidden": hidden, "layers": layers, "num_layers": sum(layers.values()),
            "blocks": list(blocks), "biases": biases, "experts": experts,
            "generate": kind in ("decoder", "seq2seq") if generate is None else generate,
            "apply_inputs": apply_inputs, "attention": attention, **extra}


def _blocks(prefix, n=LAYERS):
    return [f"{prefix}.{i}" for i in range(n)]


def _hf(model_cls, config, blocks, kind, inputs=None, **facts):
    """Build a transformers model seeded, in eval mode, with sdpa where offered (else eager)."""
    torch.manual_seed(0)
    try:
        config._attn_implementation = "sdpa"
        model = model_cls(config)
    except (ValueError, ImportError):
        config._attn_implementation = "eager"
        torch.manual_seed(0)
        model = model_cls(config)
    model.eval()
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
    inputs = inputs if inputs is not None else {"input_ids": _ids()}
    facts.setdefault("biases", any(n.endswith("bias") for n, _ in model.named_parameters()))
    return model, inputs, _facts(kind, facts.pop("layers", LAYERS), blocks, **facts)


# ---------------------------------------------------------------- encoders

def bert():
    from transformers import BertConfig, BertModel
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                     intermediate_size=128, max_position_embeddings=64)
    return _hf(BertModel, cfg, _blocks("encoder.layer"), "encoder")


def bert_cls():
    from transformers import BertConfig, BertForSequenceClassification
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                     intermediate_size=128, max_position_embeddings=64, num_labels=3)
    return _hf(BertForSequenceClassification, cfg, _blocks("bert.encoder.layer"), "encoder", head="pooled")


def roberta():
    from transformers import RobertaConfig, RobertaModel
    cfg = RobertaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                        intermediate_size=128, max_position_embeddings=64, pad_token_id=1)
    return _hf(RobertaModel, cfg, _blocks("encoder.layer"), "encoder")


def distilbert():
    from transformers import DistilBertConfig, DistilBertModel
    cfg = DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=128,
                           max_position_embeddings=64)
    return _hf(DistilBertModel, cfg, _blocks("transformer.layer"), "encoder")


def albert():
    from transformers import AlbertConfig, AlbertModel
    cfg = AlbertConfig(vocab_size=VOCAB, embedding_size=32, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                       num_attention_heads=HEADS, intermediate_size=128, max_position_embeddings=64)
    # one shared layer group called num_hidden_layers times
    return _hf(AlbertModel, cfg, ["encoder.albert_layer_groups.0.albert_layers.0"] * LAYERS, "encoder",
               shared_layers=True, embedding_width=32)


def deberta_v2():
    from transformers import DebertaV2Config, DebertaV2Model
    cfg = DebertaV2Config(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                          intermediate_size=128, max_position_embeddings=64, relative_attention=True,
                          position_buckets=16, max_relative_positions=32, pos_att_type=["p2c", "c2p"])
    return _hf(DebertaV2Model, cfg, _blocks("encoder.layer"), "encoder")


def electra():
    from transformers import ElectraConfig, ElectraModel
    cfg = ElectraConfig(vocab_size=VOCAB, embedding_size=HIDDEN, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                        num_attention_heads=HEADS, intermediate_size=128, max_position_embeddings=64)
    return _hf(ElectraModel, cfg, _blocks("encoder.layer"), "encoder")


def xlm_roberta():
    from transformers import XLMRobertaConfig, XLMRobertaModel
    cfg = XLMRobertaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                           intermediate_size=128, max_position_embeddings=64, pad_token_id=1)
    return _hf(XLMRobertaModel, cfg, _blocks("encoder.layer"), "encoder")


def clip_text():
    from transformers import CLIPTextConfig, CLIPTextModel
    cfg = CLIPTextConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         intermediate_size=128, max_position_embeddings=64, projection_dim=32)
    return _hf(CLIPTextModel, cfg, _blocks("encoder.layers"), "encoder")


def wav2vec2():
    from transformers import Wav2Vec2Config, Wav2Vec2Model
    cfg = Wav2Vec2Config(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         intermediate_size=128, conv_dim=(32, 32), conv_stride=(5, 4), conv_kernel=(10, 4),
                         num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, do_stable_layer_norm=True,
                         mask_time_prob=0.0)
    g = torch.Generator().manual_seed(1)
    inputs = {"input_values": torch.randn(BATCH, 400, generator=g)}
    return _hf(Wav2Vec2Model, cfg, _blocks("encoder.layers"), "audio", inputs=inputs, apply_inputs=inputs)


class TorchEncoder(nn.Module):
    """A plain PyTorch model: embedding, two nn.TransformerEncoderLayer (batch_first), a linear head."""

    def __init__(self, vocab=VOCAB, d=HIDDEN, layers=LAYERS):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, HEADS, dim_feedforward=128, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids):
        return self.head(self.encoder(self.embed(input_ids)))


def torch_encoder():
    torch.manual_seed(0)
    model = TorchEncoder().eval()
    inputs = {"input_ids": _ids()}
    return model, inputs, _facts("encoder", LAYERS, _blocks("encoder.layers"), apply_inputs=inputs, generate=False,
                                 biases=True)


def funnel():
    # pooling between blocks: the second block's first layer reads queries from the pooled hidden state and keys
    # from the unpooled one (self-attention, not cross-attention), and has half the positions of the input
    from transformers import FunnelBaseModel, FunnelConfig
    per = max(LAYERS // 2, 1)
    cfg = FunnelConfig(vocab_size=VOCAB, d_model=HIDDEN, n_head=HEADS, d_head=16, d_inner=128, block_sizes=[per, per])
    return _hf(FunnelBaseModel, cfg, [f"encoder.blocks.{b}.{i}" for b in range(2) for i in range(per)], "encoder")


# ---------------------------------------------------------------- decoders

def _decoder(cfg_name, model_name, blocks="model.layers", **cfg):
    import transformers
    base = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    facts = cfg.pop("facts", {})
    base.update(cfg)
    config = getattr(transformers, cfg_name)(**base)
    return _hf(getattr(transformers, model_name), config, _blocks(blocks), "decoder", **facts)


def gpt2():
    return _decoder("GPT2Config", "GPT2LMHeadModel", "transformer.h", n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                    n_positions=64)


def gpt2_cls():
    return _decoder("GPT2Config", "GPT2ForSequenceClassification", "transformer.h", n_embd=HIDDEN, n_layer=LAYERS,
                    n_head=HEADS, n_positions=64, num_labels=3, facts={"generate": False, "head": "pooled"})


def gpt_neo():
    return _decoder("GPTNeoConfig", "GPTNeoForCausalLM", "transformer.h", num_layers=LAYERS,
                    attention_types=[[["global", "local"], 1]], window_size=4)


def gptj():
    return _decoder("GPTJConfig", "GPTJForCausalLM", "transformer.h", n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                    n_positions=64, rotary_dim=8)


def gpt_neox():
    return _decoder("GPTNeoXConfig", "GPTNeoXForCausalLM", "gpt_neox.layers")


def opt():
    return _decoder("OPTConfig", "OPTForCausalLM", "model.decoder.layers", ffn_dim=128, word_embed_proj_dim=HIDDEN,
                    dropout=0.0)


def bloom():
    return _decoder("BloomConfig", "BloomForCausalLM", "transformer.h", n_layer=LAYERS, n_head=HEADS)


def falcon():
    return _decoder("FalconConfig", "FalconForCausalLM", "transformer.h", new_decoder_architecture=True,
                    num_kv_heads=2, multi_query=True, bias=False)


def llama():
    return _decoder("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2)


def mistral():
    return _decoder("MistralConfig", "MistralForCausalLM", num_key_value_heads=2, sliding_window=4)


def mixtral():
    return _decoder("MixtralConfig", "MixtralForCausalLM", num_key_value_heads=2, num_local_experts=4,
                    num_experts_per_tok=2, facts={"experts": 4})


def gpt_oss():
    # attention sinks: a learned per-head logit concatenated to the scores before the softmax, sliced off after;
    # experts stored (experts, in, out) with biases
    return _decoder("GptOssConfig", "GptOssForCausalLM", num_key_value_heads=2, head_dim=16, intermediate_size=64,
                    num_local_experts=4, num_experts_per_tok=2, facts={"experts": 4})


def qwen2():
    return _decoder("Qwen2Config", "Qwen2ForCausalLM", num_key_value_heads=2)


def qwen2_moe():
    return _decoder("Qwen2MoeConfig", "Qwen2MoeForCausalLM", num_key_value_heads=2, num_experts=4,
                    num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=128,
                    decoder_sparse_step=1, mlp_only_layers=[], facts={"experts": 4})


def qwen3():
    return _decoder("Qwen3Config", "Qwen3ForCausalLM", num_key_value_heads=2, head_dim=16)


def phi():
    return _decoder("PhiConfig", "PhiForCausalLM", partial_rotary_factor=0.5, resid_pdrop=0.0, embd_pdrop=0.0)


def phi3():
    return _decoder("Phi3Config", "Phi3ForCausalLM", num_key_value_heads=2)


def gemma():
    return _decoder("GemmaConfig", "GemmaForCausalLM", num_key_value_heads=2, head_dim=16)


def gemma2():
    return _decoder("Gemma2Config", "Gemma2ForCausalLM", num_key_value_heads=2, head_dim=16, sliding_window=4)


def gemma3_text():
    return _decoder("Gemma3TextConfig", "Gemma3ForCausalLM", num_key_value_heads=2, head_dim=16, sliding_window=4)


def olmo():
    return _decoder("OlmoConfig", "OlmoForCausalLM", num_key_value_heads=2)


def stablelm():
    return _decoder("StableLmConfig", "StableLmForCausalLM", num_key_value_heads=2)


def starcoder2():
    return _decoder("Starcoder2Config", "Starcoder2ForCausalLM", num_key_value_heads=2, sliding_window=4)


def cohere():
    # a parallel block adding its branches one by one: residual + attention(norm(x)) + mlp(norm(x)); logit scale
    return _decoder("CohereConfig", "CohereForCausalLM", num_key_value_heads=2, logit_scale=0.0625)


def granitemoe():
    # the head's forward takes use_cache only through **kwargs; embedding/residual/attention/logit multipliers
    return _decoder("GraniteMoeConfig", "GraniteMoeForCausalLM", num_key_value_heads=2, num_local_experts=4,
                    num_experts_per_tok=2, embedding_multiplier=12.0, residual_multiplier=0.22,
                    attention_multiplier=0.0078125, logits_scaling=8.0, facts={"experts": 4})


def minimax():
    # hybrid: layer 0 linear (lightning) attention, no softmax; layer 1 softmax attention; MoE FFNs; residuals
    # scaled (residual * alpha + branch * beta); its cache's get_seq_length() (layer 0's) is 0 while decoding
    return _decoder("MiniMaxConfig", "MiniMaxForCausalLM", num_key_value_heads=2, head_dim=16, num_local_experts=4,
                    num_experts_per_tok=2, layer_types=["linear_attention", "full_attention"] * (LAYERS // 2),
                    facts={"experts": 4})


def mamba():
    from transformers import MambaConfig, MambaForCausalLM
    cfg = MambaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, state_size=8, expand=2,
                      conv_kernel=4, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _hf(MambaForCausalLM, cfg, _blocks("backbone.layers"), "ssm", generate=True, attention=None)


# ---------------------------------------------------------------- encoder-decoders

def _seq2seq_inputs():
    return {"input_ids": _ids(seed=1), "decoder_input_ids": _ids(seed=2, seq=6)}


def _no_cache(inputs):
    """Trace inputs: without use_cache=False an encoder-decoder returns an EncoderDecoderCache, which torch.export
    cannot flatten (test_seq2seq_example_inputs_with_a_cache_trace covers the engine doing this itself)."""
    return {**inputs, "use_cache": False}


def t5():
    from transformers import T5Config, T5ForConditionalGeneration
    cfg = T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=16, d_ff=128, num_layers=LAYERS, num_decoder_layers=LAYERS,
                   num_heads=HEADS, relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0,
                   eos_token_id=1, dropout_rate=0.0)
    inputs = _seq2seq_inputs()
    return _hf(T5ForConditionalGeneration, cfg, _blocks("encoder.block") + _blocks("decoder.block"), "seq2seq",
               inputs=inputs, apply_inputs=_no_cache(inputs), layers={"encoder": LAYERS, "decoder": LAYERS})


def _bart_like(cfg_cls, model_cls):
    import transformers
    cfg = getattr(transformers, cfg_cls)(
        vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
        dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2)
    inputs = _seq2seq_inputs()
    return _hf(getattr(transformers, model_cls), cfg, _blocks("model.encoder.layers") + _blocks("model.decoder.layers"),
               "seq2seq", inputs=inputs, apply_inputs=_no_cache(inputs), layers={"encoder": LAYERS, "decoder": LAYERS})


def bart():
    return _bart_like("BartConfig", "BartForConditionalGeneration")


def mbart():
    return _bart_like("MBartConfig", "MBartForConditionalGeneration")


def m2m_100():
    # a sinusoidal position embedding reading the scaled token embedding (its input mark once broke the trace)
    return _bart_like("M2M100Config", "M2M100ForConditionalGeneration")


def whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration
    cfg = WhisperConfig(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
                        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=128,
                        decoder_ffn_dim=128, num_mel_bins=16, max_source_positions=16, max_target_positions=32,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                        begin_suppress_tokens=None, suppress_tokens=None)
    g = torch.Generator().manual_seed(1)
    inputs = {"input_features": torch.randn(BATCH, 16, 32, generator=g), "decoder_input_ids": _ids(seed=2, seq=6)}
    return _hf(WhisperForConditionalGeneration, cfg, _blocks("model.encoder.layers") + _blocks("model.decoder.layers"),
               "seq2seq", inputs=inputs, apply_inputs=_no_cache(inputs), layers={"encoder": LAYERS, "decoder": LAYERS},
               encoder_input="input_features")


# ---------------------------------------------------------------- vision

def vit():
    from transformers import ViTConfig, ViTForImageClassification
    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                    num_attention_heads=HEADS, intermediate_size=128, num_labels=5)
    g = torch.Generator().manual_seed(1)
    inputs = {"pixel_values": torch.randn(BATCH, 3, 16, 16, generator=g)}
    return _hf(ViTForImageClassification, cfg, _blocks("vit.layers"), "vision", inputs=inputs,
               apply_inputs=inputs, head="pooled")


def clip_vision():
    from transformers import CLIPVisionConfig, CLIPVisionModel
    cfg = CLIPVisionConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                           num_attention_heads=HEADS, intermediate_size=128, projection_dim=32)
    g = torch.Generator().manual_seed(1)
    inputs = {"pixel_values": torch.randn(BATCH, 3, 16, 16, generator=g)}
    return _hf(CLIPVisionModel, cfg, _blocks("encoder.layers"), "vision", inputs=inputs,
               apply_inputs=inputs)


# ---------------------------------------------------------------- diffusion

def unet():
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8).eval()
    g = torch.Generator().manual_seed(1)
    inputs = {"sample": torch.randn(BATCH, 4, 16, 16, generator=g), "timestep": torch.tensor(10),
              "encoder_hidden_states": torch.randn(BATCH, 6, 32, generator=g)}
    blocks = ["down_blocks.0.attentions.0.transformer_blocks.0", "mid_block.attentions.0.transformer_blocks.0",
              "up_blocks.1.attentions.0.transformer_blocks.0", "up_blocks.1.attentions.1.transformer_blocks.0"]
    return model, inputs, _facts("diffusion", len(blocks), blocks, hidden=None, apply_inputs=inputs,
                                 generate=False, widths=(32, 64), biases=True)


def dit():
    from diffusers import PixArtTransformer2DModel
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=LAYERS,
        cross_attention_dim=32, sample_size=8, patch_size=2, norm_num_groups=8, caption_channels=24,
        use_additional_conditions=False).eval()
    g = torch.Generator().manual_seed(1)
    inputs = {"hidden_states": torch.randn(BATCH, 4, 8, 8, generator=g),
              "encoder_hidden_states": torch.randn(BATCH, 6, 24, generator=g),
              "timestep": torch.tensor([10, 20])}
    return model, inputs, _facts("diffusion", LAYERS, _blocks("transformer_blocks"), hidden=32, apply_inputs=inputs,
                                 generate=False, biases=True)


def flux():
    from diffusers import FluxTransformer2DModel
    # joint attention over image and text tokens laid end to end, one output projection per stream; single-stream
    # blocks whose one proj_out reads the attention and the MLP concatenated (no attention output projection)
    torch.manual_seed(0)
    per = max(LAYERS // 2, 1)
    model = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=per, num_single_layers=per,
                                   attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                                   pooled_projection_dim=16, axes_dims_rope=(2, 2, 4)).eval()
    g = torch.Generator().manual_seed(1)
    inputs = {"hidden_states": torch.randn(BATCH, 16, 8, generator=g),
              "encoder_hidden_states": torch.randn(BATCH, 6, 32, generator=g),
              "pooled_projections": torch.randn(BATCH, 16, generator=g), "timestep": torch.tensor([0.5, 0.5]),
              "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(6, 3)}
    blocks = [f"transformer_blocks.{i}" for i in range(per)] + [f"single_transformer_blocks.{i}" for i in range(per)]
    return model, inputs, _facts("diffusion", 2 * per, blocks, hidden=32,
                                 apply_inputs=inputs, generate=False, biases=True)


ARCHITECTURES = {
    "bert": bert, "roberta": roberta, "distilbert": distilbert, "albert": albert, "deberta-v2": deberta_v2,
    "electra": electra, "xlm-roberta": xlm_roberta, "clip-text": clip_text, "wav2vec2": wav2vec2,
    "torch-encoder": torch_encoder, "bert-cls": bert_cls, "funnel": funnel,
    "gpt2": gpt2, "gpt2-cls": gpt2_cls, "gpt_neo": gpt_neo, "gptj": gptj, "gpt_neox": gpt_neox, "opt": opt,
    "bloom": bloom, "falcon": falcon, "llama": llama, "mistral": mistral, "mixtral": mixtral, "gpt_oss": gpt_oss, "qwen2": qwen2,
    "qwen2_moe": qwen2_moe, "qwen3": qwen3, "phi": phi, "phi3": phi3, "gemma": gemma, "gemma2": gemma2,
    "gemma3_text": gemma3_text, "olmo": olmo, "stablelm": stablelm, "starcoder2": starcoder2, "cohere": cohere,
    "granitemoe": granitemoe, "minimax": minimax, "mamba": mamba,
    "t5": t5, "bart": bart, "mbart": mbart, "m2m_100": m2m_100, "whisper": whisper,
    "vit": vit, "clip-vision": clip_vision,
    "unet": unet, "dit": dit, "flux": flux,
}


def main_output(model, inputs):
    """The model's main tensor output for `inputs`: logits, else the last hidden state, else a diffusers sample."""
    out = model(**inputs)
    for name in ("logits", "last_hidden_state", "sample"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"no tensor output in {type(out).__name__}")


def kind_of(arch: str) -> str:
    """The kind of an architecture without building it (for docs/architectures.md)."""
    return KINDS[arch]


KINDS = {
    **dict.fromkeys(["bert", "roberta", "distilbert", "albert", "deberta-v2", "electra", "xlm-roberta", "clip-text",
                     "torch-encoder", "bert-cls", "funnel"], "encoder"),
    "wav2vec2": "audio",
    **dict.fromkeys(["gpt2", "gpt2-cls", "gpt_neo", "gptj", "gpt_neox", "opt", "bloom", "falcon", "llama", "mistral",
                     "mixtral", "gpt_oss", "qwen2", "qwen2_moe", "qwen3", "phi", "phi3", "gemma", "gemma2", "gemma3_text", "olmo",
                     "stablelm", "starcoder2", "cohere", "granitemoe", "minimax"], "decoder"),
    "mamba": "ssm",
    **dict.fromkeys(["t5", "bart", "mbart", "m2m_100", "whisper"], "seq2seq"),
    **dict.fromkeys(["vit", "clip-vision"], "vision"),
    **dict.fromkeys(["unet", "dit", "flux"], "diffusion"),
}
assert set(KINDS) == set(ARCHITECTURES)
