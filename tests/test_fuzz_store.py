"""Fuzzing the logits-store readers: thousands of mutations (bit flips, overwritten bytes, truncations, appended
bytes, crafted headers, sizes and decompression bombs) of a real raw and a real compact store, read back in a
child process under an address-space cap. Every case must end either in sound rows (ids in the vocabulary,
no NaN, no +inf) or in one ``InputError`` line naming the store: zero other exceptions, zero silent NaNs, and
the child's peak memory stays small. The attacker is assumed to fix up ``store.json`` (sizes, sha256) to
match a mutated shard, as whoever edits a shard can, so the decoders themselves are what is tested.

Run by hand for more cases: ``python tests/test_fuzz_store.py DIR CASES SEED``."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from refine.core.logits.format import MAGIC, STREAMS  # noqa: E402  (the child imports this file by path)
from tests.capped_child import peak_mib, run_capped  # noqa: E402  (the child imports this file by path)

pytestmark = pytest.mark.integration   # real engines, processes or training runs (make test-unit skips)

VOCAB, POSITIONS, K = 49_152, 31, 20
CAP_BYTES = 1 << 30          # address-space cap of the child: under one bomb, so an inflated one fails
BOMB = 1 << 30               # a decompression bomb's content: 1 GiB of zeros in a ~32 KB frame


def build_stores(root: Path) -> None:
    from refine.core.logits import LogitsWriter, StoreHeader

    rng = np.random.default_rng(0)
    for codec in ("raw", "zstd"):
        writer = LogitsWriter(root / codec, StoreHeader(VOCAB, "fuzz", 0.95, K, POSITIONS, codec=codec))
        shards = []
        for s in range(2):
            n = 6
            ids = np.stack([rng.choice(VOCAB, K, replace=False) for _ in range(n * POSITIONS)]).reshape(n, POSITIONS, K)
            z = -np.sort(-rng.normal(size=(n, POSITIONS, K)) * 3, axis=-1)
            lps = (z - np.log(np.exp(z).sum(-1, keepdims=True)) - 0.2).astype(np.float32)
            shards.append(writer.write_shard(s, ids, lps))
        writer.finish(shards)


# ---- the compact shard's parts, to craft headers -------------------------------------------------------------

def parse_compact(data: bytes) -> dict:
    import zstandard

    (index_len,) = struct.unpack("<I", data[4:8])
    index = zstandard.ZstdDecompressor().decompress(data[8:8 + index_len])
    n, t, vocab, k, levels = np.frombuffer(index[:20], dtype="<u4").tolist()
    at = 28 + 4 * (levels + 1)
    sizes = np.frombuffer(index[at:at + 4 * k * 32], dtype="<u4").copy()
    at += 4 * k * 32
    frame_sizes = np.frombuffer(index[at:at + 4 * STREAMS * n], dtype="<u4").copy()
    at += 4 * STREAMS * n
    ends = np.cumsum(frame_sizes.astype(np.int64)) + 8 + index_len
    frames = [data[int(a):int(b)] for a, b in zip(np.concatenate([[8 + index_len], ends[:-1]]), ends)]
    return {"head": [n, t, vocab, k, levels], "scale": struct.unpack("<d", index[20:28])[0],
            "centroids": np.frombuffer(index[28:28 + 4 * (levels + 1)], dtype="<f4").copy(), "sizes": sizes,
            "table": index[at:], "frames": frames}


def assemble_compact(p: dict, index_frame: bytes | None = None, index_len: int | None = None) -> bytes:
    import zstandard

    frame_sizes = np.array([len(f) for f in p["frames"]], dtype="<u4")
    index = b"".join([np.array(p["head"], dtype="<u4").tobytes(), struct.pack("<d", p["scale"]),
                      p["centroids"].astype("<f4").tobytes(), p["sizes"].astype("<u4").tobytes(),
                      frame_sizes.tobytes(), p["table"]])
    index = index_frame if index_frame is not None else zstandard.ZstdCompressor().compress(index)
    length = len(index) if index_len is None else index_len
    return b"".join([MAGIC, struct.pack("<I", length), index, *p["frames"]])


def zero_bomb(size: int, declare: bool) -> bytes:
    """A zstd frame of ``size`` zero bytes, its content size in the header or not (streamed, never held)."""
    import zstandard

    cobj = zstandard.ZstdCompressor(level=1).compressobj(size=size if declare else -1)
    chunk, out = bytes(1 << 20), []
    for _ in range(size >> 20):
        out.append(cobj.compress(chunk))
    return b"".join(out) + cobj.flush()


def claims(size: int) -> bytes:
    """A zstd frame header that declares ``size`` bytes of content and holds none."""
    return b"\x28\xb5\x2f\xfd\xe0" + struct.pack("<Q", size) + b"\x01\x00\x00"


def crafted_cases() -> list[tuple[str, str, callable]]:
    """(name, codec, fn(files) -> files): the cases of the issue and their neighbours."""
    def compact(change):
        def fn(files):
            p = parse_compact(files["shard-00000.bin"])
            out = change(p)
            files["shard-00000.bin"] = out if isinstance(out, bytes) else assemble_compact(p)
            return files
        return fn

    def setp(key, value, idx=None):
        def change(p):
            if idx is None:
                p[key] = value
            else:
                p[key][idx] = value
        return change

    def frame(i, data):
        def change(p):
            p["frames"][i] = data
        return change

    def raw(section, value, at=0):
        def fn(files):
            n, pairs = 6, int(files["_pairs0"])
            data = bytearray(files["shard-00000.bin"])
            offset = {"counts": 0, "offsets": n * POSITIONS, "ids": n * POSITIONS + (n + 1) * 8,
                      "lps": n * POSITIONS + (n + 1) * 8 + 2 * pairs}[section]
            data[offset + at:offset + at + len(value)] = value
            files["shard-00000.bin"] = bytes(data)
            return files
        return fn

    def store_json(change):
        def fn(files):
            index = json.loads(files["store.json"])
            out = change(index)
            files["store.json"] = out if isinstance(out, bytes) else json.dumps(index).encode()
            return files
        return fn

    def shard0(key, value):
        def change(index):
            index["shards"][0][key] = value
        return change

    def header(key, value):
        def change(index):
            index["header"][key] = value
        return change

    return [
        ("compact: scale -1", "zstd", compact(setp("scale", -1.0))),
        ("compact: scale NaN", "zstd", compact(setp("scale", float("nan")))),
        ("compact: scale 1e300", "zstd", compact(setp("scale", 1e300))),
        ("compact: centroid NaN", "zstd", compact(setp("centroids", np.nan, 3))),
        ("compact: centroid 5.0", "zstd", compact(setp("centroids", 5.0, 3))),
        ("compact: 0 clusters", "zstd", compact(setp("head", 0, 3))),
        ("compact: 1000 levels", "zstd", compact(setp("head", 1000, 4))),
        ("compact: a 2^31-entry id table", "zstd", compact(setp("sizes", 1 << 31, 5))),
        ("compact: index length 2^32-1", "zstd", compact(lambda p: assemble_compact(p, index_len=2**32 - 1))),
        ("compact: 1 GiB index bomb, size declared", "zstd",
         compact(lambda p: assemble_compact(p, index_frame=zero_bomb(BOMB, True)))),
        ("compact: 1 GiB index bomb, size not declared", "zstd",
         compact(lambda p: assemble_compact(p, index_frame=zero_bomb(BOMB, False)))),
        ("compact: 1 GiB clusters frame", "zstd", compact(frame(0, zero_bomb(BOMB, True)))),
        ("compact: 1 GiB counts frame, size not declared", "zstd", compact(frame(1, zero_bomb(BOMB, False)))),
        ("compact: frame header claiming 1 TB", "zstd", compact(frame(2, claims(1 << 40)))),
        ("compact: index header claiming 1 TB", "zstd",
         compact(lambda p: assemble_compact(p, index_frame=claims(1 << 40)))),
        ("raw: offsets decreasing", "raw", raw("offsets", struct.pack("<q", 10**6), at=8)),
        ("raw: id 65535 in a 49,152 vocabulary", "raw", raw("ids", struct.pack("<H", 65535))),
        ("raw: NaN log-prob", "raw", raw("lps", np.float16(np.nan).tobytes())),
        ("raw: +inf log-prob", "raw", raw("lps", np.float16(np.inf).tobytes())),
        ("raw: counts not adding up to the offsets", "raw", raw("counts", b"\xff")),
        ("store.json: shard file ../../etc/passwd", "raw", store_json(shard0("file", "../../etc/passwd"))),
        ("store.json: shard file /etc/passwd", "zstd", store_json(shard0("file", "/etc/passwd"))),
        ("store.json: 2^40 instances", "zstd", store_json(lambda index: index.update(count=(1 << 40) + 6) or
                                                          shard0("instances", 1 << 40)(index))),
        ("store.json: 2^40 positions", "zstd", store_json(header("positions", 1 << 40))),
        ("store.json: id_dtype object", "raw", store_json(header("id_dtype", "object"))),
        ("store.json: pairs a string", "raw", store_json(shard0("pairs", "many"))),
        ("store.json: 100,000-deep JSON", "raw", store_json(lambda index: b"[" * 100_000 + b"]" * 100_000)),
    ]


# ---- the child: mutate, read, classify -----------------------------------------------------------------------

def _mutate(files: dict, rng: np.random.Generator) -> str:
    target = "store.json" if rng.random() < 0.1 else f"shard-0000{int(rng.integers(2))}.bin"
    data = bytearray(files[target])
    kind = rng.choice(["flip", "bytes", "truncate", "extend"], p=[0.5, 0.25, 0.15, 0.1])
    if kind == "flip":
        for _ in range(int(rng.integers(1, 9))):
            bit = int(rng.integers(len(data) * 8))
            data[bit // 8] ^= 1 << (bit % 8)
    elif kind == "bytes":
        at = int(rng.integers(len(data)))
        data[at:at + int(rng.integers(1, 9))] = rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8).tobytes()
    elif kind == "truncate":
        del data[int(rng.integers(len(data))):]
    else:
        data += rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    files[target] = bytes(data)
    return f"{kind} {target}"


def _fix_up(folder: Path, files: dict) -> None:
    """What an attacker does after editing a shard: the sizes and sha256 in store.json made to match."""
    from refine.core.manifest import sha256_bytes

    try:
        index = json.loads(files["store.json"])
        for e in index["shards"]:
            data = files.get(e["file"])
            if isinstance(data, bytes):
                e["bytes"], e["sha256"] = len(data), sha256_bytes(data)
        files["store.json"] = json.dumps(index).encode()
    except (ValueError, KeyError, TypeError, RecursionError):
        pass                                      # a mutated store.json stays as mutated


def _read_all(folder: Path, verify) -> str:
    """'ok' when every row is sound, 'error: <line>' for an InputError; anything else escapes."""
    from refine.core.errors import InputError
    from refine.core.logits import LogitsStore

    try:
        store = LogitsStore(folder, verify=verify)
        for i in range(len(store)):
            r = store[i]
            if np.isnan(r.logprobs).any() or (r.logprobs == np.inf).any():
                return "nan"
            if len(r.counts) != POSITIONS or len(r.ids) != int(r.counts.sum()) or (r.ids >= VOCAB).any() \
                    or (r.ids < 0).any() or len(r.logprobs) != len(r.ids):
                return "unsound"
        return "ok"
    except InputError as e:
        return f"error: {e}"


def run_cases(root: Path, cases: int, seed: int) -> dict:
    """The child's work; returns counts, peak memory and the crafted cases' lines."""
    import traceback

    pristine = {codec: {p.name: p.read_bytes() for p in (root / codec).iterdir()} for codec in ("raw", "zstd")}
    for codec in pristine:
        pristine[codec]["_pairs0"] = str(json.loads(pristine[codec]["store.json"])["shards"][0]["pairs"])
    scratch = root / "case"
    scratch.mkdir()
    rng = np.random.default_rng(seed)
    counts = {"ok": 0, "error": 0, "nan": 0, "unsound": 0, "traceback": 0, "multi_line": 0, "unnamed": 0}
    crafted, bad = {}, []
    jobs = [(name, codec, fn) for name, codec, fn in crafted_cases()]
    jobs += [(None, str(rng.choice(["raw", "zstd"])), None) for _ in range(cases)]
    for name, codec, fn in jobs:
        files = dict(pristine[codec])
        what = name or _mutate(files, rng)
        if fn is not None:
            files = fn(files)
        if name or rng.random() < 0.8:
            _fix_up(scratch, files)
        for p in scratch.iterdir():               # new inodes: nothing still maps the old bytes
            p.unlink()
        for fname, data in files.items():
            if not fname.startswith("_"):
                (scratch / fname).write_bytes(data)
        verify = False if name else [False, "lazy", True][int(rng.integers(3))]
        try:
            outcome = _read_all(scratch, verify)
        except Exception:  # noqa: BLE001 - the point: count and show what escaped
            outcome = "traceback"
            bad.append(f"{what}: {traceback.format_exc(limit=3)}")
        kind = outcome.split(":")[0]
        counts[kind] += 1
        if kind == "error" and "\n" in outcome:
            counts["multi_line"] += 1
        if kind == "error" and str(scratch) not in outcome:
            counts["unnamed"] += 1
            bad.append(f"{what}: {outcome}")
        if kind in ("nan", "unsound"):
            bad.append(f"{what}: {outcome}")
        if name:
            crafted[name] = outcome
    return {"cases": len(jobs), "random": cases, "counts": counts, "peak_rss_mib": peak_mib(),
            "cap_gib": CAP_BYTES / 2**30, "crafted": crafted, "bad": bad[:10]}


def fuzz(root: Path, cases: int, seed: int) -> dict:
    """Build the stores here, run the cases in a child capped at ``CAP_BYTES`` of address space."""
    build_stores(root)
    return run_capped("tests.test_fuzz_store", root, cases, seed, CAP_BYTES, timeout=300)


def test_fuzzed_stores_end_in_sound_rows_or_one_line(tmp_path):
    out = fuzz(tmp_path, cases=4000, seed=0)
    print(json.dumps({k: v for k, v in out.items() if k != "crafted"}, indent=1))
    for name, line in out["crafted"].items():
        print(f"{name:<48} -> {line}")
    c = out["counts"]
    assert c["traceback"] == c["nan"] == c["unsound"] == c["multi_line"] == c["unnamed"] == 0, out["bad"]
    assert all(line.startswith("error: ") for line in out["crafted"].values()), out["crafted"]
    assert c["error"] > 1000 and c["ok"] > 100            # both outcomes are exercised
    assert out["peak_rss_mib"] < 512, out                  # the 1 GiB bombs and 1 TB claims were never inflated


def test_a_crafted_store_is_one_line_from_the_cli(tmp_path):
    """``python -m refine.core.logits info`` on a scale-NaN compact store: exit 2, one stderr line."""
    build_stores(tmp_path)
    name, _, fn = crafted_cases()[1]
    folder = tmp_path / "zstd"
    files = fn({p.name: p.read_bytes() for p in folder.iterdir()})
    _fix_up(folder, files)
    for fname, data in files.items():
        (folder / fname).write_bytes(data)
    res = subprocess.run([sys.executable, "-m", "refine.core.logits", "info", str(folder)], cwd=REPO,
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "scale nan" in res.stderr, res.stderr


if __name__ == "__main__":
    print(json.dumps(fuzz(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])), indent=1))
