"""Issue 29 item 7: figures that were off. The trainer's ``tokens`` counts real tokens, not PAD slots; the refine
report does not set per-token NLLs of two vocabularies side by side."""

from __future__ import annotations

import numpy as np
import pytest

from distill.fused_loss import IGNORE
from tests.test_cross_family import gpt2_style_tokenizer  # noqa: F401  (a fixture)
from tests.test_cross_reference import _hand_rows, pair  # noqa: F401  (a fixture)
from tests.test_train import tiny_kd_data  # noqa: F401  (a fixture)


@pytest.mark.integration
def test_logged_tokens_are_the_real_tokens_of_padded_rows(tiny_overrides, request, tmp_path):
    """Before: every step added batch x accum x seq_len (448 here), PAD slots of the re-tokenized rows included."""
    from distill.data import BatchStream, open_retokenized
    from distill.train import train
    from refine.core.tokenizer import load_tokenizer
    from tests.test_train import _cfg, _records

    _, student_tok = request.getfixturevalue("gpt2_style_tokenizer")
    kd_data = request.getfixturevalue("tiny_kd_data")
    keep = [o for o in tiny_overrides if o.startswith("paths.")]
    cfg = _cfg(["+experiment=cross_family_kd", "+debug=tiny", *keep, *kd_data, f"model.tokenizer={student_tok}",
                "data.seq_len=112", "schedule=constant", "schedule.warmup_steps=0", "data.batch_size=2",
                "data.grad_accum=2", "trainer.max_steps=2", "trainer.eval_every=2", "trainer.ckpt_every=2",
                f"run_dir={tmp_path / 'run'}"])
    summary = train(cfg)
    # the same stream replayed: 2 steps of 2 micro-batches of 2 rows
    stream = BatchStream(open_retokenized(cfg.data.train, cfg.kd.teacher, load_tokenizer(student_tok), 112), 2,
                         cfg.seed)
    real = [int((stream.next_batch() != IGNORE).sum()) for _ in range(4)]
    steps = [real[0] + real[1], real[0] + real[1] + real[2] + real[3]]
    assert steps[1] < 2 * 2 * 2 * 112                                    # the rows are padded
    assert [r["tokens"] for r in _records(tmp_path / "run", "train")] == steps
    assert summary["tokens"] == steps[1] and _records(tmp_path / "run", "val")[-1]["tokens"] == steps[1]


class _Tok:
    def decode(self, ids):
        return " ".join(f"w{i}" for i in ids)


def test_refine_report_compares_a_reference_of_another_tokenizer_in_bits_per_byte(pair, tmp_path):  # noqa: F811
    """Before: 'mean NLL teacher / reference | 2.000 / 3.000 nats/token' and the two perplexities side by side,
    though per-token NLLs of two vocabularies do not compare; now the bits per byte the scores are made of."""
    from refine.core.instances import Instances
    from refine.cross_reference import FOLDER, cross_bits_per_byte, reference_rows
    from refine.report import write_report

    teacher, ref = pair
    out = tmp_path / "out"
    inst = _hand_rows(teacher, out / "instances_scored")
    reference_rows(inst, teacher, ref, out / FOLDER)
    nlls = (np.array([2.0, 2.0]), np.array([3.0, 3.0]))
    t_bpb, r_bpb = cross_bits_per_byte(inst, Instances(out / FOLDER), *nlls)
    scores, kept = r_bpb - t_bpb, np.array([0])
    tpass = {"tok_s": 1.0, "mean_nll": 2.0}
    rpass = {"tok_s": 1.0, "mean_nll": 3.0, "retokenized": True, "tokenizer": {"name": "other-bpe"}}
    figures = write_report(out, inst, inst, scores, kept, _Tok(), {}, tpass, rpass, 1, "bytes", nlls,
                           {"kind": "given (reference.path)"}, None)
    text = (out / "report.md").read_text()
    assert f"| mean bits/byte teacher / reference (the same text) | {t_bpb.mean():.3f} / {r_bpb.mean():.3f} |" in text
    assert figures["teacher_bits_per_byte"] == pytest.approx(t_bpb.mean())
    assert figures["reference_bits_per_byte"] == pytest.approx(r_bpb.mean())
    pairs = [line for line in text.splitlines() if "teacher / reference" in line]
    assert pairs and not any("nats" in line or "perplexity" in line for line in pairs)
    assert f"| teacher mean NLL (per teacher token, {inst.tokenizer.name}) | 2.000 nats/token |" in text
    assert "| reference mean NLL (per reference token, other-bpe) | 3.000 nats/token |" in text
    assert "| reference perplexity (per reference token, other-bpe) | 20.1 |" in text


def test_refine_report_of_one_vocabulary_keeps_nats_per_token_side_by_side(pair, tmp_path):  # noqa: F811
    from refine.report import write_report

    teacher, _ = pair
    out = tmp_path / "out"
    inst = _hand_rows(teacher, out / "instances_scored")
    nlls = (np.array([2.0, 2.0]), np.array([3.0, 3.0]))
    passes = ({"tok_s": 1.0, "mean_nll": 2.0}, {"tok_s": 1.0, "mean_nll": 3.0})
    figures = write_report(out, inst, inst, nlls[1] - nlls[0], np.array([0]), _Tok(), {}, *passes, 1, "tokens", nlls,
                           {"kind": "given (reference.path)"}, None)
    text = (out / "report.md").read_text()
    assert "| mean NLL teacher / reference | 2.000 / 3.000 nats/token |" in text
    assert "| perplexity teacher / reference (scored text, per own token) | 7.4 / 20.1 |" in text
    assert "teacher_bits_per_byte" not in figures
