"""Benchmarks of surgery against PEFT, a hand-written model and the base model: `python -m benchmarks`."""
