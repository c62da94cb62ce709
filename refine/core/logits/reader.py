"""Read a finished logits store (``refine.core.logits.format``) by global instance index, and check it.

Reads are memory-mapped raw arrays or one instance's compact frames; a truncated or corrupt shard, a bad
``store.json`` or a read that would give a wrong id or a NaN is one ``InputError`` line naming the file. The
``check_*`` methods refuse, in one line, the pairings training must not make (another tokenizer, other instances,
the ``tail`` policy on a store without per-position kept mass).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from refine.core.errors import InputError
from refine.core.instances import Instances
from refine.core.logits.compact_decoder import CorruptShard, ShardDecoder
from refine.core.logits.format import CODECS, FORMAT, VERSION, StoreHeader, check_index, raw_sizes
from refine.core.logits.rows import SparseRows, pad
from refine.core.manifest import sha256_file


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
        check_index(path, self.header, index)
        self.index, self.count = index, int(index["count"])
        self._shards = [self._open(s, verify is True) for s in index["shards"]]
        self._unverified = set(range(len(self._shards))) if verify == "lazy" and self.header.codec == "raw" else set()
        self._starts = np.cumsum([0] + [s["instances"] for s in index["shards"]])

    def _open(self, entry: dict, verify: bool):
        path = self.folder / entry["file"]
        if not path.resolve().is_relative_to(self.folder.resolve()):      # a link out of the store
            raise InputError(f"{self.folder / 'store.json'}: shard {entry['file']!r} leads outside the store")
        n, pos = entry["instances"], self.header.positions
        sizes = raw_sizes(self.header, entry)
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
        return (mm(0, np.uint8, n * pos).reshape(n, pos), offsets, mm(2, self.header.id_dtype, entry["pairs"]),
                mm(3, self.header.logprob_dtype, entry["pairs"]))

    def __len__(self) -> int:
        return self.count

    def shard_rows(self, s: int) -> range:
        """The global instance indices of shard ``s``."""
        start = int(self._starts[s])
        return range(start, start + self.index["shards"][s]["instances"])

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

    def padded(self, rows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Instances ``rows`` as [B, L-1, K] arrays (ids, logprobs, mask): ``refine.core.logits.rows.pad``."""
        return pad([self[int(r)] for r in rows], self.header.positions)

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
                             f"refine.core.logits link {self.folder} {inst.folder}")
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
