"""Data: the indexed token file, tokenizers, corpus packing, training samples and their order."""
