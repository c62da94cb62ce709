"""The selection step and what it writes into ``<out>/``, the manifest last: ``instances/`` (refined tokens),
``refined.jsonl`` (their documents as text, for students with another tokenizer: ``refine.core.text_export``),
``logits/`` (aligned with ``instances/``), ``instances_random/`` + ``random.jsonl`` (the same fraction chosen
blindly: the equal-compute control), ``scores.npz``, ``report.md``. The teacher pass keeps every scored
instance's logits in ``teacher/logits/``, so re-selecting never rescores."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from refine.config import RefineConfig
from refine.core.errors import InputError
from refine.core.instances import Instances, TokenizerInfo, write_subset
from refine.core.logits import LogitsStore, LogitsWriter
from refine.core.manifest import code_version, write_manifest
from refine.core.text_export import write_text_export
from refine.core.tokenizer import tokenizer_hash
from refine.core.write import atomic_path
from refine.select import difference_scores, random_control, select


@dataclass
class Scored:
    """What a selection is made from: the scored instances, both passes' summaries and where they came from."""
    inst: Instances
    tok: object                            # the teacher's tokenizer
    emb: np.ndarray | None                 # reference-model embeddings of ``inst`` (dedup / diversity), or None
    dedup_info: dict
    tpass: dict
    rpass: dict
    teacher: str
    reference: str
    corpus_key: str | None
    t0: float                              # when the run started
    scoring_s: float
    d_ref: dict = field(default_factory=dict)   # what the reference was trained on, when refine trained it
    ref_model: dict = field(default_factory=dict)   # which reference: given, or trained (its plan and run)


def write_kept_logits(src: LogitsStore, rows: np.ndarray, out: Path, shard_size: int,
                      kept: Instances | None) -> LogitsStore:
    """Rows ``rows`` of ``src`` as a new store aligned with ``kept`` (the instances they are scored on)."""
    with atomic_path(out) as tmp:       # a private temporary, not a fixed "logits.tmp" anyone can plant
        writer = LogitsWriter(tmp, src.header)
        shards = [writer.write_rows(s, [src[int(r)] for r in rows[start:start + shard_size]])
                  for s, start in enumerate(range(0, len(rows), shard_size))]
        writer.finish(shards, extra={"rows_of": "instances/"}, instances=kept)
    return LogitsStore(out)


def byte_normalised(inst: Instances, tok, *mean_nlls: np.ndarray) -> list[np.ndarray]:
    """Each pass's bits per byte of the text each row predicts (tokens 1..L-1), same tokenizer for both."""
    from refine.core.token_bytes import byte_lengths, row_bytes
    from refine.select import bits_per_byte

    lengths = byte_lengths(tok)
    nbytes = np.concatenate([row_bytes(inst.tokens[a:a + 4096, 1:], lengths) for a in range(0, len(inst), 4096)])
    return [bits_per_byte(nll, inst.seq_len - 1, nbytes) for nll in mean_nlls]


def _scores(cfg: RefineConfig, out: Path, s: Scored, teacher_nll: np.ndarray, ref_nll: np.ndarray) -> np.ndarray:
    """Reference minus teacher, per token or per byte; a reference of another tokenizer scored its re-tokenized
    rows (``refine.cross_reference``): only per byte, even when re-selecting its saved scores."""
    if s.rpass.get("retokenized"):
        if cfg.select.normalize != "bytes":
            raise InputError(f"{out}'s reference ({s.reference}) uses another tokenizer than the teacher; per-token "
                             f"NLLs of two vocabularies do not compare: use select.normalize=bytes")
        from refine.cross_reference import FOLDER, cross_bits_per_byte

        return difference_scores(*cross_bits_per_byte(s.inst, Instances(out / FOLDER), teacher_nll, ref_nll))
    if cfg.select.normalize == "bytes":
        return difference_scores(*byte_normalised(s.inst, s.tok, teacher_nll, ref_nll))
    return difference_scores(teacher_nll, ref_nll)


def write_selection(cfg: RefineConfig, out: Path, s: Scored) -> dict:
    """Select from the two passes' NLLs and write every selection output, the manifest last."""
    from refine.report import write_report

    inst, tok = s.inst, s.tok
    teacher_nll = np.load(out / "teacher" / "nll.npy", allow_pickle=False)
    ref_nll = np.load(out / "reference" / "nll.npy", allow_pickle=False)
    scores = _scores(cfg, out, s, teacher_nll, ref_nll)
    kept = select(scores, cfg.select.alpha, cfg.select.mode, cfg.select.temperature, cfg.select.seed)
    with atomic_path(out / "scores.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, teacher_nll=teacher_nll, ref_nll=ref_nll, score=scores, kept=kept)
    refined = write_subset(inst, kept, out / "instances", extra={"selection": asdict(cfg.select)})
    write_text_export(inst, kept, scores, tok, out / "refined.jsonl")
    # MiniPLM's control: the same fraction of the scored instances chosen blindly (seeded), for equal-compute
    # comparisons (conf/experiment/random_alpha.yaml, cross_family_random.yaml).
    control = random_control(len(scores), cfg.select.alpha, cfg.select.seed)
    write_subset(inst, control, out / "instances_random",
                 extra={"selection": {**asdict(cfg.select), "mode": "random"}})
    write_text_export(inst, control, scores, tok, out / "random.jsonl")
    stores = {}
    for name, wanted in (("logits", cfg.logits.top_k), ("logits_rs", cfg.logits.rs_samples)):
        if wanted:
            stores[name] = write_kept_logits(LogitsStore(out / "teacher" / name), kept, out / name, cfg.shard_size,
                                             refined)
    diversity = None
    if s.emb is not None:
        from refine.dedup import diversity as spread

        diversity = {"scored": spread(s.emb), "refined": spread(s.emb[kept]),
                     "random_same_size": spread(s.emb[control])}
    report = write_report(out, inst, refined, scores, kept, tok, stores, s.tpass, s.rpass, cfg.report_examples,
                          str(cfg.select.normalize), (teacher_nll, ref_nll), s.ref_model, diversity)
    if s.emb is not None:
        report["dedup"] = s.dedup_info
    key = {"corpus": s.corpus_key, "config": asdict(cfg)}
    manifest = write_manifest(out, key, teacher=s.teacher, reference=s.reference,
                              **({"reference_trained_on": {"d_ref": s.d_ref, "corpus": s.corpus_key}}
                                 if s.d_ref else {}),
                              reference_model=s.ref_model, tokenizer_hash=tokenizer_hash(tok),
                              reference_tokenizer=s.rpass.get("tokenizer") or TokenizerInfo.of(tok).__dict__,
                              instances_scored=len(inst),
                              instances_kept=len(refined), teacher_pass=s.tpass, reference_pass=s.rpass,
                              seconds={"total": time.perf_counter() - s.t0, "scoring": s.scoring_s},
                              report=report, code=code_version())
    for line in report["warnings"]:
        print(f"warning: {line}", flush=True)
    print(f"kept {len(refined):,} of {len(inst):,} instances (alpha {cfg.select.alpha}) -> {out}")
    return manifest
