"""Persistence: adapters saved as safetensors with their specs and a manifest, and loaded onto a base model."""
from surgery.io.checkpoint import CheckpointError, load, read_manifest, save
from surgery.io.peft import PeftFormatError, from_peft, to_peft  # noqa: F401

__all__ = ["CheckpointError", "load", "read_manifest", "save"]
