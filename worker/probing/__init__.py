"""Pipelines and what runs inside them: the pipeline cache, block hooks and attention probes, batched sweep variants, renderers."""
