"""vLLM engine settings shared by the scorer (``refine.scorers.vllm``) and lm-eval's vLLM model
(``distill.lm_eval_vllm``); imports no vLLM.

CPU defaults (each only if unset): ``VLLM_CPU_KVCACHE_SPACE=2`` GiB (unset, vLLM reserves most of RAM),
``VLLM_CPU_OMP_THREADS_BIND`` = all cores (the default leaves one idle), ``VLLM_ENABLE_V1_MULTIPROCESSING=0``
(in-process engine: starts in seconds, no exit-time crash).
"""

from __future__ import annotations

import os
from pathlib import Path

from refine.core.paths import config_int

DEFAULT_MAX_MODEL_LEN = 2048       # packed instances are <= 1024 tokens; a cap keeps the KV cache check cheap
# vLLM compiles the model at every start (torch.compile; its compile cache under VLLM_CACHE_ROOT shortens later
# starts of the same model and settings). bench/results/engine_start.json, SmolLM2-135M on this 2-core CPU: eager
# starts in 55 s against 134 s compiled with a warm cache and 205 s cold, and scores ~11% slower (134 vs 150
# tok/s), so eager finishes first below ~100k tokens per engine start (~190k with a cold cache).
EAGER_BELOW_TOKENS = 100_000


def cpu_defaults(env=None) -> None:
    """Set the CPU engine defaults in ``env`` (default ``os.environ``; a copy for a ``vllm serve`` child)."""
    env = os.environ if env is None else env
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = list(cores)
    contiguous = cores == list(range(cores[0], cores[-1] + 1))
    bind = f"{cores[0]}-{cores[-1]}" if contiguous and len(cores) > 1 else ",".join(map(str, cores))
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", bind)
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def eager_default(tokens: int) -> dict:
    """vLLM's ``enforce_eager`` for an engine that will score ``tokens`` tokens, unless the user sets it: on CPU,
    eager below ``EAGER_BELOW_TOKENS`` (the start-up would cost more than compiling saves), vLLM's compiled
    default above; on a GPU vLLM's own default (compiled, CUDA graphs), which this machine cannot measure."""
    import torch

    if torch.cuda.is_available():
        return {}
    return {"enforce_eager": tokens < EAGER_BELOW_TOKENS}


def engine_max_len(model_dir: str | Path) -> int:
    """The default ``max_model_len``: the model's own limit, capped at ``DEFAULT_MAX_MODEL_LEN``."""
    return min(config_int(model_dir, "max_position_embeddings") or DEFAULT_MAX_MODEL_LEN, DEFAULT_MAX_MODEL_LEN)


def close_llm(llm) -> None:
    """Shut a ``vllm.LLM``'s engine down now (its threads and KV cache), not whenever it is collected."""
    engine = getattr(llm, "llm_engine", None)
    shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
    if callable(shutdown):
        shutdown()
