"""The sparse teacher-logits store (this module alone reads and writes it).

For every instance and every predicted position ``t = 1 .. L-1`` it keeps a sparse teacher next-token
distribution: a variable number ``c_t`` of ``(token id, log-prob)`` pairs, most likely first. Two kinds:

``top_p_k`` (default): the top-p-k truncation; the log-probs are the teacher's *full-softmax* log-probs at
capture temperature 1, so

* the mass the truncation left out is recoverable: ``1 - sum(exp(logprobs))`` (``kept_mass``);
* any KD temperature tau can be applied later: ``softmax(logprobs / tau)`` over the kept ids equals
  ``softmax(z_kept / tau)``, the PD paper's renormalised target.

``sampled`` (RS-KD): ``samples`` draws per position, stored as unique ids with log importance weights
(``refine.core.sparse_sampling``): an unbiased estimate of the teacher distribution. ``1 - sum(exp)`` is the
weight of draws that fell outside the candidates the engine returned. Its temperature is fixed at capture.

Layout: a folder with ``store.json`` (format, version, vocab size, tokenizer hash, p, k, capture tau, dtypes,
positions per instance, codec, shards with sha256) and one binary file per shard, in one of two codecs:

``raw`` (a store.json without ``codec`` is raw: version-1 stores read unchanged), 4 B per pair + 1 per position::

    counts   uint8  [n, L-1]        c_t per position
    offsets  int64  [n + 1]         first pair of each instance (cumulative counts)
    ids      uint16|uint32 [pairs]  token ids
    logprobs float16 [pairs]        full-softmax log-probs

``zstd`` (``refine.core.logits_codec``, the default for new stores): ids exact, ``sqrt(p)`` quantised to 48 levels,
zstd frames per instance; under a third of raw's bytes (``bench/logits_store_bench.py``: bench/README.md). Its
reader returns each position's pairs most likely first (ties by id) with float32 log-probs of the quantised
values. A copy into another compact store (the refine stage's kept subset) keeps every id; a value stays within
its level's width (each shard decodes a level to its own mean, and each position to its stored mass).
``convert`` changes a store's codec; ``retruncate --codec`` cuts and converts in one go.

Shards are written atomically; reads are by instance index (memory-mapped raw arrays, or one instance's zstd
frames); a truncated or corrupt shard is one clear error.

``store.json`` also records the packed instances the logits were scored on (``instances``: their tokens' sha256,
count, length; for a subset such as the refined ``instances/``, its parent's sha256 and a hash of the row
mapping). Training refuses any other instances (``check_aligned``): the same count is not the same text.
A store written before that record is linked once by hand: ``python -m refine.core.logits_store link STORE INSTANCES``.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from refine.core.errors import InputError
from refine.core.instances import Instances, dtype_for
from refine.core.logits_codec import CorruptShard, ShardDecoder, encode_shard
from refine.core.manifest import atomic_path, sha256_bytes, sha256_file, write_json_atomic

# version 2 added ``codec`` (version-1 stores are raw); version 3 compact shards store each position's kept mass
FORMAT, VERSION = "rd-logits", 3
LOGPROB_DTYPE = np.dtype(np.float16)  # the raw codec's; compact stores decode to float32
MAX_K = 255  # counts are uint8
CODECS = ("raw", "zstd")


@dataclass(frozen=True)
class StoreHeader:
    vocab_size: int
    tokenizer_hash: str
    top_p: float
    top_k: int
    positions: int                  # predicted positions per instance (seq_len - 1)
    capture_temperature: float = 1.0
    id_dtype: str = "uint16"
    logprob_dtype: str = LOGPROB_DTYPE.name
    format: str = FORMAT
    version: int = VERSION
    kind: str = "top_p_k"           # top_p_k | sampled (RS-KD, refine.core.sparse_sampling)
    samples: int = 0                # sampled: draws per position
    sample_temperature: float = 1.0  # sampled: proposal q ∝ p^(1/t)
    codec: str = "raw"              # raw | zstd (refine.core.logits_codec)


def instances_record(inst: Instances) -> dict:
    """What a store records of the instances it is aligned with (``LogitsStore.check_aligned``)."""
    record = {"tokens_sha256": inst.index["tokens_sha256"], "count": len(inst), "seq_len": inst.seq_len}
    if "subset_of" in inst.index:
        rows = np.asarray(inst.subset["parent_rows"], dtype="<i8")
        record["subset_of"] = {"tokens_sha256": inst.index["parent_sha256"],
                               "rows_sha256": sha256_bytes(rows.tobytes())}
    return record


def truncate_top_p_k(topk_logprobs: np.ndarray, top_p: float, top_k: int) -> np.ndarray:
    """How many of the (sorted) candidates to keep per position: top-p first, then at most top-k.

    Top-p keeps the smallest prefix whose probability reaches ``top_p`` (the token that crosses it included),
    measured on the full-softmax probabilities; top-k then caps it. At least one token is always kept.
    """
    probs = np.exp(topk_logprobs.astype(np.float64))
    mass_before = np.cumsum(probs, axis=-1) - probs
    n_p = (mass_before < top_p).sum(axis=-1)
    return np.clip(n_p, 1, top_k).astype(np.uint8)


@dataclass
class SparseRows:
    """The kept pairs of one instance: ``ids``/``logprobs`` flat, ``counts`` per position."""
    counts: np.ndarray
    ids: np.ndarray
    logprobs: np.ndarray

    def kept_mass(self) -> np.ndarray:
        """Per-position probability mass of the kept ids (1 - the mass the truncation dropped)."""
        pos = np.repeat(np.arange(len(self.counts)), self.counts)
        # bincount, not reduceat: a position with no pairs (all RS-KD draws in the tail) must give 0
        return np.bincount(pos, weights=np.exp(self.logprobs.astype(np.float64)), minlength=len(self.counts))

    def dense(self, vocab_size: int, temperature: float = 1.0) -> np.ndarray:
        """[positions, vocab] renormalised target ``softmax(logprobs / tau)`` over kept ids, zero elsewhere."""
        out = np.zeros((len(self.counts), vocab_size), dtype=np.float64)
        pos = np.repeat(np.arange(len(self.counts)), self.counts)
        z = self.logprobs.astype(np.float64) / temperature
        zmax = np.full(len(self.counts), -np.inf)
        np.maximum.at(zmax, pos, z)
        e = np.exp(z - zmax[pos])
        out[pos, self.ids] = e / np.bincount(pos, weights=e, minlength=len(self.counts))[pos]
        return out


class LogitsWriter:
    """Append instances' truncated top-K in instance order; each ``write_shard`` call is one shard file."""

    def __init__(self, folder: str | Path, header: StoreHeader):
        if not 1 <= header.top_k <= MAX_K:
            raise InputError(f"logits top_k must be in 1..{MAX_K}, got {header.top_k}")
        if not 0 < header.top_p <= 1:
            raise InputError(f"logits top_p must be in (0, 1], got {header.top_p}")
        if header.codec not in CODECS:
            raise InputError(f"unknown logits codec {header.codec!r} ({' | '.join(CODECS)})")
        self.folder = Path(folder)
        lp_dtype = LOGPROB_DTYPE.name if header.codec == "raw" else "float32"     # what the reader returns
        self.header = StoreHeader(**{**asdict(header), "id_dtype": dtype_for(header.vocab_size).name,
                                     "logprob_dtype": lp_dtype, "version": VERSION})
        self.folder.mkdir(parents=True, exist_ok=True)

    def shard_path(self, shard: int) -> Path:
        return self.folder / f"shard-{shard:05d}.bin"

    def write_shard(self, shard: int, topk_ids: np.ndarray, topk_logprobs: np.ndarray,
                    counts: np.ndarray | None = None) -> dict:
        """Write [n, L-1, K] sorted candidates as shard ``shard``, keeping the first ``counts`` [n, L-1] of each
        position (default: the top-p-k rule); return its entry."""
        positions = topk_ids.shape[1]
        if positions != self.header.positions:
            raise ValueError(f"expected {self.header.positions} positions per instance, got {positions}")
        if counts is None:
            counts = truncate_top_p_k(topk_logprobs, self.header.top_p, self.header.top_k)
        keep = np.arange(topk_ids.shape[-1]) < counts[..., None]          # prefix mask, row-major order kept
        return self._write(shard, counts, topk_ids[keep], topk_logprobs[keep])

    def write_rows(self, shard: int, rows: list[SparseRows]) -> dict:
        """Write already-truncated instances (e.g. the kept subset of another store) as shard ``shard``."""
        return self._write(shard, np.stack([r.counts for r in rows]), np.concatenate([r.ids for r in rows]),
                           np.concatenate([r.logprobs for r in rows]))

    def _write(self, shard: int, counts: np.ndarray, ids: np.ndarray, lps: np.ndarray) -> dict:
        n = counts.shape[0]
        offsets = np.concatenate([[0], np.cumsum(counts.reshape(n, -1).sum(1, dtype=np.int64))]).astype(np.int64)
        path = self.shard_path(shard)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            if self.header.codec == "zstd":
                f.write(encode_shard(counts.reshape(n, -1), ids, lps, self.header.vocab_size))
            else:
                for arr, dt in ((counts, np.uint8), (offsets, np.int64), (ids, self.header.id_dtype),
                                (lps, LOGPROB_DTYPE)):
                    f.write(np.ascontiguousarray(arr, dtype=dt).tobytes())
        return {"file": path.name, "instances": n, "pairs": int(offsets[-1]), "bytes": path.stat().st_size,
                "sha256": sha256_file(path)}

    def finish(self, shards: list[dict], extra: dict | None = None, instances: Instances | None = None) -> dict:
        """Write ``store.json``; ``instances``: the packed instances these logits were scored on (row i of the
        store is row i of ``instances``), recorded so training can refuse any others."""
        index = {"header": asdict(self.header), "shards": shards,
                 "count": sum(s["instances"] for s in shards), **(extra or {})}
        if instances is not None:
            index["instances"] = instances_record(instances)
        write_json_atomic(self.folder / "store.json", index)
        return index


MAX_POSITIONS = 1 << 20   # predicted positions per instance: far beyond any context, so no bound on real data
MAX_VOCAB = 1 << 32       # ids are at most uint32


def _check_index(path: Path, h: StoreHeader, index: dict) -> None:
    """store.json's numbers, before any of them sizes an allocation or a read: one line naming what is wrong."""
    def ok_int(v, lo, hi) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi

    shards = index.get("shards")
    problem = ("vocab_size" if not ok_int(h.vocab_size, 1, MAX_VOCAB) else
               "positions" if not ok_int(h.positions, 1, MAX_POSITIONS) else
               "id_dtype" if h.id_dtype not in ("uint16", "uint32") or np.dtype(h.id_dtype).itemsize < 4
               and h.vocab_size > 65536 else
               "logprob_dtype" if h.logprob_dtype not in ("float16", "float32") else
               "shards" if not isinstance(shards, list) or not all(isinstance(e, dict) for e in shards) else "")
    for i, e in enumerate(shards if not problem else []):
        f, n = e.get("file"), e.get("instances")
        if not (isinstance(f, str) and f not in ("", ".", "..") and "/" not in f and "\\" not in f):
            problem = f"shard {i} file {f!r} (a file name inside the store, please)"
        elif not ok_int(n, 0, 1 << 40) or not ok_int(e.get("pairs"), 0, n * h.positions * MAX_K) \
                or not ok_int(e.get("bytes"), 0, 1 << 50) or not isinstance(e.get("sha256"), str):
            problem = f"shard {i} instances/pairs/bytes/sha256"
        if problem:
            break
    if not problem and index.get("count") != sum(e["instances"] for e in shards):
        problem = "count (not the sum of the shards' instances)"
    if problem:
        raise InputError(f"{path}: bad {problem}")


@contextmanager
def _corrupt_is_input_error(path: Path):
    try:
        yield
    except CorruptShard as e:
        raise InputError(f"{path}: corrupt logits shard ({e})") from None


class LogitsStore:
    """Memory-mapped reads of a finished store by global instance index.

    ``verify``: True checks every shard's sha256 now; "lazy" (what training uses) checks a raw shard the first
    time one of its instances is read, so a bit flip is an error, not a wrong target, at one read of each
    shard (a compact shard's zstd frames carry their own checksums); False trusts the files.
    """

    def __init__(self, folder: str | Path, verify: bool | str = False):
        self.folder = Path(folder)
        path = self.folder / "store.json"
        if not path.is_file():
            raise InputError(f"not a logits store (no store.json): {self.folder}")
        try:
            index = json.loads(path.read_text())
            self.header = StoreHeader(**index["header"])
        except (ValueError, KeyError, TypeError, RecursionError):   # ValueError: bad JSON or UTF-8
            raise InputError(f"corrupt store.json in {self.folder}") from None
        h = self.header
        if h.format != FORMAT or h.version not in (1, 2, VERSION) or h.codec not in CODECS:
            raise InputError(f"{self.folder}: unsupported logits format {self.header.format} v{self.header.version} "
                             f"codec {self.header.codec}")
        _check_index(path, self.header, index)
        self.index, self.count = index, int(index["count"])
        self._shards = [self._open(s, verify is True) for s in index["shards"]]
        self._unverified = set(range(len(self._shards))) if verify == "lazy" and self.header.codec == "raw" else set()
        self._starts = np.cumsum([0] + [s["instances"] for s in index["shards"]])

    def _open(self, entry: dict, verify: bool):
        path = self.folder / entry["file"]
        if not path.resolve().is_relative_to(self.folder.resolve()):      # a link out of the store
            raise InputError(f"{self.folder / 'store.json'}: shard {entry['file']!r} leads outside the store")
        n, pos = entry["instances"], self.header.positions
        id_dt, lp_dt = np.dtype(self.header.id_dtype), np.dtype(self.header.logprob_dtype)
        sizes = [n * pos, (n + 1) * 8, entry["pairs"] * id_dt.itemsize, entry["pairs"] * lp_dt.itemsize]
        expected = sum(sizes) if self.header.codec == "raw" else entry["bytes"]
        actual = path.stat().st_size if path.is_file() else -1
        if actual != expected:
            raise InputError(f"{path}: truncated or missing logits shard ({actual} bytes, expected {expected})")
        if verify and sha256_file(path) != entry["sha256"]:
            raise InputError(f"{path}: checksum mismatch (corrupt logits shard)")
        if self.header.codec == "zstd":
            with _corrupt_is_input_error(path):
                if actual < 8:                      # (an empty file cannot even be memory-mapped)
                    raise CorruptShard(f"{actual} bytes, not a compact shard")
                return ShardDecoder(np.memmap(path, dtype=np.uint8, mode="r"), n, pos, self.header.vocab_size)
        starts = np.cumsum([0] + sizes)
        mm = lambda i, dt, count: np.memmap(path, dtype=dt, mode="r", offset=int(starts[i]), shape=(count,))
        offsets = mm(1, np.int64, n + 1)
        if offsets[0] != 0 or offsets[-1] != entry["pairs"] or (np.diff(offsets) < 0).any():
            raise InputError(f"{path}: corrupt logits shard (instance offsets not increasing from 0 to "
                             f"{entry['pairs']})")
        return (mm(0, np.uint8, n * pos).reshape(n, pos), offsets, mm(2, id_dt, entry["pairs"]),
                mm(3, lp_dt, entry["pairs"]))

    def __len__(self) -> int:
        return self.count

    def verify(self, shards=None) -> None:
        for s in range(len(self._shards)) if shards is None else shards:
            entry = self.index["shards"][s]
            if sha256_file(self.folder / entry["file"]) != entry["sha256"]:
                raise InputError(f"{self.folder / entry['file']}: checksum mismatch (corrupt logits shard)")

    def __getitem__(self, i: int) -> SparseRows:
        if not 0 <= i < self.count:
            raise IndexError(i)
        s = int(np.searchsorted(self._starts, i, side="right") - 1)
        j = int(i - self._starts[s])
        if s in self._unverified:
            self.verify([s])
            self._unverified.discard(s)
        if self.header.codec == "zstd":
            with _corrupt_is_input_error(self.folder / self.index["shards"][s]["file"]):
                return SparseRows(*self._shards[s].decode(j))
        counts, offsets, ids, lps = self._shards[s]
        a, b = int(offsets[j]), int(offsets[j + 1])
        rows = SparseRows(np.asarray(counts[j]), np.asarray(ids[a:b]), np.asarray(lps[a:b]))
        # a wrong id reaches torch.gather (a device-side assert on a GPU), a NaN the loss: checked per read
        problem = ("counts that do not add up to its pairs" if int(rows.counts.sum(dtype=np.int64)) != b - a else
                   "a token id outside the vocabulary" if b > a and int(rows.ids.max()) >= self.header.vocab_size
                   else "a NaN or +inf log-prob" if b > a and not (rows.logprobs < np.inf).all() else "")
        if problem:
            raise InputError(f"{self.folder / self.index['shards'][s]['file']}: corrupt logits shard (instance {j} "
                             f"has {problem})")
        return rows

    def check_tokenizer(self, tokenizer_hash: str) -> None:
        if self.header.tokenizer_hash != tokenizer_hash:
            raise InputError(f"{self.folder}: logits were stored with tokenizer {self.header.tokenizer_hash}, "
                             f"the student uses {tokenizer_hash} (cross-tokenizer KD needs another loss)")

    def check_tail_mass(self) -> None:
        """The ``tail`` policy needs each position's missing mass; compact stores before version 3 kept the mass
        unbiased only per shard, so a position's missing mass was off by several percent."""
        if self.header.codec == "zstd" and self.header.version < 3:
            raise InputError(f"{self.folder}: a compact store of format v{self.header.version} has no per-position "
                             f"kept mass, which kd.missing_mass=tail needs; use kd.missing_mass=renorm, or write the "
                             f"store again (a refine rerun, or convert from its raw source)")

    def check_aligned(self, inst: Instances, what: str = "the instances") -> None:
        """Refuse, in one line, instances other than the ones these logits were scored on."""
        self.check_shape(inst, what)
        record = self.index.get("instances")
        if record is None:
            raise InputError(f"logits store {self.folder} does not record which instances it was scored on (written "
                             f"before that check); if it was scored on {inst.folder}, link it once: python -m "
                             f"refine.core.logits_store link {self.folder} {inst.folder}")
        if record["tokens_sha256"] != inst.index["tokens_sha256"]:
            raise InputError(f"logits store {self.folder} holds teacher logits of other instances than {what} "
                             f"{inst.folder} (tokens sha256 {record['tokens_sha256'][:12]} vs "
                             f"{inst.index['tokens_sha256'][:12]}): same count, other text; use the store written "
                             f"next to those instances")

    def check_shape(self, inst: Instances, what: str = "the instances") -> None:
        if len(self) != len(inst) or self.header.positions != inst.seq_len - 1:
            raise InputError(f"logits store {self.folder} ({len(self)} instances x {self.header.positions + 1} tokens) "
                             f"is not aligned with {what} {inst.folder} ({len(inst)} x {inst.seq_len}); use the store "
                             f"written next to those instances")

    def bytes_per_token(self) -> float:
        total = sum(s["bytes"] for s in self.index["shards"])
        return total / max(self.count * self.header.positions, 1)

    def stats(self, sample: int = 64) -> dict:
        """Bytes and ids per predicted token (exact), mean kept probability mass (over ``sample`` instances)."""
        rows = np.unique(np.linspace(0, len(self) - 1, min(len(self), sample)).astype(int))
        pairs = sum(s["pairs"] for s in self.index["shards"])
        return {"bytes_per_token": self.bytes_per_token(),
                "ids_per_position": pairs / max(self.count * self.header.positions, 1),
                "mean_kept_mass": float(np.mean([self[int(i)].kept_mass().mean() for i in rows]))}

    def padded(self, rows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Instances ``rows`` as [B, L-1, K] arrays (ids, logprobs, mask), K the largest count among them, most
        likely first, padded with id 0 / -inf / False; one scatter per instance, no Python per position."""
        sparse = [self[int(r)] for r in rows]
        b, t = len(sparse), self.header.positions
        k = max(max(int(s.counts.max()) for s in sparse), 1)
        ids = np.zeros((b, t, k), dtype=np.int64)
        lps = np.full((b, t, k), -np.inf, dtype=np.float32)
        mask = np.zeros((b, t, k), dtype=bool)
        for i, s in enumerate(sparse):
            counts = s.counts.astype(np.int64)
            pos = np.repeat(np.arange(t), counts)
            slot = np.arange(len(pos)) - np.repeat(np.cumsum(counts) - counts, counts)   # rank within position
            ids[i, pos, slot], lps[i, pos, slot], mask[i, pos, slot] = s.ids, s.logprobs.astype(np.float32), True
        return ids, lps, mask


def retruncate(src: str | Path, dst: str | Path, top_p: float, top_k: int, shard_size: int = 256,
               codec: str | None = None) -> LogitsStore:
    """A smaller top-p-k store from a larger one, without the teacher: the stored pairs are sorted full-softmax
    log-probs, so applying top-p' then top-k' (p' <= p, k' <= k) to them gives exactly what a teacher pass
    with (p', k') would have stored (from a compact source: to within its quantisation). Storage-vs-quality
    sweeps use it. ``codec``: the new store's (default: the source's)."""
    store = LogitsStore(src)
    h = store.header
    if h.kind != "top_p_k":
        raise InputError(f"{src}: a {h.kind} store cannot be re-truncated with top-p-k")
    if top_p > h.top_p or top_k > h.top_k:
        raise InputError(f"{src} holds top-{h.top_p}-{h.top_k}; it cannot give top-{top_p}-{top_k}")
    writer = LogitsWriter(dst, StoreHeader(**{**asdict(h), "top_p": top_p, "top_k": top_k,
                                              "codec": codec or h.codec}))
    shards = []
    for s, start in enumerate(range(0, len(store), shard_size)):
        ids, lps, mask = store.padded(range(start, min(start + shard_size, len(store))))
        # padding has probability 0, so top-p could count it where the stored mass is below p': cap by the mask
        counts = np.minimum(truncate_top_p_k(lps, top_p, top_k), mask.sum(-1))
        shards.append(writer.write_shard(s, ids, lps, counts.astype(np.uint8)))
    writer.finish(shards, extra=_extra(store))
    return LogitsStore(dst)


def _extra(store: LogitsStore) -> dict:
    return {k: v for k, v in store.index.items() if k not in ("header", "shards", "count")}


def convert(src: str | Path, dst: str | Path, codec: str, workers: int = 1) -> LogitsStore:
    """The same store (any kind, same shards) in another codec, e.g. an existing raw store made compact.
    Written next to ``dst`` and renamed over it, so ``dst`` may be ``src``. ``workers``: shards encoded at once
    (threads: the encoder's numpy, scipy and zstd work runs outside the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    store = LogitsStore(src)
    with atomic_path(dst) as tmp:
        writer = LogitsWriter(tmp, StoreHeader(**{**asdict(store.header), "codec": codec}))

        def one(s: int) -> dict:
            start = int(store._starts[s])
            return writer.write_rows(s, [store[i] for i in range(start, start + store.index["shards"][s]["instances"])])

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            shards = list(pool.map(one, range(len(store.index["shards"]))))
        writer.finish(shards, extra=_extra(store))
    return LogitsStore(dst)


def next_token_coverage(store: LogitsStore, inst: Instances, offset: int = 0, sample: int = 64) -> float:
    """Fraction of positions whose actual next token (in row ``r + offset`` of ``inst``) is among the stored ids
    of row ``r``: high for the instances a store was scored on, chance level (``offset`` != 0) for others."""
    rows = np.unique(np.linspace(0, len(store) - 1, min(len(store), sample)).astype(int))
    hits = total = 0
    for r in rows:
        sparse, nxt = store[int(r)], np.asarray(inst.tokens[(int(r) + offset) % len(inst)][1:], dtype=np.int64)
        pos = np.repeat(np.arange(len(sparse.counts)), sparse.counts)
        hits += int(np.unique(pos[sparse.ids.astype(np.int64) == nxt[pos]]).size)
        total += len(nxt)
    return hits / max(total, 1)


def link(store_dir: str | Path, inst_dir: str | Path) -> dict:
    """Record in a store written before ``instances`` records existed which instances it was scored on (once,
    by hand: nothing can prove it). Prints the next-token coverage against those rows and against other rows
    (chance), so a wrong pairing shows."""
    store, inst = LogitsStore(store_dir, verify=True), Instances(inst_dir)
    record = store.index.get("instances")
    if record is not None:
        if record["tokens_sha256"] != inst.index["tokens_sha256"]:
            raise InputError(f"{store.folder} already records the instances it was scored on, and they are not "
                             f"{inst.folder}; it cannot be re-linked")
        return record
    store.check_shape(inst)
    coverage = {"these_rows": next_token_coverage(store, inst), "other_rows": next_token_coverage(store, inst, 1)}
    index = {k: v for k, v in store.index.items() if k != "instances"}
    index["instances"] = {**instances_record(inst), "linked_by_hand": {"next_token_coverage": coverage}}
    write_json_atomic(store.folder / "store.json", index)
    print(f"linked {store.folder} to {inst.folder}: the stored ids hold the next token at "
          f"{coverage['these_rows']:.1%} of positions of those rows ({coverage['other_rows']:.1%} of other rows', "
          f"chance level)")
    return index["instances"]


def main(argv: list[str] | None = None) -> None:
    """``python -m refine.core.logits_store info STORE`` | ``retruncate SRC DST --top-p P --top-k K [--codec C]``
    | ``convert SRC DST --codec C [--workers N]`` | ``link STORE INSTANCES``."""
    import argparse

    from refine.core.errors import exit_on_input_error

    ap = argparse.ArgumentParser(prog="python -m refine.core.logits_store", description=main.__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    info = sub.add_parser("info", help="header, size, bytes/token, mean kept mass; verifies checksums")
    info.add_argument("store")
    rt = sub.add_parser("retruncate", help="a smaller top-p-k store from a larger one (no teacher needed)")
    rt.add_argument("src")
    rt.add_argument("dst")
    rt.add_argument("--top-p", type=float, required=True)
    rt.add_argument("--top-k", type=int, required=True)
    rt.add_argument("--codec", choices=CODECS, help="the new store's codec (default: the source's)")
    cv = sub.add_parser("convert", help="the same store in another codec (e.g. raw -> zstd)")
    cv.add_argument("src")
    cv.add_argument("dst")
    cv.add_argument("--codec", choices=CODECS, required=True)
    cv.add_argument("--workers", type=int, default=1, help="shards encoded at once (threads)")
    ln = sub.add_parser("link", help="record which instances a store written before that record was scored on")
    ln.add_argument("store")
    ln.add_argument("instances")
    a = ap.parse_args(argv)

    @exit_on_input_error
    def run() -> None:
        if a.cmd == "link":
            link(a.store, a.instances)
            return
        if a.cmd == "info":
            store = LogitsStore(a.store, verify=True)
        elif a.cmd == "convert":
            store = convert(a.src, a.dst, a.codec, a.workers)
        else:
            store = retruncate(a.src, a.dst, a.top_p, a.top_k, codec=a.codec)
        print(json.dumps({"folder": str(store.folder), **asdict(store.header), "instances": len(store),
                          **store.stats()}, indent=1))

    run()


if __name__ == "__main__":
    main()
