"""LoRA and LyCORIS support, torch-free parts (issue 13, in progress; nothing here is wired into a
job yet): what a LoRA file holds (`lora_formats`), which checkpoint key each of its modules
modifies (`lora_keys`), and per-block strengths in the LoRA Block Weight extension's forms
(`lora_block_weights`). The weight deltas themselves are computed in `worker/lora/lora_delta.py`."""
