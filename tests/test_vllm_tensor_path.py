"""The vLLM scorer's tensor path (prompt log-probs kept as the engine's tensors, ``refine.scorers.vllm``) against
vLLM's public per-position lists on a tiny real engine: the same scores bit for bit, and teacher passes
(``run_pass``: NLL, top-p-k and RS-KD compact stores) with the same bytes; with another vLLM version the scorer
falls back to the lists with one warning line and the same results.

Each engine runs in a child process (see tests/test_scorers.py for why).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO

SCRIPT = """
import sys, numpy as np
from pathlib import Path
import refine.scorers.vllm as V
from refine.config import LogitsConfig, ModelPassConfig
from refine.core.instances import Instances
from refine.score_pass import PassConfig, run_pass
from refine.scorers.registry import make_scorer
model, inst, out, fallback = sys.argv[1], Instances(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] == "1"
if fallback:
    V.TENSOR_PATH_VLLM = ("0.0.0",)                       # as if this were another vLLM version
s = make_scorer("vllm", model, top_k=20, dtype="float32")
rows = np.asarray(inst.tokens)
res = {}
for path in ("fallback",) if fallback else ("tensors", "lists"):
    s.tensor_path = path == "tensors"
    sc = s.score(rows)
    res.update({f"{path}_{k}": getattr(sc, k) for k in ("token_logprobs", "topk_ids", "topk_logprobs")})
    res[f"{path}_output_s"] = s.last_timing["output_s"]
    cfg = PassConfig(str(inst.folder), str(out / path), ModelPassConfig(model, batch_rows=5), shard_size=8,
                     logits=LogitsConfig(top_p=0.9, top_k=10, candidates=20, rs_samples=8), quiet=True)
    run_pass(cfg, scorer=s)
s.close()
np.savez(out / "scores.npz", **res)
"""


def _run(model: Path, inst: Path, out: Path, fallback: bool) -> tuple[dict, str]:
    out.mkdir(parents=True, exist_ok=True)
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(model), str(inst), str(out), "1" if fallback else "0"],
                         capture_output=True, text=True, cwd=REPO, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return dict(np.load(out / "scores.npz")), res.stderr


def _pass_files(folder: Path) -> dict[str, bytes]:
    """A pass folder's data files (scores and both stores) by relative path; shard and pass json carry timings."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix in (".npy", ".bin")}


@pytest.mark.integration
def test_tensor_path_gives_the_public_paths_bytes_and_falls_back(tiny_model_dir, tiny_tokenizer_dir, tiny_corpus,
                                                                 tmp_path):
    from refine.core.pack import pack
    from refine.core.tokenizer import load_tokenizer

    inst = pack(tiny_corpus / "train.jsonl", load_tokenizer(tiny_tokenizer_dir), 64, tmp_path / "inst", quiet=True)
    inst = inst.folder
    main, stderr = _run(tiny_model_dir, inst, tmp_path / "main", fallback=False)
    assert "warning: vLLM prompt log-probs" not in stderr
    for k in ("token_logprobs", "topk_ids", "topk_logprobs"):
        a, b = main[f"tensors_{k}"], main[f"lists_{k}"]
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), k
    assert main["lists_output_s"] > 0 and main["tensors_output_s"] < main["lists_output_s"]
    tensors, lists = _pass_files(tmp_path / "main" / "tensors"), _pass_files(tmp_path / "main" / "lists")
    assert {"nll.npy", "logits/shard-00000.bin", "logits_rs/shard-00000.bin"} <= set(tensors)
    assert tensors == lists

    fb, stderr = _run(tiny_model_dir, inst, tmp_path / "fb", fallback=True)
    warnings = [ln for ln in stderr.splitlines() if ln.startswith("warning: vLLM prompt log-probs")]
    assert len(warnings) == 1 and "vLLM 0.32.0 (the tensor path was written for 0.0.0)" in warnings[0], warnings
    for k in ("token_logprobs", "topk_ids", "topk_logprobs"):
        assert fb[f"fallback_{k}"].tobytes() == main[f"tensors_{k}"].tobytes(), k
    assert fb["fallback_output_s"] == 0                     # vLLM's own processor: nothing of ours in the loop
    assert _pass_files(tmp_path / "fb" / "fallback") == tensors
