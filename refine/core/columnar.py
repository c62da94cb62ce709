"""Parquet files and saved-dataset arrow files read at a bounded cost, whatever their bytes declare.

A few KB of columnar data can stand for GBs: a parquet dictionary page of one 50 MiB string that 1,000 rows
point at (2 KB on disk, 50 GB once decoded), a page whose header declares 2 GB uncompressed, an arrow file of
zstd-compressed buffers (26 KB that ``datasets.load_from_disk`` inflates whole). What is checked, before the
data is decoded:

* parquet: every page header of the columns read (a walk of the column chunk's Thrift page headers, where
  pyarrow will read them; the chunks' offsets come from the footer's Thrift read here, as pyarrow's Python
  ``RowGroupMetaData.column`` aborts the process on some damaged footers): a page is at most
  ``page_bound(max_doc_bytes)`` uncompressed (4 x max_doc_bytes + 1 MiB: a page holds whole values, so one
  document over that is refused in one line, one under it is skipped and counted); a row group is read in
  batches of ``BATCH_BYTES`` / (its largest page, the dictionary page included) rows, so a batch decodes to at
  most ``BATCH_BYTES`` however often a dictionary repeats a value (2 rows of the 50 MiB one at a time).
* a saved dataset's arrow files (IPC streams): each message's buffers, from its flatbuffer metadata; a
  compressed buffer declares its decompressed length in its first 8 bytes, and a file's compressed buffers may
  declare at most ``arrow_bound(max_doc_bytes)`` (4 x max_doc_bytes + 64 MiB; ``datasets`` never compresses
  them, and ``load_from_disk`` decompresses a compressed file whole).
* every batch: validated in full (offsets, dictionary indices, UTF-8) before a value is turned into Python;
  a row whose text, id and source together exceed ``max_doc_bytes`` (their arrow lengths) is skipped and
  counted without becoming a Python string; the rest become Python values ``CHUNK_BYTES`` at a time.

The text column must be a flat type (a string, or anything a ``Document`` then refuses in one line); an ``id``
or ``source`` column of a nested type (a list, a struct) is not read (an explicit ``id_field`` is refused).
Damage pyarrow finds (a corrupt page, a bad footer, invalid UTF-8) is one ``InputError`` line naming the file.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from refine.core.errors import InputError

MAX_BATCH_ROWS = 1024
BATCH_BYTES = 128 << 20      # rows per parquet batch: this over the largest page (at least one row)
CHUNK_BYTES = 16 << 20       # values turned into Python objects at a time (one larger row alone)
MAX_PAGE_HEADER = 16 << 20   # pyarrow's own limit on a Thrift page header
PAGE_TYPES = {0: "data", 1: "index", 2: "dictionary", 3: "data v2"}


def page_bound(max_doc_bytes: int) -> int:
    """The largest uncompressed parquet page read: a page holds whole values, so this bounds one value too."""
    return 4 * max_doc_bytes + (1 << 20)


def arrow_bound(max_doc_bytes: int) -> int:
    """The most a saved dataset's arrow file may declare in compressed buffers (decompressed)."""
    return 4 * max_doc_bytes + (64 << 20)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text[:300] or type(e).__name__)


def _arrow_errors() -> tuple[type[BaseException], ...]:
    import pyarrow as pa

    return (pa.ArrowException, OSError, ValueError, IndexError, struct.error)


# ---- columns ----------------------------------------------------------------------------------------------------

def _stringish(t) -> bool:
    import pyarrow as pa

    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
            or pa.types.is_large_binary(t) or pa.types.is_string_view(t) or pa.types.is_binary_view(t))


def _flat(t) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        return _flat(t.value_type)
    return not (pa.types.is_nested(t) or isinstance(t, pa.ExtensionType))


def columns(schema, f: Path, text_field: str, id_field: str | None) -> list[str]:
    """The columns a Document needs (a wide table stays cheap), each of a flat type; InputError when the text is
    absent or nested (or an explicit id field is); a nested ``id``/``source`` column is left out."""
    names = list(schema.names)
    if text_field not in names:
        raise InputError(f"{f}: no field {text_field!r} (fields: {', '.join(names) or 'none'}); "
                         f"choose one with text_field")
    out = []
    for c in dict.fromkeys([text_field, id_field or "id", "source"]):
        if c not in names:
            continue
        if names.count(c) > 1:
            raise InputError(f"{f}: {names.count(c)} columns are named {c!r}; which one is meant is unclear")
        t = schema.field(c).type
        if not _flat(t):
            if c == text_field or c == id_field:
                what = "field" if c == text_field else "id field"
                raise InputError(f"{f}: {what} {c!r} is {str(t)[:100]}, not a string")
            continue                                     # a struct ``source`` is no source name: not read
        out.append(c)
    return out


# ---- rows of a batch, bounded -------------------------------------------------------------------------------------

def _lengths(col) -> np.ndarray:
    """Each value's size in bytes (strings and binaries; 0 for fixed-size values), without decoding it."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = col.type
    if pa.types.is_dictionary(t):
        if not _stringish(t.value_type):
            return np.zeros(len(col), dtype=np.int64)
        per_value = pc.binary_length(col.dictionary).fill_null(0)
        lengths = pc.take(per_value, col.indices).fill_null(0)
    elif _stringish(t):
        lengths = pc.binary_length(col).fill_null(0)
    else:
        return np.zeros(len(col), dtype=np.int64)
    return lengths.to_numpy(zero_copy_only=False).astype(np.int64)


def _pylist(col, f: Path, name: str, first_row: int) -> list:
    import pyarrow as pa

    if pa.types.is_dictionary(col.type):                 # the slice's values only (to_pylist would turn the
        col = col.dictionary.take(col.indices)           # whole dictionary into Python objects each time)
    try:
        return col.to_pylist()
    except UnicodeDecodeError:
        pass
    except pa.ArrowException as e:
        raise InputError(f"{f}: cannot read field {name!r} near row {first_row} ({_one_line(e)})") from None
    for k in range(len(col)):                            # find the row to name it
        try:
            col[k].as_py()
        except UnicodeDecodeError as e:
            raise InputError(f"{f}:row {first_row + k}: field {name!r} is not UTF-8 ({e.reason} at byte "
                             f"{e.start} of the value)") from None
    raise InputError(f"{f}: field {name!r} near row {first_row} is not UTF-8")


def _validate(batch, f: Path, first_row: int) -> None:
    """Offsets, dictionary indices and UTF-8 checked before any value is read (an arrow file is not validated
    by pyarrow's reader: an offset past its buffer would be read as it stands)."""
    import pyarrow as pa

    try:
        batch.validate(full=True)
    except pa.ArrowException as e:
        msg = _one_line(e)
        if isinstance(e, pa.ArrowInvalid) and ("utf8" in msg.lower() or "utf-8" in msg.lower()):
            return                                       # the offsets are sound: _pylist names the row
        raise InputError(f"{f}: corrupt data in the rows from {first_row} ({msg})") from None


def batch_rows(batch, f: Path, max_doc_bytes: int, first_row: int) -> Iterator[tuple[str, dict | None]]:
    """(":row N", row) for each row of ``batch`` (rows numbered from ``first_row``), ``None`` for one over
    ``max_doc_bytes`` (its columns' bytes together), which is never decoded."""
    _validate(batch, f, first_row)
    try:
        sizes = sum((_lengths(c) for c in batch.columns), np.zeros(batch.num_rows, dtype=np.int64)).tolist()
    except _arrow_errors() as e:
        raise InputError(f"{f}: corrupt data in the rows from {first_row} ({_one_line(e)})") from None
    names, n, i = batch.schema.names, batch.num_rows, 0
    while i < n:
        if sizes[i] > max_doc_bytes:
            yield f":row {first_row + i}", None
            i += 1
            continue
        j, total = i, 0
        while j < n and sizes[j] <= max_doc_bytes and (j == i or total + sizes[j] <= CHUNK_BYTES):
            total += sizes[j]
            j += 1
        values = [_pylist(c.slice(i, j - i), f, name, first_row + i) for c, name in zip(batch.columns, names)]
        for k, row in enumerate(zip(*values)):
            yield f":row {first_row + i + k}", dict(zip(names, row))
        i = j


def _guarded(it: Iterable, what: str) -> Iterator:
    """``it``'s items; pyarrow's errors while producing one are one InputError line."""
    it = iter(it)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except InputError:
            raise
        except (*_arrow_errors(), MemoryError) as e:
            raise InputError(f"{what} ({type(e).__name__}: {_one_line(e)})") from None
        yield item


# ---- parquet page headers (Thrift compact protocol) ------------------------------------------------------------

class _Short(Exception):
    """The header goes on past the bytes read."""


class _Thrift:
    """Just enough of Thrift's compact protocol to read a parquet ``PageHeader``: ints and nested structs are
    kept ({field id: value}), everything else skipped, all of it bounds-checked."""

    def __init__(self, data: bytes):
        self.d, self.i = data, 0

    def byte(self) -> int:
        if self.i >= len(self.d):
            raise _Short
        self.i += 1
        return self.d[self.i - 1]

    def varint(self) -> int:
        out = shift = 0
        while True:
            b = self.byte()
            out |= (b & 0x7F) << shift
            if not b & 0x80:
                return out
            shift += 7
            if shift > 70:
                raise ValueError("a varint longer than 10 bytes")

    def zigzag(self) -> int:
        v = self.varint()
        return (v >> 1) ^ -(v & 1)

    def skip_bytes(self, n: int) -> None:
        if n < 0:
            raise ValueError("a negative length")
        if self.i + n > len(self.d):
            raise _Short
        self.i += n

    def value(self, t: int, depth: int):
        if t in (1, 2):                                  # bool in a list (in a struct field it has no payload)
            return self.byte() == 1
        if t == 3:
            return self.byte()
        if t in (4, 5, 6):
            return self.zigzag()
        if t == 7:
            self.skip_bytes(8)
            return None
        if t == 8:
            self.skip_bytes(self.varint())
            return None
        if t in (9, 10):
            head = self.byte()
            n, et = head >> 4, head & 0x0F
            if n == 15:
                n = self.varint()
            for _ in range(n):
                self.value(et, depth + 1)
            return None
        if t == 11:
            n = self.varint()
            if n:
                kv = self.byte()
                for _ in range(n):
                    self.value(kv >> 4, depth + 1)
                    self.value(kv & 0x0F, depth + 1)
            return None
        if t == 12:
            return self.struct(depth + 1)
        raise ValueError(f"Thrift type {t}")

    def fields(self) -> Iterator[tuple[int, int]]:
        """(field id, type) of each field of a struct; the caller reads or ``skip``s each value."""
        fid = 0
        while True:
            head = self.byte()
            if head == 0:
                return
            delta, t = head >> 4, head & 0x0F
            fid = fid + delta if delta else self.zigzag()
            yield fid, t

    def skip(self, t: int) -> None:
        if t not in (1, 2):                              # a bool field's value is its type
            self.value(t, 1)

    def struct(self, depth: int = 0) -> dict:
        if depth > 16:
            raise ValueError("structs nested too deeply")
        return {fid: (t == 1) if t in (1, 2) else self.value(t, depth) for fid, t in self.fields()}

    def structs(self, t: int) -> int:
        """The length of a list of structs (the list header read)."""
        if t != 9:
            raise ValueError(f"Thrift type {t} where a list belongs")
        head = self.byte()
        n = head >> 4 if head >> 4 != 15 else self.varint()
        if head & 0x0F != 12:
            raise ValueError(f"a list of Thrift type {head & 0x0F} where structs belong")
        return n


def _chunk_metadata(fh, file_size: int, leaves: set[int]) -> list[dict[int, dict]]:
    """Per row group, {leaf column: its ``ColumnMetaData`` fields} read from the footer's Thrift here: pyarrow's
    ``RowGroupMetaData.column`` aborts the process (a C++ exception it does not catch) on some damaged footers,
    so its Python metadata objects are not used for the offsets."""
    fh.seek(file_size - 8)
    length = int.from_bytes(fh.read(4), "little")
    if not 0 < length <= file_size - 12:
        raise ValueError(f"a footer of {length} bytes in a {file_size}-byte file")
    fh.seek(file_size - 8 - length)
    r = _Thrift(fh.read(length))
    groups: list[dict[int, dict]] = []
    for fid, t in r.fields():                            # FileMetaData
        if fid != 4:
            r.skip(t)
            continue
        for _ in range(r.structs(t)):                    # RowGroup
            columns: dict[int, dict] = {}
            for gid, gt in r.fields():
                if gid != 1:
                    r.skip(gt)
                    continue
                for j in range(r.structs(gt)):           # ColumnChunk: its field 3 is the ColumnMetaData
                    meta = {}
                    for cid, ct in r.fields():
                        if cid == 3 and ct == 12:
                            meta = r.struct(1)
                        else:
                            r.skip(ct)
                    if j in leaves:
                        columns[j] = meta
            groups.append(columns)
    return groups


def _page_header(fh, pos: int, file_size: int) -> tuple[dict, int]:
    """The page header at ``pos`` and its length."""
    want = 1 << 16
    while True:
        fh.seek(pos)
        data = fh.read(min(want, max(file_size - pos, 0)))
        reader = _Thrift(data)
        try:
            return reader.struct(), reader.i
        except _Short:
            if len(data) < want or want >= MAX_PAGE_HEADER:
                raise ValueError("the page header runs past the end of the file" if len(data) < want
                                 else f"a page header over {MAX_PAGE_HEADER} bytes") from None
            want *= 4


def _walk_chunk(fh, meta: dict, file_size: int, bound: int, where: str) -> int:
    """The largest page of one column chunk, uncompressed (its dictionary page included: a row's value is at
    most that), from its page headers, read where pyarrow will read them (from the ``ColumnMetaData`` fields:
    5 num_values, 7 total_compressed_size, 9 data_page_offset, 11 dictionary_page_offset); InputError for a
    page over ``bound`` or a header that cannot be read."""
    start, d, length, values = meta.get(9), meta.get(11), meta.get(7), meta.get(5)
    if not all(isinstance(v, int) for v in (start, length, values)):
        raise InputError(f"{where}: no column chunk metadata (offsets and sizes) in the footer")
    if isinstance(d, int) and 0 < d < start:
        start = d
    end = min(start + length, file_size)
    if start < 0 or start >= file_size or length < 0:
        raise InputError(f"{where}: its column chunk lies outside the file (byte {start} of {file_size})")
    pos, seen, largest = start, 0, 0
    while seen < values and pos < end:
        try:
            header, length = _page_header(fh, pos, file_size)
            kind = header.get(1)
            unc, comp = header.get(2), header.get(3)
            if not isinstance(kind, int) or kind not in PAGE_TYPES or not isinstance(unc, int) \
                    or not isinstance(comp, int) or unc < 0 or comp < 0:
                raise ValueError("no page type and sizes in it" if None in (kind, unc, comp)
                                 else f"page type {kind}, sizes {unc} / {comp}")
        except ValueError as e:
            raise InputError(f"{where}: corrupt page header at byte {pos} ({e})") from None
        if unc > bound:
            raise InputError(f"{where}: a {PAGE_TYPES[kind]} page of {unc:,} bytes uncompressed at byte {pos}, over "
                             f"the {bound:,} a page may hold (4 x max_doc_bytes + 1 MiB); refused before decoding")
        if kind in (0, 3):
            sub = header.get(5 if kind == 0 else 8)
            n = sub.get(1) if isinstance(sub, dict) else None
            seen += n if isinstance(n, int) and n > 0 else 0
        largest = max(largest, unc)
        pos += length + comp
    return largest


def parquet_rows(f: Path, text_field: str, id_field: str | None,
                 max_doc_bytes: int) -> Iterator[tuple[str, dict | None]]:
    """The rows of a parquet file (see the module docstring)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f, buffer_size=1 << 20)
        meta = pf.metadata
        schema = pf.schema_arrow
        leaves = {meta.schema.column(j).path: j for j in range(meta.num_columns)}
        num_rows, num_row_groups = meta.num_rows, meta.num_row_groups
    except (pa.ArrowException, OSError, ValueError) as e:   # (ValueError: names that are not UTF-8)
        raise InputError(f"{f}: not a readable parquet file ({_one_line(e)})") from None
    if num_rows == 0:
        raise InputError(f"empty file: {f} (0 rows)")
    cols = columns(schema, f, text_field, id_field)
    missing = [c for c in cols if c not in leaves]
    if missing:
        raise InputError(f"{f}: column {missing[0]!r} has no column chunk of its own")
    bound, size, row_no = page_bound(max_doc_bytes), f.stat().st_size, 1
    with open(f, "rb") as fh:
        try:
            chunks = _chunk_metadata(fh, size, {leaves[c] for c in cols})
        except (_Short, ValueError) as e:
            raise InputError(f"{f}: unreadable parquet footer ({_one_line(e) if str(e) else 'cut short'})") from None
        if len(chunks) != num_row_groups:
            raise InputError(f"{f}: unreadable parquet footer ({len(chunks)} row groups, {num_row_groups} "
                             f"counted)")
        for g, metas in enumerate(chunks):
            largest = max(_walk_chunk(fh, metas.get(leaves[c], {}), size, bound,
                                      f"{f}: row group {g}, column {c!r}") for c in cols)
            # a value lies inside one page (a dictionary value inside the dictionary page): a batch of this many
            # rows decodes to at most BATCH_BYTES, whatever a dictionary repeats
            rows = max(1, min(MAX_BATCH_ROWS, BATCH_BYTES // max(largest, 1)))
            batches = pf.iter_batches(batch_size=rows, row_groups=[g], columns=cols, use_threads=False)
            for batch in _guarded(batches, f"{f}: cannot read row group {g}"):
                yield from batch_rows(batch, f, max_doc_bytes, row_no)
                row_no += batch.num_rows


# ---- arrow IPC streams (a saved dataset's files) ---------------------------------------------------------------

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
    except (*_arrow_errors(), MemoryError) as e:
        raise InputError(f"{path}: not a readable arrow stream ({_one_line(e)})") from None


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


def table_rows(batches: Iterable, f: Path, max_doc_bytes: int) -> Iterator[tuple[str, dict | None]]:
    """The rows of arrow tables or record batches, numbered from 1."""
    row_no = 1
    for table in _guarded(batches, f"{f}: cannot read the saved dataset"):
        for batch in (table.to_batches() if hasattr(table, "to_batches") else [table]):
            yield from batch_rows(batch, f, max_doc_bytes, row_no)
            row_no += batch.num_rows
