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
# starts of the same model and settings). Eager mode starts much sooner and scores somewhat slower, so below
# this many tokens per engine start it finishes first (the crossover measured by bench/engine_start.py,
# bench/README.md).
EAGER_BELOW_TOKENS = 100_000
GIB = 1 << 30
# The batched-token cap (``batched_token_cap``): prompt log-probs may take this share of the memory a CUDA engine is
# given (gpu_memory_utilization x device memory; vLLM 0.32's default utilization 0.92 when the engine sets none) ...
PROMPT_LOGPROB_SHARE = 0.05
VLLM_GPU_MEMORY_UTILIZATION = 0.92
# ... and on CPU as much as its KV cache space (VLLM_CPU_KVCACHE_SPACE, GiB; cpu_defaults sets 2 where unset)
CPU_KVCACHE_GIB = 2
CAP_MULTIPLE = 256                 # the cap is rounded down to a multiple of this (above the one-row floor)


def cpu_defaults(env=None) -> None:
    """Set the CPU engine defaults in ``env`` (default ``os.environ``; a copy for a ``vllm serve`` child)."""
    env = os.environ if env is None else env
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = list(cores)
    contiguous = cores == list(range(cores[0], cores[-1] + 1))
    bind = f"{cores[0]}-{cores[-1]}" if contiguous and len(cores) > 1 else ",".join(map(str, cores))
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(CPU_KVCACHE_GIB))
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


def prompt_logprob_allowance(engine_kwargs: dict | None = None, device_memory: int | None = None) -> tuple[int, str]:
    """The bytes the engine's prompt log-probs may take at once, and how they were derived: on CUDA
    ``PROMPT_LOGPROB_SHARE`` of gpu_memory_utilization x the device's memory (``device_memory``, e.g. vLLM's NVML
    reading, which leaves CUDA uninitialised for vLLM's workers; else torch's), on CPU ``VLLM_CPU_KVCACHE_SPACE``."""
    import torch

    engine_kwargs = engine_kwargs or {}
    if torch.cuda.is_available():
        total = device_memory or torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        util = float(engine_kwargs.get("gpu_memory_utilization") or VLLM_GPU_MEMORY_UTILIZATION)
        return (int(total * util * PROMPT_LOGPROB_SHARE),
                f"{PROMPT_LOGPROB_SHARE:.0%} of gpu_memory_utilization {util:g} x {total / GIB:.1f} GiB")
    space = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "").strip()
    gib = int(space) if space.isdigit() and int(space) > 0 else CPU_KVCACHE_GIB
    return gib * GIB, f"VLLM_CPU_KVCACHE_SPACE {gib} GiB"


def batched_token_cap(vocab: int, max_model_len: int, allowance: int, logits_bytes: int = 4,
                      ceiling: int | None = None, floor: int = 0) -> int:
    """vLLM's ``max_num_batched_tokens`` for a teacher pass with prompt log-probs over ``vocab`` ids.

    Why: prompt log-probs are computed outside vLLM's memory profile (the profile run that sizes the KV cache
    inside gpu_memory_utilization runs none), from a row of logits per prompt token in the model's dtype
    (``logits_bytes``) and their fp32 ``log_softmax`` over the whole vocabulary: a step of T scheduled tokens
    computed at once takes T x vocab x (logits_bytes + 4) bytes beyond what the engine was given (8,192 tokens x
    151,552 ids: 6.9 GiB in bf16, 9.3 GiB in fp32). The cap keeps a step's worth within ``allowance``
    (``prompt_logprob_allowance``), rounded down to a multiple of ``CAP_MULTIPLE``; never above ``ceiling`` (vLLM's
    own default for the platform: the cap only lowers it), never below one row of the pass (``max_model_len``:
    vLLM refuses less without chunked prefill) nor ``floor`` (the engine's ``max_num_seqs``, which vLLM requires
    the cap to reach). vLLM 0.32's own runners compute less at once (the V1 runner request by request, the V2
    runner 1,024 positions at a time), so there the cap bounds the worst case rather than the usual one."""
    fit = allowance // (vocab * (logits_bytes + 4)) // CAP_MULTIPLE * CAP_MULTIPLE
    if ceiling:
        fit = min(fit, ceiling)
    return max(fit, max_model_len, floor)


def close_llm(llm) -> None:
    """Shut a ``vllm.LLM``'s engine down now (its threads and KV cache), not whenever it is collected."""
    engine = getattr(llm, "llm_engine", None)
    shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
    if callable(shutdown):
        shutdown()
