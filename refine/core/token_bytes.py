"""The UTF-8 bytes behind each token id of a tokenizer, and byte counts of token rows.

Two tokenizers meet only in bytes: a row re-tokenized with another tokenizer keeps its byte offsets
(``refine.core.retokenize``: cross-tokenizer KD aligns positions by them, a reference of another tokenizer counts
the same bytes as the teacher) and refine's ``select.normalize=bytes`` divides a row's summed NLL by its byte
count, the scale on which models with different tokenizers compare over the same text. Both need each token's
bytes exactly, which the vocabulary gives without running the tokenizer:

* byte-level BPE (GPT-2, SmolLM2, Llama 3, Qwen): a token's string spells its bytes through GPT-2's
  ``bytes_to_unicode`` table;
* SentencePiece without a dummy prefix (Gemma): ``▁`` is a space, ``<0xNN>`` the byte NN, other pieces
  their UTF-8.

Refused in one line when the table is made, for every role (teacher, student, reference, the same-tokenizer
byte counts), rather than guessed: a wrong byte table would silently misalign every position or miscount
every row.

* Tokens without a byte spelling (WordPiece).
* A tokenizer that adds a space the text does not have in front of every text it encodes: SentencePiece with a
  dummy prefix (Llama 2, TinyLlama, Mistral v0.1), or byte-level BPE with ``add_prefix_space``. Packing encodes
  each document on its own, so every document's first token spells one phantom byte, but a row cut mid-document
  starts without one, and the row alone does not say which it is. Detected by behaviour (what ``"a"`` encodes
  to), not by config keys, which differ between versions of one tokenizer.

Special tokens, one rule for every byte count (``text_bytes``): EOS, the document separator, is no text (0
bytes); any other special token inside a packed row is the literal text of a document packed before special
strings were read as text (``refine.core.tokenizer.encode_text``), so it counts its literal string.
"""

from __future__ import annotations

import json
import re
from functools import cache

import numpy as np

from refine.core.errors import InputError
from refine.core.tokenizer import encode_text


@cache
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode``: printable bytes map to themselves, the rest to U+0100 onwards."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
SUPPORTED = "byte-level BPE (GPT-2, SmolLM2, Llama 3, Qwen) or SentencePiece without a dummy prefix (Gemma)"


def _name(tok) -> str:
    return getattr(tok, "name_or_path", "") or "(unnamed)"


def _kind(tok) -> str:
    """``byte_level`` | ``sentencepiece`` from the fast tokenizer's decoder (what turns ids back into text)."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    decoder = spec.get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    types = {p.get("type") for p in parts}
    if "ByteLevel" in types:
        return "byte_level"
    metaspace = any(p.get("type") == "Replace" and "▁" in json.dumps(p, ensure_ascii=False) for p in parts)
    if types & {"ByteFallback", "Metaspace"} or metaspace:
        return "sentencepiece"
    raise InputError(f"tokenizer {_name(tok)}: cannot map its tokens to bytes (decoder "
                     f"{sorted(t for t in types if t) or 'none'}); byte alignment and byte counts need {SUPPORTED}")


def _refuse_added_space(tok, kind: str, table: list[bytes | None]) -> None:
    """One line when encoding ``"a"`` spells a leading space: the tokenizer adds one to every text it encodes
    (the module docstring says why that cannot be counted right). By behaviour, so every way of configuring it
    (a ``Prepend`` normaliser, ``Metaspace`` with ``prepend_scheme``, ``add_prefix_space``) is caught."""
    spelled = b"".join(table[i] or b"" for i in encode_text(tok, ["a"])[0] if i < len(table))
    if spelled[:1] != b" ":
        return
    what = "SentencePiece with a dummy prefix (Llama-2 style)" if kind == "sentencepiece" else \
        "byte-level BPE with add_prefix_space"
    raise InputError(f"tokenizer {_name(tok)}: {what}, which adds a space the text does not have ('a' encodes "
                     f"as {spelled.decode(errors='replace')!r}), is not supported for byte alignment or byte counts; "
                     f"use {SUPPORTED}")


def token_bytes(tok) -> list[bytes | None]:
    """Each id's bytes (``None`` for special/added tokens and ids without a piece); refuses what the module
    docstring lists."""
    kind = _kind(tok)
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    table: list[bytes | None] = [None] * len(tok)
    u2b = _unicode_to_byte()
    for piece, i in tok.get_vocab().items():
        if i in special or i >= len(table):
            continue
        if kind == "byte_level":
            try:
                table[i] = bytes(u2b[c] for c in piece)
            except KeyError:           # an added non-special token stored as plain text
                table[i] = piece.encode()
        else:
            m = _BYTE_PIECE.fullmatch(piece)
            table[i] = bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode()
    _refuse_added_space(tok, kind, table)
    return table


def text_bytes(tok) -> list[bytes | None]:
    """Each id's bytes as the text of a packed row, the one rule of every byte count: EOS (a document boundary)
    ``None``, other special tokens their literal string (a document that holds one, packed before packing read
    such strings as text)."""
    table, eos = token_bytes(tok), int(tok.eos_token_id)
    for i, t in tok.added_tokens_decoder.items():
        if i != eos and i < len(table) and table[i] is None:
            table[i] = t.content.encode()
    return table


def lengths_of(table: list[bytes | None]) -> np.ndarray:
    """[vocab] int64: each entry's byte count, 0 for ``None``."""
    return np.array([len(b) if b is not None else 0 for b in table], dtype=np.int64)


def byte_lengths(tok) -> np.ndarray:
    """[vocab] int64: each id's byte count in a packed row's text (``text_bytes``: EOS 0, other special tokens
    their literal length)."""
    return lengths_of(text_bytes(tok))


def row_bytes(tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Bytes of the text each row [N, L] of token ids spells (``lengths`` from ``byte_lengths``), as int64 [N]."""
    return lengths[np.asarray(tokens, dtype=np.int64)].sum(axis=-1, dtype=np.int64)
