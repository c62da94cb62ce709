"""A packed row of one tokenizer re-tokenized with another, with every token's byte offsets in the row.

Two stages need the same text of a teacher row in another vocabulary: cross-tokenizer KD
(``distill.token_alignment`` pairs the positions where both have read the same bytes) and refine's difference
score with a reference of another tokenizer (``refine.cross_reference`` counts the reference's NLL over the
same bytes as the teacher's). This module is the one place the row's text is rebuilt, so both see exactly the
same target tokens and offsets.

Row edges and separators:

* The row's bytes are what its source tokens spell (``refine.core.token_bytes``). Source EOS tokens (document
  separators in a packed row) become target EOS tokens, each counted as one *virtual* byte on both sides, so
  offsets after a document boundary still line up; each document segment is re-tokenized on its own (as it was
  when it was packed), never across the boundary.
* A UTF-8 character cut by the row's first or last edge (byte-level tokens can split one) is dropped from the
  target's text: only bytes that form whole characters are re-tokenized.
* Other special tokens count as their literal text (a document that contains one, packed before packing read
  such strings as text), and the target re-tokenizes special-token strings of its own as text too
  (``refine.core.tokenizer.encode_text``, as packing does): a document that mentions the target's
  ``<|im_start|>`` is those characters on both sides.
* A target tokenizer that does not give back the text's bytes (a normaliser that lowercases or rewrites
  Unicode), or a source row holding an id that spells no bytes, cannot be aligned: one ``InputError`` naming the
  row, never a silently shifted offset. A tokenizer whose tokens have no byte spelling (WordPiece), or one that
  adds a space in front of every text (SentencePiece with a dummy prefix, Llama-2 style), is refused, as source
  or target, in one line when the ``Retokenizer`` is made (``token_bytes``), never per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refine.core.errors import InputError
from refine.core.token_bytes import lengths_of, text_bytes, token_bytes
from refine.core.tokenizer import encode_text


@dataclass(frozen=True)
class Retokenized:
    ids: np.ndarray            # int64 [S] the row's text in target tokens (target EOS where the source had EOS)
    ends: np.ndarray           # int64 [S] each target token's end byte in the row (EOS: one virtual byte)
    source_ends: np.ndarray    # int64 [L] each source token's end byte, same offsets


def utf8_lead_trim(b: bytes) -> int:
    """Continuation bytes at the start of ``b`` (the tail of a character begun in the previous row)."""
    n = 0
    while n < min(3, len(b)) and b[n] & 0xC0 == 0x80:
        n += 1
    return n


def utf8_tail_trim(b: bytes) -> int:
    """Bytes at the end of ``b`` that begin a character the row does not finish."""
    for back in range(1, min(4, len(b)) + 1):
        c = b[-back]
        if c & 0xC0 != 0x80:           # a lead byte (or ASCII): is its character complete?
            need = 1 if c < 0x80 else 2 if c >> 5 == 0b110 else 3 if c >> 4 == 0b1110 else 4
            return back if need > back else 0
    return 0


class Retokenizer:
    """Source and target tokenizers with their byte tables. ``roles`` name them in error lines (e.g.
    ``("teacher", "student")``)."""

    def __init__(self, source_tok, target_tok, roles: tuple[str, str] = ("source", "target")):
        self.target_tok, self.roles = target_tok, roles
        # special tokens other than EOS are their literal text in the row (a document that contains one); the
        # target's own never occur (encode_text reads their strings as text), so its table keeps them None and
        # the id map cannot send a source special token to a target control id
        src_bytes, tgt_bytes = text_bytes(source_tok), token_bytes(target_tok)
        self.src_eos, self.tgt_eos = int(source_tok.eos_token_id), int(target_tok.eos_token_id)
        self.src_bytes, self.tgt_bytes = src_bytes, tgt_bytes
        # byte lengths with EOS as one virtual byte: the offsets rows are aligned in
        self.src_len = lengths_of(src_bytes)      # the same counts as ``byte_lengths`` (one rule for specials)
        self.src_len[self.src_eos] = 1
        self.tgt_len = np.array([len(b) if b is not None else 1 for b in tgt_bytes], dtype=np.int64)
        self.tgt_len[self.tgt_eos] = 1
        # real text bytes (EOS none: it is no text), what bits per byte divide by
        self.src_text_len = self.src_len.copy()
        self.src_text_len[self.src_eos] = 0
        self.tgt_text_len = lengths_of(tgt_bytes)

    def __call__(self, row: np.ndarray, key=None) -> Retokenized:
        """Row ``row`` (source ids) re-tokenized; ``key`` names the row in error lines."""
        row = np.asarray(row, dtype=np.int64)
        src, tgt = self.roles
        if not self.src_len[row].all():    # an id without bytes would shift every byte offset after it
            bad = int(row[np.flatnonzero(self.src_len[row] == 0)[0]])
            raise InputError(f"{src} row {key} holds token id {bad}, which spells no bytes; cannot align it")
        eos_at = np.flatnonzero(row == self.src_eos)
        bounds = [-1, *eos_at.tolist(), len(row)]
        texts, starts = [], []            # each segment's text and its first byte's row offset
        src_ends = np.cumsum(self.src_len[row])
        for j in range(len(bounds) - 1):
            a, b = bounds[j] + 1, bounds[j + 1]
            blob = b"".join(self.src_bytes[i] or b"" for i in row[a:b].tolist())
            start = int(src_ends[a - 1]) if a > 0 else 0
            lead = utf8_lead_trim(blob) if j == 0 else 0
            tail = utf8_tail_trim(blob) if j == len(bounds) - 2 else 0
            blob = blob[lead:len(blob) - tail]
            try:
                texts.append(blob.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise InputError(f"{src} row {key}: its tokens do not spell UTF-8 text (byte {e.start} of a "
                                 f"segment); cannot align it with the {tgt} tokenizer") from None
            starts.append(start + lead)
        encoded = encode_text(self.target_tok, texts)   # a special string in the text stays text
        ids, ends = [], []
        for j, (text, seg, start) in enumerate(zip(texts, encoded, starts, strict=True)):
            seg = np.asarray(seg, dtype=np.int64)
            if b"".join(self.tgt_bytes[i] or b"" for i in seg.tolist()) != text.encode():
                raise InputError(f"{tgt} tokenizer {getattr(self.target_tok, 'name_or_path', '?')} does not "
                                 f"give back the bytes of {src} row {key}'s text (a normaliser that rewrites "
                                 f"it?): its tokens cannot be aligned by byte offsets")
            ids.append(seg)
            ends.append(start + np.cumsum(self.tgt_len[seg]))
            if j < len(texts) - 1:                          # the EOS that followed this segment
                ids.append(np.array([self.tgt_eos]))
                ends.append(np.array([int(src_ends[eos_at[j]])]))
        empty = np.zeros(0, dtype=np.int64)
        return Retokenized(np.concatenate(ids) if ids else empty, np.concatenate(ends) if ends else empty, src_ends)

    def starts(self, r: Retokenized) -> np.ndarray:
        """Each target token's first byte in the row (EOS: its virtual byte)."""
        return r.ends - self.tgt_len[r.ids]
