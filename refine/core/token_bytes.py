"""The UTF-8 bytes behind each token id of a tokenizer, and byte counts of token rows.

Two tokenizers meet only in bytes: a row re-tokenized with another tokenizer keeps its byte offsets
(``refine.core.retokenize``: cross-tokenizer KD aligns positions by them, a reference of another tokenizer counts
the same bytes as the teacher) and refine's ``select.normalize=bytes`` divides a row's summed NLL by its byte
count, the scale on which models with different tokenizers compare over the same text. Both need each token's
bytes exactly, which the vocabulary gives without running the tokenizer:

* byte-level BPE (GPT-2, SmolLM2, Llama 3, Qwen): a token's string spells its bytes through GPT-2's
  ``bytes_to_unicode`` table;
* SentencePiece with byte fallback (Gemma, Llama 2): ``▁`` is a space, ``<0xNN>`` the byte NN, other pieces
  their UTF-8.

Special (added) tokens have no bytes: ``None`` in the table, 0 in ``byte_lengths``. A tokenizer of another
kind is refused in one line rather than guessed: a wrong byte table would silently misalign every position.
"""

from __future__ import annotations

import json
import re
from functools import cache

import numpy as np

from refine.core.errors import InputError


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


def _kind(tok) -> str:
    """``byte_level`` | ``sentencepiece`` from the fast tokenizer's decoder (what turns ids back into text)."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    decoder = spec.get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    types = {p.get("type") for p in parts}
    if "ByteLevel" in types:
        return "byte_level"
    metaspace = any(p.get("type") == "Replace" and "▁" in json.dumps(p, ensure_ascii=False) for p in parts)
    if "ByteFallback" in types or metaspace:
        return "sentencepiece"
    raise InputError(f"tokenizer {getattr(tok, 'name_or_path', '?')}: cannot map its tokens to bytes (decoder "
                     f"{sorted(t for t in types if t) or 'none'}); byte alignment needs byte-level BPE or "
                     f"SentencePiece with byte fallback")


def token_bytes(tok) -> list[bytes | None]:
    """Each id's bytes (``None`` for special/added tokens and ids without a piece)."""
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
    return table


def text_bytes(tok) -> list[bytes | None]:
    """Each id's bytes as the text of a packed row: EOS (a document boundary) ``None``, other special tokens
    their literal string (a document that holds one, packed before packing read such strings as text)."""
    table, eos = token_bytes(tok), int(tok.eos_token_id)
    for i, t in tok.added_tokens_decoder.items():
        if i != eos and i < len(table) and table[i] is None:
            table[i] = t.content.encode()
    return table


def byte_lengths(tok) -> np.ndarray:
    """[vocab] int32: each id's byte count (0 for special tokens)."""
    return np.array([len(b) if b is not None else 0 for b in token_bytes(tok)], dtype=np.int32)


def row_bytes(tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Bytes of the text each row [N, L] of token ids spells (special tokens count 0), as int64 [N]."""
    return lengths[np.asarray(tokens, dtype=np.int64)].sum(axis=-1, dtype=np.int64)
