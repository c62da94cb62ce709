"""Difference sampling judged by what it is for (MiniPLM Fig. 3b), on the real teacher and the real pipeline:
a corpus of planted classes (prose; licence boilerplate the teacher knows from the web and that repeats in the
corpus; noise neither model knows) refined at alpha 0.5 by the default flow, the reference sized to the job.
Minutes on this CPU and needs `make data models`: slow tier (make test-slow). The figures: bench/README.md."""

from __future__ import annotations

import pytest

from bench.selection_mechanism import TARGETS, build_corpus, run_setting
from refine.core.paths import cache_dir, corpus_dir, teacher_dir

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not (teacher_dir() / "config.json").is_file() or not (corpus_dir() / "train.jsonl").is_file(),
                    reason="needs the teacher and the bundled corpus (make data models)")
@pytest.mark.xfail(reason="not reached yet at this CPU scale: noise kept 7% against 5% (bench/README.md)", strict=False)
def test_the_default_reference_drops_boilerplate_and_noise_and_keeps_prose():
    corpus = cache_dir() / "data" / "planted" / "planted.jsonl"
    build_corpus(corpus)
    result = run_setting(corpus, "auto", instances=320, fraction=0.3)
    kept = result["kept"]
    print(result["setting"], kept, result["spearman_ref"], result["spearman_teacher"])
    for cls, (op, target) in TARGETS.items():
        assert (kept[cls] <= target) if op == "<=" else (kept[cls] >= target), (cls, kept)
