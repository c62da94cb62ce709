"""The vLLM engine's batched-token cap (issue 31 item 4): prompt log-probs can take [scheduled tokens, vocab] fp32
outside vLLM's memory profile, so refine sets ``max_num_batched_tokens`` from the teacher's vocabulary and the
memory the engine is given (``refine.core.engine_settings.batched_token_cap``), says so in one log line, and a
user's ``teacher.engine.max_num_batched_tokens`` wins. No engine starts: a stand-in ``vllm`` module records the
kwargs ``vllm.LLM`` gets."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

import refine.scorers.vllm as V
from refine.config import ModelPassConfig
from refine.core.engine_settings import GIB, batched_token_cap, prompt_logprob_allowance
from refine.score_pass import PassConfig, _make_scorer

H100 = 81_559 * 2**20           # an H100 80GB's memory as NVML reports it
H100_ALLOWANCE = int(H100 * 0.92 * 0.05)   # 5% of vLLM 0.32's default gpu_memory_utilization x the device
ROW = 1024 + 16                 # refine's max_model_len for 1,024-token rows


def test_cap_fits_the_allowance_between_one_row_and_vllms_default():
    # fp32 teacher (refine's default dtype): 8 B per (token, vocab id)
    assert batched_token_cap(49_152, ROW, H100_ALLOWANCE, 4, ceiling=16_384) == 9_984
    assert batched_token_cap(151_552, ROW, H100_ALLOWANCE, 4, ceiling=16_384) == 3_072
    assert batched_token_cap(151_552, ROW, H100_ALLOWANCE, 2, ceiling=16_384) == 4_096       # bf16 logits
    for vocab in (49_152, 151_552):
        cap = batched_token_cap(vocab, ROW, H100_ALLOWANCE, 4, ceiling=16_384)
        assert cap * vocab * 8 <= H100_ALLOWANCE and cap % 256 == 0
    assert batched_token_cap(32_000, ROW, 100 * GIB, 4, ceiling=16_384) == 16_384            # never above vLLM's
    assert batched_token_cap(262_144, 2_064, GIB // 4, 4, ceiling=4_096) == 2_064             # never below a row
    assert batched_token_cap(151_552, ROW, 2 * GIB, 4, ceiling=4_096, floor=2_048) == 2_048  # >= max_num_seqs
    assert batched_token_cap(151_552, ROW, 2 * GIB, 4, ceiling=4_096) == 1_536                # CPU, 2 GiB KV space


def test_allowance_on_cpu_is_the_kv_cache_space(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "6")
    assert prompt_logprob_allowance({})[0] == 6 * GIB
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "0")            # vLLM's "auto": the default 2 GiB is assumed
    assert prompt_logprob_allowance({})[0] == 2 * GIB
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert prompt_logprob_allowance({}, H100)[0] == H100_ALLOWANCE
    assert prompt_logprob_allowance({"gpu_memory_utilization": 0.5}, H100)[0] == int(H100 * 0.5 * 0.05)


class _LLM:
    """Stands in for ``vllm.LLM``: records its kwargs."""
    calls: list[dict] = []

    def __init__(self, **kwargs):
        _LLM.calls.append(kwargs)
        self.llm_engine = None


@pytest.fixture
def fake_vllm(monkeypatch):
    """A ``vllm`` module whose ``LLM`` records its kwargs (the tensor path declines it: another version)."""
    fake = types.ModuleType("vllm")
    fake.__version__, fake.LLM, fake.SamplingParams = "0.0.0+stand-in", _LLM, lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", fake)
    for var, value in (("VLLM_CPU_KVCACHE_SPACE", "2"), ("VLLM_CPU_OMP_THREADS_BIND", "0"),
                       ("VLLM_ENABLE_V1_MULTIPROCESSING", "0"), ("VLLM_LOGGING_LEVEL", "WARNING")):
        monkeypatch.setenv(var, value)          # cpu_defaults leaves them; the test leaves no trace
    _LLM.calls.clear()
    return _LLM.calls


def _teacher(tmp_path: Path, tokenizer_dir: Path, vocab: int) -> Path:
    """A teacher folder with ``vocab`` ids in its config.json (the tiny tokenizer: refine reads its BOS)."""
    folder = tmp_path / f"teacher-{vocab}"
    shutil.copytree(tokenizer_dir, folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": vocab,
                                                    "max_position_embeddings": 4096}))
    (folder / "model.safetensors").write_bytes(b"")   # the registry's folder check; the fake engine loads nothing
    return folder


def _score_pass_engine(folder: Path, tmp_path: Path, engine: dict, seq_len: int = 1024) -> dict:
    """The kwargs refine's teacher pass (``score_pass._make_scorer``, as ``python -m refine`` runs it) gives vLLM."""
    cfg = PassConfig(str(tmp_path / "instances"), str(tmp_path / "out"), ModelPassConfig(str(folder), engine=engine),
                     shard_size=8)
    _make_scorer(cfg, seq_len, tokens=10**6).close()
    return _LLM.calls[-1]


@pytest.mark.parametrize("vocab,gpu_cap,cpu_cap", [(49_152, 9_984, 4_096), (151_552, 3_072, 1_536)])
def test_the_engine_receives_the_cap(vocab, gpu_cap, cpu_cap, fake_vllm, tiny_tokenizer_dir, tmp_path, monkeypatch,
                                     capsys):
    folder = _teacher(tmp_path, tiny_tokenizer_dir, vocab)
    # CPU: vLLM's default 4,096 (what vLLM 0.32 reads on CPU), allowance VLLM_CPU_KVCACHE_SPACE = 2 GiB
    monkeypatch.setattr(V, "_vllm_platform", lambda world: (4_096, None))
    kwargs = _score_pass_engine(folder, tmp_path, {})
    assert kwargs["max_num_batched_tokens"] == cpu_cap and kwargs["max_model_len"] == 1_040
    line = [ln for ln in capsys.readouterr().err.splitlines() if "max_num_batched_tokens" in ln]
    assert line == [line[0]] and f"max_num_batched_tokens={cpu_cap} " in line[0] and f"{vocab:,}" in line[0]
    # an H100 (as vLLM reads it: 16,384 by default, 81,559 MiB)
    monkeypatch.setattr(V, "_vllm_platform", lambda world: (16_384, H100))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _score_pass_engine(folder, tmp_path, {})["max_num_batched_tokens"] == gpu_cap
    # with tensor parallelism the world size reaches vLLM's defaults
    seen = []
    monkeypatch.setattr(V, "_vllm_platform", lambda world: seen.append(world) or (16_384, H100))
    _score_pass_engine(folder, tmp_path, {"tensor_parallel_size": 2})
    assert seen == [2]


def test_the_users_setting_wins(fake_vllm, tiny_tokenizer_dir, tmp_path, monkeypatch, capsys):
    folder = _teacher(tmp_path, tiny_tokenizer_dir, 151_552)
    monkeypatch.setattr(V, "_vllm_platform", lambda world: (16_384, H100))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _score_pass_engine(folder, tmp_path, {"max_num_batched_tokens": 12_288})["max_num_batched_tokens"] == 12_288
    assert "max_num_batched_tokens=12288 (the user's engine setting)" in capsys.readouterr().err
    assert "max_num_batched_tokens" not in _score_pass_engine(folder, tmp_path, {"max_num_batched_tokens": 0})
    # gpu_memory_utilization is part of what the engine is given: less of it, a smaller cap
    kwargs = _score_pass_engine(folder, tmp_path, {"gpu_memory_utilization": 0.5})
    assert kwargs["max_num_batched_tokens"] == batched_token_cap(151_552, 1_040, int(H100 * 0.5 * 0.05), 4, 16_384)
    assert kwargs["gpu_memory_utilization"] == 0.5
    # the engine's max_num_seqs is a floor (vLLM refuses a cap below it)
    assert _score_pass_engine(folder, tmp_path, {"max_num_seqs": 4_000})["max_num_batched_tokens"] == 4_000


def test_a_config_without_vocab_size_leaves_vllms_default(fake_vllm, tiny_tokenizer_dir, tmp_path, capsys):
    folder = _teacher(tmp_path, tiny_tokenizer_dir, 1)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "max_num_batched_tokens" not in _score_pass_engine(folder, tmp_path, {})
    assert "left to vLLM" in capsys.readouterr().err
