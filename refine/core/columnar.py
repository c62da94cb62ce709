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
  declare at most ``arrow_ipc.arrow_bound(max_doc_bytes)`` (4 x max_doc_bytes + 64 MiB; ``datasets`` never compresses
  them, and ``load_from_disk`` decompresses a compressed file whole).
* every batch: validated in full (offsets, dictionary indices, UTF-8) before a value is turned into Python;
  a row whose text, id and source together exceed ``max_doc_bytes`` (their arrow lengths) is skipped and
  counted without becoming a Python string; the rest become Python values ``CHUNK_BYTES`` at a time.

The text column must be a flat type (a string, or anything a ``Document`` then refuses in one line); an ``id``
or ``source`` column of a nested type (a list, a struct) is not read (an explicit ``id_field`` is refused).
Damage pyarrow finds (a corrupt page, a bad footer, invalid UTF-8) is one ``InputError`` line naming the file.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from refine.core.errors import InputError
from refine.core.parquet_pages import Truncated, chunk_metadata, walk_chunk

MAX_BATCH_ROWS = 1024
BATCH_BYTES = 128 << 20      # rows per parquet batch: this over the largest page (at least one row)
CHUNK_BYTES = 16 << 20       # values turned into Python objects at a time (one larger row alone)


def page_bound(max_doc_bytes: int) -> int:
    """The largest uncompressed parquet page read: a page holds whole values, so this bounds one value too."""
    return 4 * max_doc_bytes + (1 << 20)


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text[:300] or type(e).__name__)


def arrow_errors() -> tuple[type[BaseException], ...]:
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
        raise InputError(f"{f}: cannot read field {name!r} near row {first_row} ({one_line(e)})") from None
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
        msg = one_line(e)
        if isinstance(e, pa.ArrowInvalid) and ("utf8" in msg.lower() or "utf-8" in msg.lower()):
            return                                       # the offsets are sound: _pylist names the row
        raise InputError(f"{f}: corrupt data in the rows from {first_row} ({msg})") from None


def batch_rows(batch, f: Path, max_doc_bytes: int, first_row: int) -> Iterator[tuple[str, dict | None]]:
    """(":row N", row) for each row of ``batch`` (rows numbered from ``first_row``), ``None`` for one over
    ``max_doc_bytes`` (its columns' bytes together), which is never decoded."""
    _validate(batch, f, first_row)
    try:
        sizes = sum((_lengths(c) for c in batch.columns), np.zeros(batch.num_rows, dtype=np.int64)).tolist()
    except arrow_errors() as e:
        raise InputError(f"{f}: corrupt data in the rows from {first_row} ({one_line(e)})") from None
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
        except (*arrow_errors(), MemoryError) as e:
            raise InputError(f"{what} ({type(e).__name__}: {one_line(e)})") from None
        yield item


def parquet_rows(f: Path, text_field: str, id_field: str | None,
                 max_doc_bytes: int) -> Iterator[tuple[str, dict | None]]:
    """The rows of a parquet file (see the module docstring)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # a hub shard (refine.core.hub_corpus.HubFile) is read as a file object, in blocks
        pf = pq.ParquetFile(f if isinstance(f, os.PathLike) else f.open("rb"), buffer_size=1 << 20)
        meta = pf.metadata
        schema = pf.schema_arrow
        leaves = {meta.schema.column(j).path: j for j in range(meta.num_columns)}
        num_rows, num_row_groups = meta.num_rows, meta.num_row_groups
    except (pa.ArrowException, OSError, ValueError) as e:   # (ValueError: names that are not UTF-8)
        raise InputError(f"{f}: not a readable parquet file ({one_line(e)})") from None
    if num_rows == 0:
        raise InputError(f"empty file: {f} (0 rows)")
    cols = columns(schema, f, text_field, id_field)
    missing = [c for c in cols if c not in leaves]
    if missing:
        raise InputError(f"{f}: column {missing[0]!r} has no column chunk of its own")
    bound, size, row_no = page_bound(max_doc_bytes), f.stat().st_size, 1
    with f.open("rb") as fh:
        try:
            chunks = chunk_metadata(fh, size, {leaves[c] for c in cols})
        except (Truncated, ValueError) as e:
            raise InputError(f"{f}: unreadable parquet footer ({one_line(e) if str(e) else 'cut short'})") from None
        if len(chunks) != num_row_groups:
            raise InputError(f"{f}: unreadable parquet footer ({len(chunks)} row groups, {num_row_groups} "
                             f"counted)")
        for g, metas in enumerate(chunks):
            largest = max(walk_chunk(fh, metas.get(leaves[c], {}), size, bound,
                                      f"{f}: row group {g}, column {c!r}") for c in cols)
            # a value lies inside one page (a dictionary value inside the dictionary page): a batch of this many
            # rows decodes to at most BATCH_BYTES, whatever a dictionary repeats
            rows = max(1, min(MAX_BATCH_ROWS, BATCH_BYTES // max(largest, 1)))
            batches = pf.iter_batches(batch_size=rows, row_groups=[g], columns=cols, use_threads=False)
            for batch in _guarded(batches, f"{f}: cannot read row group {g}"):
                yield from batch_rows(batch, f, max_doc_bytes, row_no)
                row_no += batch.num_rows


def table_rows(batches: Iterable, f: Path, max_doc_bytes: int) -> Iterator[tuple[str, dict | None]]:
    """The rows of arrow tables or record batches, numbered from 1."""
    row_no = 1
    for table in _guarded(batches, f"{f}: cannot read the saved dataset"):
        for batch in (table.to_batches() if hasattr(table, "to_batches") else [table]):
            yield from batch_rows(batch, f, max_doc_bytes, row_no)
            row_no += batch.num_rows
