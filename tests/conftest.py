"""Tiny real assets for CPU tests: a byte-level BPE tokenizer trained here and a small synthetic corpus."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

# Tests never reach a hub (the packages do not force this: users with a network may use hub ids).
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")

REPO = Path(__file__).resolve().parent.parent
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have "
         "an they you were her she there been one all we their has would when if so no more what my out up who "
         "river mountain city king queen ship letter garden music science history war peace church school "
         "house road light winter summer morning evening north south island village army law money bridge").split()


HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def offline_hub_repo(tmp_path: Path, monkeypatch, name: str = "acme--tiny", kind: str = "models",
                     refs: dict[str, str] | None = None) -> Path:
    """An empty ``<kind>--<name>`` repo in an ``HF_HOME`` under ``tmp_path``, as huggingface_hub lays a download
    out (``refs/<ref>`` -> ``snapshots/<commit>``; default ``main`` -> ``HUB_COMMIT``), with the hub offline and
    ``tmp_path`` the working folder; the caller fills the snapshots."""
    repo = tmp_path / "hf" / "hub" / f"{kind}--{name}"
    refs = refs or {"main": HUB_COMMIT}
    for commit in refs.values():
        (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref, commit in refs.items():
        (repo / "refs" / ref).write_text(commit)
    for var in ("HF_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return repo


def make_docs(n: int, seed: int, prefix: str = "doc") -> list[dict]:
    """Sentences with a little structure (a per-doc topic word), so a tiny LM has something to learn."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        topic = rng.choice(WORDS[40:])
        sents = []
        for _ in range(rng.randint(2, 6)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(5, 12))]
            words.insert(rng.randint(0, len(words)), topic)
            sents.append(" ".join(words).capitalize() + ".")
        docs.append({"id": f"{prefix}/{i}", "source": prefix, "text": " ".join(sents)})
    return docs


def write_jsonl(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def train_tiny_tokenizer(out: Path, vocab_size: int = 400, seed: int = 1) -> Path:
    """A byte-level BPE (GPT-2's kind) trained on generated docs, saved as an HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([d["text"] for d in make_docs(300, seed=seed)], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A train/val/ref corpus folder like `make data` writes, at toy size."""
    out = tmp_path_factory.mktemp("corpus")
    write_jsonl(out / "train.jsonl", make_docs(400, seed=2))
    write_jsonl(out / "val.jsonl", make_docs(40, seed=3, prefix="val"))
    write_jsonl(out / "ref.jsonl", make_docs(80, seed=4, prefix="ref"))
    return out


@pytest.fixture
def tiny_overrides(tiny_tokenizer_dir, tiny_corpus, tmp_path) -> list[str]:
    """Hydra overrides that point a debug run at the tiny assets and a private cache/run folder."""
    return ["+experiment=lm_baseline", "+debug=tiny", "data.seq_len=64", f"model.tokenizer={tiny_tokenizer_dir}",
            f"paths.corpus={tiny_corpus}", f"paths.cache={tmp_path / 'cache'}", f"paths.runs={tmp_path / 'runs'}",
            f"run_dir={tmp_path / 'runs' / 'run'}"]


@pytest.fixture
def refine_overrides(tiny_corpus, tiny_model_dir, tiny_reference_dir, tmp_path) -> list[str]:
    """A refine run of the tiny corpus with the tiny teacher and reference (transformers backend: fast to start)."""
    return [f"corpus={tiny_corpus / 'train.jsonl'}", f"teacher.path={tiny_model_dir}",
            f"reference.path={tiny_reference_dir}", "teacher.backend=hf", "reference.backend=hf",
            "pack.seq_len=64", "shard_size=16", "logits.top_k=10", "logits.top_p=0.9", "logits.candidates=20",
            "logits.rs_samples=8", f"out={tmp_path / 'out'}"]


def save_tiny_llama(tokenizer_dir: Path, out: Path, seed: int, hidden: int = 128, layers: int = 2,
                    init_std: float = 0.2) -> Path:
    """A random-init Llama with the tiny tokenizer, saved as an HF folder (head_dim 64: vLLM's CPU attention
    has no kernel for head sizes below 32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from refine.core.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=1,
                         max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    # A wider init than the default spreads the next-token distributions, so top-K ids are well separated.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, init_std)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def scoring_rows(model_dir: Path, n: int, seq: int = 64) -> np.ndarray:
    """n rows of seq token ids: random ones, and row 5 a greedy continuation of the model (every actual token is
    its top-1, so the actual token also appears among the top-K: the duplicate case scorers must handle)."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    rows = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(n, seq), dtype=np.int64)
    with torch.no_grad():
        greedy = model.generate(torch.as_tensor(rows[:1, :1]), max_new_tokens=seq - 1, min_new_tokens=seq - 1,
                                do_sample=False, pad_token_id=0)
    rows[5] = greedy[0].numpy()
    return rows


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    return save_tiny_llama(tiny_tokenizer_dir, tmp_path_factory.mktemp("tiny_model"), seed=0)


@pytest.fixture(scope="session")
def tiny_reference_dir(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    return save_tiny_llama(tiny_tokenizer_dir, tmp_path_factory.mktemp("tiny_reference"), seed=1, layers=1,
                           init_std=0.1)


def refine_output_differences(a: Path, b: Path) -> list[str]:
    """Files of two refine outputs that differ (or exist in one only), ignoring what records time or place:
    manifests, pass summaries and the report (timings), the folder lock (its last writer's pid), a scoring
    shard's seconds, a subset's parent path, the logs.
    Everything else (stores, scores, instances, text exports) must match byte for byte."""
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.relative_to(a).parts[0] != "logs")
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.relative_to(b).parts[0] != "logs")
    differ = sorted(str(f) for f in set(files_a) ^ set(files_b))
    for f in set(files_a) & set(files_b):
        x, y = (a / f).read_bytes(), (b / f).read_bytes()
        if f.name in ("manifest.json", "pass.json", "report.md", ".writer.lock"):   # timings; the writer's pid
            continue
        if f.name == "index.json":                                    # a subset names its parent's folder
            y = y.replace(str(b).encode(), str(a).encode())
        if f.name.startswith("shard-") and f.suffix == ".json":
            x, y = ({k: v for k, v in json.loads(z).items() if k not in ("seconds", "tok_s", "write_seconds")}
                    for z in (x, y))
        if x != y:
            differ.append(str(f))
    assert sum(f.suffix in (".bin", ".npy") for f in files_a) > 20, "not a refine output"
    return sorted(differ)
