"""The logits store's on-disk format: what its files and bytes mean (this module alone defines it).

A store is a folder: ``store.json`` and one binary file per shard. For every instance and every predicted
position ``t = 1 .. L-1`` it keeps a sparse teacher next-token distribution: ``c_t`` ``(token id, log-prob)``
pairs, most likely first. Two kinds (``StoreHeader.kind``):

``top_p_k``: the top-p-k truncation (``refine.core.logits.truncate``) of the teacher's *full-softmax* log-probs
at capture temperature 1, so the mass the truncation left out is ``1 - sum(exp(logprobs))`` and any KD
temperature tau can be applied later: ``softmax(logprobs / tau)`` over the kept ids equals
``softmax(z_kept / tau)``, the PD paper's renormalised target.

``sampled`` (RS-KD, ``refine.core.sparse_sampling``): ``samples`` draws per position, stored as unique ids with
log importance weights, an unbiased estimate of the teacher distribution; ``1 - sum(exp)`` is the weight of
draws that fell outside the candidates the engine returned. Its temperature is fixed at capture.

``store.json``: ``header`` (``StoreHeader``), ``shards`` (file, instances, pairs, bytes, sha256 each), ``count``,
and ``instances`` (``instances_record``): the packed instances the logits were scored on (their tokens' sha256,
count, length; for a subset such as the refined ``instances/``, its parent's sha256 and a hash of the row
mapping), since the same count is not the same text. Versions: 2 added ``codec`` (a version-1 store is raw);
3: compact shards store each position's kept mass.

A ``raw`` shard, 4 B per pair + 1 per position::

    counts   uint8  [n, L-1]        c_t per position
    offsets  int64  [n + 1]         first pair of each instance (cumulative counts)
    ids      uint16|uint32 [pairs]  token ids
    logprobs float16 [pairs]        full-softmax log-probs

A ``zstd`` (compact) shard, little-endian and self-contained (shards may be written on different machines)::

    b"RDL2" | u32 index length | index: one zstd frame of
        u32 [n, positions, vocab, clusters, levels] | f64 scale | f32 centroids [levels + 1]
        | u32 table sizes [clusters, 32 classes] | u32 frame sizes [n, 5] | varint table gaps
    | per instance five zstd frames: u8 cluster [positions] | u8 count [positions] | varint gaps | u8 levels
                                   | f16 log kept mass [positions]

A pair's value ``v = exp(logprob) / scale`` is a level ``clip(round(sqrt(v) * levels), 1, levels)``, which
decodes to ``centroids[level] * scale``; each position's decoded values are then scaled to sum to
``exp(log kept mass)``. Each cluster has a table of ids, ordered by frequency class (``floor(log2(count))``,
most frequent first; ``table sizes`` per class) and by id within a class, stored as gaps within each class.
A pair's id is its *rank* in its position's cluster table; a position's ranks are sorted and stored as gaps
(LEB128 varints), its levels in the same order. Every frame carries zstd's checksum. Version-1 compact
shards (``b"RDLZ"``) have four frames per instance, no kept mass. How the encoder picks clusters and levels:
``refine.core.logits.compact_encoder``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refine.core.errors import InputError
from refine.core.instances import Instances
from refine.core.manifest import sha256_bytes

# version 2 added ``codec`` (version-1 stores are raw); version 3 compact shards store each position's kept mass
FORMAT, VERSION = "rd-logits", 3
LOGPROB_DTYPE = np.dtype(np.float16)  # the raw codec's; compact stores decode to float32
MAX_K = 255  # counts are uint8
CODECS = ("raw", "zstd")
MAX_POSITIONS = 1 << 20   # predicted positions per instance: far beyond any context, so no bound on real data
MAX_VOCAB = 1 << 32       # ids are at most uint32

MAGIC, MAGIC_V1 = b"RDL2", b"RDLZ"    # compact shards
CLASSES = 32         # frequency classes floor(log2(count)) of a table entry (counts < 2^32)
STREAMS = 5          # cluster, count, gaps, levels, log kept mass (version 1: the first four)


def shard_file(shard: int) -> str:
    """A shard's file name in its store folder (``store.json`` lists them; a scoring pass copies them by it)."""
    return f"shard-{shard:05d}.bin"


class CorruptShard(ValueError):
    """The bytes are not a valid compact shard (truncated, flipped, or not this codec)."""


@dataclass(frozen=True)
class StoreHeader:
    vocab_size: int
    tokenizer_hash: str
    top_p: float
    top_k: int
    positions: int                  # predicted positions per instance (seq_len - 1)
    capture_temperature: float = 1.0
    id_dtype: str = "uint16"
    logprob_dtype: str = LOGPROB_DTYPE.name
    format: str = FORMAT
    version: int = VERSION
    kind: str = "top_p_k"           # top_p_k | sampled (RS-KD, refine.core.sparse_sampling)
    samples: int = 0                # sampled: draws per position
    sample_temperature: float = 1.0  # sampled: proposal q ∝ p^(1/t)
    codec: str = "raw"              # raw | zstd (refine.core.logits.compact_encoder)


def instances_record(inst: Instances) -> dict:
    """What a store records of the instances it is aligned with (``LogitsStore.check_aligned``)."""
    record = {"tokens_sha256": inst.index["tokens_sha256"], "count": len(inst), "seq_len": inst.seq_len}
    if "subset_of" in inst.index:
        rows = np.asarray(inst.subset["parent_rows"], dtype="<i8")
        record["subset_of"] = {"tokens_sha256": inst.index["parent_sha256"],
                               "rows_sha256": sha256_bytes(rows.tobytes())}
    return record


def extra_fields(index: dict) -> dict:
    """What a copy of a store carries over from its ``store.json``: all but header, shards and count."""
    return {k: v for k, v in index.items() if k not in ("header", "shards", "count")}


def raw_sizes(h: StoreHeader, entry: dict) -> list[int]:
    """Bytes of a raw shard's four arrays (counts, offsets, ids, logprobs)."""
    n, pos = entry["instances"], h.positions
    return [n * pos, (n + 1) * 8, entry["pairs"] * np.dtype(h.id_dtype).itemsize,
            entry["pairs"] * np.dtype(h.logprob_dtype).itemsize]


def check_index(path, h: StoreHeader, index: dict) -> None:
    """store.json's numbers, before any of them sizes an allocation or a read: one line naming what is wrong."""
    def ok_int(v, lo, hi) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi

    shards = index.get("shards")
    problem = ("vocab_size" if not ok_int(h.vocab_size, 1, MAX_VOCAB) else
               "positions" if not ok_int(h.positions, 1, MAX_POSITIONS) else
               "id_dtype" if h.id_dtype not in ("uint16", "uint32") or np.dtype(h.id_dtype).itemsize < 4
               and h.vocab_size > 65536 else
               "logprob_dtype" if h.logprob_dtype not in ("float16", "float32") else
               "shards" if not isinstance(shards, list) or not all(isinstance(e, dict) for e in shards) else "")
    for i, e in enumerate(shards if not problem else []):
        f, n = e.get("file"), e.get("instances")
        if not (isinstance(f, str) and f not in ("", ".", "..") and "/" not in f and "\\" not in f):
            problem = f"shard {i} file {f!r} (a file name inside the store, please)"
        elif not ok_int(n, 0, 1 << 40) or not ok_int(e.get("pairs"), 0, n * h.positions * MAX_K) \
                or not ok_int(e.get("bytes"), 0, 1 << 50) or not isinstance(e.get("sha256"), str):
            problem = f"shard {i} instances/pairs/bytes/sha256"
        if problem:
            break
    if not problem and index.get("count") != sum(e["instances"] for e in shards):
        problem = "count (not the sum of the shards' instances)"
    if problem:
        raise InputError(f"{path}: bad {problem}")
