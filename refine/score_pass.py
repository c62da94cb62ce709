"""One scoring pass of one model over packed instances, shard by shard, resumable.

Run by ``python -m refine`` in its own process per model (vLLM is faster without transformers beside it, and
each engine's memory goes back to the OS when the pass ends)::

    python -m refine.score_pass --model DIR --instances DIR --out DIR [--top-k 50 --top-p 0.95 --codec zstd]
    python -m refine.score_pass --backend served --urls http://host1:8000 http://host2:8000 --model DIR ...

For each shard of ``--shard-size`` instances it writes ``nll-XXXXX.npy`` (mean per-token NLL per instance) and,
when ``--top-k > 0``, the top-p-k truncated logits shard of ``refine.core.logits``; then ``shard-XXXXX.json``
last. A shard whose json exists is finished: a rerun after a crash scores only the missing shards.
``finish`` assembles ``nll.npy`` and the store's ``store.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

from refine.core.errors import InputError, exit_on_input_error
from refine.core.instances import Instances
from refine.core.logits import CODECS, LogitsWriter, StoreHeader
from refine.core.manifest import atomic_path, write_json_atomic


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=False)


def run_pass(model: str, instances_dir: str, out: str, backend: str = "vllm", dtype: str = "float32",
             top_k: int = 0, top_p: float = 1.0, shard_size: int = 128, batch_rows: int = 32,
             quiet: bool = False, scorer=None, candidates: int = 0, rs_samples: int = 0,
             rs_temperature: float = 1.0, seed: int = 0, codec: str = "zstd", shard: str = "0/1",
             write_workers: int = 0, **engine_opts) -> dict:
    """Score every unfinished shard. ``scorer``: an already started one (benchmarks), else one is made here.

    The engine returns the top ``max(top_k, candidates)`` per position; the top-p-k store keeps a prefix of
    them, and with ``rs_samples`` > 0 the same candidates (plus their remaining mass) also give an RS-KD
    sampled store in ``logits_rs/`` (draws seeded by ``seed`` and the shard: a rerun writes the same bytes).
    ``codec``: both stores' (``refine.core.logits``: zstd | raw). ``shard``: "i/N", this machine's part of a
    run spread over N (a partial summary until a folder holds every part's shard files). ``write_workers``:
    threads encoding and writing scored shards while the next ones are scored (0: a quarter of the cores, 1..4).
    """
    from refine.scorers.registry import make_scorer

    inst = Instances(instances_dir)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_shards = (len(inst) + shard_size - 1) // shard_size
    part, part_count = parse_shard(shard)
    # shard i/N of a run spread over N machines scores every N-th score shard: each machine gets its own
    # shard files, and a folder holding all of them finishes into exactly the unsharded pass (refine merge_from)
    todo = [s for s in range(part, n_shards, part_count) if not (out_dir / f"shard-{s:05d}.json").is_file()]
    writer = rs_writer = None
    header = StoreHeader(inst.tokenizer.vocab_size, inst.tokenizer.hash, top_p, top_k, inst.seq_len - 1,
                         codec=codec)
    if top_k:
        writer = LogitsWriter(out_dir / "logits", header)
    if rs_samples:
        if not top_k:
            raise InputError("RS-KD sampling draws from the teacher's top-K candidates: it needs top_k > 0")
        rs_writer = LogitsWriter(out_dir / "logits_rs", replace(header, top_p=1.0, top_k=rs_samples, kind="sampled",
                                                                 samples=rs_samples,
                                                                 sample_temperature=rs_temperature))
    n_cand = max(top_k, candidates)
    load_s = 0.0
    check_key = _key_guard(out_dir)
    if todo:
        t_load = time.perf_counter()
        own = scorer is None
        if own:
            # max_model_len leaves room for the one token vLLM must generate after the prompt.
            opts = {"max_model_len": inst.seq_len + 16, **engine_opts} if backend == "vllm" else engine_opts
            scorer = make_scorer(backend, model, top_k=n_cand, dtype=dtype, **opts)
        load_s = time.perf_counter() - t_load

        def write(s: int, rows: np.ndarray, parts: list, score_s: float) -> None:
            """A scored shard's files, ``shard-XXXXX.json`` last (what marks it finished)."""
            t0 = time.perf_counter()
            check_key(f"before shard {s} was written")
            nll = np.concatenate([p.mean_nll() for p in parts]).astype(np.float32)
            entry = rs_entry = None
            if writer is not None:
                cand_ids = np.concatenate([p.topk_ids for p in parts])
                cand_lps = np.concatenate([p.topk_logprobs for p in parts])
                entry = writer.write_shard(s, cand_ids[..., :top_k], cand_lps[..., :top_k])
            if rs_writer is not None:
                rs_entry = _write_sampled(rs_writer, s, cand_ids, cand_lps, rs_samples, rs_temperature, seed)
            _save_npy(out_dir / f"nll-{s:05d}.npy", nll)
            write_json_atomic(out_dir / f"shard-{s:05d}.json", {
                "shard": s, "instances": len(rows), "tokens": int(rows.size), "seconds": score_s,
                "tok_s": rows.size / score_s, "write_seconds": time.perf_counter() - t0, "logits": entry,
                "logits_rs": rs_entry})
            try:
                check_key(f"while shard {s} was written")
            except InputError:                # ours landed in a folder that is no longer ours: take it back out
                for f in [out_dir / f"shard-{s:05d}.json", out_dir / f"nll-{s:05d}.npy",
                          *out_dir.glob(f"logits*/shard-{s:05d}.bin")]:
                    f.unlink(missing_ok=True)
                raise
            if not quiet:
                print(f"  {Path(model).name}: shard {s + 1}/{n_shards}, {rows.size / score_s:,.0f} tok/s",
                      file=sys.stderr, flush=True)

        # Encoding and writing shards overlaps scoring the next ones (a GPU teacher outruns one encoder thread;
        # numpy, scipy and zstd release the GIL, so threads scale: 1.6x with 2 on 2 cores). At most
        # `workers` shards wait, so memory stays at workers + 1 shards' candidates. Each shard is finished
        # by its own json, so the order in which they finish does not matter.
        workers = write_workers or min(4, max(1, (os.cpu_count() or 1) // 4))
        pending: list = []
        try:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for s in todo:
                    t0 = time.perf_counter()
                    rows = np.asarray(inst.tokens[s * shard_size:(s + 1) * shard_size])
                    parts = [scorer.score(rows[i:i + batch_rows]) for i in range(0, len(rows), batch_rows)]
                    score_s = time.perf_counter() - t0
                    while len(pending) >= workers:
                        pending.pop(0).result()
                    pending.append(pool.submit(write, s, rows, parts, score_s))
                for job in pending:
                    job.result()
        finally:
            if own:
                scorer.close()
    if part_count > 1 and not all((out_dir / f"shard-{s:05d}.json").is_file() for s in range(n_shards)):
        done = sum((out_dir / f"shard-{s:05d}.json").is_file() for s in range(n_shards))
        return {"model": str(model), "partial": f"{part}/{part_count}", "shards_done": done, "shards": n_shards,
                "engine_load_seconds": load_s}
    check_key("before the pass was finished")
    return finish(out_dir, n_shards, writer, rs_writer, model, load_s, inst)


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
           load_s: float, inst) -> dict:
    entries = [json.loads((out_dir / f"shard-{s:05d}.json").read_text()) for s in range(n_shards)]
    nll = np.concatenate([np.load(out_dir / f"nll-{s:05d}.npy", allow_pickle=False) for s in range(n_shards)])
    _save_npy(out_dir / "nll.npy", nll)
    if writer is not None:
        writer.finish([e["logits"] for e in entries], instances=inst)
    if rs_writer is not None:
        rs_writer.finish([e["logits_rs"] for e in entries], instances=inst)
    tokens, seconds = sum(e["tokens"] for e in entries), sum(e["seconds"] for e in entries)
    summary = {"model": str(model), "instances": int(len(nll)), "tokens": tokens, "score_seconds": seconds,
               "tok_s": tokens / max(seconds, 1e-9), "engine_load_seconds": load_s, "mean_nll": float(nll.mean())}
    write_json_atomic(out_dir / "pass.json", summary)
    return summary


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Score packed instances with one model (a refine pass).")
    ap.add_argument("--model", required=True)
    ap.add_argument("--instances", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--backend", choices=["vllm", "hf", "served"], default="vllm")
    ap.add_argument("--urls", nargs="+", default=[], help="served: base URLs of running vLLM servers")
    ap.add_argument("--api-key-env", default=None, help="served: NAME of the environment variable holding the "
                    "servers' API key (the key never goes on a command line)")
    ap.add_argument("--served-model", default=None, help="served: the model name the servers serve (default: "
                    "their only one)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--top-k", type=int, default=0, help="store top-p-k logits with this k (0: NLL only)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--candidates", type=int, default=0, help="top-K the engine returns (default: --top-k)")
    ap.add_argument("--rs-samples", type=int, default=0, help="also write an RS-KD sampled store (draws/position)")
    ap.add_argument("--rs-temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--codec", choices=CODECS, default="zstd", help="logits store codec")
    ap.add_argument("--shard-size", type=int, default=128)
    ap.add_argument("--shard", default="0/1", help="i/N: score this machine's part of a run spread over N")
    ap.add_argument("--batch-rows", type=int, default=32)
    ap.add_argument("--write-workers", type=int, default=0, help="shard encoder threads (0: cores / 4, 1..4)")
    ap.add_argument("--engine-opts", default="{}", help="JSON dict passed to the engine (e.g. tensor_parallel_size)")
    a = ap.parse_args(argv)
    if not Path(a.model).is_dir():
        raise InputError(f"model folder not found: {a.model}")
    engine_opts = json.loads(a.engine_opts)
    if a.backend == "served":   # --model stays the local folder (config.json + tokenizer)
        engine_opts = {**engine_opts, **({"urls": a.urls} if a.urls else {}),
                       **({"served_model": a.served_model} if a.served_model else {}),
                       **({"api_key_env": a.api_key_env} if a.api_key_env is not None else {})}
    summary = run_pass(a.model, a.instances, a.out, a.backend, a.dtype, a.top_k, a.top_p, a.shard_size,
                       a.batch_rows, candidates=a.candidates, rs_samples=a.rs_samples,
                       rs_temperature=a.rs_temperature, seed=a.seed, codec=a.codec, shard=a.shard,
                       write_workers=a.write_workers, **engine_opts)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
