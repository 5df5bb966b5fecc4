"""Model factories for the CLI: `surgery inspect examples.models:minigpt --spec specs/houlsby.yaml`."""
from surgery.example_models import minigpt  # noqa: F401


def llama_small():
    """A LLaMA-shaped model from a small config (needs transformers)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
