"""The packed-instances format (this module alone reads and writes it).

A folder holds::

    tokens.bin           row-major [count, seq_len] token ids, uint16 if the vocabulary fits, else uint32
    doc_starts.bin       per document in stream order: its first token offset in the stream (<i8)
    doc_ids.bin          the documents' ids, UTF-8, back to back
    doc_id_offsets.bin   where each id starts in doc_ids.bin, plus its end (<i8, documents + 1)
    doc_sources.bin      per document: its source as an index into doc_sources.json (<u4)
    doc_sources.json     the distinct source names
    index.json           format/version, dtype, seq_len, count, tokenizer {name, hash, vocab_size, eos_id},
                         documents, sha256 of tokens.bin, tokens dropped at the tail

The document index is flat arrays written as packing goes and memory-mapped when read, so neither packing nor
reading holds a Python object per document: memory stays flat in the document count (about 20 bytes of files
per document plus its id). Version 1 folders kept it as one ``docs.json`` list (id, source, start, len per
document); they still read, that list loaded whole as before.

A *subset* (``write_subset``: e.g. the instances difference sampling kept) has no stream; instead
``subset.json`` records each row's index in the parent folder and the ids of the documents it came from, and
``index.json`` its parent as ``subset_of`` (``subset_link``): ``../<name>`` for a parent beside it (refine's
``instances_*`` folders, so a copy of an output folder elsewhere reads as the original), else the parent's
absolute path, which is how every link was written before and still reads.

Documents are tokenized, each followed by EOS, concatenated into one stream, and cut into rows of
``seq_len`` tokens (the incomplete tail row is dropped and counted). Instance ``i`` covers stream tokens
``[i*seq_len, (i+1)*seq_len)``; ``doc_ids(i)`` recovers which documents it came from. Reads are memory-mapped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refine.core.doc_index import ArrayDocs, DocIndex, DocIndexWriter, JsonDocs
from refine.core.errors import InputError
from refine.core.manifest import sha256_file
from refine.core.read_guard import regular_file_inside
from refine.core.write import atomic_path

FORMAT = "rd-instances"
VERSION = 2
READABLE_VERSIONS = (1, 2)


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
        self._docs = DocIndexWriter(self._tmp)
        self._pending = np.empty(0, dtype=self.dtype)
        self._stream_len = 0
        self.documents = 0
        self.count = 0

    def add(self, ids: list[int] | np.ndarray, doc_id: str, source: str) -> None:
        """Append one document's token ids (EOS is added here)."""
        arr = np.asarray(ids, dtype=np.int64)
        self.add_batch(arr, np.array([arr.size]), [doc_id], [source])

    def add_batch(self, flat: np.ndarray, lengths: np.ndarray, doc_ids: list[str], sources: list[str]) -> None:
        """Append documents given as their token ids back to back (``lengths`` each; EOS is added here)."""
        flat, lengths = np.asarray(flat, dtype=np.int64), np.asarray(lengths, dtype=np.int64)
        if not len(lengths):
            return
        if flat.size and (flat.min() < 0 or flat.max() >= self.tokenizer.vocab_size):
            bad = int(np.searchsorted(np.cumsum(lengths), np.flatnonzero(
                (flat < 0) | (flat >= self.tokenizer.vocab_size))[0], side="right"))
            raise InputError(f"document {doc_ids[bad]}: token id outside the vocabulary ({self.tokenizer.vocab_size})")
        ends = np.cumsum(lengths)
        arr = np.insert(flat, ends, self.tokenizer.eos_id).astype(self.dtype)
        starts = self._stream_len + np.concatenate([[0], ends[:-1] + np.arange(1, len(lengths))])
        self._docs.add(starts, doc_ids, sources)
        self.documents += len(lengths)
        self._stream_len += int(arr.size)
        self._pending = np.concatenate([self._pending, arr])
        full = self._pending.size // self.seq_len
        if full:
            self._bin.write(self._pending[: full * self.seq_len].tobytes())
            self._pending = self._pending[full * self.seq_len:]
            self.count += full

    def close(self, extra: dict | None = None) -> dict:
        self._bin.close()
        self._docs.close()
        if self.count == 0:
            self._atomic.__exit__(InputError, None, None)
            raise InputError(f"corpus too small: {self._stream_len} tokens make no instance of {self.seq_len}")
        index = {
            "format": FORMAT, "version": VERSION, "dtype": self.dtype.name, "seq_len": self.seq_len,
            "count": self.count, "tokenizer": self.tokenizer.__dict__, "documents": self.documents,
            "stream_tokens": self._stream_len, "dropped_tail_tokens": int(self._pending.size),
            "tokens_sha256": sha256_file(self._tmp / "tokens.bin"), **(extra or {}),
        }
        (self._tmp / "index.json").write_text(json.dumps(index, indent=2))
        self._atomic.__exit__(None, None, None)
        return index

    def abort(self) -> None:
        self._bin.close()
        self._docs.close()
        self._atomic.__exit__(RuntimeError, None, None)


SIBLING = "../"       # a relative subset_of: "../<name>", the folder <name> beside the subset's own


def subset_link(parent: str | Path, folder: str | Path) -> str:
    """What subset ``folder`` records as its parent ``parent`` (``subset_of``): ``../<name>`` when ``parent`` is a
    folder beside it (not a symbolic link), so the pair can move together; else ``parent``'s absolute path."""
    real = Path(parent).resolve()
    beside = Path(folder).absolute().parent / real.name
    if real.name and not beside.is_symlink() and beside.resolve() == real:
        return SIBLING + real.name
    return str(real)


class Instances:
    """Memory-mapped read access to a packed-instances folder."""

    subset_link = staticmethod(subset_link)

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
        if self.index.get("format") != FORMAT or self.index.get("version") not in READABLE_VERSIONS:
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
        self._docs: DocIndex | None = None
        self._subset: dict | None = None
        self._root: tuple[Instances, np.ndarray] | None = None

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
    def docs(self) -> DocIndex:
        """The packed stream's documents (not of a subset): ``len``, ``starts``, ``ids(a, b)``, ``sources(a, b)``,
        ``record(j)``; memory-mapped arrays, or a version 1 folder's ``docs.json``. Checked on first use."""
        if "subset_of" in self.index:
            raise InputError(f"{self.folder} is a subset: its documents are those of {self.index['subset_of']}")
        if self._docs is None:
            self._docs = (JsonDocs(self.folder, self.index, self._read_json("docs.json"))
                          if self.index["version"] == 1 else ArrayDocs(self.folder, self.index))
        return self._docs

    def _doc_range(self, i: int) -> range:
        """The documents instance ``i`` overlaps, in stream order (O(log documents))."""
        starts = self.docs.starts
        lo, hi = i * self.seq_len, (i + 1) * self.seq_len
        first = int(np.searchsorted(starts, lo, side="right")) - 1
        last = int(np.searchsorted(starts, hi, side="left")) - 1
        return range(max(first, 0), last + 1)

    def doc_ids(self, i: int) -> list[str]:
        """Ids of the documents that instance ``i`` overlaps, in stream order (O(log documents) a call)."""
        if "subset_of" in self.index:
            return self.subset["doc_ids"][i]
        span = self._doc_range(i)
        return self.docs.ids(span.start, span.stop)

    def source_of(self, i: int) -> str:
        """The corpus source of instance ``i``'s documents, or "mixed" (a subset's rows: through its parents)."""
        if "subset_of" in self.index:
            if self._root is None:
                self._root = self.root_rows()
            root, rows = self._root
            return root.source_of(int(rows[i]))
        span = self._doc_range(i)
        sources = set(self.docs.sources(span.start, span.stop))
        return sources.pop() if len(sources) == 1 else "mixed"

    def root_rows(self, within: Path | None = None) -> tuple[Instances, np.ndarray]:
        """The packed stream at the end of the ``subset_of`` chain (see ``stream_root``) and, for each row here,
        its row there."""
        node, rows, seen = self, np.arange(self.count, dtype=np.int64), {self.folder.resolve()}
        while "subset_of" in node.index:
            up = node._parent(within, seen)
            try:
                parent_rows = np.asarray(node.subset["parent_rows"], dtype=np.int64)
            except (TypeError, ValueError, OverflowError):
                parent_rows = None
            if parent_rows is None or parent_rows.shape != (node.count,) or \
                    (node.count and (parent_rows.min() < 0 or parent_rows.max() >= up.count)):
                raise InputError(f"{node.folder / 'subset.json'}: parent_rows are not {node.count} rows of {up.folder}")
            node, rows = up, parent_rows[rows]
        return node, rows

    def stream_root(self, within: Path | None = None) -> Instances:
        """The packed stream at the end of this folder's ``subset_of`` chain (itself when it is no subset).
        Every link is checked: a packed-instances folder (inside ``within`` when given) holding the tokens the
        subset was made from (``parent_sha256``); a chain that comes back to a folder already seen is refused,
        so a self-referencing one cannot loop forever."""
        node, seen = self, {self.folder.resolve()}
        while "subset_of" in node.index:
            node = node._parent(within, seen)
        return node

    def _parent(self, within: Path | None, seen: set | None) -> Instances:
        """The folder this subset was made from, checked (inside ``within``; not in ``seen``; its tokens)."""
        where, parent = self.folder / "index.json", self.index["subset_of"]
        path = self._link_target(parent, where)
        if path is None or within is not None and not path.is_relative_to(Path(within).resolve()):
            raise InputError(f"{where}: subset_of {str(parent)[:200]!r} is not a folder inside {within}")
        seen = seen if seen is not None else {self.folder.resolve()}
        if path in seen:
            raise InputError(f"{where}: the subset_of chain comes back to {path} (a cycle)")
        seen.add(path)
        up = Instances(path)
        if up.index.get("tokens_sha256") != self.index.get("parent_sha256"):
            raise InputError(f"{where}: subset_of {path} does not hold the tokens this subset was made from")
        return up

    def _link_target(self, parent, where: Path) -> Path | None:
        """The folder ``subset_of`` names (resolved), or None for no path. A relative link is ``../<name>`` only:
        a plain folder beside this one, reached through no symbolic link (``read_guard.regular_file_inside``), so
        it cannot leave the folder that holds both, wherever that folder was copied; an absolute one (written
        before links were relative) is taken as it is, ``within`` bounding both."""
        if not isinstance(parent, str) or not parent or "\0" in parent:
            return None
        if Path(parent).is_absolute():
            return Path(parent).resolve()
        name = parent[len(SIBLING):] if parent.startswith(SIBLING) else ""
        if not name or name in (".", "..") or name != Path(name).name or "\\" in name:
            raise InputError(f"{where}: subset_of {parent[:200]!r} is not a folder beside {self.folder} (a relative "
                             f"link is {SIBLING}<name>); refusing to read it")
        beside = self.folder.absolute().parent
        try:
            regular_file_inside(beside / name / "index.json", beside)
        except InputError as e:             # (a subset copied without the folders it was made from: "missing")
            raise InputError(f"{where}: subset_of {parent[:200]!r}: {e}") from None
        return (beside / name).resolve()

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
        index = {**src.index, "count": len(rows), "subset_of": subset_link(src.folder, folder),
                 "parent_sha256": src.index["tokens_sha256"],
                 "tokens_sha256": sha256_file(tmp / "tokens.bin"), **(extra or {})}
        for key in ("documents", "stream_tokens", "dropped_tail_tokens"):
            index.pop(key, None)
        (tmp / "index.json").write_text(json.dumps(index, indent=2))
    return Instances(folder)
