"""Difference scores with a reference of another tokenizer (``select.normalize=bytes``).

The teacher's pass scores the packed rows as they are; the reference cannot read those ids, so each teacher
row's TEXT is re-tokenized with the reference's tokenizer (``refine.core.retokenize``: document separators,
row edges) and written once, before scoring, as an instances folder of the reference's tokenizer,
``<out>/instances_reference/``: ``tokens.bin`` [N, S] (every row padded with the reference's EOS to the
longest, S), ``index.json`` (its ``retokenized_from``: the teacher rows' hash and tokenizer) and
``counted.npy`` [N, 4] int64 per row: ``first`` (the first counted reference token), ``length`` (its real
tokens), ``ref_bytes`` (the bytes the counted reference tokens spell) and ``teacher_bytes`` (the bytes of
teacher tokens 1..L-1). The reference pass (``refine.score_pass``) scores those rows like any others (right
padding cannot change a causal model's earlier positions) and writes, per row, the mean NLL over the counted
positions only. Same-tokenizer runs never come here: their outputs are those of before, byte for byte.

Which bytes: the teacher predicts its tokens 1..L-1 given token 0, i.e. the row's bytes from where token 1
starts (byte ``b1``) to its end. The reference scores the whole re-tokenized row (with its own BOS prefix, as
every pass does) but counts only its tokens that START at or after ``b1`` (and never its token 0, which no pass
predicts), dividing their summed NLL by the bytes THEY spell. Both sides are rates over nearly the same text:
the reference leaves out at most the one token that straddles ``b1`` and a UTF-8 character the row's end cuts
(<= 3 bytes, which it cannot spell), a few bytes of a row of ~1,000, and each side divides by its own bytes,
so the left-out bytes change which bytes are averaged over, not the scale. Counting the straddling token would
be worse: its NLL is mostly about bytes the teacher reads as context, not predicts. Document separators (EOS)
count their NLL and no bytes on both sides, as ``refine.outputs.byte_normalised`` does; other special tokens
are their literal text on both sides.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from refine.core.errors import InputError
from refine.core.instances import FORMAT, VERSION, Instances, TokenizerInfo, dtype_for
from refine.core.manifest import sha256_file
from refine.core.retokenize import Retokenized, Retokenizer
from refine.core.write import atomic_path

COUNTED = "counted.npy"
FOLDER = "instances_reference"


def counting(retok: Retokenizer, r: Retokenized, row: np.ndarray) -> tuple[int, int, int, int]:
    """(first, length, ref_bytes, teacher_bytes) of one re-tokenized row (the module docstring says why)."""
    b1 = int(r.source_ends[0])                   # where teacher token 1 starts
    first = max(1, int(np.searchsorted(retok.starts(r), b1, side="left")))
    ref_bytes = int(retok.tgt_text_len[r.ids[first:]].sum())
    teacher_bytes = int(retok.src_text_len[np.asarray(row[1:], dtype=np.int64)].sum())
    return first, len(r.ids), ref_bytes, teacher_bytes


def reference_rows(inst: Instances, teacher_tok, ref_tok, folder: Path, chunk: int = 1024) -> Instances:
    """``inst``'s rows re-tokenized with ``ref_tok`` at ``folder`` (reused when it holds exactly these: the same
    teacher rows and both tokenizers). Memory stays at one chunk of rows: the ragged rows go to a flat file
    first, then are padded once the longest is known."""
    made_from = {"instances": inst.index["tokens_sha256"], "tokenizer": inst.tokenizer.__dict__}
    info = TokenizerInfo.of(ref_tok)
    try:
        old = Instances(folder)
        if old.index.get("retokenized_from") == made_from and old.index.get("tokenizer") == info.__dict__ and \
                sha256_file(folder / COUNTED) == old.index.get("counted_sha256"):
            return old
    except (InputError, OSError):
        pass
    retok = Retokenizer(teacher_tok, ref_tok, ("teacher", "reference"))
    dtype = dtype_for(info.vocab_size)
    counted = np.zeros((len(inst), 4), dtype=np.int64)
    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        with open(tmp / "flat.bin", "wb") as flat:
            for a in range(0, len(inst), chunk):
                for i, row in enumerate(np.asarray(inst.tokens[a:a + chunk], dtype=np.int64), start=a):
                    r = retok(row, key=i)
                    counted[i] = counting(retok, r, row)
                    flat.write(r.ids.astype(dtype).tobytes())
        seq_len = max(2, int(counted[:, 1].max()))
        offsets = np.concatenate([[0], np.cumsum(counted[:, 1])])
        stream = np.memmap(tmp / "flat.bin", dtype=dtype, mode="r") if offsets[-1] else np.zeros(0, dtype)
        with open(tmp / "tokens.bin", "wb") as f:
            for a in range(0, len(inst), chunk):
                block = np.full((min(chunk, len(inst) - a), seq_len), info.eos_id, dtype=dtype)
                for j in range(len(block)):
                    block[j, :counted[a + j, 1]] = stream[offsets[a + j]:offsets[a + j + 1]]
                f.write(block.tobytes())
        del stream
        (tmp / "flat.bin").unlink()
        with open(tmp / COUNTED, "wb") as f:
            np.save(f, counted, allow_pickle=False)
        index = {"format": FORMAT, "version": VERSION, "dtype": dtype.name, "seq_len": seq_len, "count": len(inst),
                 "tokenizer": info.__dict__, "tokens_sha256": sha256_file(tmp / "tokens.bin"),
                 "retokenized_from": made_from, "counted_sha256": sha256_file(tmp / COUNTED),
                 "counted_columns": ["first", "length", "ref_bytes", "teacher_bytes"]}
        (tmp / "index.json").write_text(json.dumps(index, indent=2))
    return Instances(folder)


def check_fits(rows: Instances, model: Path, ref_tok) -> None:
    """Re-tokenized rows can be longer than the teacher's (another vocabulary cuts the same text finer): one line
    when they (with the reference's BOS prefix) pass the reference model's positions, before any scoring."""
    from refine.core.paths import config_int
    from refine.core.tokenizer import bos_prefix

    need, limit = rows.seq_len + (bos_prefix(ref_tok) is not None), config_int(model, "max_position_embeddings")
    if limit and need > limit:
        raise InputError(f"the teacher's rows re-tokenized for reference {model} are up to {need} of its tokens "
                         f"(BOS included), more than its max_position_embeddings ({limit}): lower pack.seq_len")


def read_counted(inst: Instances) -> np.ndarray | None:
    """[N, 4] int64 (first, length, ref_bytes, teacher_bytes) of a re-tokenized rows folder; None for packed
    instances (every position counts)."""
    if "retokenized_from" not in inst.index:
        return None
    path = inst.folder / COUNTED
    try:
        counted = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable ({type(e).__name__})") from None
    if counted.shape != (len(inst), 4) or counted.dtype != np.int64 or \
            sha256_file(path) != inst.index.get("counted_sha256"):
        raise InputError(f"{path}: not the counts {inst.folder} was written with (corrupt or replaced)")
    return counted


def counted_mean_nll(token_logprobs: np.ndarray, counted: np.ndarray) -> np.ndarray:
    """Per row, the mean NLL [B] float64 over its counted positions: log-prob column j predicts token j+1, so
    tokens first..length-1 are columns first-1..length-2 (a row without any: 0, and 0 bytes)."""
    cols = np.arange(token_logprobs.shape[1])
    mask = (cols >= counted[:, :1] - 1) & (cols < counted[:, 1:2] - 1)
    total = -np.where(mask, token_logprobs.astype(np.float64), 0.0).sum(axis=1)
    return total / np.maximum(mask.sum(axis=1), 1)


def cross_bits_per_byte(inst: Instances, ref_rows: Instances, teacher_nll: np.ndarray, ref_nll: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Teacher and reference bits per byte of each row: the teacher's mean NLL over its L-1 predicted tokens,
    the reference's over its counted tokens, each times its token count over its own bytes."""
    from refine.select import bits_per_byte

    counted = read_counted(ref_rows)
    if counted is None or ref_rows.index["retokenized_from"]["instances"] != inst.index["tokens_sha256"]:
        raise InputError(f"{ref_rows.folder} does not hold the re-tokenized rows of {inst.folder}")
    n_ref = np.maximum(counted[:, 1] - counted[:, 0], 0)
    return (bits_per_byte(teacher_nll, inst.seq_len - 1, counted[:, 3]),
            bits_per_byte(ref_nll, n_ref, counted[:, 2]))
