"""The text export of a selection, ``refined.jsonl`` and ``random.jsonl`` (this module alone writes it).

A student of another family re-tokenizes refined data with its own tokenizer (MiniPLM's cross-family use), so
the export holds *documents*, not packed rows. Packed rows join documents with the teacher's EOS token and cut
them at both ends; a row's decoded text would carry the teacher's EOS spelling (``<|endoftext|>``, ``<eos>``),
which another tokenizer reads as ordinary characters. Instead each line is one *document piece*, the longest
run of one document's text that the selected rows hold without a gap, in corpus order::

    {"id": "<doc id>#<start>", "doc_id": "<doc id>", "source": "<corpus source>",
     "start": 0, "end": 412,          # the piece's teacher tokens within its document, [start, end)
     "whole": true,                   # the piece is the whole document
     "rows": [17, 18], "scores": [0.41, 0.12],   # the selected rows that hold it (scores.npz order), scores
     "text": "..."}

A document the selection kept in consecutive rows is one record, whole when its first and last rows are both
kept. ``text`` is the bytes the teacher's tokens spell (``token_bytes.text_bytes``): a whole document's text is
the corpus document's text. A piece that begins or ends mid-document starts and ends at whole UTF-8 characters
(a byte-level token can split one; the partial character is left out). No record holds a control token: the
student's packer puts its own EOS after each record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from refine.core.errors import InputError
from refine.core.instances import Instances
from refine.core.retokenize import utf8_lead_trim, utf8_tail_trim
from refine.core.token_bytes import text_bytes
from refine.core.write import atomic_path


@dataclass
class _Piece:
    doc: int                   # the document's index in the packed stream
    start: int                 # its first token's offset within the document
    stream_end: int            # one past its last token in the stream (where a continuation must begin)
    tokens: int = 0
    ends_doc: bool = False
    chunks: list[bytes] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)


def _spelling(tok):
    """ids -> bytes: the byte table where the tokenizer has one (the EOS id inside a document is the literal
    string, a document packed before packing read special strings as text), else the tokenizer's decode."""
    try:
        table = text_bytes(tok)
    except InputError:                        # no byte spelling (WordPiece): the decoder's text is the best
        return lambda ids: tok.decode(ids.tolist()).encode()
    table[int(tok.eos_token_id)] = tok.convert_ids_to_tokens(int(tok.eos_token_id)).encode()
    return lambda ids: b"".join(table[i] or b"" for i in ids.tolist())


def write_text_export(inst: Instances, rows: np.ndarray, scores: np.ndarray, tok, path: Path) -> int:
    """Rows ``rows`` of ``inst`` (increasing) as document pieces in ``path``; returns the records written."""
    root, stream_rows = inst.root_rows()
    docs, seq_len, spell = root.docs, inst.seq_len, _spelling(tok)
    starts, n_docs = docs.starts, len(docs)
    written = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        def flush(p: _Piece | None) -> None:
            nonlocal written
            if p is None or not p.chunks:
                return
            blob = b"".join(p.chunks)
            lead = utf8_lead_trim(blob) if p.start else 0
            tail = 0 if p.ends_doc else utf8_tail_trim(blob)
            text = blob[lead:len(blob) - tail].decode("utf-8", errors="replace")
            if not text:
                return
            doc_id, source = docs.ids(p.doc, p.doc + 1)[0], docs.sources(p.doc, p.doc + 1)[0]
            f.write(json.dumps({"id": f"{doc_id}#{p.start}", "doc_id": doc_id, "source": source,
                                "start": p.start, "end": p.start + p.tokens, "whole": p.start == 0 and p.ends_doc,
                                "rows": p.rows, "scores": p.scores, "text": text}, ensure_ascii=False) + "\n")
            written += 1

        piece: _Piece | None = None
        for r in np.asarray(rows, dtype=np.int64).tolist():
            lo = int(stream_rows[r]) * seq_len
            hi, row = lo + seq_len, np.asarray(inst.tokens[r], dtype=np.int64)
            first = int(np.searchsorted(starts, lo, side="right")) - 1
            last = int(np.searchsorted(starts, hi, side="left")) - 1
            for j in range(max(first, 0), last + 1):
                nxt = int(starts[j + 1]) if j + 1 < n_docs else docs.stream_tokens
                eos = nxt - 1 if isinstance(nxt, int) else hi      # the document's EOS in the stream
                a, b = max(int(starts[j]), lo), min(eos, hi)
                if piece is None or piece.doc != j or piece.stream_end != a:
                    flush(piece)
                    piece = _Piece(j, a - int(starts[j]), a)
                piece.chunks.append(spell(row[a - lo:b - lo]))
                piece.stream_end, piece.ends_doc = b, eos < hi
                piece.rows.append(r)
                piece.scores.append(round(float(scores[r]), 5))
                piece.tokens += b - a
                if piece.ends_doc:
                    flush(piece)
                    piece = None
        flush(piece)
    return written
