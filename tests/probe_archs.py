"""Tiny random-weight models of families outside the architecture matrix (issue: break the promise on encoder,
vision, audio, encoder-decoder and diffusion models it was not tested on); run their cells with
`python tools/probe_archs.py NAME [spec,spec]`. Same conventions as tests/architectures.py."""
import torch
from architectures import _hf, _blocks, _ids, _facts, _no_cache, _seq2seq_inputs, VOCAB, HIDDEN, LAYERS, HEADS, BATCH

def _px(size=32, ch=3):
    g = torch.Generator().manual_seed(1)
    return {"pixel_values": torch.randn(BATCH, ch, size, size, generator=g)}

def _audio():
    g = torch.Generator().manual_seed(1)
    return {"input_values": torch.randn(BATCH, 400, generator=g)}

def swin():
    from transformers import SwinConfig, SwinModel
    cfg = SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4)
    i = _px()
    return _hf(SwinModel, cfg, ["encoder.layers.0.blocks.0", "encoder.layers.1.blocks.0"], "vision", inputs=i,
               apply_inputs=i, hidden=None)

def convnext():
    from transformers import ConvNextConfig, ConvNextModel
    cfg = ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2)
    i = _px()
    return _hf(ConvNextModel, cfg, ["encoder.stages.0.layers.0", "encoder.stages.1.layers.0"], "vision", inputs=i,
               apply_inputs=i, hidden=None, attention=None)

def dinov2():
    from transformers import Dinov2Config, Dinov2Model
    cfg = Dinov2Config(image_size=16, patch_size=4, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                       num_attention_heads=HEADS, mlp_ratio=2)
    i = _px(16)
    return _hf(Dinov2Model, cfg, _blocks("encoder.layer"), "vision", inputs=i, apply_inputs=i)

def beit():
    from transformers import BeitConfig, BeitModel
    cfg = BeitConfig(image_size=16, patch_size=4, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                     num_attention_heads=HEADS, intermediate_size=128, use_relative_position_bias=True)
    i = _px(16)
    return _hf(BeitModel, cfg, _blocks("layers"), "vision", inputs=i, apply_inputs=i)

def siglip_vision():
    from transformers import SiglipVisionConfig, SiglipVisionModel
    cfg = SiglipVisionConfig(image_size=16, patch_size=4, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                             num_attention_heads=HEADS, intermediate_size=128)
    i = _px(16)
    return _hf(SiglipVisionModel, cfg, _blocks("encoder.layers"), "vision", inputs=i, apply_inputs=i)

def siglip_text():
    from transformers import SiglipTextConfig, SiglipTextModel
    cfg = SiglipTextConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                           intermediate_size=128, max_position_embeddings=64)
    return _hf(SiglipTextModel, cfg, _blocks("encoder.layers"), "encoder")

def segformer():
    from transformers import SegformerConfig, SegformerModel
    cfg = SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                          patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2])
    i = _px()
    return _hf(SegformerModel, cfg, ["stages.0.blocks.0", "stages.1.blocks.0"], "vision", inputs=i, apply_inputs=i,
               hidden=None)

def _w2v_like(cfg_name, model_name, **kw):
    import transformers
    cfg = getattr(transformers, cfg_name)(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=128, conv_dim=(32, 32), conv_stride=(5, 4), conv_kernel=(10, 4),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, mask_time_prob=0.0, **kw)
    i = _audio()
    return _hf(getattr(transformers, model_name), cfg, _blocks("encoder.layers"), "audio", inputs=i, apply_inputs=i)

def hubert():
    return _w2v_like("HubertConfig", "HubertModel", do_stable_layer_norm=False)

def wavlm():
    return _w2v_like("WavLMConfig", "WavLMModel", num_buckets=16, max_bucket_distance=32)

def data2vec_audio():
    return _w2v_like("Data2VecAudioConfig", "Data2VecAudioModel")

def _bart_like(cfg_cls, model_cls, **kw):
    import transformers
    cfg = getattr(transformers, cfg_cls)(
        vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
        dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, **kw)
    inputs = _seq2seq_inputs()
    return _hf(getattr(transformers, model_cls), cfg, _blocks("model.encoder.layers") + _blocks("model.decoder.layers"),
               "seq2seq", inputs=inputs, apply_inputs=_no_cache(inputs), layers={"encoder": LAYERS, "decoder": LAYERS})

def pegasus():
    return _bart_like("PegasusConfig", "PegasusForConditionalGeneration")

def marian():
    return _bart_like("MarianConfig", "MarianMTModel", decoder_vocab_size=VOCAB)

def blenderbot():
    return _bart_like("BlenderbotConfig", "BlenderbotForConditionalGeneration")

def m2m_100():
    return _bart_like("M2M100Config", "M2M100ForConditionalGeneration")

def _t5_like(cfg_cls, model_cls, **kw):
    import transformers
    cfg = getattr(transformers, cfg_cls)(vocab_size=VOCAB, d_model=HIDDEN, d_kv=16, d_ff=128, num_layers=LAYERS,
        num_decoder_layers=LAYERS, num_heads=HEADS, relative_attention_num_buckets=8, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1, dropout_rate=0.0, **kw)
    inputs = _seq2seq_inputs()
    return _hf(getattr(transformers, model_cls), cfg, _blocks("encoder.block") + _blocks("decoder.block"), "seq2seq",
               inputs=inputs, apply_inputs=_no_cache(inputs), layers={"encoder": LAYERS, "decoder": LAYERS})

def umt5():
    return _t5_like("UMT5Config", "UMT5ForConditionalGeneration")

def mt5():
    return _t5_like("MT5Config", "MT5ForConditionalGeneration", feed_forward_proj="gated-gelu")

def longt5():
    return _t5_like("LongT5Config", "LongT5ForConditionalGeneration", local_radius=2, encoder_attention_type="local")

def switch():
    return _t5_like("SwitchTransformersConfig", "SwitchTransformersForConditionalGeneration", num_experts=4,
                    expert_capacity=16, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, experts=4)

def modernbert():
    from transformers import ModernBertConfig, ModernBertModel
    cfg = ModernBertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                           intermediate_size=128, max_position_embeddings=64, global_attn_every_n_layers=2,
                           local_attention=4, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    return _hf(ModernBertModel, cfg, _blocks("layers"), "encoder")

def _enc(cfg_name, model_name, blocks="encoder.layer", **kw):
    import transformers
    base = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                intermediate_size=128, max_position_embeddings=64)
    base.update(kw)
    return _hf(getattr(transformers, model_name), getattr(transformers, cfg_name)(**base), _blocks(blocks), "encoder")

def _mpnet():
    return _enc("MPNetConfig", "MPNetModel", relative_attention_num_buckets=8, pad_token_id=0)

def roformer():
    return _enc("RoFormerConfig", "RoFormerModel", embedding_size=HIDDEN)

def ernie():
    return _enc("ErnieConfig", "ErnieModel")

def bert_generation():
    return _enc("BertGenerationConfig", "BertGenerationEncoder")

def funnel():
    from transformers import FunnelConfig, FunnelBaseModel
    cfg = FunnelConfig(vocab_size=VOCAB, d_model=HIDDEN, n_head=HEADS, d_head=16, d_inner=128, block_sizes=[1, 1])
    return _hf(FunnelBaseModel, cfg, ["encoder.blocks.0.0", "encoder.blocks.1.0"], "encoder")

def layoutlm():
    return _enc("LayoutLMConfig", "LayoutLMModel")

def unet2d():
    from diffusers import UNet2DModel
    torch.manual_seed(0)
    model = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
                        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                        attention_head_dim=8, norm_num_groups=8).eval()
    g = torch.Generator().manual_seed(1)
    i = {"sample": torch.randn(BATCH, 3, 16, 16, generator=g), "timestep": torch.tensor(10)}
    blocks = ["down_blocks.1.attentions.0", "mid_block.attentions.0", "up_blocks.0.attentions.0", "up_blocks.0.attentions.1"]
    return model, i, _facts("diffusion", len(blocks), blocks, hidden=None, apply_inputs=i, generate=False, biases=True,
                            attention=r"(?i)(attn|attention|to_[qkv]|to_out)")

def sd3(layers: int = LAYERS):
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=layers, attention_head_dim=8,
                                  num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
                                  pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16).eval()
    g = torch.Generator().manual_seed(1)
    i = {"hidden_states": torch.randn(BATCH, 4, 8, 8, generator=g),
         "encoder_hidden_states": torch.randn(BATCH, 6, 32, generator=g),
         "pooled_projections": torch.randn(BATCH, 16, generator=g), "timestep": torch.tensor([10, 20])}
    return model, i, _facts("diffusion", layers, _blocks("transformer_blocks", layers), hidden=32, apply_inputs=i,
                            generate=False, biases=True)

def flux(layers: int = 1):
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=layers, num_single_layers=layers, attention_head_dim=8,
                                   num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=16,
                                   axes_dims_rope=(2, 2, 4)).eval()
    g = torch.Generator().manual_seed(1)
    i = {"hidden_states": torch.randn(BATCH, 16, 8, generator=g),
         "encoder_hidden_states": torch.randn(BATCH, 6, 32, generator=g),
         "pooled_projections": torch.randn(BATCH, 16, generator=g), "timestep": torch.tensor([0.5, 0.5]),
         "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(6, 3)}
    return model, i, _facts("diffusion", 2 * layers, _blocks("transformer_blocks", layers)
                            + _blocks("single_transformer_blocks", layers), hidden=32,
                            apply_inputs=i, generate=False, biases=True)

def vae():
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    model = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                          up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(16, 32),
                          layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16).eval()
    g = torch.Generator().manual_seed(1)
    i = {"sample": torch.randn(BATCH, 3, 16, 16, generator=g)}
    blocks = ["encoder.mid_block.attentions.0", "decoder.mid_block.attentions.0"]
    return model, i, _facts("diffusion", len(blocks), blocks, hidden=None, apply_inputs=i, generate=False, biases=True,
                            attention=r"(?i)(attn|attention|to_[qkv]|to_out)")

PROBES = {k: v for k, v in dict(globals()).items() if callable(v) and not k.startswith("_") and v.__module__ == __name__}
KINDS = {}
