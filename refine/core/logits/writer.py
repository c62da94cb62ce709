"""Write a logits store (``refine.core.logits.format``) shard by shard, atomically, then its ``store.json``."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from refine.core.errors import InputError
from refine.core.instances import Instances, dtype_for
from refine.core.logits.compact_encoder import encode_shard
from refine.core.logits.format import CODECS, LOGPROB_DTYPE, MAX_K, VERSION, StoreHeader, instances_record, shard_file
from refine.core.logits.rows import SparseRows
from refine.core.logits.truncate import truncate_top_p_k
from refine.core.manifest import sha256_file
from refine.core.write import atomic_path, write_json_atomic


class LogitsWriter:
    """Append instances' truncated top-K in instance order; each ``write_shard`` call is one shard file."""

    def __init__(self, folder: str | Path, header: StoreHeader, threads: int = 1):
        """``threads``: zstd threads per compact shard (the same bytes whatever the number)."""
        if not 1 <= header.top_k <= MAX_K:
            raise InputError(f"logits top_k must be in 1..{MAX_K}, got {header.top_k}")
        if not 0 < header.top_p <= 1:
            raise InputError(f"logits top_p must be in (0, 1], got {header.top_p}")
        if header.codec not in CODECS:
            raise InputError(f"unknown logits codec {header.codec!r} ({' | '.join(CODECS)})")
        self.folder, self.threads = Path(folder), threads
        lp_dtype = LOGPROB_DTYPE.name if header.codec == "raw" else "float32"     # what the reader returns
        self.header = StoreHeader(**{**asdict(header), "id_dtype": dtype_for(header.vocab_size).name,
                                     "logprob_dtype": lp_dtype, "version": VERSION})
        self.folder.mkdir(parents=True, exist_ok=True)

    def shard_path(self, shard: int) -> Path:
        return self.folder / shard_file(shard)

    def write_shard(self, shard: int, topk_ids: np.ndarray, topk_logprobs: np.ndarray,
                    counts: np.ndarray | None = None) -> dict:
        """Write [n, L-1, K] sorted candidates as shard ``shard``, keeping the first ``counts`` [n, L-1] of each
        position (default: the top-p-k rule); return its entry."""
        positions = topk_ids.shape[1]
        if positions != self.header.positions:
            raise ValueError(f"expected {self.header.positions} positions per instance, got {positions}")
        if counts is None:
            counts = truncate_top_p_k(topk_logprobs, self.header.top_p, self.header.top_k)
        keep = np.arange(topk_ids.shape[-1]) < counts[..., None]          # prefix mask, row-major order kept
        return self._write(shard, counts, topk_ids[keep], topk_logprobs[keep])

    def write_rows(self, shard: int, rows: list[SparseRows]) -> dict:
        """Write already-truncated instances (e.g. the kept subset of another store) as shard ``shard``."""
        return self._write(shard, np.stack([r.counts for r in rows]), np.concatenate([r.ids for r in rows]),
                           np.concatenate([r.logprobs for r in rows]))

    def _write(self, shard: int, counts: np.ndarray, ids: np.ndarray, lps: np.ndarray) -> dict:
        n = counts.shape[0]
        offsets = np.concatenate([[0], np.cumsum(counts.reshape(n, -1).sum(1, dtype=np.int64))]).astype(np.int64)
        path = self.shard_path(shard)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            if self.header.codec == "zstd":
                f.write(encode_shard(counts.reshape(n, -1), ids, lps, self.header.vocab_size, threads=self.threads))
            else:
                for arr, dt in ((counts, np.uint8), (offsets, np.int64), (ids, self.header.id_dtype),
                                (lps, LOGPROB_DTYPE)):
                    f.write(np.ascontiguousarray(arr, dtype=dt).tobytes())
        return {"file": path.name, "instances": n, "pairs": int(offsets[-1]), "bytes": path.stat().st_size,
                "sha256": sha256_file(path)}

    def finish(self, shards: list[dict], extra: dict | None = None, instances: Instances | None = None) -> dict:
        """Write ``store.json``; ``instances``: the packed instances these logits were scored on (row i of the
        store is row i of ``instances``), recorded so training can refuse any others."""
        index = {"header": asdict(self.header), "shards": shards,
                 "count": sum(s["instances"] for s in shards), **(extra or {})}
        if instances is not None:
            index["instances"] = instances_record(instances)
        write_json_atomic(self.folder / "store.json", index)
        return index
