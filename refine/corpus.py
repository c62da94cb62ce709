"""Corpus readers: JSONL, parquet, plain text files or folders, and saved HF ``datasets`` directories.

``iter_documents(path, text_field="text")`` yields ``Document(id, text, source)`` in a deterministic order.
Bad input ends with one ``InputError`` line that names the file (and line): a missing path, an empty file
or corpus, non-UTF-8 bytes, a malformed JSON line, a missing or non-string text field. Empty or
whitespace-only documents inside an otherwise sound corpus are skipped and counted in ``CorpusStats``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from refine.errors import InputError

JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    source: str


@dataclass
class CorpusStats:
    documents: int = 0
    skipped_empty: int = 0
    files: int = 0
    skipped_ids: list[str] = field(default_factory=list)


def _is_hf_dataset_dir(path: Path) -> bool:
    return path.is_dir() and any((path / n).is_file() for n in ("dataset_info.json", "state.json",
                                                               "dataset_dict.json"))


def iter_documents(path: str | Path, text_field: str = "text", id_field: str | None = None,
                   split: str = "train", stats: CorpusStats | None = None) -> Iterator[Document]:
    """Every non-empty document of ``path``; raise InputError on bad input (after nothing was half-used)."""
    path = Path(path)
    stats = stats if stats is not None else CorpusStats()
    if not path.exists():
        raise InputError(f"corpus not found: {path}")
    if _is_hf_dataset_dir(path):
        files: list[Path] = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise InputError(f"corpus folder has no files: {path}")
    else:
        files = [path]
    for f in files:
        stats.files += 1
        if _is_hf_dataset_dir(f):
            rows = _hf_rows(f, split)
        elif f.suffix.lower() in JSONL_SUFFIXES:
            rows = _jsonl_rows(f)
        elif f.suffix.lower() in PARQUET_SUFFIXES:
            rows = _parquet_rows(f)
        else:
            rows = _text_file(f)
        for where, row in rows:
            doc = _to_document(row, f, where, text_field, id_field)
            if not doc.text.strip():
                stats.skipped_empty += 1
                stats.skipped_ids.append(doc.id)
                continue
            stats.documents += 1
            yield doc
    if stats.documents == 0:
        raise InputError(f"corpus has no non-empty documents: {path} "
                         f"({stats.skipped_empty} empty skipped)")


def _to_document(row: dict, f: Path, where: str, text_field: str, id_field: str | None) -> Document:
    if text_field not in row:
        raise InputError(f"{f}{where}: no field {text_field!r} (fields: {', '.join(map(str, row)) or 'none'}); "
                         f"choose one with text_field")
    text = row[text_field]
    if not isinstance(text, str):
        raise InputError(f"{f}{where}: field {text_field!r} is {type(text).__name__}, not a string")
    key = id_field or "id"
    doc_id = str(row[key]) if row.get(key) is not None else f"{f.stem}{where.replace(':', '#', 1)}"
    source = str(row["source"]) if row.get("source") is not None else f.stem
    return Document(doc_id, text, source)


def _decode(data: bytes, f: Path, line_no: int | None = None) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        where = f":{line_no}" if line_no is not None else ""
        raise InputError(f"{f}{where}: not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}"
                         f"{' of the line' if line_no is not None else ''})") from None


def _jsonl_rows(f: Path) -> Iterator[tuple[str, dict]]:
    if f.stat().st_size == 0:
        raise InputError(f"empty file: {f}")
    with open(f, "rb") as fh:
        for no, raw in enumerate(fh, start=1):
            line = _decode(raw, f, no).strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{f}:{no}: malformed JSON ({e.msg} at column {e.colno}); "
                                 f"a truncated last line looks like this too") from None
            if not isinstance(row, dict):
                raise InputError(f"{f}:{no}: expected a JSON object per line, got {type(row).__name__}")
            yield f":{no}", row


def _parquet_rows(f: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{f}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    if pf.metadata.num_rows == 0:
        raise InputError(f"empty file: {f} (0 rows)")
    row_no = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            row_no += 1
            yield f":row {row_no}", row


def _text_file(f: Path) -> Iterator[tuple[str, dict]]:
    data = f.read_bytes()
    if not data:
        raise InputError(f"empty file: {f}")
    if b"\x00" in data[:8192]:
        raise InputError(f"{f}: looks binary (NUL bytes), not a text document")
    yield "", {"text": _decode(data, f), "id": f.stem, "source": f.parent.name or f.stem}


def _hf_rows(d: Path, split: str) -> Iterator[tuple[str, dict]]:
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
    for i, row in enumerate(ds):
        yield f":row {i + 1}", row


def write_jsonl(docs: Iterator[Document] | list[Document], path: str | Path) -> int:
    """Write documents as JSONL ({"id", "source", "text"}) atomically; return the count."""
    from refine.manifest import atomic_path

    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps({"id": d.id, "source": d.source, "text": d.text}, ensure_ascii=False) + "\n")
            n += 1
    return n
