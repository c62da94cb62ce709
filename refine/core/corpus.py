"""Corpus readers: JSONL (plain or compressed), parquet, plain text files, folders or globs of shards, and saved
HF ``datasets`` directories.

``iter_documents(path)`` yields ``Document(id, text, source)`` in a deterministic order:

* ``*.jsonl`` / ``*.json`` / ``*.ndjson``: one JSON object per line; text from ``text_field``; id from
  ``id_field`` (or an ``"id"`` key) else ``"<name>:<line no>"``; source from a ``"source"`` key else the file stem.
  The same compressed (``.gz``, ``.zst``/``.zstd``, ``.bz2``, ``.xz``: ``train.jsonl.gz``, ``0001.json.zst``),
  decompressed as a stream while it is read: shards as FineWeb, Dolma or RedPajama ship them.
* ``*.parquet``: the same fields per row (id default ``"<name>:<row no>"``), streamed batch by batch.
* a saved ``datasets`` directory (``save_to_disk``; a ``DatasetDict`` is read at ``split``), rows as for parquet.
* any other file: one document, the whole file (id ``<name>``, source the parent folder's name); compressed too.
* a folder: everything inside, recursively, in sorted path order, each by the rules above; hidden files and
  folders are skipped, and so are symbolic links (counted in ``CorpusStats.skipped_links``): a link to a system
  file must not become a document, a ``..`` link would read the corpus again, two links to ``.`` never end.
  FIFOs, devices and sockets are skipped too (counted in ``CorpusStats.skipped_special``): opening a FIFO
  waits for a writer for ever, ``/dev/zero`` never ends. (The corpus path itself may be a link: whoever names it
  chose it; named directly, a FIFO or a device is one error line.) Except in a hub cache snapshot, whose files
  are links into the repo's ``blobs/``: read under the link's name, only when the link resolves to a regular
  file directly inside that repo's real ``blobs/`` folder (not itself a link; ``refine.core.read_guard``).
* a glob pattern (``/data/fineweb/*.jsonl.zst``, ``shards/**/*.parquet``): every match in sorted path order, a
  matched folder read as above; names are relative to the pattern's folder part; hidden matches, links, FIFOs,
  devices and sockets are skipped as inside a folder.
* a hub dataset, ``hf://datasets/ORG/NAME[@REVISION]/PATTERN``: the parquet and JSON-lines shards
  the pattern names, streamed from the hub or read from the hub cache (offline), fingerprinted by
  commit and file list, never downloaded whole (``refine.core.hub_corpus``).
* a saved dataset names only plain files of its own: every ``state.json`` data file and ``dataset_dict.json``
  split is a plain name of a regular file or folder inside it, checked before ``datasets`` opens anything
  (``refine.core.read_guard.check_saved_dataset``), so the fingerprint covers what is read.

``<name>`` is the file stem (without compression suffix) for a single file, the relative path without suffixes
in a folder or glob. ``corpus_units`` lists what is read; ``refine.core.pack.corpus_fingerprint`` hashes exactly
that list, so the cache key covers exactly what is read.

A document larger than ``max_doc_bytes`` (a JSON line, a text file, or a parquet/dataset text in UTF-8 bytes;
default 64 MiB, ``max_doc_bytes`` in the refine and data configs) is skipped and counted
(``CorpusStats.skipped_too_large``); a JSON line is read in bounded pieces, so one 2 GB line costs no 2 GB.
What parsing costs is bounded too, before it is paid: a JSON line of more JSON values than ``max_json_values``
(``[{},{},...]``: 60 MB of them are 1.5 GB of objects) is skipped and counted as too large without being parsed
(``refine.core.json_bounds``); parquet pages and a saved dataset's compressed arrow buffers are checked from their
headers, and rows read in batches sized by them, so a 2 KB dictionary bomb or a 26 KB zstd-compressed arrow
file is read at a bounded cost or refused in one line (``refine.core.columnar``).

Bad input raises one ``InputError`` line naming the file (and line or row): a missing path or a glob with no
match, an empty file or corpus, non-UTF-8 bytes (with the byte offset), a malformed or too deeply nested JSON
line, a missing or non-string text field, a corrupt or truncated compressed file (with the compressed offset), a
zstd frame asking for a window over 128 MiB (``zstd --long=31``: the window it needs), a corrupt parquet page or
arrow file, a string column that is not UTF-8 (with the row).
Empty or whitespace-only documents inside an otherwise sound corpus are skipped and counted in ``CorpusStats``.

This module lists the units and makes documents of their rows; the per-format readers are
``refine.core.corpus_formats``.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from refine.core.corpus_formats import (
    JSONL_SUFFIXES,
    PARQUET_SUFFIXES,
    jsonl_rows,
    max_json_values,
    parquet_rows,
    saved_dataset_rows,
    strip_suffixes,
    suffixes,
    text_file_rows,
)
from refine.core.errors import InputError
from refine.core.hub_corpus import HubFile, is_hub_corpus
from refine.core.hub_corpus import corpus_units as hub_units
from refine.core.read_guard import check_saved_dataset, hub_snapshot_file, is_link_below, is_plain, kind

GLOB_CHARS = frozenset("*?[")
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
MAX_SKIPPED_IDS = 100  # enough to find the culprits without holding millions of ids
MAX_DOC_BYTES = 64 << 20  # a 10 MB book is one document; a 2 GB line is a mistake (tens of GB to tokenize)


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    source: str


@dataclass
class CorpusStats:
    """Filled in while ``iter_documents`` runs: pass one in, read it after the loop."""

    documents: int = 0
    skipped_empty: int = 0
    files: int = 0
    skipped_ids: list[str] = field(default_factory=list)  # the first MAX_SKIPPED_IDS empty documents
    skipped_too_large: int = 0                             # documents over max_doc_bytes
    too_large_ids: list[str] = field(default_factory=list)  # the first MAX_SKIPPED_IDS of them
    skipped_links: int = 0                                 # symbolic links inside a corpus folder
    skipped_special: int = 0                               # FIFOs, devices and sockets inside a corpus folder
    held_out: int = 0                                      # documents left out as D_ref (refine.core.holdout)


def is_hf_dataset_dir(path: Path | HubFile) -> bool:
    return isinstance(path, Path) and path.is_dir() and any((path / n).is_file()
                                                            for n in HF_MARKERS)


def is_glob(path: str | Path) -> bool:
    """A pattern rather than a path: glob characters and nothing by that literal name."""
    return bool(GLOB_CHARS.intersection(str(path))) and not Path(path).exists()


def glob_base(pattern: str) -> Path:
    """The folder part of a pattern before its first glob character (names are relative to it)."""
    parts = Path(pattern).parts
    fixed = list(itertools.takewhile(lambda part: not GLOB_CHARS.intersection(part), parts[:-1]))
    return Path(*fixed) if fixed else Path(".")


def corpus_units(path: str | Path,
                 stats: CorpusStats | None = None) -> list[tuple[Path | HubFile, str]]:
    """What ``iter_documents`` reads, in order: (a file, a saved-dataset folder or a hub dataset's
    shard, the name its ids start with). InputError for a missing path, a FIFO or device named as
    the corpus, a glob with no match, an empty folder, a saved dataset naming files outside itself,
    or a hub corpus naming no shard."""
    stats = stats if stats is not None else CorpusStats()
    if is_hub_corpus(path):
        return hub_units(str(path), stats)
    if is_glob(path):
        base = glob_base(str(path))
        units: dict[Path, str] = {}
        expanded: set[Path] = set()                      # matched folders: read whole, their matches with them
        # pathlib's ``**`` does not descend into linked folders (glob.glob's does: a ``..`` link never ends)
        for m in sorted(base.glob(str(Path(path).relative_to(base)))):
            if any(part.startswith(".") for part in m.relative_to(base).parts) or expanded.intersection(m.parents):
                continue                                 # hidden, as inside a folder; or read already
            if is_link_below(m.parent, base):            # as inside a folder
                stats.skipped_links += 1
                continue
            if _skipped(m, base, stats):
                continue
            if m.is_dir() and not is_hf_dataset_dir(m):
                expanded.add(m)
            for u in ([m] if is_hf_dataset_dir(m) or not m.is_dir() else _corpus_units(m, stats, base)):
                units.setdefault(u, strip_suffixes(u.relative_to(base)).as_posix())
        if not units:
            raise InputError(f"no corpus files match {path}{_skipped_note(stats)}")
        return _checked(list(units.items()))
    path = Path(path)
    if not path.exists():
        raise InputError(f"corpus not found: {path}")
    if not path.is_file() and not path.is_dir():         # the path named is followed, as it is a link
        raise InputError(f"corpus {path} is {kind(path, follow=True)}, not a regular file or folder")
    if is_hf_dataset_dir(path) or not path.is_dir():
        return _checked([(path, strip_suffixes(Path(path.name)).as_posix() if path.is_file() else path.name)])
    units = [(u, strip_suffixes(u.relative_to(path)).as_posix()) for u in _corpus_units(path, stats)]
    if not units:
        raise InputError(f"corpus folder has no files: {path}{_skipped_note(stats)}")
    return _checked(units)


def _skipped(p: Path, root: Path, stats: CorpusStats) -> bool:
    """``p`` (under ``root``) is not read, and counted: a link that is no hub snapshot file
    (``refine.core.read_guard.hub_snapshot_file``), or a FIFO, a device or a socket."""
    if p.is_symlink():
        if hub_snapshot_file(p, root) is not None:
            return False
        stats.skipped_links += 1
        return True
    if not is_plain(p):
        stats.skipped_special += 1
        return True
    return False


def _skipped_note(stats: CorpusStats) -> str:
    if not (stats.skipped_links or stats.skipped_special):
        return ""
    return f" ({stats.skipped_links} links, {stats.skipped_special} FIFOs, devices or sockets skipped)"


def _checked(units: list[tuple[Path, str]]) -> list[tuple[Path, str]]:
    """Saved datasets among ``units`` checked to name only their own plain files (before anything reads them)."""
    for u, _ in units:
        if is_hf_dataset_dir(u):
            check_saved_dataset(u)
    return units


def _corpus_units(folder: Path, stats: CorpusStats, root: Path | None = None) -> list[Path]:
    """Files and saved-dataset folders under ``folder`` (inside the corpus ``root``, the folder itself if None),
    sorted; hidden ones, links, FIFOs, devices and sockets skipped, datasets whole."""
    root = folder if root is None else root
    units = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or _skipped(p, root, stats):
            continue
        if is_hf_dataset_dir(p) or p.is_file():
            units.append(p)
        elif p.is_dir():
            units.extend(_corpus_units(p, stats, root))
    return units


def iter_documents(path: str | Path, text_field: str = "text", id_field: str | None = None,
                   split: str = "train", stats: CorpusStats | None = None,
                   max_doc_bytes: int = MAX_DOC_BYTES) -> Iterator[Document]:
    """Every non-empty document of ``path`` (see the module docstring); InputError on bad input."""
    if max_doc_bytes < 1:
        raise InputError(f"max_doc_bytes must be >= 1, got {max_doc_bytes}")
    stats = stats if stats is not None else CorpusStats()
    json_read = False
    for unit, name in corpus_units(path, stats):
        stats.files += 1
        fmt, compression = suffixes(unit)
        if is_hf_dataset_dir(unit):
            rows = saved_dataset_rows(unit, split, text_field, id_field, max_doc_bytes)
        elif fmt in JSONL_SUFFIXES:
            rows, json_read = jsonl_rows(unit, max_doc_bytes), True
        elif fmt in PARQUET_SUFFIXES:
            if compression:
                raise InputError(f"{unit}: parquet compresses inside the file; decompress it "
                                 f"(or write it with compression=...) and name it *.parquet")
            rows = parquet_rows(unit, text_field, id_field, max_doc_bytes)
        else:
            rows = text_file_rows(unit, name, max_doc_bytes)
        for where, row in rows:
            if row is None or _too_large(row.get(text_field), max_doc_bytes):      # None: a line left unread
                stats.skipped_too_large += 1
                if len(stats.too_large_ids) < MAX_SKIPPED_IDS:
                    stats.too_large_ids.append(f"{name}{where.replace(':row ', ':')}")
                continue
            doc = _to_document(row, unit, name, where, text_field, id_field)
            if not doc.text.strip():
                stats.skipped_empty += 1
                if len(stats.skipped_ids) < MAX_SKIPPED_IDS:
                    stats.skipped_ids.append(doc.id)
                continue
            stats.documents += 1
            yield doc
    if stats.documents == 0:
        costly = f"; a JSON line of over {max_json_values(max_doc_bytes)} values counts as over" \
            if stats.skipped_too_large and json_read else ""
        raise InputError(f"corpus has no non-empty documents: {path} ({stats.skipped_empty} empty, "
                         f"{stats.skipped_too_large} over {max_doc_bytes} bytes skipped{costly})")


def _too_large(text, max_doc_bytes: int) -> bool:
    """UTF-8 size over the limit (encoded only when the character count cannot decide it)."""
    if not isinstance(text, str) or len(text) <= max_doc_bytes // 4:
        return False
    return len(text) > max_doc_bytes or len(text.encode("utf-8", "surrogatepass")) > max_doc_bytes


def _to_document(row: dict, f: Path, name: str, where: str, text_field: str, id_field: str | None) -> Document:
    if text_field not in row:
        raise InputError(f"{f}{where}: no field {text_field!r} (fields: {', '.join(map(str, row)) or 'none'}); "
                         f"choose one with text_field")
    text = row[text_field]
    if not isinstance(text, str):
        raise InputError(f"{f}{where}: field {text_field!r} is {type(text).__name__}, not a string")
    key = id_field or "id"
    if id_field and row.get(id_field) is None:
        raise InputError(f"{f}{where}: no id field {id_field!r} (fields: {', '.join(map(str, row))})")
    doc_id = str(row[key]) if row.get(key) is not None else f"{name}{where.replace(':row ', ':')}"
    source = str(row["source"]) if row.get("source") is not None else strip_suffixes(Path(f.name)).name
    return Document(doc_id, text, source)


def write_jsonl(docs: Iterable[Document], path: str | Path) -> int:
    """Write documents as JSONL ({"id", "source", "text"}) atomically; return the count."""
    from refine.core.write import atomic_path

    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps({"id": d.id, "source": d.source, "text": d.text}, ensure_ascii=False) + "\n")
            n += 1
    return n
