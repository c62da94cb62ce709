"""Fuzzing the corpus readers (as ``tests/test_fuzz_store.py`` fuzzes the logits store): mutations (bit flips,
overwritten bytes, sizes and offsets claiming GBs, inserted bytes, truncations, appended bytes) of a real corpus
in each reader format (JSONL plain, ``.gz`` and ``.zst``, parquet with dictionary and plain pages, a saved HF
dataset's arrow file), each read through ``iter_documents`` in a child process under an address-space cap. Every
case must end either in sound documents or in one ``InputError`` line naming the file: zero other exceptions,
and the child's peak memory (VmHWM) stays small, whatever sizes a mutated header declares.

Run by hand for more cases: ``python tests/test_fuzz_corpus.py DIR CASES SEED``."""

from __future__ import annotations

import gzip
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.capped_child import peak_mib, run_capped  # noqa: E402  (the child imports this file by path)

pytestmark = pytest.mark.integration   # a child process under a memory cap (make test-unit skips)

CAP_BYTES = 2 << 30          # address-space cap of the child (pyarrow and datasets reserve a few hundred MB)
PEAK_MIB = 512               # what the child may have touched at most
FORMATS = ("jsonl", "jsonl.gz", "jsonl.zst", "parquet", "parquet-plain", "dataset")


def seed_docs(n: int = 60) -> list[dict]:
    rng = np.random.default_rng(0)
    words = "the river king queen letter garden café naïve 日本語 — {x} [y] \"quoted\" back\\slash".split()
    return [{"id": f"doc/{i}", "source": "fuzz", "text": " ".join(rng.choice(words, int(rng.integers(3, 60))))}
            for i in range(n)]


def build_seeds(root: Path) -> dict[str, Path]:
    """One real corpus per reader format under ``root/seeds``."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    seeds = root / "seeds"
    seeds.mkdir(parents=True)
    docs = seed_docs()
    jsonl = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode()
    (seeds / "c.jsonl").write_bytes(jsonl)
    (seeds / "c.jsonl.gz").write_bytes(gzip.compress(jsonl))
    half = len(jsonl) // 2                               # two frames, as shards are often written
    (seeds / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl[:half])
                                        + zstandard.ZstdCompressor().compress(jsonl[half:]))
    table = pa.table({k: [d[k] for d in docs] for k in ("text", "id", "source")})
    # small pages and row groups: page headers, dictionary pages and several row groups to hit
    pq.write_table(table, seeds / "c.parquet", compression="zstd", data_page_size=512, row_group_size=25)
    pq.write_table(table, seeds / "p.parquet", compression="snappy", use_dictionary=False, data_page_size=1024)
    datasets.Dataset.from_dict({k: [d[k] for d in docs] for k in ("text", "id")}).save_to_disk(
        str(seeds / "hf"), max_shard_size="1MB")
    return {"jsonl": seeds / "c.jsonl", "jsonl.gz": seeds / "c.jsonl.gz", "jsonl.zst": seeds / "c.jsonl.zst",
            "parquet": seeds / "c.parquet", "parquet-plain": seeds / "p.parquet", "dataset": seeds / "hf"}


def _target(seed: Path) -> Path:
    """The file a case mutates: the seed itself, or a saved dataset's arrow file."""
    return next(seed.glob("*.arrow")) if seed.is_dir() else seed


def _mutate(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    data = bytearray(data)
    kind = str(rng.choice(["flip", "bytes", "big", "insert", "truncate", "extend"],
                          p=[0.35, 0.15, 0.15, 0.15, 0.1, 0.1]))
    if kind == "flip":
        for _ in range(int(rng.integers(1, 9))):
            bit = int(rng.integers(len(data) * 8))
            data[bit // 8] ^= 1 << (bit % 8)
    elif kind == "bytes":
        at = int(rng.integers(len(data)))
        n = int(rng.integers(1, 9))
        data[at:at + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    elif kind == "big":                                  # a size or offset claiming GBs: LE int or a varint
        at, value = int(rng.integers(len(data))), int(rng.choice([2**31 - 1, 2**32 + 7, 2**40, 2**62]))
        if rng.random() < 0.5:
            data[at:at + 8] = value.to_bytes(8, "little")
        else:
            varint = bytearray()
            while value > 0x7F:
                varint.append(value & 0x7F | 0x80)
                value >>= 7
            data[at:at + int(rng.integers(1, 6))] = bytes(varint) + bytes([value])
    elif kind == "insert":
        at = int(rng.integers(len(data) + 1))
        data[at:at] = rng.integers(0, 256, int(rng.integers(1, 17)), dtype=np.uint8).tobytes()
    elif kind == "truncate":
        del data[int(rng.integers(len(data))):]
    else:
        data += rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    return bytes(data), kind


def _read(path: Path) -> tuple[str, int]:
    """('ok', documents) when every document is sound, ('error: <line>', 0) for an InputError."""
    from refine.core.corpus import iter_documents
    from refine.core.errors import InputError

    try:
        n = 0
        for d in iter_documents(path):
            if not (isinstance(d.text, str) and isinstance(d.id, str) and isinstance(d.source, str)):
                return "unsound", n
            n += 1
        return "ok", n
    except InputError as e:
        return f"error: {e}", 0


def run_cases(root: Path, cases: int, seed: int) -> dict:
    """The child's work: ``cases`` mutations spread over the formats; counts, peak memory, examples."""
    import traceback

    seeds = {f: root / "seeds" / p for f, p in json.loads((root / "seeds.json").read_text()).items()}
    rng = np.random.default_rng(seed)
    counts = {"ok": 0, "error": 0, "unsound": 0, "traceback": 0, "multi_line": 0, "unnamed": 0}
    per_format = {f: {"ok": 0, "error": 0} for f in FORMATS}
    bad, lines = [], {}
    t0 = time.perf_counter()
    for i in range(cases):
        fmt = FORMATS[i % len(FORMATS)]
        src = seeds[fmt]
        case = root / "case" / str(i)                    # a new path each time: nothing maps the old bytes
        case.parent.mkdir(exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, case / src.name)
            path = case / src.name
        else:
            case.mkdir()
            path = case / src.name
        target = _target(path) if src.is_dir() else path
        data, kind = _mutate(_target(src).read_bytes(), rng)
        target.write_bytes(data)
        try:
            outcome, _ = _read(path)
        except Exception:  # noqa: BLE001 - the point: count and show what escaped
            outcome = "traceback"
            bad.append(f"{fmt} {kind}: {traceback.format_exc(limit=4)}")
        k = outcome.split(":")[0]
        counts[k] += 1
        if k in per_format[fmt]:
            per_format[fmt][k] += 1
        if k == "error":
            line = outcome[len("error: "):]
            if "\n" in line:
                counts["multi_line"] += 1
                bad.append(f"{fmt} {kind}: {line}")
            if str(case) not in line:
                counts["unnamed"] += 1
                bad.append(f"{fmt} {kind}: {line}")
            lines.setdefault(f"{fmt}: {line.replace(str(path), 'F')[:60]}", line.replace(str(case), "..."))
        if k == "unsound":
            bad.append(f"{fmt} {kind}: unsound")
        shutil.rmtree(case)
    return {"cases": cases, "counts": counts, "per_format": per_format, "peak_rss_mib": peak_mib(),
            "cap_gib": CAP_BYTES / 2**30, "seconds": round(time.perf_counter() - t0, 1),
            "some_lines": list(lines.values())[:25], "bad": bad[:10]}


def fuzz(root: Path, cases: int, seed: int) -> dict:
    """Build the seeds here, run the cases in a child capped at ``CAP_BYTES`` of address space."""
    seeds = build_seeds(root)
    (root / "seeds.json").write_text(json.dumps({f: p.name for f, p in seeds.items()}))
    return run_capped("tests.test_fuzz_corpus", root, cases, seed, CAP_BYTES, timeout=600,
                      env={"HF_DATASETS_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"})


def test_fuzzed_corpora_end_in_documents_or_one_line(tmp_path):
    out = fuzz(tmp_path, cases=1200, seed=0)
    print(json.dumps({k: v for k, v in out.items() if k != "some_lines"}, indent=1))
    for line in out["some_lines"]:
        print("  ", line[:200])
    c = out["counts"]
    assert c["traceback"] == c["unsound"] == c["multi_line"] == c["unnamed"] == 0, out["bad"]
    assert c["error"] > 500 and c["ok"] > 60, c           # both outcomes are exercised
    assert all(v["error"] > 0 for v in out["per_format"].values()), out["per_format"]
    assert out["peak_rss_mib"] < PEAK_MIB, out


if __name__ == "__main__":
    print(json.dumps(fuzz(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])), indent=1))
