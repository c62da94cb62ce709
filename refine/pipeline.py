"""The refine stage's steps, each reusing a finished result: pack the corpus with the teacher's tokenizer,
(optionally) drop near-duplicates, score every instance with the teacher and the reference
(``refine.passes``), then select and write (``refine.outputs``); ``select_only`` re-selects (``refine.reselect``)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from refine.array_job import scheduler_shard
from refine.config import RefineConfig, ScoreUnit
from refine.core.errors import InputError
from refine.core.instances import Instances, write_subset
from refine.core.manifest import read_manifest
from refine.core.pack import corpus_fingerprint, pack
from refine.core.paths import resolve_model
from refine.core.retokenize import Retokenizer
from refine.core.token_bytes import token_bytes
from refine.core.tokenizer import load_tokenizer, tokenizer_hash
from refine.core.write import FolderLock, atomic_path, write_json_atomic
from refine.cross_reference import FOLDER as REF_ROWS
from refine.cross_reference import check_fits, read_counted, reference_rows
from refine.folder_key import check_settings, scoring_settings
from refine.outputs import Scored, write_selection
from refine.passes import model_fingerprint, score
from refine.reference import carve, check_not_trained_on_scored, check_size, hold_out
from refine.reference import train as train_reference
from refine.reselect import check_saved_scores, reselect
from refine.score_pass import ShardFiles, parse_shard


def refine(cfg: RefineConfig) -> dict:
    """The whole stage (``select_only``: re-selection from the folder's saved scores), holding the folder's
    lock: exclusive, but shared among the parts of a sharded run (``refine.core.write.FolderLock`` says why)."""
    if cfg.shard == "auto":                 # from the scheduler's variables (an array job's task)
        shard, source = scheduler_shard()
        print(f"shard=auto: part {shard} ({source})", flush=True)
        cfg = replace(cfg, shard=shard)
    _, parts = parse_shard(cfg.shard)
    out = Path(cfg.out)
    if parts > 1 and not cfg.reference.path and not cfg.select_only:
        raise InputError("a sharded run needs one reference for every part: train it once (an unsharded refine "
                         "of a slice, pack.max_instances=8, trains it in <paths.cache>/d_ref/*/run-*) and give "
                         "reference.path=")
    if cfg.select_only:
        check_saved_scores(out)                  # before the lock creates anything
    shared = parts > 1 and not cfg.overwrite and not cfg.select_only
    with FolderLock(out, "refine run", "use another out= (or name=)", shared=shared) as lock:
        return reselect(cfg) if cfg.select_only else _refine(cfg, lock)


def _refine(cfg: RefineConfig, lock: FolderLock) -> dict:
    t0 = time.perf_counter()
    out = Path(cfg.out)
    teacher = resolve_model(cfg.teacher.path)
    tok = load_tokenizer(teacher)
    if cfg.select.normalize == ScoreUnit.bytes:
        token_bytes(tok)                     # per-byte scores need the teacher's byte table: refused now, not after
    carving = not cfg.reference.path         # MiniPLM: the reference learns D_ref, a held-out part of this corpus
    reference = None if carving else resolve_model(cfg.reference.path)
    ref_tok = None                           # a reference with another tokenizer's (select.normalize=bytes)
    if reference is not None:
        ref_tok = _check_tokenizers(cfg, out, tok, reference)
    corpus_key = corpus_fingerprint(cfg.corpus)
    ref_info, split = {}, None
    if carving:
        d_ref, ref_info = carve(cfg, corpus_key, tok)       # into the cache: out is not touched yet
        check_size(cfg, ref_info)
        split = hold_out(ref_info)           # what the carve held out (a budget lowers ref_split.fraction)
    check_settings(out, scoring_settings(asdict(cfg)), cfg.overwrite)   # before anything is written to out
    if _finished_part(cfg, out):
        return {"partial": cfg.shard, "finished": True}
    if carving:
        reference, ref_model = train_reference(cfg, teacher, d_ref, len(tok), ref_info)
        _check_tokenizers(cfg, out, tok, reference)
    else:
        ref_model = {"kind": "given (reference.path)", "path": str(reference)}
    inst = pack(cfg.corpus, tok, cfg.pack.seq_len, out / "instances_all", cfg.text_field,
                max_doc_bytes=cfg.max_doc_bytes, workers=cfg.pack.workers, hold_out=split)
    if not carving:
        check_not_trained_on_scored(reference, inst)
    inst = _sample(cfg, inst, out)

    emb, dedup_info = None, {}
    if cfg.dedup.enabled or cfg.dedup.diversity:
        emb = embeddings(inst, reference, out,
                         None if ref_tok is None else reference_rows(inst, tok, ref_tok, out / REF_ROWS))
    if cfg.dedup.enabled:
        inst, emb, dedup_info = _dedup(cfg, inst, emb, out)
    # The scored set always lives at instances_scored/ (row i <-> teacher/logits row i): offline KD on the
    # unselected data trains on it.
    inst = _subset(inst, np.arange(len(inst)), out / "instances_scored")

    t_pass = time.perf_counter()
    # the reference's rows are written before the teacher pass: text it cannot align stops the run before any scoring
    ref_inst = inst if ref_tok is None else reference_rows(inst, tok, ref_tok, out / REF_ROWS)
    if ref_tok is not None:
        check_fits(ref_inst, reference, ref_tok)
    tpass, rpass = passes = (score(cfg, "teacher", teacher, inst), score(cfg, "reference", reference, ref_inst))
    if parse_shard(cfg.shard)[1] > 1:
        if not _last_part(out, passes, lock):
            print(f"part {cfg.shard} scored -> {out}; the part that ends last in {out} finishes the run; parts "
                  f"in separate folders: finish on one machine with merge_from=[<each part's out>]")
            return {"partial": cfg.shard, "teacher_pass": tpass, "reference_pass": rpass}
        # the last part finishes the run: a pass the other parts completed meanwhile is finished now (every
        # shard is there: nothing is scored again)
        tpass = score(cfg, "teacher", teacher, inst) if "partial" in tpass else tpass
        rpass = score(cfg, "reference", reference, ref_inst) if "partial" in rpass else rpass
    t_scored = time.perf_counter()
    return write_selection(cfg, out, Scored(inst, tok, emb, dedup_info, tpass, rpass, str(teacher), str(reference),
                                            corpus_key, t0, t_scored - t_pass, ref_info, ref_model))


def _sample(cfg: RefineConfig, inst: Instances, out: Path) -> Instances:
    """``pack.max_instances`` of them, evenly spaced: every part of the corpus stays represented (the first N
    would be one source)."""
    if not 0 < cfg.pack.max_instances < len(inst):
        return inst
    rows = np.unique(np.linspace(0, len(inst) - 1, cfg.pack.max_instances).round().astype(np.int64))
    return _subset(inst, rows, out / "instances_sample")


def _finished_part(cfg: RefineConfig, out: Path) -> bool:
    """A part of a sharded run started again on a folder that holds the finished run (same scoring settings,
    checked before): it has nothing to do."""
    done = parse_shard(cfg.shard)[1] > 1 and read_manifest(out) is not None and all(
        (out / name / "pass.json").is_file() for name in ("teacher", "reference"))
    if done:
        print(f"part {cfg.shard}: {out} holds the finished run (same scoring settings); nothing to do")
    return done


def _last_part(out: Path, summaries: tuple[dict, ...], lock: FolderLock) -> bool:
    """Whether this part of a sharded run finishes it: every shard of both passes is in ``out`` now and no other
    part on this host still holds the folder (the lock is then this part's alone). Of parts that end together
    one finishes (``FolderLock.take_whole``); across hosts, where flock may not reach, both may: to the same
    bytes."""
    passes = zip(("teacher", "reference"), summaries)
    complete = all(len(ShardFiles.finished(out / name)) == s["shards"] for name, s in passes if "partial" in s)
    return complete and lock.take_whole()


def _check_tokenizers(cfg: RefineConfig, out: Path, tok, reference: Path):
    """The reference's tokenizer when it is another than the teacher's (None: the same), refused unless scores
    are per byte (per-token NLLs of two vocabularies do not compare) or when its tokens have no byte spelling;
    and a folder keeps one teacher vocabulary."""
    ref_tok = load_tokenizer(reference)
    other = tokenizer_hash(ref_tok) != tokenizer_hash(tok)
    if other and cfg.select.normalize != ScoreUnit.bytes:
        raise InputError(f"reference model {reference} uses another tokenizer than the teacher; per-token NLLs of two "
                         f"vocabularies do not compare: use select.normalize=bytes (bits per byte of the same text, "
                         f"the reference scoring each teacher row re-tokenized)")
    if other:
        Retokenizer(tok, ref_tok, ("teacher", "reference"))   # both spell bytes, or one line now, before packing
    previous = read_manifest(out)
    if previous and not cfg.overwrite and previous.get("tokenizer_hash") not in (None, tokenizer_hash(tok)):
        raise InputError(f"{out} holds the refine output of a teacher with another tokenizer; choose another "
                         f"name= (e.g. name=gemma with paths=gemma) or delete the folder")
    return ref_tok if other else None


def _dedup(cfg: RefineConfig, inst: Instances, emb: np.ndarray, out: Path) -> tuple[Instances, np.ndarray, dict]:
    from refine.dedup import near_duplicates

    keep_rows = np.flatnonzero(near_duplicates(emb, cfg.dedup.threshold))
    info = {"before": len(inst), "after": len(keep_rows), "threshold": cfg.dedup.threshold}
    print(f"near-duplicates: dropped {len(inst) - len(keep_rows)} of {len(inst)} (cosine >= {cfg.dedup.threshold})")
    if len(keep_rows) < len(inst):
        inst = _subset(inst, keep_rows, out / "instances_dedup")
        emb = emb[keep_rows]
    return inst, emb, info


def embeddings(inst: Instances, reference: Path, out: Path, ref_rows: Instances | None = None) -> np.ndarray:
    """Reference-model embeddings of ``inst`` (``ref_rows``: its rows re-tokenized for a reference of another
    tokenizer, pooled over their real tokens), cached in ``out`` under a key of instances + model."""
    from refine.dedup import embed

    key = {"instances": inst.index["tokens_sha256"], "model": model_fingerprint(reference),
           **({"reference_rows": ref_rows.index["tokens_sha256"]} if ref_rows is not None else {})}
    path, key_path = out / "embeddings.npy", out / "embeddings.json"
    if path.is_file() and key_path.is_file() and json.loads(key_path.read_text()) == key:
        return np.load(path, allow_pickle=False)
    t0 = time.perf_counter()
    emb = embed(inst, str(reference)) if ref_rows is None else \
        embed(ref_rows, str(reference), lengths=read_counted(ref_rows)[:, 1])
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, emb, allow_pickle=False)
    write_json_atomic(key_path, key)
    print(f"embedded {len(inst):,} instances with the reference model in {time.perf_counter() - t0:.0f} s")
    return emb


def _subset(parent: Instances, rows: np.ndarray, folder: Path) -> Instances:
    """``rows`` of ``parent`` at ``folder``, reusing an identical subset already there."""
    try:
        sub = Instances(folder)
        if sub.index.get("subset_of") == Instances.subset_link(parent.folder, folder) and \
                sub.index.get("parent_sha256") == parent.index["tokens_sha256"] and \
                sub.subset["parent_rows"] == rows.tolist():
            return sub
    except InputError:
        pass
    return write_subset(parent, rows, folder)
