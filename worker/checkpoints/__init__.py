"""Tensors from checkpoint files, LDM ↔ diffusers key conversion, and generated test checkpoints (tiny and full-size layouts)."""
