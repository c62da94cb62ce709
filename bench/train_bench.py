"""Training-step cost: LM-only vs offline KD vs online KD, same student, same batch, side by side.

Run (needs `make refine`, or pass --refined)::

    python bench/train_bench.py [--refined .cache/refined/default] [--steps 6] [--rounds 2]

Each variant runs in its own process (so peak memory is its own), alternating lm, kd_offline, kd_online for
``--rounds`` rounds; a variant's step time is the median over its timed steps (after one warm-up step) and
its peak memory the process's peak RSS (CPU) or ``torch.cuda.max_memory_allocated`` (CUDA). The step is
what the trainer does: forward, loss (``distill.kd.Distiller``), backward, AdamW step. Student llama_small
(49k vocabulary), batch 4 x 256, SmolLM2-135M teacher. Writes ``bench/results/train_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def run_variant(variant: str, refined: str, steps: int) -> dict:
    import torch
    from hydra import compose, initialize_config_dir

    from distill.config import to_config
    from distill.data import BatchStream, open_instances
    from distill.kd import Distiller
    from distill.models import build_student
    from distill.train import CONF_DIR, pick_device
    from refine.tokenizer import load_tokenizer, tokenizer_hash

    exp = {"lm": "lm_baseline", "kd_offline": "kd_offline", "kd_online": "kd_online"}[variant]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = to_config(compose("train", overrides=[f"+experiment={exp}", "run_dir=/tmp/unused",
                                                     f"paths.refined={refined}",
                                                     f"data.train={refined}/instances_scored"]))
    device = pick_device("auto")
    tok = load_tokenizer(cfg.model.tokenizer)
    train_set = open_instances(cfg.data.train, tok, cfg.data.seq_len, cfg.paths.cache, quiet=True)
    model = build_student(cfg.model, tok, 0).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    distiller = Distiller(cfg.kd, train_set, tokenizer_hash(tok), device, 1000)
    stream = BatchStream(train_set, cfg.data.batch_size, seed=0)
    rows = stream.next_rows()
    batch = stream.fetch(rows).to(device)
    times = []
    for i in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = model(input_ids=batch).logits
        loss, _ = distiller.loss(logits, batch, rows, 100)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:                                   # step 0 warms up allocators and kernels
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"step_s": float(np.median(times)), "peak_mb": peak, "device": str(device)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--refined", default=str(REPO / ".cache" / "refined" / "default"))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.variant:
        print(json.dumps(run_variant(a.variant, a.refined, a.steps)))
        return
    results: dict[str, list[dict]] = {"lm": [], "kd_offline": [], "kd_online": []}
    for _ in range(a.rounds):
        for v in results:
            out = subprocess.run([sys.executable, __file__, "--variant", v, "--refined", a.refined, "--steps",
                                  str(a.steps)], capture_output=True, text=True, cwd=REPO, check=True)
            results[v].append(json.loads(out.stdout.strip().splitlines()[-1]))
    res = {}
    for v, runs in results.items():
        res[f"{v}_step_s"] = float(np.median([r["step_s"] for r in runs]))
        res[f"{v}_peak_mb"] = float(max(r["peak_mb"] for r in runs))
    res["kd_offline_over_lm"] = res["kd_offline_step_s"] / res["lm_step_s"]
    res["kd_online_over_lm"] = res["kd_online_step_s"] / res["lm_step_s"]
    res["rounds"] = results
    from bench.refine_bench import machine

    res["setup"] = {"student": "llama_small (16M, vocab 49,152)", "batch": "4 x 256", "teacher": "SmolLM2-135M",
                    "steps_timed": a.steps, "device": results["lm"][0]["device"]}
    res["machine"] = machine()
    print(f"{'variant':<12}{'step s':>9}{'x LM':>7}{'peak MB':>10}")
    for v in results:
        step, peak = res[f"{v}_step_s"], res[f"{v}_peak_mb"]
        print(f"{v:<12}{step:>9.3f}{step / res['lm_step_s']:>7.2f}{peak:>10.0f}")
    out = REPO / "bench" / "results" / "train_cpu.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
