"""The refine stage (MiniPLM difference sampling + teacher logits for distillation). A Hydra app.

Run::

    python -m refine                                   # the bundled corpus (make refine)
    python -m refine corpus=my.jsonl name=mine         # any corpus refine.core.corpus reads
    python -m refine select.alpha=0.3                  # same settings, another alpha: the passes are reused
    python -m refine select_only=true select.alpha=0.3 # re-select from <out>'s saved scores only (make select)
    python -m refine pack.max_instances=512            # a quick look: 512 instances spread over the corpus

Stages, each reusing a finished result: (1) pack the corpus with the teacher's tokenizer; (2) teacher pass
(its own process: per-instance NLL + top-p-k logits, one pass); (3) reference pass (NLL only); (4) select the
top alpha by ``NLL_ref - NLL_teacher`` in corpus order and write ``<out>/``: ``instances/`` (refined tokens),
``refined.jsonl`` (text, for students with another tokenizer), ``logits/`` (aligned with ``instances/``),
``instances_random/`` + ``random.jsonl`` (the same fraction chosen at random: the equal-compute control),
``scores.npz``, ``report.md`` + ``score_hist.png``, ``manifest.json``. The teacher pass keeps the logits of
*every* scored instance in ``teacher/logits/`` (aligned with ``instances_scored/``), so re-selecting with
another alpha never rescores, and offline KD on the unselected data can use them.

A folder scored with other settings is refused, never rescored over (``refine.folder_key``; ``overwrite=true``
replaces it), and its writers lock it (``refine.core.folder_lock``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from refine.config import LogitsConfig, ModelPassConfig, RefineConfig, to_refine_config
from refine.core.errors import InputError, exit_on_input_error
from refine.core.folder_lock import FolderLock
from refine.core.hydra_cli import precheck_overrides
from refine.core.instances import Instances, write_subset
from refine.core.logits import LogitsStore, LogitsWriter, convert
from refine.core.manifest import (
    atomic_path,
    code_version,
    read_manifest,
    sha256_file,
    write_json_atomic,
    write_manifest,
)
from refine.core.pack import corpus_fingerprint, pack
from refine.core.paths import resolve_model
from refine.core.tokenizer import load_tokenizer, tokenizer_hash
from refine.folder_key import check_settings, claim_json, differences, normal, refusal, saved_settings, scoring_settings
from refine.score_pass import parse_shard
from refine.select import difference_scores, select

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def _model_fingerprint(model: Path) -> str:
    files = sorted(model.glob("*.safetensors")) + [model / "config.json"]
    return "|".join(f"{f.name}:{f.stat().st_size}:{sha256_file(f)[:16]}" for f in files)


def score(pass_cfg: ModelPassConfig, model: Path, inst: Instances, out: Path, logits: LogitsConfig | None,
          shard_size: int, shard: str = "0/1", merge_from: list[str] = (), overwrite: bool = False) -> dict:
    """Run (or reuse) one model's scoring pass in a child process; return its pass summary. ``logits``: what
    to capture besides the NLL (the teacher pass), None for NLL only (the reference pass). ``shard``: this
    machine's part (a partial summary); ``merge_from``: refine outputs of other parts, whose finished shards
    of this same pass are copied in first. A pass folder holding another key is refused (``overwrite``:
    replaced); the caller holds the refine folder's lock."""
    logits = logits or LogitsConfig(top_p=1.0, top_k=0)
    top_k, top_p = logits.top_k, logits.top_p
    key = {"model": _model_fingerprint(model), "instances": inst.index["tokens_sha256"], **asdict(logits),
           "dtype": pass_cfg.dtype, "backend": pass_cfg.backend, "shard_size": shard_size}
    key_file = out / "key.json"
    old = json.loads(key_file.read_text()) if key_file.is_file() else key
    if old != key and (out / "pass.json").is_file() and {**old, "codec": logits.codec} == key:
        for name in ("logits", "logits_rs"):  # only the codec changed (or a pre-codec cache): no rescoring
            if (out / name / "store.json").is_file() and LogitsStore(out / name).header.codec != logits.codec:
                print(f"converting {out / name} to the {logits.codec} codec (no rescoring)", flush=True)
                convert(out / name, out / name, logits.codec)
        write_json_atomic(key_file, key)
    elif old != key and not overwrite:        # another model/config/data: its shards must not be mixed in
        raise refusal(out, differences(normal(old), normal(key)))
    elif old != key:
        shutil.rmtree(out)
    if (out / "pass.json").is_file() and key_file.is_file():
        return json.loads((out / "pass.json").read_text())
    held = claim_json(key_file, key)          # exclusive: a part starting at the same moment elsewhere loses
    if held != normal(key):
        raise refusal(out, differences(held, normal(key)))
    for src in merge_from:
        _copy_shards(Path(src) / out.name, out, key)
    cmd = [sys.executable, "-m", "refine.score_pass", "--model", str(model), "--instances", str(inst.folder),
           "--out", str(out), "--backend", pass_cfg.backend, "--dtype", pass_cfg.dtype, "--top-k", str(top_k),
           "--top-p", str(top_p), "--candidates", str(logits.candidates), "--rs-samples", str(logits.rs_samples),
           "--rs-temperature", str(logits.rs_temperature), "--seed", str(logits.seed), "--codec", logits.codec,
           "--shard-size", str(shard_size), "--shard", shard, "--batch-rows", str(pass_cfg.batch_rows),
           "--write-workers", str(pass_cfg.write_workers),
           "--engine-opts", json.dumps(pass_cfg.engine), *(["--urls", *pass_cfg.urls] if pass_cfg.urls else []),
           *(["--api-key-env", pass_cfg.api_key_env] if pass_cfg.backend == "served" else [])]
    print(f"scoring {len(inst)} instances with {model} ({pass_cfg.backend}, {pass_cfg.dtype}"
          f"{f', top-{top_p}-{top_k} logits' if top_k else ''})", flush=True)
    returncode, stdout, error = _run_child(cmd)
    if error:                                 # the child's one-line error is this run's one line
        raise InputError(error)
    if returncode != 0:
        raise InputError(f"scoring with {model} failed (exit {returncode}); rerun to resume its shards")
    summary = json.loads(stdout.strip().splitlines()[-1])
    if "partial" in summary:
        print(f"  part {summary['partial']}: {summary['shards_done']} of {summary['shards']} shards scored here")
        return summary
    print(f"  {summary['tokens']:,} tokens in {summary['score_seconds']:.0f} s: {summary['tok_s']:,.0f} tok/s "
          f"(+{summary['engine_load_seconds']:.0f} s engine start)")
    return summary


def _run_child(cmd: list[str]) -> tuple[int, str, str | None]:
    """Run a scoring child; its stderr passes through but for its ``error: ...`` line, which is returned (the
    parent ends with that one line instead of adding its own)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    errors: list[str] = []

    def pump() -> None:
        for line in proc.stderr:
            if line.startswith("error: "):
                errors.append(line[len("error: "):].strip())
            else:
                sys.stderr.write(line)
                sys.stderr.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    stdout = proc.stdout.read()
    proc.wait()
    reader.join()
    return proc.returncode, stdout, errors[-1] if proc.returncode == 2 and errors else None


def _copy_shards(src: Path, dst: Path, key: dict) -> None:
    """Another machine's finished shards of this pass (same key: model, instances, capture settings): each
    shard's data files, then its json (the mark of a finished shard), so a crash mid-copy leaves no shard
    that looks finished but is not."""
    src_key = src / "key.json"
    if not src_key.is_file():
        raise InputError(f"merge_from: {src} holds no scoring pass (no key.json)")
    if json.loads(src_key.read_text()) != key:
        raise InputError(f"merge_from: {src} was scored with another model, instances or settings than this run")
    copied = 0
    for marker in sorted(src.glob("shard-*.json")):
        if (dst / marker.name).is_file():
            continue
        n = marker.stem.split("-")[1]
        for data in [src / f"nll-{n}.npy", *sorted(src.glob(f"logits*/shard-{n}.bin"))]:
            target = dst / data.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as tmp:
                shutil.copyfile(data, tmp)
        with atomic_path(dst / marker.name) as tmp:
            shutil.copyfile(marker, tmp)
        copied += 1
    print(f"merge_from: {copied} finished shards of {src}")


def embeddings(inst: Instances, reference: Path, out: Path) -> np.ndarray:
    """Reference-model embeddings of ``inst``, cached in ``out`` under a key of instances + model."""
    from refine.dedup import embed

    key = {"instances": inst.index["tokens_sha256"], "model": _model_fingerprint(reference)}
    path, key_path = out / "embeddings.npy", out / "embeddings.json"
    if path.is_file() and key_path.is_file() and json.loads(key_path.read_text()) == key:
        return np.load(path, allow_pickle=False)
    t0 = time.perf_counter()
    emb = embed(inst, str(reference))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, emb, allow_pickle=False)
    write_json_atomic(key_path, key)
    print(f"embedded {len(inst):,} instances with the reference model in {time.perf_counter() - t0:.0f} s")
    return emb


def write_text_export(inst: Instances, rows: np.ndarray, scores: np.ndarray, tok, path: Path) -> None:
    """The kept instances as text: students with another tokenizer train on this."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            rec = {"id": f"instance/{int(r)}", "doc_ids": inst.doc_ids(int(r)), "score": round(float(scores[r]), 5),
                   "text": tok.decode(np.asarray(inst.tokens[r]).tolist())}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def write_kept_logits(src: LogitsStore, rows: np.ndarray, out: Path, shard_size: int,
                      kept: Instances | None) -> LogitsStore:
    """Rows ``rows`` of ``src`` as a new store aligned with ``kept`` (the instances they are scored on)."""
    with atomic_path(out) as tmp:       # a private temporary, not a fixed "logits.tmp" anyone can plant
        writer = LogitsWriter(tmp, src.header)
        shards = [writer.write_rows(s, [src[int(r)] for r in rows[start:start + shard_size]])
                  for s, start in enumerate(range(0, len(rows), shard_size))]
        writer.finish(shards, extra={"rows_of": "instances/"}, instances=kept)
    return LogitsStore(out)


def refine(cfg: RefineConfig) -> dict:
    """The whole stage (``select_only``: re-selection from the folder's saved scores), holding the folder's
    lock: exclusive, but shared among the parts of a sharded run (``refine.core.folder_lock`` says why)."""
    _, parts = parse_shard(cfg.shard)
    out = Path(cfg.out)
    if cfg.select_only:
        _check_saved_scores(out)                 # before the lock creates anything
    shared = parts > 1 and not cfg.overwrite and not cfg.select_only
    with FolderLock(out, "refine run", "use another out= (or name=)", shared=shared):
        return reselect(cfg) if cfg.select_only else _refine(cfg)


def _refine(cfg: RefineConfig) -> dict:
    t0 = time.perf_counter()
    out = Path(cfg.out)
    teacher, reference = resolve_model(cfg.teacher.path), resolve_model(cfg.reference.path)
    tok = load_tokenizer(teacher)
    ref_hash = tokenizer_hash(load_tokenizer(reference))
    if ref_hash != tokenizer_hash(tok):
        raise InputError(f"reference model {reference} uses another tokenizer than the teacher; difference "
                         f"sampling compares per-token NLLs of the same tokens")

    previous = read_manifest(out)
    if previous and not cfg.overwrite and previous.get("tokenizer_hash") not in (None, tokenizer_hash(tok)):
        raise InputError(f"{out} holds the refine output of a teacher with another tokenizer; choose another "
                         f"name= (e.g. name=gemma with paths=gemma) or delete the folder")
    check_settings(out, scoring_settings(asdict(cfg)), cfg.overwrite)   # before anything is written
    inst = pack(cfg.corpus, tok, cfg.pack.seq_len, out / "instances_all", cfg.text_field,
                max_doc_bytes=cfg.max_doc_bytes, workers=cfg.pack.workers)
    if 0 < cfg.pack.max_instances < len(inst):
        # An evenly spaced subset keeps every part of the corpus represented (the first N would be one source).
        rows = np.unique(np.linspace(0, len(inst) - 1, cfg.pack.max_instances).round().astype(np.int64))
        inst = _subset(inst, rows, out / "instances_sample")

    emb, dedup_info = None, {}
    if cfg.dedup.enabled or cfg.dedup.diversity:
        emb = embeddings(inst, reference, out)
    if cfg.dedup.enabled:
        from refine.dedup import near_duplicates

        keep_rows = np.flatnonzero(near_duplicates(emb, cfg.dedup.threshold))
        dedup_info = {"before": len(inst), "after": len(keep_rows), "threshold": cfg.dedup.threshold}
        print(f"near-duplicates: dropped {len(inst) - len(keep_rows)} of {len(inst)} (cosine >= "
              f"{cfg.dedup.threshold})")
        if len(keep_rows) < len(inst):
            inst = _subset(inst, keep_rows, out / "instances_dedup")
            emb = emb[keep_rows]
    # The scored set always lives at instances_scored/ (row i <-> teacher/logits row i): offline KD on the
    # unselected data trains on it.
    inst = _subset(inst, np.arange(len(inst)), out / "instances_scored")

    t_pass = time.perf_counter()
    tpass = score(cfg.teacher, teacher, inst, out / "teacher", cfg.logits, cfg.shard_size, cfg.shard,
                  cfg.merge_from, cfg.overwrite)
    rpass = score(cfg.reference, reference, inst, out / "reference", None, cfg.shard_size, cfg.shard,
                  cfg.merge_from, cfg.overwrite)
    t_scored = time.perf_counter()
    if "partial" in tpass or "partial" in rpass:
        print(f"part {cfg.shard} scored -> {out}; when every part is done, finish on one machine with "
              f"merge_from=[<each part's out>] (nothing to merge if they share {out})")
        return {"partial": cfg.shard, "teacher_pass": tpass, "reference_pass": rpass}
    corpus_key = corpus_fingerprint(cfg.corpus)
    return _write_selection(cfg, out, inst, tok, emb, dedup_info, tpass, rpass, str(teacher), str(reference),
                            corpus_key, t0, t_scored - t_pass)


def _write_selection(cfg: RefineConfig, out: Path, inst: Instances, tok, emb: np.ndarray | None, dedup_info: dict,
                     tpass: dict, rpass: dict, teacher: str, reference: str, corpus_key: str | None, t0: float,
                     scoring_s: float) -> dict:
    """Select from the two passes' NLLs and write every selection output, the manifest last."""
    from refine.report import write_report

    teacher_nll = np.load(out / "teacher" / "nll.npy", allow_pickle=False)
    ref_nll = np.load(out / "reference" / "nll.npy", allow_pickle=False)
    scores = difference_scores(teacher_nll, ref_nll)
    kept = select(scores, cfg.select.alpha, cfg.select.mode, cfg.select.temperature, cfg.select.seed)
    with atomic_path(out / "scores.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, teacher_nll=teacher_nll, ref_nll=ref_nll, score=scores, kept=kept)
    refined = write_subset(inst, kept, out / "instances", extra={"selection": asdict(cfg.select)})
    write_text_export(inst, kept, scores, tok, out / "refined.jsonl")
    # MiniPLM's control: the same fraction of the scored instances chosen blindly (seeded), for equal-compute
    # comparisons (conf/experiment/random_alpha.yaml, cross_family_random.yaml).
    control = select(scores, cfg.select.alpha, "random", seed=cfg.select.seed)
    write_subset(inst, control, out / "instances_random",
                 extra={"selection": {**asdict(cfg.select), "mode": "random"}})
    write_text_export(inst, control, scores, tok, out / "random.jsonl")
    stores = {}
    for name, wanted in (("logits", cfg.logits.top_k), ("logits_rs", cfg.logits.rs_samples)):
        if wanted:
            stores[name] = write_kept_logits(LogitsStore(out / "teacher" / name), kept, out / name, cfg.shard_size,
                                             refined)
    report = write_report(out, inst, refined, scores, kept, tok, stores, tpass, rpass, cfg.report_examples)
    if emb is not None:
        from refine.dedup import diversity

        report["diversity"] = {"scored": diversity(emb), "refined": diversity(emb[kept]),
                               "random_same_size": diversity(emb[control])}
        report["dedup"] = dedup_info
        with open(out / "report.md", "a") as f:
            d = report["diversity"]
            f.write(f"\n## Diversity (mean pairwise cosine distance of reference-model embeddings)\n\n"
                    f"scored {d['scored']:.4f} · refined {d['refined']:.4f} · random {cfg.select.alpha:.0%} "
                    f"{d['random_same_size']:.4f}\n")
    key = {"corpus": corpus_key, "config": asdict(cfg)}
    manifest = write_manifest(out, key, teacher=teacher, reference=reference,
                              tokenizer_hash=tokenizer_hash(tok), instances_scored=len(inst),
                              instances_kept=len(refined), teacher_pass=tpass, reference_pass=rpass,
                              seconds={"total": time.perf_counter() - t0, "scoring": scoring_s},
                              report=report, code=code_version())
    print(f"kept {len(refined):,} of {len(inst):,} instances (alpha {cfg.select.alpha}) -> {out}")
    return manifest


SAVED_SCORES = ("instances_scored/index.json", "teacher/pass.json", "teacher/nll.npy", "reference/pass.json",
                "reference/nll.npy")


def _check_saved_scores(out: Path) -> None:
    missing = [p for p in SAVED_SCORES if not (out / p).is_file()]
    if missing or saved_settings(out) is None:
        why = f"no {missing[0]}" if missing else "no record of its settings"
        raise InputError(f"{out} holds no saved scores to select from ({why}): score it first with python -m "
                         f"refine (without select_only=true)")


def reselect(cfg: RefineConfig) -> dict:
    """``select_only=true`` (``make select``): select again from the scores ``out`` holds, with this command's
    ``select.*``. What was scored (corpus, packing, dedup, models, capture) comes from the folder's own record,
    whatever this command says about it, so nothing is packed, embedded or scored; only the selection outputs
    are rewritten, and they equal a full run's with the same settings."""
    t0 = time.perf_counter()
    out = Path(cfg.out)
    _check_saved_scores(out)
    cfg = _as_scored(cfg, saved_settings(out))
    inst = Instances(out / "instances_scored")
    tok = load_tokenizer(resolve_model(cfg.teacher.path))
    if inst.tokenizer.hash != tokenizer_hash(tok):
        raise InputError(f"the teacher at {cfg.teacher.path} is not the one {out} was scored with (another "
                         f"tokenizer)")
    previous = read_manifest(out) or {}
    emb = _saved_embeddings(out, inst) if cfg.dedup.enabled or cfg.dedup.diversity else None
    print(f"select_only: selecting from the saved scores of {len(inst):,} instances in {out} (nothing rescored)",
          flush=True)
    passes = [json.loads((out / name / "pass.json").read_text()) for name in ("teacher", "reference")]
    return _write_selection(cfg, out, inst, tok, emb, previous.get("report", {}).get("dedup", {}), *passes,
                            previous.get("teacher", cfg.teacher.path), previous.get("reference", cfg.reference.path),
                            previous.get("key", {}).get("corpus"), t0, 0.0)


def _as_scored(cfg: RefineConfig, saved: dict) -> RefineConfig:
    """``cfg`` with the scoring settings replaced by those the folder records (``refine.folder_key``)."""
    from dataclasses import fields, replace

    def model(mine: ModelPassConfig, rec: dict) -> ModelPassConfig:
        return replace(mine, path=rec["path"], dtype=rec["dtype"], backend=rec["backend"])

    known = {f.name for f in fields(LogitsConfig)}
    logits = replace(cfg.logits, **{k: v for k, v in saved["logits"].items() if k in known})
    dedup = replace(cfg.dedup, enabled=saved["dedup"]["enabled"],
                    threshold=saved["dedup"].get("threshold", cfg.dedup.threshold))
    return replace(cfg, corpus=saved["corpus"], text_field=saved["text_field"], pack=replace(cfg.pack, **saved["pack"]),
                   dedup=dedup, teacher=model(cfg.teacher, saved["teacher"]),
                   reference=model(cfg.reference, saved["reference"]), logits=logits, shard_size=saved["shard_size"])


def _saved_embeddings(out: Path, inst: Instances) -> np.ndarray | None:
    """The cached embeddings of the scored instances (rows of a dedup subset picked out), or None."""
    parent, rows = inst.index.get("parent_sha256"), None
    if (out / "instances_dedup" / "index.json").is_file():
        dedup = Instances(out / "instances_dedup")
        if dedup.index["tokens_sha256"] == parent:
            parent, rows = dedup.index.get("parent_sha256"), dedup.subset["parent_rows"]
    try:
        if json.loads((out / "embeddings.json").read_text())["instances"] != parent:
            return None
        emb = np.load(out / "embeddings.npy", allow_pickle=False)
    except (OSError, ValueError, KeyError):
        return None
    return emb if rows is None else emb[rows]


def _subset(parent: Instances, rows: np.ndarray, folder: Path) -> Instances:
    """``rows`` of ``parent`` at ``folder``, reusing an identical subset already there."""
    try:
        sub = Instances(folder)
        if sub.index.get("subset_of") == str(parent.folder.resolve()) and \
                sub.index.get("parent_sha256") == parent.index["tokens_sha256"] and \
                sub.subset["parent_rows"] == rows.tolist():
            return sub
    except InputError:
        pass
    return write_subset(parent, rows, folder)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="refine")
@exit_on_input_error
def _hydra_main(cfg: DictConfig) -> None:
    refine(to_refine_config(cfg))


def main() -> None:
    # `--shard i/N`, the usual command-line form, is Hydra's shard=i/N
    argv = sys.argv[1:]
    for i, arg in enumerate(argv):
        if arg == "--shard" and i + 1 < len(argv):
            argv[i:i + 2] = [f"shard={argv[i + 1]}"]
            break
        if arg.startswith("--shard="):
            argv[i] = "shard=" + arg.split("=", 1)[1]
            break
    sys.argv[1:] = argv
    precheck_overrides(CONF_DIR, "refine", sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
