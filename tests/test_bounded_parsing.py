"""Small inputs that cost far more than their bytes to parse, and inputs that used to end in a traceback (issue 28:
findings 5, 8, 11 and 12's zstd part). Each crafted input is read as the app reads it; where memory is the point,
in a child process under a 2 GiB address-space cap (``RLIMIT_AS``), as before the fix it ended in a
``MemoryError`` traceback there, and the child's peak (VmHWM) is bounded.

* a 2 KB parquet whose one dictionary value (50 MiB) 1,000 rows point at: read a batch of 2 rows at a time,
  or refused at its dictionary page when a page may not hold it; a 37 KB saved dataset of zstd-compressed
  arrow buffers declaring 1 GiB: refused from the 8-byte prefixes, before ``load_from_disk`` inflates them;
  a 60 MB JSON line ``[{},{},...]`` (20 KB as .zst, four of them): skipped and counted, not parsed;
  the served scorer's vocabulary probe: parsed only within 16 JSON values per vocabulary entry.
* a corrupt parquet page, a non-UTF-8 parquet or arrow string, a tokenizer regex at Oniguruma's retry limit (a
  Rust panic, a PicklingError with two pack workers), a checkpoint with a pickled ``pytorch_model.bin``: one line.
* token ids ``"05"`` in a served answer, K candidates of log-prob 0 (total probability K): refused.
* a ``zstd --long=31`` corpus: says the 2 GiB window it needs and that it is refused, not "corrupt".
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from refine.core.errors import InputError  # noqa: E402  (the child imports this file by path)

pytestmark = pytest.mark.integration   # child processes under a memory cap (make test-unit skips)

CAP_BYTES = 2 << 30


# ---- crafted inputs -----------------------------------------------------------------------------------------

def parquet_dictionary_bomb(p: Path, value_mib: int = 50, rows: int = 1000) -> Path:
    """``rows`` rows of one dictionary-encoded ``value_mib`` MiB string: ~2 KB on disk, zstd level 19."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    column = pa.DictionaryArray.from_arrays(pa.array([0] * rows, pa.int32()), pa.array(["a" * (value_mib << 20)]))
    pq.write_table(pa.table({"text": column}), p, compression="zstd", compression_level=19)
    return p


def rewrite_arrow(d: Path, batches: list, compression: str | None = None) -> Path:
    """The saved dataset ``d``'s one arrow file rewritten as an IPC stream of ``batches`` (record batches)."""
    import pyarrow as pa

    arrow = next(d.glob("*.arrow"))
    options = pa.ipc.IpcWriteOptions(compression=pa.Codec(compression, 19) if compression else None)
    with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_stream(sink, batches[0].schema, options=options) as w:
        for b in batches:
            w.write_batch(b)
    return d


def saved_dataset(d: Path, texts: list[str]) -> Path:
    import datasets

    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(d))
    return d


def zstd_dataset_bomb(d: Path) -> Path:
    """A saved dataset whose arrow file is 10 batches of 100 rows of 1 MiB, zstd-compressed: ~37 KB, 1 GiB."""
    import pyarrow as pa

    saved_dataset(d, ["x"])
    batch = pa.record_batch([pa.array(["a" * (1 << 20)] * 100)], names=["text"])
    return rewrite_arrow(d, [batch] * 10, "zstd")


def container_line(mb: int = 60) -> bytes:
    """``[{},{},...]``: ~20M objects in ``mb`` MB, 1.5 GB once parsed."""
    n = mb * 10**6 // 3
    return b"[" + b"{}," * (n - 1) + b"{}]\n"


def non_utf8_strings():
    """A string array whose second value is ``caf\\xe9!`` (arrow does not check UTF-8 when it is built so)."""
    import pyarrow as pa

    offsets = pa.py_buffer(np.array([0, 2, 7], dtype=np.int32).tobytes())
    return pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(b"okcaf\xe9!")])


def zstd_long(p: Path, window_log: int = 31) -> Path:
    """JSONL compressed as ``zstd --long=31`` writes a stream: a frame asking for a 2 GiB window."""
    import zstandard

    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=window_log, enable_ldm=True)
    c = zstandard.ZstdCompressor(compression_params=params).compressobj()
    p.write_bytes(c.compress(b'{"text": "a document"}\n' * 100) + c.flush())
    return p


# ---- the child: read under the cap --------------------------------------------------------------------------

def read_all(path: str, kw: dict, limit: int | None) -> dict:
    """In the child: iterate ``iter_documents`` (at most ``limit`` documents); the outcome and the peak."""
    import itertools
    import traceback

    from refine.core.corpus import CorpusStats, iter_documents

    stats, out = CorpusStats(), {}
    try:
        docs = iter_documents(path, stats=stats, **kw)
        out["docs"] = sum(1 for _ in (itertools.islice(docs, limit) if limit else docs))
        out["outcome"] = "ok"
    except InputError as e:
        out["outcome"], out["line"] = "error", str(e)
    except BaseException:  # noqa: BLE001 - the point: show what escaped
        out["outcome"], out["line"] = "traceback", traceback.format_exc(limit=4)
    out["too_large"] = stats.skipped_too_large
    status = Path("/proc/self/status").read_text()
    out["peak_mib"] = round(int(status.split("VmHWM:")[1].split()[0]) / 1024, 1)
    return out


def read_capped(path: Path, limit: int | None = None, **kw) -> dict:
    code = ("import json, resource; "
            f"resource.setrlimit(resource.RLIMIT_AS, ({CAP_BYTES}, {CAP_BYTES})); "
            "from tests.test_bounded_parsing import read_all; "
            f"print(json.dumps(read_all({str(path)!r}, {kw!r}, {limit!r})))")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print(path.name, kw, out)
    return out


def one_error(path, match: str, **kw) -> str:
    from refine.core.corpus import iter_documents

    with pytest.raises(InputError, match=match) as e:
        list(iter_documents(path, **kw))
    assert "\n" not in str(e.value)
    return str(e.value)


# ---- finding 5: parsing bounded by cost -----------------------------------------------------------------------

def test_a_parquet_dictionary_bomb_is_read_in_bounded_batches(tmp_path):
    f = parquet_dictionary_bomb(tmp_path / "bomb.parquet")
    assert f.stat().st_size < 4096
    out = read_capped(f, limit=3)                        # rows of 50 MiB are documents: 2 decoded at a time
    assert out["outcome"] == "ok" and out["docs"] == 3, out
    assert out["peak_mib"] < 1024, out
    # where a page may not hold the dictionary value, it is refused at the page header, before decoding
    out = read_capped(f, max_doc_bytes=1 << 20)
    assert out["outcome"] == "error" and out["line"] == (
        f"{f}: row group 0, column 'text': a dictionary page of 52,428,804 bytes uncompressed at byte 4, over the "
        f"5,242,880 a page may hold (4 x max_doc_bytes + 1 MiB); refused before decoding"), out
    assert out["peak_mib"] < 256, out
    # where it may, rows over max_doc_bytes are skipped and counted without becoming Python strings
    small = parquet_dictionary_bomb(tmp_path / "small.parquet", rows=40)
    out = read_capped(small, max_doc_bytes=20 << 20)
    assert out["outcome"] == "error" and out["too_large"] == 40 and "(0 empty, 40 over 20971520 bytes skipped" \
        in out["line"], out
    assert out["peak_mib"] < 768, out


def test_a_zstd_compressed_saved_dataset_is_refused_before_it_is_inflated(tmp_path):
    d = zstd_dataset_bomb(tmp_path / "hf")
    assert sum(p.stat().st_size for p in d.iterdir()) < 64 << 10
    out = read_capped(d)
    arrow = next(d.glob("*.arrow"))
    assert out["outcome"] == "error" and out["line"] == (
        f"{arrow}: compressed arrow buffers declaring over 419,432,016 bytes decompressed, more than the "
        f"335,544,320 a saved dataset's file may hold compressed (4 x max_doc_bytes + 64 MiB); refused before "
        f"decompressing"), out
    assert out["peak_mib"] < 256, out
    # a sound compressed one within the bound reads as the uncompressed one
    import pyarrow as pa

    ok = rewrite_arrow(saved_dataset(tmp_path / "ok", ["one", "two"]),
                       [pa.record_batch([pa.array(["one", "two"])], names=["text"])], "zstd")
    from refine.core.corpus import iter_documents

    assert [d.text for d in iter_documents(ok)] == ["one", "two"]


def test_a_json_line_of_millions_of_objects_is_skipped_not_parsed(tmp_path):
    import zstandard

    good = json.dumps({"id": "good", "text": "a fine document"}).encode() + b"\n"
    plain = tmp_path / "c.jsonl"
    plain.write_bytes(container_line() + good)
    out = read_capped(plain)
    assert out["outcome"] == "ok" and out["docs"] == 1 and out["too_large"] == 1, out
    assert out["peak_mib"] < 384, out                    # it cost 1.5 GB to parse
    zst = tmp_path / "four.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor(level=19).compress(container_line() * 4))
    assert zst.stat().st_size < 32 << 10
    out = read_capped(zst)
    assert out["outcome"] == "error" and out["too_large"] == 4 and out["line"].endswith(
        "(0 empty, 4 over 67108864 bytes skipped; a JSON line of over 524288 values counts as over)"), out
    assert out["peak_mib"] < 384, out


def test_structure_is_counted_outside_strings():
    """A long document whose text is full of braces and commas is read (only structure outside strings counts);
    a line of many small values is over however it is written."""
    from refine.core.json_bounds import too_many_values

    code = json.dumps({"text": "f(a, b) { x[1]: y, z: [2, 3] }\n" * 200_000, "id": "code"}).encode()
    assert len(code) > 6_000_000 and not too_many_values(code, 1 << 16)
    for line in (b"[" + b'"ab",' * 100_000 + b'"ab"]', b"[" + b"1," * 100_000 + b"1]",
                 b'{"text": "x", "meta": ' + b"[[]," * 70_000 + b"[]]}"):
        assert too_many_values(line, 1 << 16), line[:30]
    assert not too_many_values(b"[" + b"1," * 30_000 + b"1]" + b" " * 200_000, 1 << 16)


def test_a_huge_code_document_in_jsonl_is_still_a_document(tmp_path):
    from refine.core.corpus import iter_documents

    text = "f(a, b) { x[1]: y, z: [2, 3] }\n" * 200_000        # 6 MB, 1.6M structural characters inside its string
    (tmp_path / "code.jsonl").write_text(json.dumps({"text": text}) + "\n")
    assert [d.text for d in iter_documents(tmp_path / "code.jsonl")] == [text]


def test_the_vocabulary_probe_is_parsed_within_a_value_bound(tiny_model_dir):
    from refine.scorers.registry import make_scorer
    from refine.scorers.served_api import SMALL_RESPONSE, response_cap
    from tests.test_served_scorer import _send, fake_vllm, raw_server

    probe = {"prompt": [0, 0], "prompt_logprobs": -1}
    assert response_cap(probe, 49_152) == SMALL_RESPONSE + 512 * 49_154     # 29 MB (was 155 MB: 3 KiB an entry)
    handle, _ = fake_vllm()
    cap = response_cap(probe, 400)
    n = (cap - 100) // 3                                 # an answer just under the cap, all empty objects
    bomb = b'{"choices": [{"prompt_logprobs": [null, [' + b"{}," * (n - 1) + b"{}]]}]}"
    assert len(bomb) <= cap

    def respond(h, path, body):
        if path == "/v1/completions" and body["prompt_logprobs"] == -1:
            return _send(h, 200, bomb)
        status, out = handle("GET" if body is None else "POST", path, body)
        _send(h, status, json.dumps(out).encode())

    with raw_server(respond) as url, pytest.raises(InputError) as e:
        make_scorer("served", str(tiny_model_dir), top_k=3, urls=[url], retries=1, backoff=0.01, timeout=5.0)
    assert f"{url}: JSON of more than {cap // 32:,} values ({len(bomb):,} bytes), not parsed (after 2 attempts)" \
        in str(e.value), str(e.value)


# ---- finding 8: one line, not a traceback ----------------------------------------------------------------------

def test_corrupt_parquet_pages_and_non_utf8_columns_are_one_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"document number {i} " * 20 for i in range(2000)]
    f = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": texts}), f, compression="zstd", use_dictionary=False)
    good, cc = f.read_bytes(), pq.ParquetFile(f).metadata.row_group(0).column(0)
    start = cc.data_page_offset
    payload = good.index(b"\x28\xb5\x2f\xfd", start)     # the first data page's zstd frame, after its header
    damaged = bytearray(good)
    damaged[start] ^= 0xFF                               # its page header
    f.write_bytes(bytes(damaged))
    one_error(f, rf"c\.parquet: row group 0, column 'text': corrupt page header at byte {start} ")
    damaged = bytearray(good)
    damaged[payload:payload + 4] = b"\x00\x00\x00\x00"     # its compressed data (no zstd frame there)
    f.write_bytes(bytes(damaged))
    one_error(f, r"c\.parquet: cannot read row group 0 \(OSError: ZSTD decompression failed")
    pq.write_table(pa.table({"text": non_utf8_strings()}), tmp_path / "u.parquet")
    one_error(tmp_path / "u.parquet", r"u\.parquet:row 2: field 'text' is not UTF-8 \(invalid continuation byte "
                                      r"at byte 3 of the value\)$")
    d = saved_dataset(tmp_path / "hf", ["x", "y"])
    rewrite_arrow(d, [pa.record_batch([non_utf8_strings()], names=["text"])])
    one_error(d, r"hf:row 2: field 'text' is not UTF-8")
    pq.write_table(pa.table({"text": [["a", "list"]]}), tmp_path / "l.parquet")
    one_error(tmp_path / "l.parquet", r"l\.parquet: field 'text' is list<element: string>, not a string")


def _regex_tokenizer(src: Path, out: Path, regex: str) -> Path:
    shutil.copytree(src, out)
    spec = json.loads((out / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        spec["pre_tokenizer"]]}
    (out / "tokenizer.json").write_text(json.dumps(spec))
    return out


def test_a_tokenizer_regex_at_onigurumas_retry_limit_is_one_line(tiny_tokenizer_dir, tmp_path):
    from refine.core.pack import pack
    from refine.core.tokenizer import load_tokenizer

    tok = load_tokenizer(_regex_tokenizer(tiny_tokenizer_dir, tmp_path / "backtracks", r"(a+)+$"))
    docs = [{"id": f"d{i}", "text": "the river and the king " * 5} for i in range(300)]
    docs[270]["text"] = "a" * 60 + "x"                   # (a+)+$ on it: exponential backtracking
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    for workers in (1, 2):                               # (2: it was a PicklingError of the panic)
        with pytest.raises(InputError) as e:
            pack(tmp_path / "c.jsonl", tok, 16, tmp_path / f"out{workers}", workers=workers, quiet=True)
        assert str(e.value) == (
            "the tokenizer backtracks fails on document 'd270': Onig: Regex search error: retry-limit-in-match "
            "over (its pre-tokenizer regex gives up on this text); fix the tokenizer or leave the document out")
    with pytest.raises(InputError, match=r"cannot load a tokenizer from .*unclosed: Oniguruma error: end pattern "
                                         r"with unmatched parenthesis"):
        load_tokenizer(_regex_tokenizer(tiny_tokenizer_dir, tmp_path / "unclosed", "(a+"))


def test_a_checkpoint_with_pickled_weights_is_refused_in_one_line(tiny_model_dir, tmp_path):
    from transformers import AutoConfig

    from distill.checkpoint import load_model

    ckpt = tmp_path / "step_1"
    shutil.copytree(tiny_model_dir, ckpt)
    for p in ckpt.glob("*.safetensors"):
        p.unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"cos\nsystem\n(S'echo planted'\ntR.")   # os.system, if unpickled
    with pytest.raises(InputError) as e:
        load_model(ckpt, AutoConfig.from_pretrained(tiny_model_dir))
    assert str(e.value) == (f"no safetensors weights in checkpoint {ckpt} (pytorch_model.bin: pickled weights are "
                            f"not loaded; save it with safetensors, save_pretrained(safe_serialization=True), where "
                            f"you trust it)")


# ---- finding 11: served answers ---------------------------------------------------------------------------------

def _answer(entries: list[dict]) -> dict:
    return {"choices": [{"prompt_logprobs": [None, *entries]}]}


def test_served_answers_with_odd_ids_or_too_much_probability_are_refused():
    from refine.scorers.served_api import parse_completion

    row, url = np.array([1, 2]), "http://t"

    def parse(entry: dict, k: int = 3):
        return parse_completion(_answer([entry]), url, row, k, None, 400)

    sound = {"2": {"logprob": -3.5, "rank": 4}, "7": {"logprob": -0.5, "rank": 1},
             "8": {"logprob": -2.0, "rank": 2}, "9": {"logprob": -3.0, "rank": 3}}
    token, ids, lps = parse(sound)
    assert ids.tolist() == [[7, 8, 9]] and token.tolist() == [-3.5]
    for key in ("07", "007", "+7", " 7", "7_0", "\u0667"):          # all int("...") == 7 (or 70)
        odd = {("2" if k == "2" else key if k == "7" else k): v for k, v in sound.items()}
        with pytest.raises(InputError, match=r"malformed prompt_logprobs at position 1 \(ValueError: token id "
                                             + re.escape(repr(key)) + " is not written as a decimal number"):
            parse(odd)
    zeros = {"2": {"logprob": 0.0, "rank": 1}, "7": {"logprob": 0.0, "rank": 2}, "8": {"logprob": 0.0, "rank": 3}}
    with pytest.raises(InputError, match=r"answered log-probs at position 1 whose probabilities add up to 3, "
                                         r"more than 1$"):
        parse(zeros)
    outside = {"2": {"logprob": -0.1, "rank": 9}, "7": {"logprob": -0.5, "rank": 1},
               "8": {"logprob": -2.0, "rank": 2}, "9": {"logprob": -3.0, "rank": 3}}
    with pytest.raises(InputError, match=r"add up to 1\.6\d*, more than 1"):            # the actual token counts
        parse(outside)
    half = float(np.log(np.float32(0.5)))                # a two-token distribution: 1 within fp error
    parse({"2": {"logprob": half, "rank": 1}, "7": {"logprob": half, "rank": 2}}, k=2)


# ---- finding 12 (zstd): a long window is said as such ---------------------------------------------------------

def test_a_zstd_long_window_corpus_says_the_window_it_needs(tmp_path):
    f = zstd_long(tmp_path / "long.jsonl.zst")
    assert f.read_bytes()[4:6] == b"\x00\xa8"           # no content size; window descriptor 2^31
    one_error(f, r"long\.jsonl\.zst: a zstd frame near compressed byte \d+ needs a 2 GiB window \(zstd --long=N, "
                 r"N > 27, makes those\); refused: over the 128 MiB a window may take here")
    from refine.core.corpus import iter_documents

    ok = zstd_long(tmp_path / "ok.jsonl.zst", window_log=27)         # --long=27: within the bound
    assert len(list(iter_documents(ok))) == 100


def test_zstd_window_sizes_from_frame_headers():
    from refine.core.compressed import zstd_window

    assert zstd_window(b"\x28\xb5\x2f\xfd\x00\xa8") == 1 << 31
    assert zstd_window(b"\x28\xb5\x2f\xfd\x00\x58") == 1 << 21
    assert zstd_window(b"\x28\xb5\x2f\xfd\x00\x59") == (1 << 21) + (1 << 18)
    assert zstd_window(b"\x28\xb5\x2f\xfd\x20\x10") == 0x10                 # single segment: the content size
    assert zstd_window(b"\x28\xb5\x2f\xfd\xa0" + struct.pack("<I", 5000)) == 5000
    assert zstd_window(b"\x28\xb5\x2f\xfd\x60" + struct.pack("<H", 10)) == 266
    assert zstd_window(b"PK\x03\x04\x00\x00") is None
