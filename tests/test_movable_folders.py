"""A refined folder moves as a whole: its subsets name their parents relative to themselves (``../<name>``), so a
copy elsewhere (another disk, a bucket sync) re-selects and trains with the original gone; a relative link never
leaves the folder that holds it, and folders written with absolute links still read."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from distill.data import BatchStream, open_instances, read_rows
from refine.core.errors import InputError
from refine.core.instances import Instances, write_subset
from refine.core.pack import pack
from refine.core.tokenizer import load_tokenizer
from tests.conftest import make_docs, write_jsonl


@pytest.fixture
def tok(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


def _refined_like(tok, root):
    """What refine leaves of the instances: instances_all (the packed stream), instances_scored (a subset of it),
    instances and instances_random (subsets of that); two sources, so per-source reads go down the chain."""
    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    write_jsonl(corpus / "a.jsonl", make_docs(40, seed=1, prefix="wiki"))
    write_jsonl(corpus / "b.jsonl", make_docs(40, seed=2, prefix="novel"))
    out = root / "out"
    full = pack(corpus, tok, 32, out / "instances_all", quiet=True)
    scored = write_subset(full, np.arange(0, len(full), 2), out / "instances_scored")
    write_subset(scored, np.array([len(scored) - 1, 0, 3]), out / "instances")
    write_subset(scored, np.array([1, 2]), out / "instances_random")
    return out, full


def _reads(out, tok):
    """Everything a re-selection, the report and training read through the links, from ``out``."""
    kept = Instances(out / "instances")
    root, rows = kept.root_rows(within=out)
    assert root.folder.resolve() == (out / "instances_all").resolve() and len(rows) == 3
    assert np.array_equal(np.asarray(kept.tokens), np.asarray(root.tokens)[rows])
    sources = [kept.source_of(i) for i in range(len(kept))]
    assert Instances(out / "instances_random").stream_root(within=out).folder.resolve() == root.folder.resolve()
    train = open_instances(out / "instances", tok, 32, out / "cache", quiet=True)   # data.train=<out>/instances
    batch = read_rows(train, BatchStream(train, 2, seed=0).next_rows())
    assert batch.shape == (2, 32)
    return sources, rows.tolist()


def test_subset_links_are_relative_and_a_copy_reads_without_the_original(tok, tmp_path):
    out, _ = _refined_like(tok, tmp_path / "a")
    for name, parent in (("instances_scored", "instances_all"), ("instances", "instances_scored"),
                         ("instances_random", "instances_scored")):
        assert json.loads((out / name / "index.json").read_text())["subset_of"] == f"../{parent}"
    before = _reads(out, tok)
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(tmp_path / "a")
    assert _reads(copy, tok) == before
    # the copy's links stay inside it: a `within` that leaves the parent out still refuses them
    with pytest.raises(InputError, match="is not a folder inside"):
        Instances(copy / "instances").stream_root(within=copy / "instances")


def test_folders_with_absolute_links_still_read(tok, tmp_path):
    out, _ = _refined_like(tok, tmp_path)
    expected = _reads(out, tok)
    for name, parent in (("instances_scored", "instances_all"), ("instances", "instances_scored"),
                         ("instances_random", "instances_scored")):      # as every folder was written before
        index = json.loads((out / name / "index.json").read_text())
        index["subset_of"] = str((out / parent).resolve())
        (out / name / "index.json").write_text(json.dumps(index, indent=2))
    assert _reads(out, tok) == expected
    with pytest.raises(InputError, match="is not a folder inside"):
        Instances(out / "instances").stream_root(within=tmp_path / "other")


def test_a_relative_link_cannot_leave_its_folder(tok, tmp_path):
    out, full = _refined_like(tok, tmp_path / "a")
    outside = tmp_path / "outside"
    shutil.copytree(out / "instances_scored", outside / "instances_scored")     # the right tokens, elsewhere
    index_path = out / "instances" / "index.json"
    index = json.loads(index_path.read_text())
    for link in ("../../outside/instances_scored", "../instances_scored/../instances_scored", "instances_scored",
                 "./../instances_scored", "../.", "../..", "..", "../", "../x\\..\\y"):
        index_path.write_text(json.dumps({**index, "subset_of": link}))
        with pytest.raises(InputError, match="is not a folder beside") as e:
            Instances(out / "instances").stream_root()
        assert "\n" not in str(e.value)
    # a sibling that is a symbolic link (to a folder outside holding the right tokens) is not followed
    index_path.write_text(json.dumps({**index, "subset_of": "../linked"}))
    os.symlink(outside / "instances_scored", out / "linked")
    with pytest.raises(InputError, match="reached through a symbolic link"):
        Instances(out / "instances").stream_root()
    index_path.write_text(json.dumps({**index, "subset_of": "../gone"}))       # copied without its parents
    with pytest.raises(InputError, match="subset_of '../gone': .*gone/index.json: missing"):
        Instances(out / "instances").root_rows(within=out)
    index_path.write_text(json.dumps({**index, "subset_of": "/x\0y"}))
    with pytest.raises(InputError, match="is not a folder inside"):
        Instances(out / "instances").stream_root()
    # a subset whose parent is not beside it keeps the absolute link (it cannot move with it)
    far = write_subset(full, np.array([0]), tmp_path / "b" / "far")
    assert far.index["subset_of"] == str((out / "instances_all").resolve())
    assert far.stream_root().folder.resolve() == (out / "instances_all").resolve()


@pytest.mark.integration
def test_a_copied_refine_output_reselects_and_trains(refine_overrides, tiny_model_dir, tmp_path):
    """A tiny refine, its folder copied elsewhere and the original deleted: ``select_only`` re-selects on the copy
    and an offline KD run trains on the copy's instances/ and logits/."""
    from hydra import compose, initialize_config_dir

    from distill.config import to_config
    from distill.train import CONF_DIR as TRAIN_CONF
    from distill.train import train
    from refine.__main__ import CONF_DIR, refine
    from refine.config import to_refine_config

    def refine_cfg(overrides):
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return to_refine_config(compose("refine", overrides=overrides))

    out, copy = tmp_path / "out", tmp_path / "moved" / "out"
    small = refine_overrides + ["pack.max_instances=32"]
    refine(refine_cfg(small))
    shutil.copytree(out, copy)
    shutil.rmtree(out)
    full = [o for o in refine_overrides if not o.startswith("out=")]
    manifest = refine(refine_cfg(full + [f"out={copy}", "select_only=true", "select.alpha=0.25"]))
    assert len(Instances(copy / "instances")) == round(0.25 * manifest["instances_scored"]) == 8
    assert not out.exists()
    with initialize_config_dir(str(TRAIN_CONF), version_base="1.3"):
        cfg = to_config(compose("train", overrides=[
            "+experiment=kd_wsd", "+debug=tiny", "data.seq_len=64", f"model.tokenizer={tiny_model_dir}",
            f"data.train={copy / 'instances'}", f"data.val={copy / 'instances_random'}", f"kd.logits={copy / 'logits'}",
            f"kd.teacher={tiny_model_dir}", "kd.top_k=10", "kd.top_p=0.9", "schedule.warmup_steps=1",
            "kd.alpha.warmup_steps=1", "trainer.max_steps=4", "trainer.eval_every=4",
            f"paths.cache={tmp_path / 'cache'}", f"paths.runs={tmp_path / 'runs'}",
            f"run_dir={tmp_path / 'runs' / 'kd'}"]))
    summary = train(cfg)
    assert summary["steps"] == 4 and np.isfinite(summary["val_loss"])
