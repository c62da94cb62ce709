"""Refine throughput, side by side in one run: bare vLLM vs our whole teacher pass vs the HF scorer.

Run (needs `make data models`)::

    python bench/refine_bench.py [--rows 128] [--seq-len 256] [--top-k 50] [--rounds 2]

On the same packed instances of the bundled corpus and the SmolLM2 teacher (fp32):

* ``vllm_raw_tok_s``: ``LLM.generate`` with ``prompt_logprobs=K`` (flat, no detokenisation), results dropped;
* ``pipeline_tok_s``: ``refine.score_pass.run_pass`` on the same engine: extraction to arrays, NLL, top-p-k
  truncation and writing the logits shards (what ``python -m refine`` does per shard);
* ``hf_scorer_tok_s``: the transformers scorer in a separate process (vLLM and transformers slow each other
  down in one process).

vLLM measurements alternate (raw, pipeline, raw, pipeline...) so machine drift hits both alike. Prints a
table, writes ``bench/results/refine_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

HF_SCRIPT = """
import sys, time, numpy as np
from refine.scorers.registry import make_scorer
rows = np.load(sys.argv[2])
s = make_scorer("hf", sys.argv[1], top_k=int(sys.argv[3]), batch_size=8)
s.score(rows[:2])                                  # warm-up
t = time.perf_counter(); s.score(rows); print(rows.size / (time.perf_counter() - t))
"""


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    import torch
    import vllm

    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "vllm": vllm.__version__,
            "python": platform.python_version()}


def main() -> None:
    from refine.config import LogitsConfig, ModelPassConfig
    from refine.core.instances import Instances, write_subset
    from refine.core.logits import LogitsStore
    from refine.core.pack import pack
    from refine.core.paths import cache_dir, corpus_dir, teacher_dir
    from refine.core.tokenizer import load_tokenizer
    from refine.score_pass import PassConfig, run_pass
    from refine.scorers.registry import make_scorer

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()

    teacher = teacher_dir()
    tok = load_tokenizer(teacher)
    full = pack(corpus_dir() / "train.jsonl", tok, a.seq_len, cache_dir() / "bench" / f"train-L{a.seq_len}",
                quiet=True)
    rows_idx = np.unique(np.linspace(0, len(full) - 1, a.rows).round().astype(np.int64))
    tmp = Path(tempfile.mkdtemp(prefix="refine_bench_"))
    inst: Instances = write_subset(full, rows_idx, tmp / "instances")
    rows = np.asarray(inst.tokens)
    tokens = rows.size

    t0 = time.perf_counter()
    scorer = make_scorer("vllm", str(teacher), top_k=a.top_k, dtype="float32", max_model_len=a.seq_len + 16)
    engine_s = time.perf_counter() - t0
    scorer.generate(rows[:4])                                   # warm-up
    raw, pipe = [], []
    for r in range(a.rounds):
        t = time.perf_counter()
        scorer.generate(rows)
        raw.append(tokens / (time.perf_counter() - t))
        out = tmp / f"pass{r}"
        t = time.perf_counter()
        run_pass(PassConfig(str(inst.folder), str(out), ModelPassConfig(str(teacher), batch_rows=len(rows)),
                            len(rows), LogitsConfig(top_p=a.top_p, top_k=a.top_k), quiet=True), scorer=scorer)
        pipe.append(tokens / (time.perf_counter() - t))
    scorer.close()
    store = LogitsStore(tmp / "pass0" / "logits")
    np.save(tmp / "rows.npy", rows)
    hf = subprocess.run([sys.executable, "-c", HF_SCRIPT, str(teacher), str(tmp / "rows.npy"), str(a.top_k)],
                        capture_output=True, text=True, cwd=REPO, check=True)
    result = {
        "vllm_raw_tok_s": float(np.median(raw)), "pipeline_tok_s": float(np.median(pipe)),
        "hf_scorer_tok_s": float(hf.stdout.strip().splitlines()[-1]),
        "pipeline_over_raw": float(np.median(pipe) / np.median(raw)),
        "logits_bytes_per_token": store.bytes_per_token(),
        "rounds": {"vllm_raw_tok_s": raw, "pipeline_tok_s": pipe}, "engine_start_s": engine_s,
        "setup": {"rows": len(rows), "seq_len": a.seq_len, "tokens": int(tokens), "top_k": a.top_k, "top_p": a.top_p,
                  "teacher": "SmolLM2-135M fp32", "dtype": "float32"},
        "machine": machine(),
    }
    print(f"{'measure':<26}{'value':>12}")
    for k in ("vllm_raw_tok_s", "pipeline_tok_s", "hf_scorer_tok_s", "pipeline_over_raw", "logits_bytes_per_token"):
        print(f"{k:<26}{result[k]:>12,.2f}")
    out = REPO / "bench" / "results" / "refine_cpu.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
