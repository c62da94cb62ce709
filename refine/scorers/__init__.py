"""Scorers: run a causal LM over token rows (``base``: the interface; ``registry``: backends by name)."""
