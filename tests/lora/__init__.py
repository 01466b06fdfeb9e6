"""Tests of mergeprobe/lora and worker/lora: LoRA files, their module names and baking them into checkpoints."""
