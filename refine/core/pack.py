"""Tokenize a corpus with a tokenizer and pack it into fixed-length instances (see ``refine.core.instances``).

Run::

    python -m refine.core.pack --corpus '/data/fineweb/*.jsonl.zst' --tokenizer .cache/models/smollm2-135m \
        --seq-len 256 --out .cache/packed/train-L256 --workers 0

A finished output whose manifest matches (same corpus bytes, tokenizer hash, seq_len, text field) is reused.

``workers`` > 1 tokenizes batches of documents in that many worker processes (0: one per core) while this
process reads the corpus and writes the batches back in corpus order, so the output is byte-identical to one
process. Memory stays flat in corpus size: a bounded number of batches is in flight and the document index goes
to disk as it grows.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import time
from collections import deque
from pathlib import Path

import numpy as np

from refine.core.corpus import (
    MAX_DOC_BYTES,
    CorpusStats,
    corpus_units,
    glob_base,
    is_glob,
    iter_documents,
)
from refine.core.errors import InputError, exit_on_input_error
from refine.core.holdout import HoldOut
from refine.core.hub_corpus import fingerprint as hub_fingerprint
from refine.core.hub_corpus import is_hub_corpus
from refine.core.instances import Instances, InstanceWriter, TokenizerInfo
from refine.core.manifest import manifest_matches, sha256_file, write_manifest
from refine.core.read_guard import hub_snapshot_file, is_link_below
from refine.core.tokenizer import encode_text, is_panic, load_tokenizer, one_line, tokenizer_name

BATCH_DOCS = 256  # documents per fast-tokenizer call: large enough to use its threads, small in memory


def corpus_fingerprint(path: str | Path) -> str:
    """sha256 over every file ``iter_documents`` reads (``corpus_units``: a file, a folder, a glob), each with its
    path relative to the corpus (a saved dataset: the files inside it), so a changed corpus re-packs.
    A hub corpus: its commit and shard list (``refine.core.hub_corpus.fingerprint``), none read."""
    if is_hub_corpus(path):
        return hub_fingerprint(str(path))
    base = glob_base(str(path)) if is_glob(path) else Path(path)
    h = hashlib.sha256()
    for unit, _ in corpus_units(path):
        # inside a saved dataset, as inside a folder, hidden files and links are not read: not part of the key
        # (but for hub snapshot files, which it reads: refine.core.read_guard.check_saved_dataset)
        files = [unit] if not unit.is_dir() else sorted(
            p for p in unit.rglob("*") if p.is_file()
            and (not is_link_below(p, unit) or hub_snapshot_file(p, unit) is not None)
            and not any(part.startswith(".") for part in p.relative_to(unit).parts))
        for f in files:
            h.update(str(f.relative_to(base) if f != base else f.name).encode())
            h.update(sha256_file(f).encode())
    return h.hexdigest()


def resolve_workers(workers: int) -> int:
    """``workers`` as a process count: 0 means one per usable core."""
    if workers < 0:
        raise InputError(f"pack workers must be >= 0 (0: one per core), got {workers}")
    if workers == 0:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return workers


def pack(corpus: str | Path, tokenizer, seq_len: int, out: str | Path, text_field: str = "text",
         quiet: bool = False, max_doc_bytes: int = MAX_DOC_BYTES, workers: int = 1,
         hold_out: HoldOut | None = None) -> Instances:
    """Pack ``corpus`` into ``out`` unless an identical packing is already there; return the reader.
    ``workers``: tokenizer processes (1: this one; 0: one per core); the output does not depend on it.
    ``hold_out``: the documents it holds (D_ref) are left out."""
    workers = resolve_workers(workers)
    info = TokenizerInfo.of(tokenizer)
    # "special_strings": a packing made before they were read as text (``encode_text``) may hold a false EOS in a
    # document that mentions ``<|endoftext|>``; it is packed again once (ordinary text gives the same bytes)
    key = {"corpus": corpus_fingerprint(corpus), "tokenizer_hash": info.hash, "seq_len": seq_len,
           "text_field": text_field, "special_strings": "text"}
    if max_doc_bytes != MAX_DOC_BYTES:          # (the default stays out: existing packings stay valid)
        key["max_doc_bytes"] = max_doc_bytes
    if hold_out is not None:
        key["hold_out"] = hold_out.key()
    if manifest_matches(out, key):
        return Instances(out)
    t0 = time.perf_counter()
    writer = InstanceWriter(out, seq_len, info)
    stats = CorpusStats()
    try:
        docs = iter_documents(corpus, text_field=text_field, stats=stats, max_doc_bytes=max_doc_bytes)
        if hold_out is not None:
            docs = _leave_out(docs, hold_out, stats)
        batches = iter(lambda: list(itertools.islice(docs, BATCH_DOCS)), [])
        if workers == 1:
            for batch in batches:
                writer.add_batch(*tokenize_batch(tokenizer, [d.text for d in batch], [d.id for d in batch]),
                                 [d.id for d in batch], [d.source for d in batch])
        else:
            _pack_parallel(batches, tokenizer, writer, workers)
    except BaseException:
        writer.abort()
        raise
    index = writer.close(extra={"corpus": str(corpus)})
    elapsed = time.perf_counter() - t0
    skipped = {k: v for k, v in (("skipped_too_large", stats.skipped_too_large), ("too_large_ids", stats.too_large_ids),
                                 ("skipped_links", stats.skipped_links), ("skipped_special", stats.skipped_special))
               if v}
    if skipped and not quiet:
        print(f"warning: {corpus}: {stats.skipped_too_large} documents over {max_doc_bytes} bytes, "
              f"{stats.skipped_links} links and {stats.skipped_special} FIFOs, devices or sockets skipped "
              f"(first: {', '.join(stats.too_large_ids[:3]) or '-'})")
    if hold_out is not None:
        skipped["held_out_documents"] = stats.held_out
    write_manifest(out, key, corpus=str(corpus), tokenizer=info.__dict__, count=index["count"],
                   stream_tokens=index["stream_tokens"], seconds=round(elapsed, 2), **skipped)
    if not quiet:
        print(f"packed {index['documents']} docs, {index['stream_tokens']} tokens -> {index['count']} x "
              f"{seq_len} in {elapsed:.1f}s ({index['stream_tokens'] / max(elapsed, 1e-9):,.0f} tok/s"
              f"{f', {workers} workers' if workers > 1 else ''}) -> {out}")
    return Instances(out)


def _leave_out(docs, hold_out: HoldOut, stats: CorpusStats):
    """``docs`` without those ``hold_out`` holds, counted in ``stats.held_out``."""
    for d in docs:
        if hold_out.holds(d.id):
            stats.held_out += 1
        else:
            yield d


def tokenize_batch(tokenizer, texts: list[str], doc_ids: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of ``texts`` back to back and each text's count (two arrays: cheap to send between processes;
    the writer checks the ids against the vocabulary). A text the tokenizer fails on (its pre-tokenizer regex
    giving up: a Rust panic, which would not even pickle back from a worker) is one InputError naming it.
    Special-token strings in the text are text (``encode_text``): the only EOS ids are those the writer puts
    between documents."""
    try:
        ids = encode_text(tokenizer, texts)
    except BaseException as e:
        if not is_panic(e):
            raise
        raise _tokenizer_failed(tokenizer, texts, doc_ids, e) from None
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    return flat, lengths


def _tokenizer_failed(tokenizer, texts: list[str], doc_ids: list[str] | None, e: BaseException) -> InputError:
    """The line for a tokenizer panic, naming the first document it fails on (each tried alone)."""
    which = "a document of this batch"
    for k, text in enumerate(texts):
        try:
            encode_text(tokenizer, [text])
        except BaseException as again:
            if not is_panic(again):
                raise
            which = f"document {doc_ids[k]!r}" if doc_ids else f"document {k + 1} of this batch"
            break
    return InputError(f"the tokenizer {tokenizer_name(tokenizer)} fails on {which}: {one_line(e)} (its "
                      f"pre-tokenizer regex gives up on this text); fix the tokenizer or leave the document out")


_worker_tokenizer = None


def _init_worker(tokenizer) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"    # the processes are the parallelism: no threads on top
    _worker_tokenizer = tokenizer


def _tokenize_in_worker(texts: list[str], doc_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return tokenize_batch(_worker_tokenizer, texts, doc_ids)


def _pack_parallel(batches, tokenizer, writer: InstanceWriter, workers: int) -> None:
    """Batches tokenized in ``workers`` spawned processes, written here in corpus order; at most two batches per
    worker in flight (reading runs ahead of tokenizing by that much, not by the corpus)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: a fork of a process whose tokenizer threads ran, or which holds a model, is unsafe
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(tokenizer,))
    in_flight: deque = deque()
    try:
        for batch in batches:
            in_flight.append((pool.submit(_tokenize_in_worker, [d.text for d in batch], [d.id for d in batch]),
                              [d.id for d in batch], [d.source for d in batch]))
            while len(in_flight) >= 2 * workers:
                future, ids, sources = in_flight.popleft()
                writer.add_batch(*future.result(), ids, sources)
        while in_flight:
            future, ids, sources = in_flight.popleft()
            writer.add_batch(*future.result(), ids, sources)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", required=True, help="JSONL (.gz/.zst/.bz2/.xz) / parquet / text file, folder or glob "
                    "of such files / saved HF dataset")
    ap.add_argument("--tokenizer", required=True, help="local tokenizer folder (e.g. the teacher's)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--max-doc-bytes", type=int, default=MAX_DOC_BYTES, help="larger documents are skipped")
    ap.add_argument("--workers", type=int, default=1, help="tokenizer processes (0: one per core)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    pack(a.corpus, load_tokenizer(a.tokenizer), a.seq_len, a.out, a.text_field, max_doc_bytes=a.max_doc_bytes,
         workers=a.workers)


if __name__ == "__main__":
    main()
