"""LM-only vs distillation on the bundled corpus: same student, same instances, same tokens, same seed.

Run after ``make refine`` with RS-KD samples captured, e.g.::

    make refine REFINE_ARGS="pack.max_instances=1024 logits.candidates=100 logits.rs_samples=24"
    python bench/kd_compare.py [--refined .cache/refined/default] [--steps 200] [--runs lm,kd_offline,...]

Every run trains llama_small on ``<refined>/instances_scored`` (the scored, *unselected* instances, so the
teacher logits cover every row) for ``--steps`` steps of the trainer defaults (4 x 256 tokens), seed 0:

* ``lm_baseline``   LM loss only
* ``lm_wsd``        LM loss only with the WSD lr: separates kd_wsd's alpha schedule from its lr schedule
* ``kd_offline``    stored top-0.95-50 logits, alpha 0.9 constant, KLD, cosine lr (PD paper's best static)
* ``kd_wsd``        the same logits, WSD alpha + WSD lr (PD paper's best)
* ``kd_rs``         RS-KD sampled store (``teacher/logits_rs``), alpha 0.9, KLD
* ``kd_topk_equal`` a top-p-k store re-truncated (``refine.core.logits.retruncate``) to the RS store's
                    bytes/token, alpha 0.9, KLD: RS-KD vs top-k at equal storage

Prints a table and writes ``bench/results/kd_compare_cpu.json``: final held-out val LM loss, the val
KL(teacher || student), bytes/token of the store used, seconds. One seed: differences of a few hundredths
of a nat are within run-to-run noise at this scale (see the JSON's note).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from refine.core.logits import LogitsStore, retruncate  # noqa: E402

RUNS = ("lm_baseline", "lm_wsd", "kd_offline", "kd_wsd", "kd_rs", "kd_topk_equal")


def equal_bytes_store(refined: Path) -> tuple[Path, dict]:
    """The top-p-k store (p kept, k searched) whose bytes/token is closest to the RS-KD store's."""
    rs = LogitsStore(refined / "teacher" / "logits_rs")
    src = LogitsStore(refined / "teacher" / "logits")
    target = rs.bytes_per_token()
    best = None
    for k in range(1, src.header.top_k + 1):
        out = refined / "teacher" / f"logits_k{k}"
        store = LogitsStore(out) if (out / "store.json").is_file() else retruncate(src.folder, out, src.header.top_p, k)
        gap = abs(store.bytes_per_token() - target)
        if best is None or gap < best[0]:
            best = (gap, out, store)
        if store.bytes_per_token() > target:
            break
    _, out, store = best
    return out, {"rs": {"samples": rs.header.samples, **rs.stats()},
                 "topk_equal": {"top_p": store.header.top_p, "top_k": store.header.top_k, **store.stats()}}


def train(name: str, overrides: list[str], runs_dir: Path) -> dict:
    run_dir = runs_dir / name
    cmd = [sys.executable, "-m", "distill.train", *overrides, f"run_name={name}", f"paths.runs={runs_dir}",
           "resume=false", "trainer.progress=false"]
    print(" ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    secs = time.perf_counter() - t0
    summary = json.loads((run_dir / "summary.json").read_text())
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in recs if r["split"] == "val"]
    return {"val_loss": summary["val_loss"], "val_ppl": summary["val_ppl"], "tokens": summary["tokens"],
            "kl_teacher": val[-1].get("kl_teacher"), "val_curve": [(r["step"], r["loss"]) for r in val],
            "seconds": secs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--refined", default=str(REPO / ".cache/refined/default"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--runs-dir", default=str(REPO / "runs/kd_compare"))
    ap.add_argument("--out", default=str(REPO / "bench/results/kd_compare_cpu.json"))
    a = ap.parse_args()
    refined, runs_dir = Path(a.refined).resolve(), Path(a.runs_dir).resolve()
    common = [f"paths.refined={refined}", f"data.train={refined}/instances_scored", f"trainer.max_steps={a.steps}",
              "seed=0"]
    names, stores = a.runs.split(","), {}
    if {"kd_rs", "kd_topk_equal"} & set(names):
        if (refined / "teacher" / "logits_rs" / "store.json").is_file():
            equal, stores = equal_bytes_store(refined)
        else:
            print(f"no RS-KD store in {refined}/teacher (refine with logits.rs_samples > 0): skipping kd_rs, "
                  f"kd_topk_equal")
            names = [n for n in names if n not in ("kd_rs", "kd_topk_equal")]
    # The logits store each KD run reads (its bytes/token goes into the table).
    logits_of = {"kd_offline": refined / "teacher" / "logits", "kd_wsd": refined / "teacher" / "logits",
                 "kd_rs": refined / "teacher" / "logits_rs"}
    if stores:
        logits_of["kd_topk_equal"] = equal
    plans = {"lm_baseline": ["+experiment=lm_baseline", *common],
             "lm_wsd": ["+experiment=lm_baseline", "schedule=wsd", *common],
             **{n: ["+experiment=kd_wsd" if n == "kd_wsd" else "+experiment=kd_offline", *common,
                    f"kd.logits={path}"] for n, path in logits_of.items()}}
    # Runs of an earlier call with the same setup are kept (``--runs`` can add one run to a finished table).
    results, out_path = {}, Path(a.out)
    if out_path.is_file():
        prev = json.loads(out_path.read_text())
        if prev.get("steps") == a.steps and prev.get("refined") == str(refined):
            results, stores = prev["results"], stores or prev.get("stores", {})
    for name in names:
        results[name] = train(name, plans[name], runs_dir)
        if name in logits_of:
            results[name]["bytes_per_token"] = LogitsStore(logits_of[name]).bytes_per_token()

    print(f"\n{'run':<15}{'val loss':>10}{'val ppl':>10}{'KL(T||S)':>10}{'B/token':>9}{'seconds':>9}")
    for name, r in results.items():
        kl = f"{r['kl_teacher']:.3f}" if r.get("kl_teacher") is not None else "-"
        bpt = f"{r['bytes_per_token']:.1f}" if "bytes_per_token" in r else "-"
        print(f"{name:<15}{r['val_loss']:>10.4f}{r['val_ppl']:>10.1f}{kl:>10}{bpt:>9}{r['seconds']:>9.0f}")
    from bench.refine_bench import machine

    out = {"results": results, "stores": stores, "steps": a.steps, "refined": str(refined),
           "note": "one seed; the val loss is over trainer.eval_batches fixed val batches of rows evenly spaced "
                   "over the val split (before issue 16: its first rows)",
           "machine": machine()}
    out_path.write_text(json.dumps(out, indent=2))
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
