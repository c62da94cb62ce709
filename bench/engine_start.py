"""vLLM engine start-up and throughput: compiled (cold / warm compile cache) vs ``enforce_eager``, side by side.

Run (needs `make data models`)::

    python bench/engine_start.py [--rows 32] [--seq-len 256] [--top-k 50] [--repeats 1]

Every variant is a fresh process (a real start), on the same packed instances of the bundled corpus and the
SmolLM2 teacher (fp32), in this order, ``--repeats`` times:

* ``compiled_cold``: vLLM's default (torch.compile of the model) with an empty compile cache
  (``VLLM_CACHE_ROOT`` = a new folder): a new machine, or a new model / max_model_len;
* ``compiled_warm``: the same again, the cache now filled by the first: every later start on the machine;
* ``eager``: ``enforce_eager=True``: no compilation, no cache.

For each: seconds to build the engine (``start_s``), then tokens/s of ``VLLMScorer.score`` over the rows with
top-K log-probs (after a 2-row warm-up), and what scoring N tokens costs in total, start included. Prints a
table, writes ``bench/results/engine_start.json``. The CPU default (``refine.core.engine_settings``) is chosen
from this file; on a GPU, measure again (CUDA graphs make eager's throughput loss larger there).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.refine_bench import machine  # noqa: E402

CHILD = """
import json, sys, time, numpy as np
from refine.scorers.vllm import VLLMScorer
rows = np.load(sys.argv[2]); eager = sys.argv[4] == "1"
t = time.perf_counter()
s = VLLMScorer(sys.argv[1], top_k=int(sys.argv[3]), max_model_len=rows.shape[1] + 16, enforce_eager=eager)
start = time.perf_counter() - t
s.score(rows[:2])
t = time.perf_counter(); s.score(rows); tok_s = rows.size / (time.perf_counter() - t)
s.close()
print(json.dumps({"start_s": start, "tok_s": tok_s}))
"""


def run_variant(teacher: Path, rows_file: Path, top_k: int, eager: bool, cache_root: Path) -> dict:
    env = {**os.environ, "VLLM_CACHE_ROOT": str(cache_root)}
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, str(teacher), str(rows_file), str(top_k), str(int(eager))],
                         capture_output=True, text=True, cwd=REPO, env=env)
    if out.returncode:
        sys.exit(f"variant failed (eager={eager}):\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["process_s"] = time.perf_counter() - t
    return res


def main() -> None:
    from refine.core.pack import pack
    from refine.core.paths import cache_dir, corpus_dir, teacher_dir
    from refine.core.tokenizer import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "engine_start.json"))
    a = ap.parse_args()

    teacher = teacher_dir()
    full = pack(corpus_dir() / "train.jsonl", load_tokenizer(teacher), a.seq_len,
                cache_dir() / "bench" / f"train-L{a.seq_len}", quiet=True)
    idx = np.unique(np.linspace(0, len(full) - 1, a.rows).round().astype(np.int64))
    tmp = Path(tempfile.mkdtemp(prefix="engine_start_"))
    rows_file = tmp / "rows.npy"
    np.save(rows_file, np.asarray(full.tokens[idx]))

    runs: dict[str, list[dict]] = {"compiled_cold": [], "compiled_warm": [], "eager": []}
    for r in range(a.repeats):
        compiled_cache = tmp / f"compiled{r}"
        runs["compiled_cold"].append(run_variant(teacher, rows_file, a.top_k, False, compiled_cache))
        runs["compiled_warm"].append(run_variant(teacher, rows_file, a.top_k, False, compiled_cache))
        runs["eager"].append(run_variant(teacher, rows_file, a.top_k, True, tmp / f"eager{r}"))
    summary = {name: {k: float(np.median([x[k] for x in xs])) for k in ("start_s", "tok_s", "process_s")}
               for name, xs in runs.items()}
    # What a refine of N tokens costs with each, start included: where eager's faster start stops paying.
    for s in summary.values():
        s["seconds_for_65k_tokens"] = s["start_s"] + 65_536 / s["tok_s"]
        s["seconds_for_1m_tokens"] = s["start_s"] + 1e6 / s["tok_s"]
    result = {"variants": summary, "runs": runs,
              "setup": {"rows": len(idx), "seq_len": a.seq_len, "top_k": a.top_k, "repeats": a.repeats,
                        "teacher": "SmolLM2-135M fp32"},
              "machine": machine()}
    cols = ("start_s", "tok_s", "process_s", "seconds_for_65k_tokens", "seconds_for_1m_tokens")
    print(f"{'variant':<15}" + "".join(f"{c:>24}" for c in cols))
    for name, s in summary.items():
        print(f"{name:<15}" + "".join(f"{s[c]:>24,.1f}" for c in cols))
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
