"""One scoring pass of one model over packed instances, shard by shard, resumable.

Run by ``python -m refine`` in its own process per model (vLLM is faster without transformers beside it, and
each engine's memory goes back to the OS when the pass ends); the parent hands it a ``PassConfig`` as JSON on
stdin. By hand: ``python -m refine.score_pass PASS.json`` (a JSON file of ``PassConfig``, e.g.
``{"instances": DIR, "out": DIR, "shard_size": 128, "model": {"path": DIR, "backend": "served", "urls":
["http://host1:8000"]}, "logits": {"top_k": 50}}``; unnamed fields keep ``refine.config``'s defaults).

For each shard of ``shard_size`` instances it writes ``nll-XXXXX.npy`` (mean per-token NLL per instance) and,
when ``logits.top_k > 0``, the top-p-k truncated logits shard of ``refine.core.logits``; then
``shard-XXXXX.json`` last. A shard whose json exists is finished: a rerun after a crash scores only the missing
shards. ``finish`` assembles ``nll.npy`` and the store's ``store.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from refine.config import Backend, LogitsConfig, ModelPassConfig
from refine.core.errors import InputError, exit_on_input_error
from refine.core.instances import Instances
from refine.core.logits import LogitsWriter, StoreHeader
from refine.core.logits.format import shard_file
from refine.core.schema import Checked, to_typed
from refine.core.write import atomic_path, write_json_atomic
from refine.cross_reference import counted_mean_nll, read_counted
from refine.progress import Events, Progress


@dataclass
class PassConfig(Checked):
    """Everything one pass needs: a new option goes into ``ModelPassConfig`` / ``LogitsConfig`` and its use.

    ``model.path``: the model folder itself (the parent resolves a run folder to its checkpoint). ``logits``: what
    to capture besides the NLL (``top_k`` 0: NLL only); the engine returns the top ``max(top_k, candidates)`` per
    position, the top-p-k store keeps a prefix of them, and ``rs_samples`` > 0 also writes an RS-KD sampled store
    in ``logits_rs/`` (draws seeded by ``seed`` and the shard: a rerun writes the same bytes). ``shard``: "i/N",
    this machine's part of a run spread over N (a partial summary until a folder holds every part's shards)."""
    instances: str
    out: str
    model: ModelPassConfig
    shard_size: int
    logits: LogitsConfig = field(default_factory=LogitsConfig)
    shard: str = "0/1"                     # all of it
    quiet: bool = False                    # no progress shown
    events: bool = False                   # progress as event lines for the parent to show (refine.progress)


@dataclass(frozen=True)
class ShardFiles:
    """One scoring shard's files in a pass folder, named here only: its data (the NLLs, the logits stores'
    shards), then its marker ``shard-XXXXX.json``, written last: a shard is finished when its marker exists."""
    folder: Path
    index: int

    @property
    def marker(self) -> Path:
        return self.folder / f"shard-{self.index:05d}.json"

    @property
    def nll(self) -> Path:
        return self.folder / f"nll-{self.index:05d}.npy"

    @property
    def done(self) -> bool:
        return self.marker.is_file()

    def data(self) -> list[Path]:
        """The files the marker vouches for: the NLLs and this shard of every store the pass writes."""
        return [self.nll, *sorted(p / shard_file(self.index) for p in self.folder.glob("logits*")
                                  if (p / shard_file(self.index)).is_file())]

    @classmethod
    def finished(cls, folder: Path) -> list[ShardFiles]:
        """The folder's finished shards, by index."""
        return sorted((cls(folder, int(m.stem.removeprefix("shard-"))) for m in folder.glob("shard-*.json")
                       if m.stem.removeprefix("shard-").isdigit()), key=lambda f: f.index)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=False)


def _writers(cfg: PassConfig, inst: Instances, out_dir: Path) -> tuple[LogitsWriter | None, LogitsWriter | None]:
    """The top-p-k store's writer (``logits.top_k`` > 0) and the RS-KD sampled store's (``rs_samples`` > 0)."""
    lc = cfg.logits
    threads = max(1, (os.cpu_count() or 1) // write_workers(cfg))     # zstd threads of each shard's encoder
    header = StoreHeader(inst.tokenizer.vocab_size, inst.tokenizer.hash, lc.top_p, lc.top_k, inst.seq_len - 1,
                         codec=str(lc.codec))
    writer = LogitsWriter(out_dir / "logits", header, threads) if lc.top_k else None
    if not lc.rs_samples:
        return writer, None
    if not lc.top_k:
        raise InputError("RS-KD sampling draws from the teacher's top-K candidates: it needs top_k > 0")
    return writer, LogitsWriter(out_dir / "logits_rs", replace(header, top_p=1.0, top_k=lc.rs_samples, kind="sampled",
                                                               samples=lc.rs_samples,
                                                               sample_temperature=lc.rs_temperature), threads)


def _make_scorer(cfg: PassConfig, seq_len: int, tokens: int):
    """The pass's scorer: ``model.engine`` options, plus the servers and key variable for backend served.
    ``tokens``: what this engine will score (vLLM on CPU starts eager when that is little: ``eager_default``)."""
    from refine.core.engine_settings import eager_default
    from refine.scorers.registry import make_scorer

    m = cfg.model
    opts = dict(m.engine)
    if m.backend == Backend.vllm:   # max_model_len leaves room for the one token vLLM must generate after the prompt
        opts = {"max_model_len": seq_len + 16, **eager_default(tokens), **opts}
    elif m.backend == Backend.served:   # model.path stays the local folder (config.json + tokenizer)
        opts = {**opts, **({"urls": list(m.urls)} if m.urls else {}), "api_key_env": m.api_key_env}
    return make_scorer(str(m.backend), m.path, top_k=max(cfg.logits.top_k, cfg.logits.candidates),
                       dtype=str(m.dtype), **opts)


def run_pass(cfg: PassConfig, scorer=None) -> dict:
    """Score every unfinished shard of this machine's part; a summary (``pass.json``'s, or a partial one).
    ``scorer``: an already started one (benchmarks), else one is made here and closed at the end."""
    inst = Instances(cfg.instances)
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_shards = (len(inst) + cfg.shard_size - 1) // cfg.shard_size
    part, part_count = parse_shard(cfg.shard)
    # shard i/N of a run spread over N machines scores every N-th score shard: each machine gets its own
    # shard files, and a folder holding all of them finishes into exactly the unsharded pass (refine merge_from)
    todo = [s for s in range(part, n_shards, part_count) if not ShardFiles(out_dir, s).done]
    writer, rs_writer = _writers(cfg, inst, out_dir)
    counted = read_counted(inst)     # re-tokenized rows of a reference with another tokenizer (or None)
    load_s = 0.0
    check_key = _key_guard(out_dir)
    if todo:
        t_load = time.perf_counter()
        own = scorer is None
        if own:
            rows = sum(min(cfg.shard_size, len(inst) - s * cfg.shard_size) for s in todo)
            scorer = _make_scorer(cfg, inst.seq_len, rows * inst.seq_len)
        load_s = time.perf_counter() - t_load
        progress = _progress(cfg, len(inst), [s for s in range(part, n_shards, part_count)], todo)
        try:
            _score_shards(cfg, inst, todo, scorer, _ShardWriter(cfg, out_dir, writer, rs_writer, check_key, progress,
                                                                  counted))
        finally:
            if progress is not None:
                progress.close()
            if own:
                scorer.close()
    done = sum(ShardFiles(out_dir, s).done for s in range(n_shards))
    if part_count > 1 and done < n_shards:
        return {"model": cfg.model.path, "partial": f"{part}/{part_count}", "shards_done": done, "shards": n_shards,
                "engine_load_seconds": load_s}
    check_key("before the pass was finished")
    # re-tokenized rows: the summary says what the NLLs are of, for the manifest and report (refine.cross_reference)
    extra = None if counted is None else {
        "retokenized": True, "tokenizer": inst.tokenizer.__dict__,
        "nll": "mean over the counted positions of rows re-tokenized from the teacher's"}
    return finish(out_dir, n_shards, writer, rs_writer, cfg.model.path, load_s, inst, extra)


def _progress(cfg: PassConfig, n_instances: int, mine: list[int], todo: list[int]):
    """How scored shards are reported: not at all (``quiet``), as events for the parent, or shown here."""
    if cfg.quiet:
        return None
    size = cfg.shard_size
    total = sum(min(size, n_instances - s * size) for s in mine)
    done = total - sum(min(size, n_instances - s * size) for s in todo)
    if cfg.events:
        return Events(total, done)
    return Progress(total, Path(cfg.model.path).name, initial=done)


class _ShardWriter:
    """Writes a scored shard's files, ``shard-XXXXX.json`` last (what marks it finished), then reports it."""

    def __init__(self, cfg: PassConfig, out_dir: Path, writer, rs_writer, check_key, progress, counted=None):
        self.cfg, self.out_dir, self.writer, self.rs_writer = cfg, out_dir, writer, rs_writer
        self.check_key, self.progress, self.counted = check_key, progress, counted

    def __call__(self, s: int, rows: np.ndarray, parts: list, score_s: float) -> None:
        t0, lc, out_dir = time.perf_counter(), self.cfg.logits, self.out_dir
        self.check_key(f"before shard {s} was written")
        tokens = int(rows.size)
        if self.counted is None:
            nll = np.concatenate([p.mean_nll() for p in parts]).astype(np.float32)
        else:                         # padded re-tokenized rows: only their counted positions, only real tokens
            counted = self.counted[s * self.cfg.shard_size:s * self.cfg.shard_size + len(rows)]
            lps = np.concatenate([p.token_logprobs for p in parts])
            nll, tokens = counted_mean_nll(lps, counted).astype(np.float32), int(counted[:, 1].sum())
        entry = rs_entry = None
        if self.writer is not None:
            cand_ids = np.concatenate([p.topk_ids for p in parts])
            cand_lps = np.concatenate([p.topk_logprobs for p in parts])
            entry = self.writer.write_shard(s, cand_ids[..., :lc.top_k], cand_lps[..., :lc.top_k])
        if self.rs_writer is not None:
            rs_entry = _write_sampled(self.rs_writer, s, cand_ids, cand_lps, lc.rs_samples, lc.rs_temperature, lc.seed)
        files = ShardFiles(out_dir, s)
        _save_npy(files.nll, nll)
        write_json_atomic(files.marker, {
            "shard": s, "instances": len(rows), "tokens": tokens, "seconds": score_s,
            "tok_s": tokens / score_s, "write_seconds": time.perf_counter() - t0, "logits": entry,
            "logits_rs": rs_entry})
        try:
            self.check_key(f"while shard {s} was written")
        except InputError:                # ours landed in a folder that is no longer ours: take it back out
            for f in [files.marker, *files.data()]:
                f.unlink(missing_ok=True)
            raise
        if self.progress is not None:
            self.progress.update(len(rows), tokens)


def _score_shards(cfg: PassConfig, inst: Instances, todo: list[int], scorer, write: _ShardWriter) -> None:
    """Score the ``todo`` shards in order; encoding and writing them overlaps scoring the next ones (a GPU teacher
    outruns one encoder thread; numpy, scipy and zstd release the GIL, so threads scale). At most ``workers``
    shards wait, so memory stays at workers + 1 shards' candidates. Each shard is finished by its own json, so
    the order in which they finish does not matter."""
    size, batch, workers = cfg.shard_size, cfg.model.batch_rows, write_workers(cfg)
    pending: list = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for s in todo:
            t0 = time.perf_counter()
            rows = np.asarray(inst.tokens[s * size:(s + 1) * size])
            parts = [scorer.score(rows[i:i + batch]) for i in range(0, len(rows), batch)]
            score_s = time.perf_counter() - t0
            while len(pending) >= workers:
                pending.pop(0).result()
            pending.append(pool.submit(write, s, rows, parts, score_s))
        for job in pending:
            job.result()


def write_workers(cfg: PassConfig) -> int:
    """Threads encoding and writing shards while the next ones are scored (``model.write_workers``, 0: cores / 4,
    1..4); each shard's zstd frames then get the cores left over (``_writers``)."""
    return cfg.model.write_workers or min(4, max(1, (os.cpu_count() or 1) // 4))


def _key_guard(out_dir: Path):
    """A check that ``out_dir/key.json`` still holds what it held when this pass started. On shared storage
    another machine's run may replace the folder (``overwrite=true``) at any moment; checking before and after
    each shard means no shard of this configuration is mixed into another's folder, nor kept there."""
    key_file = out_dir / "key.json"
    started = key_file.read_bytes() if key_file.is_file() else None   # None: a bare score_pass, no key to keep

    def check(when: str) -> None:
        if started is not None and (key_file.read_bytes() if key_file.is_file() else None) != started:
            raise InputError(f"{key_file} changed {when} (another run with other settings took {out_dir} over); "
                             f"this pass stopped and left that folder as it found it")

    return check


def parse_shard(shard: str) -> tuple[int, int]:
    """"i/N" -> (i, N), 0 <= i < N."""
    try:
        i, n = (int(x) for x in str(shard).split("/"))
    except ValueError:
        raise InputError(f"shard must be i/N (e.g. 0/4), got {shard!r}") from None
    if not 0 <= i < n:
        raise InputError(f"shard {shard}: need 0 <= i < N")
    return i, n


def _write_sampled(writer: LogitsWriter, shard: int, cand_ids: np.ndarray, cand_lps: np.ndarray, samples: int,
                   temperature: float, seed: int) -> dict:
    import torch

    from refine.core.sparse_sampling import sample_sparse, seed_for

    gen = torch.Generator().manual_seed(seed_for(seed, shard))
    ids, logw, counts = sample_sparse(torch.from_numpy(cand_ids), torch.from_numpy(cand_lps), samples, temperature,
                                      gen)
    return writer.write_shard(shard, ids.numpy(), logw.numpy(), counts.numpy().astype(np.uint8))


def finish(out_dir: Path, n_shards: int, writer: LogitsWriter | None, rs_writer: LogitsWriter | None, model: str,
           load_s: float, inst, extra: dict | None = None) -> dict:
    shards = [ShardFiles(out_dir, s) for s in range(n_shards)]
    entries = [json.loads(f.marker.read_text()) for f in shards]
    nll = np.concatenate([np.load(f.nll, allow_pickle=False) for f in shards])
    _save_npy(out_dir / "nll.npy", nll)
    if writer is not None:
        writer.finish([e["logits"] for e in entries], instances=inst)
    if rs_writer is not None:
        rs_writer.finish([e["logits_rs"] for e in entries], instances=inst)
    tokens, seconds = sum(e["tokens"] for e in entries), sum(e["seconds"] for e in entries)
    summary = {"model": str(model), "instances": int(len(nll)), "tokens": tokens, "score_seconds": seconds,
               "tok_s": tokens / max(seconds, 1e-9), "engine_load_seconds": load_s, "mean_nll": float(nll.mean()),
               **(extra or {})}
    write_json_atomic(out_dir / "pass.json", summary)
    return summary


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Score packed instances with one model (a refine pass).")
    ap.add_argument("config", help="a JSON file of refine.score_pass.PassConfig, or - to read it from stdin")
    a = ap.parse_args(argv)
    try:
        raw = json.loads(sys.stdin.read() if a.config == "-" else Path(a.config).read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read the pass config {a.config}: {e}") from None
    cfg = to_typed(PassConfig, raw)
    if not Path(cfg.model.path).is_dir():
        raise InputError(f"model folder not found: {cfg.model.path}")
    print(json.dumps(run_pass(cfg)))


if __name__ == "__main__":
    main()
