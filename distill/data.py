"""Training data: packed token instances and a batch stream whose position is explicit state.

``open_instances`` accepts a packed-instances folder (e.g. the refine stage's output) or any corpus that
``refine.core.corpus`` reads; a corpus is packed once with the student's tokenizer into the cache and reused.

``BatchStream`` walks a seeded permutation of the instances epoch by epoch. Its whole state is
``{"epoch", "cursor"}``: saved in a checkpoint and loaded back, the stream continues with exactly the batch it
would have produced next (lingua-style), so a resumed run sees the same data as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from refine.core.corpus import MAX_DOC_BYTES
from refine.core.instances import Instances
from refine.core.pack import pack


def open_instances(path: str | Path, tokenizer, seq_len: int, cache: str | Path, text_field: str = "text",
                   quiet: bool = False, max_doc_bytes: int = MAX_DOC_BYTES) -> Instances:
    """Instances for ``path`` with ``seq_len`` tokens each, tokenized by ``tokenizer`` (checked by hash)."""
    from refine.core.tokenizer import tokenizer_hash

    path = Path(path)
    tok_hash = tokenizer_hash(tokenizer)
    if (path / "index.json").is_file():
        inst = Instances(path)
        inst.check_tokenizer(tok_hash, "the student")
        if inst.seq_len != seq_len:
            from refine.core.errors import InputError

            raise InputError(f"{path} holds instances of {inst.seq_len} tokens, but data.seq_len is {seq_len}")
        return inst
    # One cache folder per (corpus path, tokenizer, seq_len); its manifest re-packs when the corpus changes.
    tag = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
    stem = "".join("_" if c in "*?[]" else c for c in path.stem)    # a glob pattern's name
    out = Path(cache) / "packed" / f"{stem}-{tag}-{tok_hash}-L{seq_len}"
    return pack(path, tokenizer, seq_len, out, text_field=text_field, quiet=quiet, max_doc_bytes=max_doc_bytes)


def read_rows(instances: Instances, rows: np.ndarray) -> np.ndarray:
    """Token rows ``rows`` (in that order), their ids checked against the vocabulary."""
    # Sorted fancy-indexing reads the memmap sequentially; the batch keeps the permutation's row order.
    batch = instances.tokens[np.sort(rows)][np.argsort(np.argsort(rows))]
    instances.check_ids(batch, rows)
    return batch


def open_retokenized(path: str | Path, teacher_tokenizer: str, student_tokenizer, seq_len: int
                     ) -> RetokenizedInstances:
    """``data.train`` for ``kd.signal=cross_tokenizer``: the teacher's packed instances (``kd.teacher`` names
    its tokenizer), read as ``seq_len`` student tokens a row."""
    from refine.core.errors import InputError
    from refine.core.tokenizer import load_tokenizer

    if not (Path(path) / "index.json").is_file():
        raise InputError(f"kd.signal=cross_tokenizer trains on the teacher's packed instances (refine's instances/, "
                         f"which kd.logits is aligned with); data.train={path} is not such a folder")
    return RetokenizedInstances(Instances(path), load_tokenizer(teacher_tokenizer), student_tokenizer, seq_len)


class RetokenizedInstances:
    """A teacher's packed instances read as student tokens (cross-tokenizer KD): row i is the text of teacher row
    i re-tokenized with the student tokenizer (``distill.token_alignment``: row edges, EOS, the ``seq_len`` cut),
    padded with ``PAD``. Rows are re-tokenized when fetched (a few ms each, cached for the signal that aligns the
    same rows), so nothing new is written and the stream's position, hence resume, is the teacher rows'."""

    def __init__(self, teacher: Instances, teacher_tokenizer, student_tokenizer, seq_len: int):
        from distill.token_alignment import CrossTokenizer
        from refine.core.tokenizer import tokenizer_hash

        teacher.check_tokenizer(tokenizer_hash(teacher_tokenizer), "kd.teacher's tokenizer")
        self.teacher, self.seq_len = teacher, seq_len
        self.cross = CrossTokenizer(teacher_tokenizer, student_tokenizer, seq_len)
        self.folder, self.index = teacher.folder, teacher.index     # the run record's fingerprint of data.train

    def __len__(self) -> int:
        return len(self.teacher)

    def alignments(self, rows: np.ndarray) -> list:
        rows = np.asarray(rows)
        return [self.cross.align(t, int(r)) for t, r in zip(read_rows(self.teacher, rows), rows.tolist(), strict=True)]

    def fetch(self, rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.cross.padded_ids(self.alignments(rows)))


class BatchStream:
    """Endless, seeded, resumable stream of [batch, seq_len] token batches from ``Instances``."""

    def __init__(self, instances: Instances, batch_size: int, seed: int):
        self.instances, self.batch_size, self.seed = instances, batch_size, seed
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        # A fresh generator per (seed, epoch): the order never depends on how many batches came before.
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.instances))

    def next_rows(self) -> np.ndarray:
        """Instance indices of the next batch (what an offline teacher signal is looked up by)."""
        rows = []
        while len(rows) < self.batch_size:
            if self.cursor == len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            rows.append(self._order[self.cursor])
            self.cursor += 1
        return np.asarray(rows)

    def peek_rows(self) -> np.ndarray:
        """The rows ``next_rows`` will return, without moving the stream (to read their teacher signal ahead)."""
        saved = self.epoch, self.cursor, self._order
        try:
            return self.next_rows()
        finally:
            self.epoch, self.cursor, self._order = saved

    def fetch(self, rows: np.ndarray) -> torch.Tensor:
        if isinstance(self.instances, RetokenizedInstances):
            return self.instances.fetch(rows)
        return torch.from_numpy(read_rows(self.instances, rows).astype(np.int64))

    def next_batch(self) -> torch.Tensor:
        return self.fetch(self.next_rows())

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "count": len(self.instances)}

    def load_state_dict(self, state: dict) -> None:
        from refine.core.errors import InputError

        if state["count"] != len(self.instances) or state["seed"] != self.seed:
            raise InputError(f"checkpoint's data position is for {state['count']} instances with seed "
                             f"{state['seed']}, but this run has {len(self.instances)} with seed {self.seed}")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation(self.epoch)


def val_batches(instances: Instances, batch_size: int, max_batches: int) -> list[torch.Tensor]:
    """A fixed, ordered set of validation batches, identical at every evaluation: rows evenly spaced over the
    split (the first rows would be one source of a corpus that lists its sources one after another)."""
    n = min(len(instances), batch_size * max_batches)
    picks = np.linspace(0, len(instances) - 1, n).round().astype(np.int64) if n else np.zeros(0, dtype=np.int64)
    rows = np.asarray(instances.tokens[picks])
    instances.check_ids(rows, picks)
    rows = torch.from_numpy(rows.astype(np.int64))
    return [rows[i:i + batch_size] for i in range(0, n, batch_size)]
