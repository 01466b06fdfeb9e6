"""Dump and sweep requests: per-block prompts, colorize expressions, sweep variants as changes to a merge plan. No torch."""
