"""Store maintenance without the teacher, and its command line (``python -m refine.core.logits``).

``retruncate``: a smaller top-p-k store from a larger one (storage-vs-quality sweeps); ``convert``: the same store
in another codec; ``link``: record, once and by hand, which instances a store written before that record was
scored on; ``info``: header, size, bytes/token and kept mass, checksums verified.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from refine.core.errors import InputError
from refine.core.instances import Instances
from refine.core.logits.format import CODECS, StoreHeader, extra_fields, instances_record
from refine.core.logits.reader import LogitsStore
from refine.core.logits.truncate import truncate_top_p_k
from refine.core.logits.writer import LogitsWriter
from refine.core.write import atomic_path, write_json_atomic


def retruncate(src: str | Path, dst: str | Path, top_p: float, top_k: int, shard_size: int = 256,
               codec: str | None = None) -> LogitsStore:
    """A smaller top-p-k store from a larger one, without the teacher: the stored pairs are sorted full-softmax
    log-probs, so applying top-p' then top-k' (p' <= p, k' <= k) to them gives exactly what a teacher pass
    with (p', k') would have stored (from a compact source: to within its quantisation). ``codec``: the new
    store's (default: the source's)."""
    store = LogitsStore(src)
    h = store.header
    if h.kind != "top_p_k":
        raise InputError(f"{src}: a {h.kind} store cannot be re-truncated with top-p-k")
    if top_p > h.top_p or top_k > h.top_k:
        raise InputError(f"{src} holds top-{h.top_p}-{h.top_k}; it cannot give top-{top_p}-{top_k}")
    writer = LogitsWriter(dst, StoreHeader(**{**asdict(h), "top_p": top_p, "top_k": top_k,
                                              "codec": codec or h.codec}))
    shards = []
    for s, start in enumerate(range(0, len(store), shard_size)):
        ids, lps, mask = store.padded(range(start, min(start + shard_size, len(store))))
        # padding has probability 0, so top-p could count it where the stored mass is below p': cap by the mask
        counts = np.minimum(truncate_top_p_k(lps, top_p, top_k), mask.sum(-1))
        shards.append(writer.write_shard(s, ids, lps, counts.astype(np.uint8)))
    writer.finish(shards, extra=extra_fields(store.index))
    return LogitsStore(dst)


def convert(src: str | Path, dst: str | Path, codec: str, workers: int = 1) -> LogitsStore:
    """The same store (any kind, same shards) in another codec, e.g. an existing raw store made compact.
    Written next to ``dst`` and renamed over it, so ``dst`` may be ``src``. ``workers``: shards encoded at once
    (threads: the encoder's numpy, scipy and zstd work runs outside the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    store = LogitsStore(src)
    with atomic_path(dst) as tmp:
        writer = LogitsWriter(tmp, StoreHeader(**{**asdict(store.header), "codec": codec}))

        def one(s: int) -> dict:
            return writer.write_rows(s, [store[i] for i in store.shard_rows(s)])

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            shards = list(pool.map(one, range(len(store.index["shards"]))))
        writer.finish(shards, extra=extra_fields(store.index))
    return LogitsStore(dst)


def next_token_coverage(store: LogitsStore, inst: Instances, offset: int = 0, sample: int = 64) -> float:
    """Fraction of positions whose actual next token (in row ``r + offset`` of ``inst``) is among the stored ids
    of row ``r``: high for the instances a store was scored on, chance level (``offset`` != 0) for others."""
    rows = np.unique(np.linspace(0, len(store) - 1, min(len(store), sample)).astype(int))
    hits = total = 0
    for r in rows:
        sparse, nxt = store[int(r)], np.asarray(inst.tokens[(int(r) + offset) % len(inst)][1:], dtype=np.int64)
        pos = np.repeat(np.arange(len(sparse.counts)), sparse.counts)
        hits += int(np.unique(pos[sparse.ids.astype(np.int64) == nxt[pos]]).size)
        total += len(nxt)
    return hits / max(total, 1)


def link(store_dir: str | Path, inst_dir: str | Path) -> dict:
    """Record in a store written before ``instances`` records existed which instances it was scored on (once,
    by hand: nothing can prove it). Prints the next-token coverage against those rows and against other rows
    (chance), so a wrong pairing shows."""
    store, inst = LogitsStore(store_dir, verify=True), Instances(inst_dir)
    record = store.index.get("instances")
    if record is not None:
        if record["tokens_sha256"] != inst.index["tokens_sha256"]:
            raise InputError(f"{store.folder} already records the instances it was scored on, and they are not "
                             f"{inst.folder}; it cannot be re-linked")
        return record
    store.check_shape(inst)
    coverage = {"these_rows": next_token_coverage(store, inst), "other_rows": next_token_coverage(store, inst, 1)}
    index = {k: v for k, v in store.index.items() if k != "instances"}
    index["instances"] = {**instances_record(inst), "linked_by_hand": {"next_token_coverage": coverage}}
    write_json_atomic(store.folder / "store.json", index)
    print(f"linked {store.folder} to {inst.folder}: the stored ids hold the next token at "
          f"{coverage['these_rows']:.1%} of positions of those rows ({coverage['other_rows']:.1%} of other rows', "
          f"chance level)")
    return index["instances"]


def main(argv: list[str] | None = None) -> None:
    """``python -m refine.core.logits info STORE`` | ``retruncate SRC DST --top-p P --top-k K [--codec C]``
    | ``convert SRC DST --codec C [--workers N]`` | ``link STORE INSTANCES``."""
    import argparse

    from refine.core.errors import exit_on_input_error

    ap = argparse.ArgumentParser(prog="python -m refine.core.logits", description=main.__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    info = sub.add_parser("info", help="header, size, bytes/token, mean kept mass; verifies checksums")
    info.add_argument("store")
    rt = sub.add_parser("retruncate", help="a smaller top-p-k store from a larger one (no teacher needed)")
    rt.add_argument("src")
    rt.add_argument("dst")
    rt.add_argument("--top-p", type=float, required=True)
    rt.add_argument("--top-k", type=int, required=True)
    rt.add_argument("--codec", choices=CODECS, help="the new store's codec (default: the source's)")
    cv = sub.add_parser("convert", help="the same store in another codec (e.g. raw -> zstd)")
    cv.add_argument("src")
    cv.add_argument("dst")
    cv.add_argument("--codec", choices=CODECS, required=True)
    cv.add_argument("--workers", type=int, default=1, help="shards encoded at once (threads)")
    ln = sub.add_parser("link", help="record which instances a store written before that record was scored on")
    ln.add_argument("store")
    ln.add_argument("instances")
    a = ap.parse_args(argv)

    @exit_on_input_error
    def run() -> None:
        if a.cmd == "link":
            link(a.store, a.instances)
            return
        if a.cmd == "info":
            store = LogitsStore(a.store, verify=True)
        elif a.cmd == "convert":
            store = convert(a.src, a.dst, a.codec, a.workers)
        else:
            store = retruncate(a.src, a.dst, a.top_p, a.top_k, codec=a.codec)
        print(json.dumps({"folder": str(store.folder), **asdict(store.header), "instances": len(store),
                          **store.stats()}, indent=1))

    run()
