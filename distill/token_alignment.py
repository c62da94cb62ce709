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
  distribution is a target for the student's, through a map of teacher ids to student ids (``kd.xtok_targets``):

  - ``exact`` (``id_map``): a teacher token whose bytes are exactly one student token maps to it (GOLD's exact
    part). Unmapped teacher tokens are the signal's missing mass (``kd.missing_mass``: renorm drops it, tail
    keeps it as one "other" outcome). Where the teacher's next token spans more bytes than any student token
    ("hello" against the student's "he" + "llo") its mass is all missing, and renorm gives the student's true
    next token about none (a few % of aligned positions, SmolLM2 -> GPT-2), so KD pushes the right token down.
  - ``first_token`` (``first_map``): each teacher token maps to the first token of the student tokenizer's own
    encoding of its bytes (the exact id where there is one). A partition of the teacher's mass, none lost: the
    student's target is the teacher's distribution of the continuation's first student token. Several
    teacher ids landing on one student id have their probabilities summed.
  - ``skip``: ``exact``, with the positions where the teacher's next token is longer than the student's left
    out of KD.

  Where several student ids spell the same bytes (SentencePiece's byte-fallback ``<0x0A>`` beside a plain
  ``\\n`` piece) the map takes the id the student's tokenizer itself produces for them: the one the LM loss
  trains. The statistics of each batch are logged (``xtok_*``, ``map_signal``); ``bench/xtok_stats.py``
  measures them per rule over a whole store.
* A student tokenizer that does not give back the text's bytes (a normaliser that lowercases or rewrites
  Unicode) cannot be aligned: one ``InputError`` naming the row, never a silently shifted target.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from threading import Lock

import numpy as np

from distill.fused_loss import IGNORE as PAD  # a padded student position: no loss there
from refine.core.errors import InputError
from refine.core.retokenize import Retokenizer
from refine.core.tokenizer import encode_text

TARGETS = ("exact", "first_token", "skip")
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")      # a SentencePiece byte-fallback piece


@dataclass(frozen=True)
class RowAlignment:
    ids: np.ndarray         # int64 [S] the row's text in student tokens, S <= seq_len
    student: np.ndarray     # int64 [n] student positions (< S - 1) that pair with ...
    teacher: np.ndarray     # int64 [n] ... these teacher positions (< teacher row length - 1)
    longer: np.ndarray      # bool [n] the teacher's next token there spans more bytes than the student's
    cut: int                # student tokens beyond seq_len, left out


def _utf8_prefix(b: bytes) -> str:
    """The longest prefix of ``b`` that is whole UTF-8 characters ("" if it starts inside one)."""
    for n in range(len(b), max(len(b) - 4, 0), -1):
        try:
            return b[:n].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return ""


class CrossTokenizer:
    """Teacher and student tokenizers, their byte tables and the maps of teacher ids to student ids."""

    # the rule ``map_signal`` applies unless told another: a bare CrossTokenizer keeps the exact map it always
    # had; training sets ``kd.xtok_targets`` (whose default is written once, in distill.config)
    targets: str = "exact"

    def __init__(self, teacher_tok, student_tok, seq_len: int, cache_rows: int = 4096):
        self.student_tok, self.seq_len = student_tok, seq_len
        self.retok = Retokenizer(teacher_tok, student_tok, ("teacher", "student"))    # the row text, re-tokenized
        r = self.retok
        self.t_eos, self.s_eos, self.t_bytes, self.s_bytes = r.src_eos, r.tgt_eos, r.src_bytes, r.tgt_bytes
        self.t_len, self.s_len = r.src_len, r.tgt_len
        self.by_bytes = self._student_ids_by_bytes()
        self.id_map = np.array([self.by_bytes.get(b, -1) if b is not None else -1 for b in self.t_bytes],
                               dtype=np.int64)
        self.id_map[self.t_eos] = self.s_eos
        # no two teacher ids on one student id (byte-level teachers): exact targets need no merging
        hit = self.id_map[self.id_map >= 0]
        self._exact_one_to_one = len(np.unique(hit)) == len(hit)
        self._first_map: np.ndarray | None = None
        self._cache: OrderedDict[int, RowAlignment] = OrderedDict()
        self._cache_rows, self._lock = cache_rows, Lock()

    def _student_ids_by_bytes(self) -> dict[bytes, int]:
        """Bytes -> the student id that spells them. Twins (a byte-fallback piece and a plain piece of the same
        bytes) resolve to the id the student's tokenizer emits for those bytes, else to the plain piece: a target
        on an id the tokenizer never emits is one the LM loss never trains."""
        ids_of: dict[bytes, list[int]] = {}
        for i, b in enumerate(self.s_bytes):
            if b is not None:
                ids_of.setdefault(b, []).append(i)
        out = {b: v[0] for b, v in ids_of.items() if len(v) == 1}
        twins = [b for b, v in ids_of.items() if len(v) > 1]
        texts = [_utf8_prefix(b) for b in twins]
        encoded = encode_text(self.student_tok, texts) if twins else []
        pieces = self.student_tok.convert_ids_to_tokens
        for b, text, enc in zip(twins, texts, encoded, strict=True):
            ids = ids_of[b]
            if text.encode() == b and len(enc) == 1 and enc[0] in ids:
                out[b] = enc[0]
            else:
                out[b] = next((i for i in ids if not _BYTE_PIECE.fullmatch(pieces(i) or "")), ids[0])
        return out

    @property
    def first_map(self) -> np.ndarray:
        """Teacher id -> the first student token of the student tokenizer's encoding of its bytes (``id_map``
        where that maps). Bytes that do not start with a whole UTF-8 character (a byte-level token holding part
        of one) take the longest student token they start with, so every teacher id with bytes maps. Built on
        first use (one batched encoding of the unmapped teacher vocabulary)."""
        if self._first_map is None:
            out = self.id_map.copy()
            todo = [i for i, m in enumerate(out.tolist()) if m < 0 and self.t_bytes[i]]
            texts = [_utf8_prefix(self.t_bytes[i]) for i in todo]
            encoded = encode_text(self.student_tok, texts) if todo else []
            for i, enc in zip(todo, encoded, strict=True):
                b = self.t_bytes[i]
                first = enc[0] if enc else -1
                if first >= 0 and self.s_bytes[first] and b.startswith(self.s_bytes[first]):
                    out[i] = first
                else:                       # no encodable start: the longest student token b begins with
                    out[i] = next((self.by_bytes[b[:n]] for n in range(len(b), 0, -1) if b[:n] in self.by_bytes),
                                  -1)
            self._first_map = out
        return self._first_map

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
        longer = self.t_len[row[t_pos + 1]] > self.s_len[s_ids[s_pos + 1]]
        return RowAlignment(s_ids, s_pos.astype(np.int64), t_pos.astype(np.int64), longer, cut)

    def padded_ids(self, aligned: list[RowAlignment]) -> np.ndarray:
        """[B, seq_len] int64 student tokens, ``PAD`` after each row's end."""
        out = np.full((len(aligned), self.seq_len), PAD, dtype=np.int64)
        for b, a in enumerate(aligned):
            out[b, :len(a.ids)] = a.ids
        return out

    def map_signal(self, aligned: list[RowAlignment], t_ids: np.ndarray, t_lps: np.ndarray, t_mask: np.ndarray,
                   targets: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float]]:
        """The teacher's [B, T-1, K] stored candidates moved to the student's [B, seq_len-1, K] positions and
        vocabulary by rule ``targets`` (default ``self.targets``): ids unique per position (several teacher ids
        on one student id: their log-probs log-sum-exp'd), log-probs (-inf where empty), mask; unaligned
        positions and unmapped ids masked out. And the batch's statistics (``stats``)."""
        ids, lps, mask, sums = self.target_sums(aligned, t_ids, t_lps, t_mask, targets)
        return ids, lps, mask, stats(sums)

    def target_sums(self, aligned: list[RowAlignment], t_ids: np.ndarray, t_lps: np.ndarray, t_mask: np.ndarray,
                    targets: str | None = None, width: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float]]:
        """``map_signal`` with its statistics as sums (what a benchmark adds up over many batches); ``width``:
        student positions of the output (default ``seq_len - 1``; a benchmark of uncut rows: their longest)."""
        rule = targets or self.targets
        if rule not in TARGETS:
            raise InputError(f"unknown cross-tokenizer target rule {rule!r} ({' | '.join(TARGETS)})")
        b_, k, width = len(aligned), t_ids.shape[-1], width or self.seq_len - 1
        ids = np.zeros((b_, width, k), dtype=np.int64)
        lps = np.full((b_, width, k), -np.inf, dtype=np.float32)
        mask = np.zeros((b_, width, k), dtype=bool)

        def cat(parts, dtype):
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)

        rows = cat([np.full(len(a.student), b) for b, a in enumerate(aligned)], np.int64)
        s_pos, t_pos = cat([a.student for a in aligned], np.int64), cat([a.teacher for a in aligned], np.int64)
        longer = cat([a.longer for a in aligned], bool)
        true_next = cat([a.ids[a.student + 1] for a in aligned], np.int64)    # the student's own next token
        cand, keep = t_ids[rows, t_pos].astype(np.int64), t_mask[rows, t_pos]
        lp = t_lps[rows, t_pos].astype(np.float64)
        mapped = (self.first_map if rule == "first_token" else self.id_map)[cand]
        use = keep & (mapped >= 0)
        if rule == "skip":
            use &= ~longer[:, None]
        if rule != "first_token" and self._exact_one_to_one:
            m_ids, m_lps, m_mask = np.where(use, mapped, 0), np.where(use, lp, -np.inf).astype(np.float32), use
        else:
            m_ids, m_lps, m_mask = _merge(mapped, lp, use)
        ids[rows, s_pos], lps[rows, s_pos], mask[rows, s_pos] = m_ids, m_lps, m_mask
        # the target's (renormalised) probability on the student's true next token, where there is a target
        covered = m_mask.any(-1)
        top = np.where(covered, m_lps.max(-1, initial=-np.inf), 0.0)        # (empty slots are -inf: weight 0)
        p = np.exp(m_lps.astype(np.float64) - top[:, None])
        true_p = (p * (m_ids == true_next[:, None])).sum(-1) / np.maximum(p.sum(-1), 1e-30)
        p_stored, hard = np.exp(lp), covered & longer
        sums = {"positions": float(sum(max(len(a.ids) - 1, 0) for a in aligned)), "aligned": float(len(rows)),
                "covered": float(covered.sum()), "longer": float(longer.sum()),
                "mass_stored": float(p_stored[keep].sum()), "mass_kept": float(p_stored[use].sum()),
                "true_prob": float(true_p[covered].sum()),
                "longer_covered": float(hard.sum()), "true_prob_longer": float(true_p[hard].sum())}
        return ids, lps, mask, sums


def stats(sums: dict[str, float]) -> dict[str, float]:
    """The logged statistics from ``target_sums``' sums: ``xtok_pos_aligned`` (student positions with a teacher
    position / student positions that predict a token), and at the aligned positions ``xtok_mass_kept`` (teacher
    probability the targets keep / stored teacher probability), ``xtok_pos_covered`` (the share with a target),
    ``xtok_teacher_longer`` (the share where the teacher's next token spans more bytes than the student's), and
    ``xtok_true_prob`` (mean renormalised target probability on the student's true next token, over the
    positions with a target: what ``kd.missing_mass=renorm`` trains towards)."""
    aligned = max(sums["aligned"], 1)
    return {"xtok_pos_aligned": sums["aligned"] / max(sums["positions"], 1),
            "xtok_mass_kept": sums["mass_kept"] / max(sums["mass_stored"], 1e-12),
            "xtok_pos_covered": sums["covered"] / aligned, "xtok_teacher_longer": sums["longer"] / aligned,
            "xtok_true_prob": sums["true_prob"] / max(sums["covered"], 1)}


def _merge(mapped: np.ndarray, lp: np.ndarray, use: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidates [n, K] (student ids, float64 log-probs, which to use) with repeated ids per position merged:
    one slot per id (in id order, the first slots), the log-sum-exp of its log-probs; the rest 0 / -inf / False.
    The losses treat each slot as its own outcome, so a repeated id would count the student's probability twice."""
    n, k = mapped.shape
    key = np.where(use, mapped, np.iinfo(np.int64).max)
    order = np.argsort(key, axis=-1)
    key = np.take_along_axis(key, order, -1)
    run = np.take_along_axis(use, order, -1)       # a run: one id's slots, side by side after the sort
    run[:, 1:] &= key[:, 1:] != key[:, :-1]
    starts = np.flatnonzero(run)
    # a run's sum stops at the next run's start; the unused slots between are -inf, nothing to the sum
    merged = np.logaddexp.reduceat(np.take_along_axis(np.where(use, lp, -np.inf), order, -1).ravel(), starts)
    count = run.sum(-1)
    pos, slot = starts // k, np.arange(len(starts)) - np.repeat(np.cumsum(count) - count, count)
    ids, lps = np.zeros((n, k), dtype=np.int64), np.full((n, k), -np.inf, dtype=np.float32)
    ids[pos, slot], lps[pos, slot] = key.ravel()[starts], merged
    return ids, lps, np.arange(k) < count[:, None]
