"""The packed-instances format (this module alone reads and writes it).

A folder holds::

    tokens.bin   row-major [count, seq_len] token ids, uint16 if the vocabulary fits, else uint32
    docs.json    the documents in stream order: id, source, first token offset in the stream, token count
    index.json   format/version, dtype, seq_len, count, tokenizer {name, hash, vocab_size, eos_id},
                 sha256 of tokens.bin, tokens dropped at the tail

A *subset* (``write_subset``: e.g. the instances difference sampling kept) has no stream; instead
``subset.json`` records each row's index in the parent folder and the ids of the documents it came from.

Documents are tokenized, each followed by EOS, concatenated into one stream, and cut into rows of
``seq_len`` tokens (the incomplete tail row is dropped and counted). Instance ``i`` covers stream tokens
``[i*seq_len, (i+1)*seq_len)``; ``doc_ids(i)`` recovers which documents it came from. Reads are memory-mapped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refine.core.errors import InputError
from refine.core.manifest import atomic_path, sha256_file

FORMAT = "rd-instances"
VERSION = 1


@dataclass(frozen=True)
class TokenizerInfo:
    name: str
    hash: str
    vocab_size: int
    eos_id: int

    @classmethod
    def of(cls, tok) -> TokenizerInfo:
        from refine.core.tokenizer import tokenizer_hash, tokenizer_name

        return cls(tokenizer_name(tok), tokenizer_hash(tok), len(tok), int(tok.eos_token_id))


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


class InstanceWriter:
    """Stream documents in, get fixed-length rows out. Written to a temp folder, renamed on ``close``."""

    def __init__(self, folder: str | Path, seq_len: int, tokenizer: TokenizerInfo):
        if seq_len < 2:
            raise InputError(f"seq_len must be >= 2, got {seq_len}")
        self.folder, self.seq_len, self.tokenizer = Path(folder), seq_len, tokenizer
        self.dtype = dtype_for(tokenizer.vocab_size)
        self._atomic = atomic_path(self.folder)
        self._tmp = self._atomic.__enter__()
        self._tmp.mkdir(parents=True)
        self._bin = open(self._tmp / "tokens.bin", "wb")
        self._pending = np.empty(0, dtype=self.dtype)
        self._docs: list[dict] = []
        self._stream_len = 0
        self.count = 0

    def add(self, ids: list[int] | np.ndarray, doc_id: str, source: str) -> None:
        """Append one document's token ids (EOS is added here)."""
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.tokenizer.vocab_size):
            raise InputError(f"document {doc_id}: token id outside the vocabulary ({self.tokenizer.vocab_size})")
        arr = np.append(arr, self.tokenizer.eos_id).astype(self.dtype)
        self._docs.append({"id": doc_id, "source": source, "start": self._stream_len, "len": int(arr.size)})
        self._stream_len += int(arr.size)
        self._pending = np.concatenate([self._pending, arr])
        full = self._pending.size // self.seq_len
        if full:
            self._bin.write(self._pending[: full * self.seq_len].tobytes())
            self._pending = self._pending[full * self.seq_len:]
            self.count += full

    def close(self, extra: dict | None = None) -> dict:
        self._bin.close()
        if self.count == 0:
            self._atomic.__exit__(InputError, None, None)
            raise InputError(f"corpus too small: {self._stream_len} tokens make no instance of {self.seq_len}")
        (self._tmp / "docs.json").write_text(json.dumps(self._docs, ensure_ascii=False))
        index = {
            "format": FORMAT, "version": VERSION, "dtype": self.dtype.name, "seq_len": self.seq_len,
            "count": self.count, "tokenizer": self.tokenizer.__dict__, "documents": len(self._docs),
            "stream_tokens": self._stream_len, "dropped_tail_tokens": int(self._pending.size),
            "tokens_sha256": sha256_file(self._tmp / "tokens.bin"), **(extra or {}),
        }
        (self._tmp / "index.json").write_text(json.dumps(index, indent=2))
        self._atomic.__exit__(None, None, None)
        return index

    def abort(self) -> None:
        self._bin.close()
        self._atomic.__exit__(RuntimeError, None, None)


class Instances:
    """Memory-mapped read access to a packed-instances folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index_path = self.folder / "index.json"
        if not index_path.is_file():
            raise InputError(f"not a packed-instances folder (no index.json): {self.folder}")
        try:
            self.index = json.loads(index_path.read_text())
        except (ValueError, RecursionError):       # bad JSON or UTF-8, or nested too deeply
            raise InputError(f"corrupt index.json in {self.folder}") from None
        if not isinstance(self.index, dict):
            raise InputError(f"{index_path}: not a JSON object")
        if self.index.get("format") != FORMAT or self.index.get("version") != VERSION:
            raise InputError(f"{self.folder}: unsupported instances format "
                             f"{self.index.get('format')} v{self.index.get('version')} (want {FORMAT} v{VERSION})")
        # every number that sizes a memory map or a read is checked first (a crafted index.json is one line)
        seq_len, count, dtype, tok = (self.index.get(k) for k in ("seq_len", "count", "dtype", "tokenizer"))
        try:
            self.tokenizer = TokenizerInfo(**tok)
        except TypeError:
            self.tokenizer = None
        ok = lambda v, lo, hi: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi  # noqa: E731
        problem = ("seq_len" if not ok(seq_len, 2, 1 << 24) else "count" if not ok(count, 1, 1 << 48) else
                   "dtype" if dtype not in ("uint16", "uint32") else
                   "tokenizer" if self.tokenizer is None or not ok(self.tokenizer.vocab_size, 1, 1 << 32) else "")
        if problem:
            raise InputError(f"{index_path}: bad {problem}")
        self.seq_len, self.count, self.dtype = seq_len, count, np.dtype(dtype)
        bin_path = self.folder / "tokens.bin"
        expected = self.count * self.seq_len * self.dtype.itemsize
        actual = bin_path.stat().st_size if bin_path.is_file() else -1
        if actual != expected:
            raise InputError(f"{bin_path}: truncated or wrong size ({actual} bytes, index says {expected})")
        self.tokens = np.memmap(bin_path, dtype=self.dtype, mode="r", shape=(self.count, self.seq_len))
        self._docs: list[dict] | None = None
        self._starts: np.ndarray | None = None
        self._subset: dict | None = None

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i):
        return self.tokens[i]

    def check_ids(self, rows: np.ndarray, which) -> None:
        """Token ids of rows read for a model must be in the vocabulary: past it, an embedding lookup is an
        IndexError on a CPU and a device-side assert on a GPU. O(rows read), next to the model's cost."""
        if rows.size and int(rows.max()) >= self.tokenizer.vocab_size:
            bad = int(np.flatnonzero((rows >= self.tokenizer.vocab_size).any(-1))[0]) if rows.ndim > 1 else 0
            raise InputError(f"{self.folder / 'tokens.bin'}: row {list(which)[bad]} has a token id "
                             f"{int(rows.max())} outside the vocabulary ({self.tokenizer.vocab_size}); corrupt file")

    def verify(self) -> None:
        """Full checksum of tokens.bin against the index (catches bit flips, not only truncation)."""
        if sha256_file(self.folder / "tokens.bin") != self.index["tokens_sha256"]:
            raise InputError(f"{self.folder / 'tokens.bin'}: checksum mismatch (corrupt file)")

    def _read_json(self, name: str):
        path = self.folder / name
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError, RecursionError) as e:
            raise InputError(f"{path}: unreadable or corrupt ({type(e).__name__})") from None

    @property
    def subset(self) -> dict:
        if self._subset is None:
            subset = self._read_json("subset.json")
            if not (isinstance(subset, dict) and isinstance(subset.get("doc_ids"), list)
                    and len(subset["doc_ids"]) == self.count):
                raise InputError(f"{self.folder / 'subset.json'}: not {self.count} rows of document ids")
            self._subset = subset
        return self._subset

    @property
    def docs(self) -> list[dict]:
        if self._docs is None:
            self._docs = self._read_json("docs.json")
        return self._docs

    def _doc_starts(self) -> np.ndarray:
        """Every document's first stream offset, built once: a per-call rebuild made ``doc_ids`` O(documents)
        (``bench/doc_ids_bench.py``: bench/README.md)."""
        if self._starts is None:
            docs = self.docs
            try:
                starts = np.fromiter((d["start"] for d in docs), dtype=np.int64, count=len(docs))
            except (TypeError, KeyError, ValueError, OverflowError):
                raise InputError(f"{self.folder / 'docs.json'}: not a list of documents with integer starts") from None
            if len(starts) and (starts[0] != 0 or (np.diff(starts) <= 0).any()):
                raise InputError(f"{self.folder / 'docs.json'}: document starts are not increasing from 0")
            self._starts = starts
        return self._starts

    def doc_ids(self, i: int) -> list[str]:
        """Ids of the documents that instance ``i`` overlaps, in stream order (O(log documents) a call)."""
        if "subset_of" in self.index:
            return self.subset["doc_ids"][i]
        starts = self._doc_starts()
        lo, hi = i * self.seq_len, (i + 1) * self.seq_len
        first = int(np.searchsorted(starts, lo, side="right")) - 1
        last = int(np.searchsorted(starts, hi, side="left")) - 1
        return [self.docs[j]["id"] for j in range(max(first, 0), last + 1)]

    def source_of(self, i: int, doc_source: dict[str, str]) -> str:
        """The corpus source of instance ``i``'s documents, or "mixed"."""
        sources = {doc_source.get(d, "?") for d in self.doc_ids(i)}
        return sources.pop() if len(sources) == 1 else "mixed"

    def stream_root(self, within: Path | None = None) -> Instances:
        """The packed stream at the end of this folder's ``subset_of`` chain (itself when it is no subset).
        Every link is checked: a packed-instances folder (inside ``within`` when given) holding the tokens the
        subset was made from (``parent_sha256``); a chain that comes back to a folder already seen is refused,
        so a self-referencing one cannot loop forever."""
        node, seen = self, {self.folder.resolve()}
        while "subset_of" in node.index:
            where, parent = node.folder / "index.json", node.index["subset_of"]
            path = Path(parent).resolve() if isinstance(parent, str) and parent else None
            if path is None or within is not None and not path.is_relative_to(Path(within).resolve()):
                raise InputError(f"{where}: subset_of {str(parent)[:200]!r} is not a folder inside {within}")
            if path in seen:
                raise InputError(f"{where}: the subset_of chain comes back to {path} (a cycle)")
            seen.add(path)
            up = Instances(path)
            if up.index.get("tokens_sha256") != node.index.get("parent_sha256"):
                raise InputError(f"{where}: subset_of {path} does not hold the tokens this subset was made from")
            node = up
        return node

    def check_tokenizer(self, tokenizer_hash: str, what: str = "the model") -> None:
        if self.tokenizer.hash != tokenizer_hash:
            raise InputError(f"{self.folder} was tokenized with {self.tokenizer.name} ({self.tokenizer.hash}), "
                             f"but {what} uses tokenizer hash {tokenizer_hash}")


def write_subset(src: Instances, rows: np.ndarray, folder: str | Path, extra: dict | None = None) -> Instances:
    """Rows ``rows`` of ``src`` (in that order) as a new instances folder that remembers where they came from."""
    rows = np.asarray(rows, dtype=np.int64)
    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        with open(tmp / "tokens.bin", "wb") as f:
            for start in range(0, len(rows), 4096):           # bounded memory for big corpora
                f.write(np.ascontiguousarray(src.tokens[rows[start:start + 4096]]).tobytes())
        subset = {"parent_rows": rows.tolist(), "doc_ids": [src.doc_ids(int(r)) for r in rows]}
        (tmp / "subset.json").write_text(json.dumps(subset, ensure_ascii=False))
        index = {**src.index, "count": len(rows), "subset_of": str(Path(src.folder).resolve()),
                 "parent_sha256": src.index["tokens_sha256"],
                 "tokens_sha256": sha256_file(tmp / "tokens.bin"), **(extra or {})}
        for key in ("documents", "stream_tokens", "dropped_tail_tokens"):
            index.pop(key, None)
        (tmp / "index.json").write_text(json.dumps(index, indent=2))
    return Instances(folder)
