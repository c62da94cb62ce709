"""Scorer backends by name; each backend's module is imported only when it is asked for (vLLM is heavy)."""

from __future__ import annotations

import importlib

from refine.core.errors import InputError
from refine.core.model_folder import check_folder
from refine.scorers.base import Scorer

BACKENDS = {
    "vllm": "refine.scorers.vllm:VLLMScorer",      # the fast path; the only module that imports vLLM
    "hf": "refine.scorers.hf:HFScorer",            # plain transformers: tests, odd models, a cross-check
    "served": "refine.scorers.served:ServedScorer",  # running `vllm serve` endpoints over HTTP
}


def make_scorer(kind: str, model_dir: str, top_k: int = 0, dtype: str = "float32", **opts) -> Scorer:
    """A scorer of backend ``kind`` (a key of ``BACKENDS``), its module imported here, on demand. ``opts`` go to
    the backend (vLLM: max_model_len, engine kwargs; HF: batch_size; served: urls, served_model, max_concurrency,
    timeout, retries; ``model_dir`` is then the local folder with the teacher's config.json and tokenizer).
    ``bos_id`` (default: ``refine.core.tokenizer.bos_prefix`` of the model's tokenizer) is put in front of every row;
    the scores stay those of the row's own tokens 1..L-1."""
    if kind not in BACKENDS:
        raise InputError(f"unknown scorer {kind!r} ({' | '.join(BACKENDS)})")
    # the one check of a scorer's model folder (a served teacher's folder holds only config and tokenizer)
    check_folder(model_dir, opts.get("trust_remote_code", False), weights=kind != "served")
    if "bos_id" not in opts:
        from refine.core.tokenizer import bos_prefix, load_tokenizer

        opts["bos_id"] = bos_prefix(load_tokenizer(model_dir, opts.get("trust_remote_code", False)))
    module, cls = BACKENDS[kind].split(":")
    return getattr(importlib.import_module(module), cls)(model_dir, top_k=top_k, dtype=dtype, **opts)
