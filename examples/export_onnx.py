"""From a spec to an onnxruntime session: apply LoRA to a small LLaMA, train a few steps, save the adapters,
load them onto a fresh copy of the base, export (LoRA merged into the weights) to ONNX, and run it.

    python examples/export_onnx.py [--spec specs/houlsby.yaml] [--out /tmp/surgery-export]
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

import surgery

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def base_model():
    """A small LLaMA from a config (same weights every call), standing in for a pretrained checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=str(ROOT / "specs" / "lora.yaml"))
    parser.add_argument("--out", default=None, help="directory for the adapters and the .onnx file")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="surgery-export-"))

    # 1. apply the spec and train the adapters a little (next-token prediction on random tokens)
    model = surgery.apply(base_model(), args.spec)
    trainable, total = surgery.trainable_parameters(model)
    print(f"spec {Path(args.spec).name}: {trainable:,} trainable of {total:,} parameters")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = torch.randint(0, 256, (8, 17), generator=torch.Generator().manual_seed(0))
    model.train()
    for step in range(10):
        loss = model(input_ids=data[:, :-1], labels=data[:, :-1], use_cache=False).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"trained 10 steps, loss {loss.item():.3f}")

    # 2. save only the adapters, and load them onto a fresh base model
    surgery.save(model, out / "adapters")
    adapter_bytes = (out / "adapters" / "adapters.safetensors").stat().st_size
    base_bytes = sum(p.numel() * p.element_size() for p in base_model().parameters())
    print(f"saved adapters to {out / 'adapters'}: {adapter_bytes:,} bytes ({100 * adapter_bytes / base_bytes:.1f}% "
          f"of the base model's {base_bytes:,})")
    deployed = surgery.load(base_model().eval(), out / "adapters")

    # 3. export to ONNX (mergeable adapters folded into the weights; dynamic batch and sequence axes)
    example = {"input_ids": data[:2, :8], "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    onnx_path = surgery.export(deployed, out / "model.onnx", example_inputs=example, format="onnx", merge=True)
    print(f"exported {onnx_path} ({onnx_path.stat().st_size:,} bytes)")

    # 4. run it in onnxruntime at shapes the export never saw, and compare with PyTorch
    import onnxruntime
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    print("inputs:", [(i.name, i.shape) for i in session.get_inputs()],
          "outputs:", [(o.name, o.shape) for o in session.get_outputs()])
    for batch, seq in [(1, 5), (4, 23)]:
        ids = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seq))
        mask = torch.ones_like(ids)
        (logits,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        with torch.no_grad():
            expected = deployed(input_ids=ids, attention_mask=mask, use_cache=False).logits
        error = (torch.from_numpy(logits) - expected).abs().max().item()
        print(f"batch {batch}, sequence {seq}: logits {list(logits.shape)}, max |onnxruntime - torch| = {error:.2e}")
        assert error < 1e-4


if __name__ == "__main__":
    main()
