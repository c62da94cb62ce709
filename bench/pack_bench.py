"""Packing a corpus: peak RSS and tokens/s at 10k and 1M documents, the old document index (one ``docs.json``
list, held in memory while packing) against the document arrays, and throughput against ``pack.workers``.

    python bench/pack_bench.py [--docs 10000 1000000] [--workers 1 2] [--old-rev e9b80a9] [--zst-max-docs N]

Each corpus is synthetic: documents of 5..20 English words (``tests.conftest.WORDS``) in 4 JSONL shards in a
folder (the old code reads that too), tokenized with the teacher's tokenizer (SmolLM2's, from ``$RD_CACHE`` /
``.cache`` / ``/work/cache``; the tests' tiny BPE if absent). Every packing runs in its own process, the old
code from ``git archive <old-rev>`` of this repository; the parent samples the process tree's RSS (workers
included) every 50 ms. Prints a table and writes ``bench/results/pack.json`` with the machine's facts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results" / "pack.json"
SEQ_LEN = 512
SHARDS = 4

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
from refine.core.pack import pack
from refine.core.instances import Instances
from refine.core.tokenizer import load_tokenizer

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

code, corpus, out, workers, tokenizer, seq_len = sys.argv[1:7]
tok = load_tokenizer(tokenizer)
tok(["warm up"], add_special_tokens=False)
before = rss_mb()
kw = {"workers": int(workers)} if int(workers) != 1 else {}
t0 = time.perf_counter()
inst = pack(corpus, tok, int(seq_len), out, quiet=True, **kw)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
inst = Instances(out)
after_pack = rss_mb()
rows = np.random.default_rng(0).integers(0, len(inst), 1000)
t0 = time.perf_counter()
n = sum(len(inst.doc_ids(int(r))) for r in rows)
doc_ids_us = (time.perf_counter() - t0) / len(rows) * 1e6
index_bytes = sum(p.stat().st_size for p in inst.folder.iterdir() if p.name.startswith("doc"))
print(json.dumps({"rss_before_mb": before, "peak_rss_mb": peak, "seconds": seconds,
                  "stream_tokens": inst.index["stream_tokens"], "documents": inst.index["documents"],
                  "instances": len(inst), "index_bytes": index_bytes, "doc_ids_us": doc_ids_us,
                  "read_rss_mb": rss_mb() - after_pack, "version": inst.index["version"]}))
"""


def find_tokenizer() -> tuple[str, str]:
    for root in (os.environ.get("RD_CACHE"), REPO / ".cache", "/work/cache"):
        if root and (Path(root) / "models" / "smollm2-135m" / "tokenizer.json").is_file():
            return str(Path(root) / "models" / "smollm2-135m"), "SmolLM2-135M (49,152)"
    from tests.conftest import train_tiny_tokenizer

    return str(train_tiny_tokenizer(Path(tempfile.mkdtemp()) / "tok")), "tests' tiny BPE (400)"


def make_corpus(folder: Path, n_docs: int, compress: str = "") -> int:
    """``n_docs`` documents of 5..20 words in SHARDS JSONL shards (``compress``: ``zst``); returns bytes."""
    from tests.conftest import WORDS

    folder.mkdir(parents=True)
    rng = random.Random(n_docs)
    per = -(-n_docs // SHARDS)
    for s in range(SHARDS):
        lines = []
        for i in range(s * per, min((s + 1) * per, n_docs)):
            text = " ".join(rng.choices(WORDS, k=rng.randint(5, 20))).capitalize() + "."
            lines.append(json.dumps({"id": f"doc/{i}", "source": f"s{i % 7}", "text": text}))
        data = ("\n".join(lines) + "\n").encode()
        if compress == "zst":
            import zstandard

            (folder / f"{s:05d}.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(data))
        else:
            (folder / f"{s:05d}.jsonl").write_bytes(data)
    return sum(p.stat().st_size for p in folder.iterdir())


def tree_rss_mb(proc) -> float:
    import psutil

    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def run(code: Path, corpus: str, out: Path, workers: int, tokenizer: str) -> dict:
    import psutil

    child = subprocess.Popen([sys.executable, "-c", CHILD, str(code), corpus, str(out), str(workers), tokenizer,
                              str(SEQ_LEN)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(code), "TOKENIZERS_PARALLELISM": "true"})
    proc, tree_peak = psutil.Process(child.pid), 0.0
    while child.poll() is None:
        tree_peak = max(tree_peak, tree_rss_mb(proc))
        time.sleep(0.05)
    stdout, stderr = child.communicate()
    if child.returncode:
        raise SystemExit(f"packing failed ({code}, workers {workers}):\n{stderr[-3000:]}")
    r = json.loads(stdout.strip().splitlines()[-1])
    r["tree_peak_rss_mb"] = tree_peak
    r["tok_s"] = r["stream_tokens"] / r["seconds"]
    return r


def old_code(rev: str, into: Path) -> Path:
    """The packages at ``rev`` (``git archive``: no worktree, nothing of the repository changed)."""
    into.mkdir()
    archive = subprocess.run(["git", "archive", rev, "refine"], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def machine() -> dict:
    import tokenizers

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "memory_gb": round(os.sysconf("SC_PHYS_PAGES") *
            os.sysconf("SC_PAGE_SIZE") / 2**30, 1), "load_average_at_start": os.getloadavg(),
            "python": platform.python_version(), "tokenizers": tokenizers.__version__, "numpy": np.__version__,
            "platform": platform.platform()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, nargs="+", default=[10_000, 1_000_000])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--zst-max-docs", type=int, default=100_000, help="the .jsonl.zst variant up to this size")
    ap.add_argument("--old-rev", default="e9b80a9", help="the commit before the document arrays ('' to skip)")
    a = ap.parse_args()
    tokenizer, tok_name = find_tokenizer()
    facts = machine()
    rows = []
    with tempfile.TemporaryDirectory(prefix="pack_bench_") as tmp:
        tmp = Path(tmp)
        old = old_code(a.old_rev, tmp / "old") if a.old_rev else None
        for n in a.docs:
            corpus = tmp / f"corpus{n}"
            size = make_corpus(corpus, n)
            runs = ([("before: docs.json", old, str(corpus), 1)] if old else []) + \
                [(f"after, workers {w}", REPO, str(corpus), w) for w in a.workers]
            zst, zst_size = tmp / f"zst{n}", 0
            if n <= a.zst_max_docs:                      # the same documents as .jsonl.zst shards, by a glob
                zst_size = make_corpus(zst, n, "zst")
                runs.append(("after, .jsonl.zst shards", REPO, f"{zst}/*.jsonl.zst", 1))
            for label, code, path, workers in runs:
                r = run(code, path, tmp / f"out{n}-{len(rows)}", workers, tokenizer)
                mb = (zst_size if "zst" in label else size) / 2**20
                r.update(variant=label, corpus_docs=n, corpus_mb=round(mb, 1))
                rows.append(r)
                print(f"{n:>9,} docs  {label:<26} {r['tok_s']:>10,.0f} tok/s  peak RSS {r['peak_rss_mb']:7.0f} MB "
                      f"(tree {r['tree_peak_rss_mb']:.0f}, +{r['peak_rss_mb'] - r['rss_before_mb']:.0f} over the "
                      f"loaded tokenizer)", flush=True)
    print("\n| documents | variant | tokens | s | tok/s | peak RSS MB (+ over start) | tree peak RSS MB | "
          "index MB | open + doc_ids RSS MB | doc_ids us |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['corpus_docs']:,} | {r['variant']} | {r['stream_tokens']:,} | {r['seconds']:.1f} | "
              f"{r['tok_s']:,.0f} | {r['peak_rss_mb']:.0f} (+{r['peak_rss_mb'] - r['rss_before_mb']:.0f}) | "
              f"{r['tree_peak_rss_mb']:.0f} | {r['index_bytes'] / 2**20:.1f} | {r['read_rss_mb']:+.0f} | "
              f"{r['doc_ids_us']:.1f} |")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": facts, "tokenizer": tok_name, "seq_len": SEQ_LEN, "shards": SHARDS,
                                   "old_rev": a.old_rev, "rows": rows}, indent=2) + "\n")
    print(f"-> {RESULTS}")


if __name__ == "__main__":
    main()
