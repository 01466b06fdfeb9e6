"""LoRA-family adapters: the weight difference one adapter module contributes (``lora_delta``)."""
