"""``Instances.doc_ids`` per call at 1M and 10M documents: the old per-call rebuild of the start offsets vs
the cached offsets + ``np.searchsorted``.

Run::

    python bench/doc_ids_bench.py [--docs 1000000 10000000]

Each size is a real packed-instances folder (``tokens.bin`` a sparse file of the right size, ``docs.json``
written in stream order) read through ``refine.core.instances.Instances``; "before" is the removed code, copied
here. Prints a table and writes ``bench/results/doc_ids.json``.
"""

from __future__ import annotations

import argparse
import bisect
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from refine.core.instances import FORMAT, Instances  # noqa: E402

SEQ_LEN = 512
RESULTS = Path(__file__).resolve().parent / "results" / "doc_ids.json"


def build(folder: Path, n_docs: int) -> None:
    """A folder of ``n_docs`` documents of 20..600 tokens (tokens.bin sparse: only its size matters here)."""
    lens = np.random.default_rng(0).integers(20, 600, n_docs)
    starts = np.cumsum(lens) - lens
    count = int(lens.sum()) // SEQ_LEN
    folder.mkdir(parents=True)
    with open(folder / "tokens.bin", "wb") as f:
        f.truncate(count * SEQ_LEN * 2)
    with open(folder / "docs.json", "w") as f:
        f.write("[")
        for a in range(0, n_docs, 100_000):
            b = min(a + 100_000, n_docs)
            f.write(("," if a else "") + ",".join(
                f'{{"id":"doc/{i}","source":"s","start":{starts[i]},"len":{lens[i]}}}' for i in range(a, b)))
        f.write("]")
    # version 1 (docs.json): the format this benchmark measured; version 2 maps arrays (bench/pack_bench.py)
    index = {"format": FORMAT, "version": 1, "dtype": "uint16", "seq_len": SEQ_LEN, "count": count,
             "tokenizer": {"name": "bench", "hash": "0", "vocab_size": 65536, "eos_id": 0},
             "documents": n_docs, "tokens_sha256": ""}
    (folder / "index.json").write_text(json.dumps(index))


def doc_ids_before(inst: Instances, i: int) -> list[str]:
    """The removed implementation: the start offsets of every document rebuilt at each call."""
    docs = inst.docs.list                                # the version 1 docs.json list
    starts = [d["start"] for d in docs]
    lo, hi = i * inst.seq_len, (i + 1) * inst.seq_len
    first = bisect.bisect_right(starts, lo) - 1
    last = bisect.bisect_left(starts, hi) - 1
    return [docs[j]["id"] for j in range(max(first, 0), last + 1)]


def per_call(fn, rows) -> float:
    t0 = time.perf_counter()
    for r in rows:
        fn(int(r))
    return (time.perf_counter() - t0) / len(rows)


def measure(n_docs: int, before_calls: int, after_calls: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "inst"
        build(folder, n_docs)
        inst = Instances(folder)
        t0 = time.perf_counter()
        assert inst.docs                                # loads docs.json
        load_s = time.perf_counter() - t0
        rng = np.random.default_rng(1)
        t0 = time.perf_counter()
        inst.doc_ids(0)                                  # builds the cached offsets
        first_s = time.perf_counter() - t0
        after = per_call(inst.doc_ids, rng.integers(0, len(inst), after_calls))
        rows = rng.integers(0, len(inst), before_calls)
        assert all(doc_ids_before(inst, int(r)) == inst.doc_ids(int(r)) for r in rows[:2])
        before = per_call(lambda r: doc_ids_before(inst, r), rows)
        return {"documents": n_docs, "instances": len(inst), "docs_json_load_s": round(load_s, 2),
                "first_call_s": round(first_s, 3), "before_ms_per_call": round(before * 1e3, 2),
                "after_us_per_call": round(after * 1e6, 2), "speedup": round(before / after),
                "before_pass_over_7800_rows_s": round(before * 7800, 1),
                "after_pass_over_7800_rows_s": round(after * 7800, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--before-calls", type=int, default=5)
    ap.add_argument("--after-calls", type=int, default=20_000)
    a = ap.parse_args()
    rows = [measure(n, a.before_calls, a.after_calls) for n in a.docs]
    print("| documents | instances | docs.json load s | first call s | before ms/call | after us/call | speedup |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['documents']:,} | {r['instances']:,} | {r['docs_json_load_s']} | {r['first_call_s']} | "
              f"{r['before_ms_per_call']} | {r['after_us_per_call']} | {r['speedup']:,}x |")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": f"{platform.machine()} {platform.processor()}".strip(),
                                   "python": platform.python_version(), "seq_len": SEQ_LEN, "rows": rows},
                                  indent=1) + "\n")
    print(f"-> {RESULTS}")


if __name__ == "__main__":
    main()
