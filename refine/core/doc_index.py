"""The document index of a packed-instances folder (its layout: ``refine.core.instances``): which documents a
stream holds, where each starts, its id and source. Version 2 keeps flat arrays on disk, written as packing goes
and memory-mapped when read, so memory stays flat in the document count; version 1's ``docs.json`` still reads.
"""

from __future__ import annotations

import json
import mmap
from pathlib import Path

import numpy as np

from refine.core.errors import InputError

CHECK_CHUNK = 1 << 20   # index entries validated per step (bounded memory at any corpus size)


class DocIndexWriter:
    """Appends documents' starts, ids and sources to the version 2 files in ``folder`` as packing goes. ``folder``
    is an ``atomic_path`` temporary (``InstanceWriter``'s), private to this process: plain opens are safe there
    (``refine.core.write``)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._files = {name: open(folder / name, "wb") for name in
                       ("doc_starts.bin", "doc_ids.bin", "doc_id_offsets.bin", "doc_sources.bin")}
        self._files["doc_id_offsets.bin"].write(np.zeros(1, "<i8").tobytes())
        self._sources: dict[str, int] = {}
        self._id_bytes = 0

    def add(self, starts: np.ndarray, doc_ids: list[str], sources: list[str]) -> None:
        self._files["doc_starts.bin"].write(np.asarray(starts).astype("<i8").tobytes())
        encoded = [d.encode("utf-8", "surrogatepass") for d in doc_ids]
        self._files["doc_ids.bin"].write(b"".join(encoded))
        offsets = self._id_bytes + np.cumsum([len(e) for e in encoded], dtype=np.int64)
        self._files["doc_id_offsets.bin"].write(offsets.astype("<i8").tobytes())
        self._id_bytes = int(offsets[-1]) if len(offsets) else self._id_bytes
        codes = [self._sources.setdefault(s, len(self._sources)) for s in sources]
        self._files["doc_sources.bin"].write(np.asarray(codes, dtype="<u4").tobytes())

    def close(self) -> None:
        if all(f.closed for f in self._files.values()):
            return
        for f in self._files.values():
            f.close()
        (self.folder / "doc_sources.json").write_text(json.dumps(list(self._sources)))


class DocIndex:
    """The documents of a packed stream, in stream order (``Instances.docs``)."""

    starts: np.ndarray          # first stream offset of each document, increasing from 0

    def __init__(self, folder: Path, index: dict):
        self.folder, self.stream_tokens = folder, index.get("stream_tokens")

    def __len__(self) -> int:
        return len(self.starts)

    def ids(self, a: int, b: int) -> list[str]:
        """The ids of documents ``a`` to ``b - 1``."""
        raise NotImplementedError

    def sources(self, a: int, b: int) -> list[str]:
        """The sources of documents ``a`` to ``b - 1``."""
        raise NotImplementedError

    def record(self, j: int) -> dict:
        """Document ``j`` as a version 1 ``docs.json`` entry: id, source, start, len (its tokens with the EOS)."""
        end = int(self.starts[j + 1]) if j + 1 < len(self) else self.stream_tokens
        return {"id": self.ids(j, j + 1)[0], "source": self.sources(j, j + 1)[0], "start": int(self.starts[j]),
                "len": end - int(self.starts[j])}

    def _check_starts(self, where: Path) -> None:
        """Increasing from 0 and inside the stream, checked in bounded steps (a memory map stays unread)."""
        starts, prev = self.starts, -1
        for a in range(0, len(starts), CHECK_CHUNK):
            part = np.asarray(starts[a:a + CHECK_CHUNK], dtype=np.int64)
            if (a == 0 and part[0] != 0) or part[0] <= prev or (np.diff(part) <= 0).any():
                raise InputError(f"{where}: document starts are not increasing from 0")
            prev = int(part[-1])
        if isinstance(self.stream_tokens, int) and len(starts) and prev >= self.stream_tokens:
            raise InputError(f"{where}: document starts run past the stream ({self.stream_tokens} tokens)")


class ArrayDocs(DocIndex):
    """Version 2: memory-mapped arrays (see ``refine.core.instances``); sizes and order checked once, in steps."""

    def __init__(self, folder: Path, index: dict):
        super().__init__(folder, index)
        n = index.get("documents")
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 1 << 48:
            raise InputError(f"{self.folder / 'index.json'}: bad documents")
        self.starts = self._map("doc_starts.bin", "<i8", n)
        self.offsets = self._map("doc_id_offsets.bin", "<i8", n + 1)
        self.codes = self._map("doc_sources.bin", "<u4", n)
        ids_path = self.folder / "doc_ids.bin"
        size = ids_path.stat().st_size if ids_path.is_file() else -1
        if size < 0:
            raise InputError(f"{ids_path}: missing")
        self.blob: bytes | mmap.mmap = b""
        if size:
            with open(ids_path, "rb") as f:
                self.blob = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            names = json.loads((self.folder / "doc_sources.json").read_text())
        except (OSError, ValueError, RecursionError) as e:
            raise InputError(f"{self.folder / 'doc_sources.json'}: unreadable or corrupt ({type(e).__name__})"
                             ) from None
        if not (isinstance(names, list) and all(isinstance(x, str) for x in names)):
            raise InputError(f"{self.folder / 'doc_sources.json'}: not a list of source names")
        self.names = names
        self._check_starts(self.folder / "doc_starts.bin")
        prev, top = 0, 0
        for a in range(0, n + 1, CHECK_CHUNK):
            part = np.asarray(self.offsets[a:a + CHECK_CHUNK], dtype=np.int64)
            if (a == 0 and part[0] != 0) or part[0] < prev or (np.diff(part) < 0).any():
                raise InputError(f"{self.folder / 'doc_id_offsets.bin'}: offsets are not increasing from 0")
            prev = int(part[-1])
        if prev != size:
            raise InputError(f"{self.folder / 'doc_id_offsets.bin'}: ends at {prev}, doc_ids.bin holds {size} bytes")
        for a in range(0, n, CHECK_CHUNK):
            top = max(top, int(self.codes[a:a + CHECK_CHUNK].max()))
        if top >= len(names):
            raise InputError(f"{self.folder / 'doc_sources.bin'}: source {top} of {len(names)} names")

    def _map(self, name: str, dtype: str, count: int) -> np.ndarray:
        path = self.folder / name
        actual = path.stat().st_size if path.is_file() else -1
        if actual != count * np.dtype(dtype).itemsize:
            raise InputError(f"{path}: truncated or wrong size ({actual} bytes for {count} entries); re-pack "
                             f"(delete {self.folder})")
        # a plain array over the map: np.memmap's subclass costs microseconds per index or slice
        return np.memmap(path, dtype=dtype, mode="r", shape=(count,)).view(np.ndarray)

    def ids(self, a: int, b: int) -> list[str]:
        if a >= b:
            return []
        off = self.offsets[a:b + 1].tolist()
        data = self.blob[off[0]:off[-1]]
        return [data[x - off[0]:y - off[0]].decode("utf-8", "surrogatepass") for x, y in zip(off, off[1:])]

    def sources(self, a: int, b: int) -> list[str]:
        return [self.names[c] for c in self.codes[a:b].tolist()]


class JsonDocs(DocIndex):
    """Version 1: ``docs.json``, one list of {id, source, start, len}, loaded whole (as version 1 read it)."""

    def __init__(self, folder: Path, index: dict, docs: list):
        super().__init__(folder, index)
        where = self.folder / "docs.json"
        self.list = docs
        try:
            self.starts = np.fromiter((d["start"] for d in self.list), dtype=np.int64, count=len(self.list))
        except (TypeError, KeyError, ValueError, OverflowError):
            raise InputError(f"{where}: not a list of documents with integer starts") from None
        if not len(self.starts):
            raise InputError(f"{where}: no documents")
        self._check_starts(where)

    def ids(self, a: int, b: int) -> list[str]:
        return [d["id"] for d in self.list[a:b]]

    def sources(self, a: int, b: int) -> list[str]:
        return [d.get("source", "?") for d in self.list[a:b]]

    def record(self, j: int) -> dict:
        return self.list[j]

