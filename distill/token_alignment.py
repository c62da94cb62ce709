"""Byte alignment of a teacher's packed row with the student tokenizer's tokens of the same text.

Cross-tokenizer KD (``kd.signal=cross_tokenizer``) trains the student on exactly the text of the teacher's
packed instances and learns from the logits the refine pass stored for them. This module is what the data path
and the loss share:

* ``CrossTokenizer.align(row)`` re-tokenizes a teacher row with the student tokenizer and pairs the positions
  where both have read the same bytes. The row's text and its edges are ``refine.core.retokenize``'s (shared
  with refine's cross-tokenizer reference pass): teacher EOS tokens become student EOS tokens, each one virtual
  byte on both sides so positions after a document boundary align too; a UTF-8 character cut by the row's first
  or last edge is left out; other special tokens count as their literal text. The student row is cut at
  ``seq_len`` tokens (the rest of the text goes untrained; ``RowAlignment.cut`` counts it) and padded with
  ``PAD`` (ignored by the loss).
* Position pairs: teacher position t (having read tokens 0..t, predicting t+1) and student position s pair when
  both prefixes end at the same byte. There the next bytes to predict are the same, so the teacher's next-token
  distribution is a target for the student's, through ``id_map``: a teacher token whose bytes are exactly one
  student token maps to it (GOLD's exact part; GPT-2 and SmolLM2 share most tokens by probability mass: the
  kept mass is logged, ``bench/xtok_stats.py`` measures it). Unmapped teacher tokens are the signal's missing
  mass (``kd.missing_mass``: renorm drops it, tail keeps it as one "other" outcome).
* A student tokenizer that does not give back the text's bytes (a normaliser that lowercases or rewrites
  Unicode) cannot be aligned: one ``InputError`` naming the row, never a silently shifted target.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from threading import Lock

import numpy as np

from distill.fused_loss import IGNORE as PAD  # a padded student position: no loss there
from refine.core.retokenize import Retokenizer


@dataclass(frozen=True)
class RowAlignment:
    ids: np.ndarray         # int64 [S] the row's text in student tokens, S <= seq_len
    student: np.ndarray     # int64 [n] student positions (< S - 1) that pair with ...
    teacher: np.ndarray     # int64 [n] ... these teacher positions (< teacher row length - 1)
    cut: int                # student tokens beyond seq_len, left out


class CrossTokenizer:
    """Teacher and student tokenizers, their byte tables and the exact id map (teacher id -> student id)."""

    def __init__(self, teacher_tok, student_tok, seq_len: int, cache_rows: int = 4096):
        self.student_tok, self.seq_len = student_tok, seq_len
        self.retok = Retokenizer(teacher_tok, student_tok, ("teacher", "student"))    # the row text, re-tokenized
        r = self.retok
        self.t_eos, self.s_eos, self.t_bytes, self.s_bytes = r.src_eos, r.tgt_eos, r.src_bytes, r.tgt_bytes
        self.t_len, self.s_len = r.src_len, r.tgt_len
        by_bytes = {b: i for i, b in enumerate(self.s_bytes) if b is not None}
        self.id_map = np.array([by_bytes.get(b, -1) if b is not None else -1 for b in self.t_bytes], dtype=np.int64)
        self.id_map[self.t_eos] = self.s_eos
        self._cache: OrderedDict[int, RowAlignment] = OrderedDict()
        self._cache_rows, self._lock = cache_rows, Lock()

    def align(self, row: np.ndarray, key: int | None = None) -> RowAlignment:
        """The student tokens of teacher row ``row`` and their position pairs (cached by ``key``: the data path
        and the signal ask for the same rows)."""
        if key is not None:
            with self._lock:
                hit = self._cache.get(key)
            if hit is not None:
                return hit
        out = self._align(np.asarray(row, dtype=np.int64), key)
        if key is not None:
            with self._lock:
                self._cache[key] = out
                while len(self._cache) > self._cache_rows:
                    self._cache.popitem(last=False)
        return out

    def _align(self, row: np.ndarray, key) -> RowAlignment:
        r = self.retok(row, key)
        cut = max(0, len(r.ids) - self.seq_len)
        s_ids, s_ends = r.ids[:self.seq_len], r.ends[:self.seq_len]
        _, s_pos, t_pos = np.intersect1d(s_ends[:-1], r.source_ends[:-1], assume_unique=True, return_indices=True)
        return RowAlignment(s_ids, s_pos.astype(np.int64), t_pos.astype(np.int64), cut)

    def padded_ids(self, aligned: list[RowAlignment]) -> np.ndarray:
        """[B, seq_len] int64 student tokens, ``PAD`` after each row's end."""
        out = np.full((len(aligned), self.seq_len), PAD, dtype=np.int64)
        for b, a in enumerate(aligned):
            out[b, :len(a.ids)] = a.ids
        return out

    def map_signal(self, aligned: list[RowAlignment], t_ids: np.ndarray, t_lps: np.ndarray, t_mask: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float]]:
        """The teacher's [B, T-1, K] stored candidates moved to the student's [B, seq_len-1, K] positions and
        vocabulary (ids, log-probs, mask; unaligned positions and unmapped ids masked out), and the alignment's
        statistics: ``xtok_pos_aligned`` (student positions with a teacher position / student positions that
        predict a token), ``xtok_mass_kept`` (teacher probability on mapped ids / stored teacher probability,
        at aligned positions)."""
        b_, k = len(aligned), t_ids.shape[-1]
        ids = np.zeros((b_, self.seq_len - 1, k), dtype=np.int64)
        lps = np.full((b_, self.seq_len - 1, k), -np.inf, dtype=np.float32)
        mask = np.zeros((b_, self.seq_len - 1, k), dtype=bool)
        positions = aligned_n = 0
        mass_all = mass_kept = 0.0
        for b, a in enumerate(aligned):
            positions += max(len(a.ids) - 1, 0)
            aligned_n += len(a.student)
            cand, keep = t_ids[b, a.teacher], t_mask[b, a.teacher]
            mapped = self.id_map[cand]
            keep_mapped = keep & (mapped >= 0)
            p = np.exp(t_lps[b, a.teacher].astype(np.float64))
            mass_all += float(p[keep].sum())
            mass_kept += float(p[keep_mapped].sum())
            ids[b, a.student] = np.where(keep_mapped, mapped, 0)
            lps[b, a.student] = np.where(keep_mapped, t_lps[b, a.teacher], -np.inf)
            mask[b, a.student] = keep_mapped
        stats = {"xtok_pos_aligned": aligned_n / max(positions, 1), "xtok_mass_kept": mass_kept / max(mass_all, 1e-12)}
        return ids, lps, mask, stats
