"""What a merge computes: methods and their rules, the per-key plan, block-weight and elemental grammars, presets, the metadata a merged file carries. No torch at import."""
