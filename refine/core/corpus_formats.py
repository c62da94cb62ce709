"""The per-format readers of ``refine.core.corpus``: one corpus unit (a JSONL file, plain or compressed; a parquet
file; a plain text file; a saved ``datasets`` folder) as ``(where, row)`` pairs, ``where`` the ``":<line no>"``,
``":row <n>"`` or ``""`` an id or an error names, ``row`` a dict of the unit's fields or ``None`` for a document
over ``max_doc_bytes``, skipped unread (or unparsed: ``max_json_values``). ``refine.core.corpus`` lists the units,
turns rows into documents and counts what is skipped; its docstring says what each format reads.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

from refine.core.compressed import COMPRESSIONS, open_stream
from refine.core.errors import InputError
from refine.core.json_bounds import too_many_values
from refine.core.read_guard import check_saved_dataset

JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}


def suffixes(p: Path) -> tuple[str, str]:
    """(format suffix, compression suffix) of a file name, lower case: ``a.jsonl.gz`` -> (".jsonl", ".gz")."""
    suffix = p.suffix.lower()
    if suffix in COMPRESSIONS:
        return Path(p.stem).suffix.lower(), suffix
    return suffix, ""


def strip_suffixes(p: Path) -> Path:
    """``p`` without its compression suffix and then one format suffix (``a/b.jsonl.zst`` -> ``a/b``)."""
    if p.suffix.lower() in COMPRESSIONS:
        p = p.with_suffix("")
    return p.with_suffix("")


def decode(data: bytes, f: Path, line_no: int | None = None) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if line_no is None:  # a whole file: find the line so the user can open it there
            line_no = data.count(b"\n", 0, e.start) + 1
            offset = f"file byte offset {e.start}"
        else:
            offset = f"byte offset {e.start} in the line"
        raise InputError(f"{f}:{line_no}: not UTF-8 (byte 0x{data[e.start]:02x} at {offset})") from None


def max_json_values(max_doc_bytes: int) -> int:
    """Values a JSON line may hold (keys, strings, numbers, objects...): ~72 bytes of Python objects each at most,
    so parsing a line costs about its text plus ``max_doc_bytes`` / 2 (a line of 1 KB values can hold up to 2^16)."""
    return max(1 << 16, max_doc_bytes // 128)


def jsonl_rows(f: Path, max_doc_bytes: int) -> Iterator[tuple[str, dict | None]]:
    """Rows by line; a line over ``max_doc_bytes`` is read past in 1 MiB pieces and yields ``None``, as does one
    holding more JSON values than ``max_json_values`` (what parsing it would cost, ``refine.core.json_bounds``)."""
    seen, values = False, max_json_values(max_doc_bytes)
    with open_stream(f) as fh:
        for no in itertools.count(1):
            raw = fh.readline(max_doc_bytes + 4)         # + BOM and line end
            if not raw:
                break
            if len(raw) > max_doc_bytes + 3 and not raw.endswith(b"\n"):
                while (piece := fh.readline(1 << 20)) and not piece.endswith(b"\n"):
                    pass
                seen = True
                yield f":{no}", None
                continue
            if no == 1 and raw.startswith(b"\xef\xbb\xbf"):  # tolerate a UTF-8 byte-order mark
                raw = raw[3:]
            if too_many_values(raw, values):             # [{},{},...]: 1.5 GB of objects from 60 MB, not parsed
                seen = True
                yield f":{no}", None
                continue
            line = decode(raw, f, no).strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{f}:{no}: malformed JSON ({e.msg} at column {e.colno}); a truncated last line"
                                 f"{' or corrupt compressed data' if suffixes(f)[1] else ''} looks like this too"
                                 ) from None
            except RecursionError:
                raise InputError(f"{f}:{no}: JSON nested too deeply to read") from None
            if not isinstance(row, dict):
                raise InputError(f"{f}:{no}: expected a JSON object per line, got {type(row).__name__}")
            seen = True
            yield f":{no}", row
    if not seen:
        raise InputError(f"empty file: {f} (no JSON lines)")


def parquet_rows(f: Path, text_field: str, id_field: str | None,
                 max_doc_bytes: int) -> Iterator[tuple[str, dict | None]]:
    """Rows batch by batch, at a cost bounded before decoding (``refine.core.columnar``); ``None`` for a row
    over ``max_doc_bytes``, never decoded."""
    from refine.core import columnar

    return columnar.parquet_rows(f, text_field, id_field, max_doc_bytes)


def text_file_rows(f: Path, name: str, max_doc_bytes: int) -> Iterator[tuple[str, dict | None]]:
    if not suffixes(f)[1]:
        if f.stat().st_size > max_doc_bytes:
            yield "", None                               # not read at all
            return
        data = f.read_bytes()
    else:
        with open_stream(f) as fh:
            data = fh.read(max_doc_bytes + 1)            # bounded: a compressed file can expand without end
        if len(data) > max_doc_bytes:
            yield "", None
            return
    if not data:
        raise InputError(f"empty file: {f}")
    if b"\x00" in data[:8192]:
        raise InputError(f"{f}: looks binary (NUL bytes), not a text document")
    yield "", {"text": decode(data, f), "id": name, "source": f.parent.name or strip_suffixes(Path(f.name)).name}


def saved_dataset_rows(d: Path, split: str, text_field: str, id_field: str | None,
                       max_doc_bytes: int) -> Iterator[tuple[str, dict | None]]:
    check_saved_dataset(d)          # every file load_from_disk opens: a plain regular file inside ``d``
    from refine.core.arrow_ipc import check_arrow_file, saved_arrow_files
    from refine.core.columnar import columns, table_rows

    for arrow in saved_arrow_files(d):  # compressed buffers' declared sizes, before load_from_disk inflates them
        check_arrow_file(arrow, max_doc_bytes)
    import datasets

    try:
        ds = datasets.load_from_disk(str(d))
    except Exception as e:  # noqa: BLE001 - datasets raises many types for a damaged folder
        raise InputError(f"{d}: cannot load the saved dataset ({str(e).splitlines()[0]})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise InputError(f"{d}: no split {split!r} (splits: {', '.join(ds)})")
        ds = ds[split]
    if len(ds) == 0:
        raise InputError(f"empty dataset: {d}")
    ds = ds.select_columns(columns(ds.data.schema, d, text_field, id_field)).with_format("arrow")
    yield from table_rows(ds.iter(batch_size=1024), d, max_doc_bytes)   # arrow tables: sizes before values
