"""Scorer throughput, side by side in one run: bare vLLM vs our vLLM scorer vs the transformers scorer.

Run::

    python bench/scorer_bench.py [--rows 12] [--seq-len 256] [--top-k 50] [--rounds 2] [--model DIR] [--eager]

Model: ``--model`` if given, else the SmolLM2-135M teacher at ``.cache/models/smollm2-135m`` if ``make models``
fetched it, else a tiny random Llama (vocab 400, 2 layers) built in a temp folder. Rows: seeded random token
ids (a dense model's speed does not depend on the text). fp32 throughout.

* ``vllm_raw_tok_s``: ``LLM.generate`` with ``SamplingParams(max_tokens=1, prompt_logprobs=K, flat_logprobs=True,
  detokenize=False)`` over all rows in one call, results dropped (``VLLMScorer.generate``);
* ``vllm_scorer_tok_s``: ``VLLMScorer.score`` on the same engine: the same call plus extraction into
  ``[B, L-1]`` / ``[B, L-1, K]`` numpy arrays;
* ``extraction_share``: the part of ``score()`` spent after the engine call (timed inside one call, so free of
  drift): what our extraction costs on top of bare vLLM;
* ``hf_scorer_tok_s``: ``HFScorer.score`` (batch 8) in a child process that stays up across rounds
  (transformers beside vLLM in one process slows both).

Each round runs raw, scorer, hf in turn (this machine's speed drifts 2x on its own; other jobs may share it:
the load average is recorded), medians over rounds are reported. Prints a table, writes
``bench/results/scorer_cpu.json``.
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
TEACHER = REPO / ".cache" / "models" / "smollm2-135m"

# A persistent HF worker: loads once, then scores the rows once per line read on stdin and prints tok/s.
HF_WORKER = """
import sys, time, numpy as np
from refine.scoring import make_scorer
rows = np.load(sys.argv[2])
s = make_scorer("hf", sys.argv[1], top_k=int(sys.argv[3]), batch_size=8)
s.score(rows[:2])                                                   # warm-up
print("ready", flush=True)
for _ in sys.stdin:
    t = time.perf_counter(); s.score(rows); print(rows.size / (time.perf_counter() - t), flush=True)
"""


def machine() -> dict:
    import torch
    import vllm

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    return {"cpu": cpu, "cores": os.cpu_count(), "avx512": "avx512f" in flags,
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "torch": torch.__version__, "vllm": vllm.__version__, "python": platform.python_version()}


def tiny_model(out: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=400, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(out)      # no tokenizer: neither scorer needs one
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", default=None)
    ap.add_argument("--eager", action="store_true", help="vLLM enforce_eager (no torch.compile)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "scorer_cpu.json"))
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    tmp = Path(tempfile.mkdtemp(prefix="scorer_bench_"))
    if a.model:
        model, name = Path(a.model), Path(a.model).name
    elif (TEACHER / "config.json").is_file():
        model, name = TEACHER, "SmolLM2-135M"
    else:
        model, name = tiny_model(tmp / "tiny"), "tiny random Llama (vocab 400, 2 layers)"
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    rows = np.random.default_rng(0).integers(0, vocab, size=(a.rows, a.seq_len), dtype=np.int64)
    np.save(tmp / "rows.npy", rows)
    tokens = rows.size

    hf = subprocess.Popen([sys.executable, "-c", HF_WORKER, str(model), str(tmp / "rows.npy"), str(a.top_k)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert hf.stdout.readline().strip() == "ready", "HF worker failed to start"

    from refine.scoring import make_scorer

    t0 = time.perf_counter()
    scorer = make_scorer("vllm", str(model), top_k=a.top_k, dtype="float32", max_model_len=a.seq_len + 16,
                         **({"enforce_eager": True} if a.eager else {}))
    engine_s = time.perf_counter() - t0
    scorer.score(rows[:2])                                            # warm-up
    raw, ours, hfs, extract = [], [], [], []
    try:
        for _ in range(a.rounds):
            t = time.perf_counter()
            scorer.generate(rows)
            raw.append(tokens / (time.perf_counter() - t))
            t = time.perf_counter()
            s = scorer.score(rows)
            ours.append(tokens / (time.perf_counter() - t))
            extract.append(scorer.last_timing["extract_s"] / sum(scorer.last_timing.values()))
            assert s.topk_ids.shape == (a.rows, a.seq_len - 1, a.top_k)
            hf.stdin.write("go\n")
            hf.stdin.flush()
            hfs.append(float(hf.stdout.readline()))
    finally:
        scorer.close()
        hf.stdin.close()
        hf.wait(timeout=60)

    med = {k: float(np.median(v)) for k, v in (("vllm_raw_tok_s", raw), ("vllm_scorer_tok_s", ours),
                                               ("hf_scorer_tok_s", hfs))}
    result = {
        **med,
        "scorer_over_raw": med["vllm_scorer_tok_s"] / med["vllm_raw_tok_s"],
        # Drift-proof: the share of score() spent turning vLLM's output into arrays, timed inside the same call.
        "extraction_share": float(np.median(extract)),
        "vllm_scorer_over_hf": med["vllm_scorer_tok_s"] / med["hf_scorer_tok_s"],
        "rounds": {"vllm_raw_tok_s": raw, "vllm_scorer_tok_s": ours, "hf_scorer_tok_s": hfs},
        "vllm_engine_start_s": engine_s,
        "setup": {"model": name, "rows": a.rows, "seq_len": a.seq_len, "tokens_per_round": int(tokens),
                  "top_k": a.top_k, "dtype": "float32", "enforce_eager": a.eager, "rows_content": "random ids",
                  "vllm_env": {k: os.environ.get(k) for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND",
                                                               "VLLM_ENABLE_V1_MULTIPROCESSING")}},
        "machine": {**machine(), "load_avg_1m_at_end": os.getloadavg()[0]},
    }
    print(f"\n{name}, {a.rows} rows x {a.seq_len} tokens, top-{a.top_k}, fp32, {a.rounds} rounds "
          f"(vLLM engine start {engine_s:.0f} s)")
    print(f"{'measure':<22}{'median':>10}   rounds")
    for k, v in result["rounds"].items():
        print(f"{k:<22}{med[k]:>10,.0f}   " + "  ".join(f"{x:,.0f}" for x in v))
    print(f"{'scorer / raw':<22}{result['scorer_over_raw']:>10.2f}")
    print(f"{'vLLM scorer / HF':<22}{result['vllm_scorer_over_hf']:>10.2f}")
    print(f"{'extraction share':<22}{result['extraction_share']:>10.2%}   (of score(), timed inside it)")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
