"""A saved dataset's arrow files (IPC streams) checked before ``datasets.load_from_disk`` inflates them
(``refine.core.columnar`` says what is bounded and why): each message's buffers, from its flatbuffer metadata; a
compressed buffer declares its decompressed length in its first 8 bytes."""

from __future__ import annotations

import struct
from pathlib import Path

from refine.core.columnar import arrow_errors, one_line
from refine.core.errors import InputError


def arrow_bound(max_doc_bytes: int) -> int:
    """The most a saved dataset's arrow file may declare in compressed buffers (decompressed)."""
    return 4 * max_doc_bytes + (64 << 20)


def _at(buf: bytes, fmt: str, pos: int):
    size = struct.calcsize(fmt)
    if pos < 0 or pos + size > len(buf):
        raise ValueError(f"flatbuffer offset {pos} outside {len(buf)} bytes")
    return struct.unpack_from(fmt, buf, pos)[0]


def _field(buf: bytes, table: int, index: int) -> int | None:
    """Where field ``index`` of the flatbuffer table at ``table`` lies, or None when absent."""
    vtable = table - _at(buf, "<i", table)
    if 4 + 2 * index + 2 > _at(buf, "<H", vtable):
        return None
    off = _at(buf, "<H", vtable + 4 + 2 * index)
    return table + off if off else None


def _ref(buf: bytes, pos: int) -> int:
    return pos + _at(buf, "<I", pos)


def _declared_bytes(meta: bytes, body) -> int:
    """What a record or dictionary batch message decompresses to: the sum of its compressed buffers' declared
    lengths (0 for an uncompressed one: its buffers are the file's bytes, memory-mapped)."""
    root = _ref(meta, 0)
    kind_at, header_at = _field(meta, root, 1), _field(meta, root, 2)
    kind = _at(meta, "<B", kind_at) if kind_at is not None else 0
    if kind not in (2, 3) or header_at is None:          # 2 DictionaryBatch, 3 RecordBatch
        return 0
    batch = _ref(meta, header_at)
    if kind == 2:
        data_at = _field(meta, batch, 1)
        if data_at is None:
            return 0
        batch = _ref(meta, data_at)
    if _field(meta, batch, 3) is None:                   # no BodyCompression: not compressed
        return 0
    buffers_at = _field(meta, batch, 2)
    if buffers_at is None:
        return 0
    vec = _ref(meta, buffers_at)
    total = 0
    for k in range(_at(meta, "<I", vec)):
        offset, length = _at(meta, "<q", vec + 4 + 16 * k), _at(meta, "<q", vec + 12 + 16 * k)
        if length == 0:
            continue
        if offset < 0 or length < 8 or offset + length > body.size:
            raise ValueError(f"buffer {k} at {offset} (+{length}) outside the {body.size}-byte body")
        declared = int.from_bytes(body.slice(offset, 8).to_pybytes(), "little", signed=True)
        if declared < -1:
            raise ValueError(f"buffer {k} declares {declared} bytes")
        total += length - 8 if declared == -1 else declared
    return total


def check_arrow_file(path: Path, max_doc_bytes: int) -> None:
    """Refuse an arrow stream whose compressed buffers declare over ``arrow_bound`` decompressed, or whose
    messages cannot be read, before pyarrow decompresses any (only metadata and 8-byte prefixes are read)."""
    import pyarrow as pa

    bound, total = arrow_bound(max_doc_bytes), 0
    try:
        with pa.memory_map(str(path)) as source:
            reader = pa.ipc.MessageReader.open_stream(source)
            for message in reader:
                total += _declared_bytes(message.metadata.to_pybytes(), message.body) if message.body else 0
                if total > bound:
                    raise InputError(f"{path}: compressed arrow buffers declaring over {total:,} bytes "
                                     f"decompressed, more than the {bound:,} a saved dataset's file may hold "
                                     f"compressed (4 x max_doc_bytes + 64 MiB); refused before decompressing")
    except InputError:
        raise
    except (*arrow_errors(), MemoryError) as e:
        raise InputError(f"{path}: not a readable arrow stream ({one_line(e)})") from None


def saved_arrow_files(d: Path) -> list[Path]:
    """The arrow files ``datasets.load_from_disk(d)`` reads (every split's), as its metadata names them; the
    names were checked already (``refine.core.read_guard.check_saved_dataset``)."""
    import json

    def files(s: Path) -> list[Path]:
        entries = json.loads((s / "state.json").read_text()).get("_data_files", [])
        return [s / (e.get("filename") if isinstance(e, dict) else e) for e in entries]

    try:
        if (d / "dataset_info.json").is_file() and (d / "state.json").is_file():
            return files(d)
        splits = json.loads((d / "dataset_dict.json").read_text()).get("splits", [])
        return [p for split in splits for p in files(d / split)]
    except (OSError, ValueError, AttributeError, TypeError, RecursionError):
        return []                                        # load_from_disk says what is wrong
