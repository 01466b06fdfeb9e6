"""Checkpoint files and the model library: architectures and their block tables, header readers (safetensors, restricted .ckpt unpickler), the library of models pinned by sha256. No torch."""
