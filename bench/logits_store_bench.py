"""Raw vs compact ("zstd") teacher-logits store, side by side on one real store.

Run after ``make refine`` (the committed figures: ``REFINE_ARGS="pack.max_instances=1024"``, the SmolLM2
teacher's top-0.95-50 store of 1,024 instances x 255 positions)::

    python bench/logits_store_bench.py [.cache/refined/default/teacher/logits] [--steps 60] [--kl-instances 16]

The store must be raw (the compact copy is written to ``--work``, default ``.cache/bench/logits_store/``).
Measures, on this machine:

* bytes per predicted token of both, ids per position, encoding (raw -> compact, 1 and 2 threads: same
  bytes, checked) and decoding speed;
* ``OfflineTeacher(store).signal(rows)`` for 4 random rows (what the trainer calls every step), raw and
  compact alternating over the same batches;
* KL(full || stored) per token: the full teacher distribution from an HF forward of the teacher over the
  store's instances (``<refined>/instances_scored``; the store must be aligned with them, checked), the stored
  one spreading its missing mass ``1 - sum(stored p)`` uniformly over the ids it does not hold; and the KL
  between the renormalised targets ``softmax`` over the kept ids, raw vs compact;
* the student's val loss after ``--steps`` steps of ``+experiment=kd_offline`` reading each store (same seed,
  instances and tokens), with the median training step time of each run.

Prints a table, writes ``bench/results/logits_store.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from refine.core.errors import InputError  # noqa: E402
from refine.core.logits import LogitsStore, SparseRows, convert  # noqa: E402
from refine.core.manifest import sha256_file  # noqa: E402


def read_speed(store: LogitsStore) -> float:
    """Instances per second decoded by ``store[i]``, every instance once."""
    t0 = time.perf_counter()
    for i in range(len(store)):
        store[i]
    return len(store) / (time.perf_counter() - t0)


def signal_ms(stores: dict[str, LogitsStore], batches: int = 30, rows: int = 4) -> dict[str, float]:
    """Median ms of ``OfflineTeacher.signal`` for ``rows`` random rows, the stores alternating on each batch."""
    from distill.signal import OfflineTeacher

    teachers = {name: OfflineTeacher(s) for name, s in stores.items()}
    n = len(next(iter(stores.values())))
    rng, times = np.random.default_rng(0), {name: [] for name in stores}
    for _ in range(batches):
        batch = rng.choice(n, rows, replace=False)
        for name, teacher in teachers.items():
            t0 = time.perf_counter()
            teacher.signal(batch)
            times[name].append(1000 * (time.perf_counter() - t0))
    return {name: float(np.median(t)) for name, t in times.items()}


def kl_figures(full_logp: np.ndarray, raw: SparseRows, compact: SparseRows) -> dict[str, np.ndarray]:
    """Per-position KL(full || stored) of both stores and KL(raw || compact) between renormalised targets."""
    t, vocab = full_logp.shape
    neg_entropy = (np.exp(full_logp) * full_logp).sum(1)
    out = {}
    for name, rows in (("raw", raw), ("compact", compact)):
        pos = np.repeat(np.arange(t), rows.counts)
        q = np.exp(rows.logprobs.astype(np.float64))
        kept = np.bincount(pos, weights=q, minlength=t)
        # the missing mass spread uniformly over the ids not stored (floored: a quantised sum may pass 1)
        missing = np.maximum(1 - kept, 1e-9) / (vocab - rows.counts.astype(np.int64))
        p = np.exp(full_logp[pos, rows.ids.astype(np.int64)])
        cross = np.bincount(pos, weights=p * np.log(q), minlength=t) + (1 - np.bincount(pos, p, t)) * np.log(missing)
        out[f"kl_full_{name}"] = neg_entropy - cross
    # The same ids in another order: align by (position, id).
    pos = np.repeat(np.arange(t), raw.counts)
    a, b = np.lexsort((raw.ids, pos)), np.lexsort((compact.ids, pos))
    if not np.array_equal(raw.ids[a], compact.ids[b]):
        raise AssertionError("compact store holds other ids than the raw one")
    lp, lq = raw.logprobs[a].astype(np.float64), compact.logprobs[b].astype(np.float64)
    norm = lambda x: x - np.log(np.bincount(pos, weights=np.exp(x), minlength=t))[pos]
    lp, lq = norm(lp), norm(lq)
    out["kl_renorm_raw_compact"] = np.bincount(pos, weights=np.exp(lp) * (lp - lq), minlength=t)
    return out


def kl_on_instances(raw: LogitsStore, compact: LogitsStore, instances: Path, teacher: Path, n: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from refine.core.forward import forward_logits
    from refine.core.instances import Instances
    from refine.core.tokenizer import bos_prefix, load_tokenizer

    inst = Instances(instances)
    if len(inst) != len(raw) or inst.seq_len - 1 != raw.header.positions:
        raise InputError(f"{raw.folder} ({len(raw)} x {raw.header.positions + 1}) is not aligned with {instances} "
                         f"({len(inst)} x {inst.seq_len})")
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32, local_files_only=True).eval()
    bos = bos_prefix(load_tokenizer(teacher))
    rows = np.unique(np.linspace(0, len(raw) - 1, n).round().astype(int))
    per, overlap = [], []
    for r in rows:
        with torch.inference_mode():
            logits = forward_logits(model, torch.from_numpy(np.asarray(inst.tokens[r]).astype(np.int64))[None], bos)
        full = torch.log_softmax(logits[0, :-1].double(), -1).numpy()
        stored = raw[int(r)]
        # Alignment: the raw store's ids are the teacher's top-c ids (vLLM and HF agree to ~1e-4 in fp32).
        c = stored.counts.astype(np.int64)
        top = np.argsort(-full, axis=1)[:, :int(c.max())]
        pos = np.repeat(np.arange(len(c)), c)
        rank = np.arange(len(pos)) - np.repeat(np.cumsum(c) - c, c)
        overlap.append(np.mean(np.isin(stored.ids.astype(np.int64) + pos * full.shape[1],
                                       top[pos, rank] + pos * full.shape[1])))
        per.append(kl_figures(full, stored, compact[int(r)]))
    if np.mean(overlap) < 0.95:
        raise InputError(f"{raw.folder} does not hold the teacher's top ids of {instances} rows "
                         f"({np.mean(overlap):.0%} overlap): not aligned")
    return {"instances": len(rows), "tokens": int(sum(len(p["kl_full_raw"]) for p in per)),
            "top_id_overlap": float(np.mean(overlap)),
            **{k: float(np.concatenate([p[k] for p in per]).mean()) for k in per[0]}}


def step_seconds(run_dir: Path) -> float:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["split"] == "train"][5:]             # past the warm-up steps
    return float(np.median([r["tokens"] / r["step"] / r["tok_s"] for r in train]))


def main() -> None:
    from bench.kd_compare import train
    from bench.refine_bench import machine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", nargs="?", default=str(REPO / ".cache/refined/default/teacher/logits"))
    ap.add_argument("--refined", help="refine output the store belongs to (default: the store's grandparent)")
    ap.add_argument("--teacher", default=str(REPO / ".cache/models/smollm2-135m"))
    ap.add_argument("--kl-instances", type=int, default=16)
    ap.add_argument("--steps", type=int, default=60, help="training steps per store (0: no training)")
    ap.add_argument("--work", default=str(REPO / ".cache/bench/logits_store"))
    ap.add_argument("--out", default=str(REPO / "bench/results/logits_store.json"))
    a = ap.parse_args()
    raw = LogitsStore(a.store, verify=True)
    if raw.header.codec != "raw":
        raise SystemExit(f"{a.store} is a {raw.header.codec} store; the bench compares a raw store with its compact "
                         f"copy (refine with logits.codec=raw, or pass another store)")
    refined = Path(a.refined) if a.refined else Path(a.store).resolve().parent.parent
    work = Path(a.work).resolve()
    shutil.rmtree(work / "zstd", ignore_errors=True)
    encode_s = {}
    for workers in (1, 2):     # one encoder thread, then two (the refine default on >= 8 cores), same bytes
        shutil.rmtree(work / f"zstd-w{workers}", ignore_errors=True)
        t0 = time.perf_counter()
        convert(raw.folder, work / f"zstd-w{workers}", "zstd", workers=workers)
        encode_s[workers] = time.perf_counter() - t0
    if any(sha256_file(f) != sha256_file(work / "zstd-w2" / f.name) for f in (work / "zstd-w1").iterdir()):
        raise SystemExit("two encoder threads wrote other bytes than one")
    shutil.rmtree(work / "zstd-w2")
    (work / "zstd-w1").rename(work / "zstd")
    compact = LogitsStore(work / "zstd")
    tokens = len(raw) * raw.header.positions
    stores = {"raw": raw, "compact": compact}
    stats = {name: s.stats() for name, s in stores.items()}
    # bytes_per_token and ids_per_position (the compact store's) are what ``distill.plan`` reads
    res = {"store": str(raw.folder), "instances": len(raw), "positions": raw.header.positions,
           "top_p": raw.header.top_p, "top_k": raw.header.top_k,
           "bytes_per_token": stats["compact"]["bytes_per_token"],
           "bytes_per_token_raw": stats["raw"]["bytes_per_token"],
           "ids_per_position": stats["compact"]["ids_per_position"],
           **{f"mean_kept_mass_{name}": st["mean_kept_mass"] for name, st in stats.items()},
           "encode_tokens_per_s": tokens / encode_s[1],
           "encode_tokens_per_s_2_threads": tokens / encode_s[2],
           **{f"decode_instances_per_s_{name}": read_speed(s) for name, s in stores.items()}}
    res["signal_ms_4_rows"] = signal_ms(stores)
    print(f"{a.kl_instances} instances: HF teacher forward for KL", flush=True)
    res["kl"] = kl_on_instances(raw, compact, refined / "instances_scored", Path(a.teacher), a.kl_instances)
    if a.steps:
        runs_dir = REPO / "runs" / "logits_store_bench"
        common = ["+experiment=kd_offline", f"paths.refined={refined}", f"data.train={refined}/instances_scored",
                  f"trainer.max_steps={a.steps}", "seed=0"]
        res["train"] = {}
        for name, s in stores.items():
            r = train(f"kd_{name}", [*common, f"kd.logits={s.folder}"], runs_dir)
            res["train"][name] = {"val_loss": r["val_loss"], "kl_teacher": r["kl_teacher"], "seconds": r["seconds"],
                                  "step_s": step_seconds(runs_dir / f"kd_{name}"), "steps": a.steps}
    res["machine"] = machine()

    k, t = res["kl"], res.get("train", {})
    print(f"\n{'store':<9}{'B/token':>9}{'ids/pos':>9}{'kept mass':>10}{'decode inst/s':>14}{'signal ms':>10}"
          f"{'KL(full||stored)':>17}{'val loss':>10}{'step s':>8}")
    for name in stores:
        tr = t.get(name, {})
        bpt = res["bytes_per_token" if name == "compact" else "bytes_per_token_raw"]
        print(f"{name:<9}{bpt:>9.1f}{res['ids_per_position']:>9.2f}"
              f"{res[f'mean_kept_mass_{name}']:>10.4f}{res[f'decode_instances_per_s_{name}']:>14.0f}"
              f"{res['signal_ms_4_rows'][name]:>10.1f}{k[f'kl_full_{name}']:>17.4f}"
              f"{tr.get('val_loss', float('nan')):>10.4f}{tr.get('step_s', float('nan')):>8.2f}")
    print(f"KL(raw || compact), renormalised targets: {k['kl_renorm_raw_compact']:.5f} nats/token; "
          f"encoding {res['encode_tokens_per_s']:,.0f} tokens/s (1 thread), "
          f"{res['encode_tokens_per_s_2_threads']:,.0f} (2 threads)")
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
