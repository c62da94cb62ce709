"""Load a tokenizer from a local folder and fingerprint it.

The fingerprint (``tokenizer_hash``) travels with every token artifact (packed instances, logit stores,
checkpoints) so that mixing artifacts made with different tokenizers is a clear error instead of silent
garbage. It hashes what decides token ids: the vocabulary (token -> id, added tokens included) and the
special tokens, not the serialisation of the file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from refine.core.errors import InputError


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """A fast HF tokenizer from a local folder or a hub id (``refine.core.hub``)."""
    from transformers import AutoTokenizer

    from refine.core.hub import local_model

    path = local_model(path)
    if not path.is_dir():
        raise InputError(f"tokenizer folder not found: {path} (run `make models` for the default teacher)")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - a damaged tokenizer.json: tokenizers' own Exception, RecursionError
        raise InputError(f"cannot load a tokenizer from {path}: {one_line(e)}") from None
    except BaseException as e:
        if not is_panic(e):                              # (a Rust panic inside tokenizers is a BaseException)
            raise
        raise InputError(f"cannot load a tokenizer from {path}: the tokenizers library failed ({one_line(e)})"
                         ) from None
    if tok.eos_token_id is None:
        raise InputError(f"tokenizer in {path} has no EOS token; packing needs one to separate documents")
    return tok


def encode_text(tok, texts: list[str]) -> list[list[int]]:
    """Token ids of each of ``texts``, corpus text: no BOS/EOS added, and a special token's string inside the
    text (``<|endoftext|>``, ``<|im_start|>``: documentation, chat logs, code hold them) is tokenized as the
    characters it is, never as the control id (which would put a false document boundary or a chat marker
    in the middle of a document). Every path that tokenizes corpus text (packing, re-tokenizing a row for
    another tokenizer) calls this, so they all read such strings the same way. Added tokens that are not
    special (a vocabulary's own multi-character pieces) are still matched as usual."""
    return tok(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def is_panic(e: BaseException) -> bool:
    """A Rust panic raised into Python (pyo3's ``PanicException``, a ``BaseException``: the tokenizers library
    raises one when its pre-tokenizer regex gives up, e.g. at Oniguruma's retry limit)."""
    return type(e).__name__ == "PanicException"


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


def tokenizer_hash(tok) -> str:
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    special = {k: str(v) for k, v in sorted(tok.special_tokens_map.items())}
    blob = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tokenizer_name(tok) -> str:
    return Path(getattr(tok, "name_or_path", "") or "unknown").name


def bos_prefix(tok) -> int | None:
    """The BOS id a model expects before its first token, when its tokenizer adds one by default (Gemma);
    ``None`` when documents are only separated by EOS (SmolLM2, GPT-2: there BOS is the EOS token).

    Packed rows start mid-stream and hold no BOS; a model trained to always see one scores such rows badly
    (Gemma-3-270M: perplexity 203 without, 17 with it on the Austen excerpt of tests/test_teacher.py), so the
    scorers and the online teacher put it in front of every row and drop its prediction.
    """
    bos = tok.bos_token_id
    if bos is None or bos == tok.eos_token_id:
        return None
    ids = tok("a")["input_ids"]
    return int(bos) if ids and ids[0] == bos else None
