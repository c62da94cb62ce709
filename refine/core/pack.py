"""Tokenize a corpus with a tokenizer and pack it into fixed-length instances (see ``refine.core.instances``).

Run::

    python -m refine.core.pack --corpus .cache/data/corpus/train.jsonl --tokenizer .cache/models/smollm2-135m \
        --seq-len 256 --out .cache/packed/train-L256

A finished output whose manifest matches (same corpus bytes, tokenizer hash, seq_len, text field) is reused.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

from refine.core.corpus import MAX_DOC_BYTES, CorpusStats, is_link_below, iter_documents
from refine.core.errors import InputError, exit_on_input_error
from refine.core.instances import Instances, InstanceWriter, TokenizerInfo
from refine.core.manifest import manifest_matches, sha256_file, write_manifest
from refine.core.tokenizer import load_tokenizer

BATCH_DOCS = 256  # documents per fast-tokenizer call: large enough to use its threads, small in memory


def corpus_fingerprint(path: str | Path) -> str:
    """sha256 over every file of a corpus (a file or a folder), so a changed corpus re-packs."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"corpus not found: {path}")
    # links inside a folder are not read (refine.core.corpus), so they are not part of the key either
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*")
                                                 if p.is_file() and not is_link_below(p, path))
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def pack(corpus: str | Path, tokenizer, seq_len: int, out: str | Path, text_field: str = "text",
         quiet: bool = False, max_doc_bytes: int = MAX_DOC_BYTES) -> Instances:
    """Pack ``corpus`` into ``out`` unless an identical packing is already there; return the reader."""
    info = TokenizerInfo.of(tokenizer)
    key = {"corpus": corpus_fingerprint(corpus), "tokenizer_hash": info.hash, "seq_len": seq_len,
           "text_field": text_field}
    if max_doc_bytes != MAX_DOC_BYTES:          # (the default stays out: existing packings stay valid)
        key["max_doc_bytes"] = max_doc_bytes
    if manifest_matches(out, key):
        return Instances(out)
    t0 = time.perf_counter()
    writer = InstanceWriter(out, seq_len, info)
    stats = CorpusStats()
    try:
        docs = iter_documents(corpus, text_field=text_field, stats=stats, max_doc_bytes=max_doc_bytes)
        batch: list = []
        for doc in docs:
            batch.append(doc)
            if len(batch) == BATCH_DOCS:
                _add_batch(writer, tokenizer, batch)
                batch = []
        if batch:
            _add_batch(writer, tokenizer, batch)
    except BaseException:
        writer.abort()
        raise
    index = writer.close(extra={"corpus": str(corpus)})
    elapsed = time.perf_counter() - t0
    skipped = {k: v for k, v in (("skipped_too_large", stats.skipped_too_large), ("too_large_ids", stats.too_large_ids),
                                 ("skipped_links", stats.skipped_links)) if v}
    if skipped and not quiet:
        print(f"warning: {corpus}: {stats.skipped_too_large} documents over {max_doc_bytes} bytes and "
              f"{stats.skipped_links} links skipped (first: {', '.join(stats.too_large_ids[:3]) or '-'})")
    write_manifest(out, key, corpus=str(corpus), tokenizer=info.__dict__, count=index["count"],
                   stream_tokens=index["stream_tokens"], seconds=round(elapsed, 2), **skipped)
    if not quiet:
        print(f"packed {index['documents']} docs, {index['stream_tokens']} tokens -> {index['count']} x "
              f"{seq_len} in {elapsed:.1f}s ({index['stream_tokens'] / max(elapsed, 1e-9):,.0f} tok/s) -> {out}")
    return Instances(out)


def _add_batch(writer: InstanceWriter, tokenizer, docs: list) -> None:
    ids = tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"]
    for d, seq in zip(docs, ids):
        writer.add(seq, d.id, d.source)


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", required=True, help="JSONL / parquet / text file or folder / saved HF dataset")
    ap.add_argument("--tokenizer", required=True, help="local tokenizer folder (e.g. the teacher's)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--max-doc-bytes", type=int, default=MAX_DOC_BYTES, help="larger documents are skipped")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    pack(a.corpus, load_tokenizer(a.tokenizer), a.seq_len, a.out, a.text_field, max_doc_bytes=a.max_doc_bytes)


if __name__ == "__main__":
    main()
