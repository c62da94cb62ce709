"""GPU readiness check (issue 15): the trainer's fused LM / offline-KD / online-KD steps against the plain
transformers step, and the HF scorer's throughput, torch.compile off and on, on random-init models; JSON out.

    python bench/gpu_check.py [--budget-s 420] [--peak-tflops T]      # -> results/gpu_check.json beside it
    python bench/gpu_check.py --dry --out /tmp/gpu_check.json         # CPU, tiny shapes, ~35 s of CPU (tests/)

Cases (``bench/gpu_cases.py``): a ~125M student at vocabulary 49,152 and the 335M ``pd_330m`` at 151,552, each
step variant with its median step time, ``max_memory_allocated`` and both as a ratio to the plain step; the HF
scorer's tokens/s and MFU (2 x parameters x tokens/s / the device's peak bf16 FLOP/s) for a ~1B teacher with
top-50 on the device. Cases run eager ones first, then compiled ones, while ``--budget-s`` lasts (counted from
the script's start, imports included); the rest are recorded as skipped. A failing case (a compile error, an
out-of-memory) is recorded with its error and the run goes on.

Imports torch, transformers, numpy and project modules that need hydra-core, omegaconf and zstandard only:
no vLLM, lm-eval or scipy, no weights, tokenizer or data (bench/README.md says what to carry to a GPU machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

T0 = time.monotonic()   # the budget counts from here: torch's, transformers' and the project's imports are in it
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")     # nothing here downloads; a GPU machine has no network

import torch  # noqa: E402
import transformers  # noqa: E402

from bench import gpu_cases as cases  # noqa: E402

# Dense bf16 tensor-core peaks (FLOP/s) by device name; H100 means the SXM part (PCIe: 756e12, pass --peak-tflops)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
# Seconds a case needs left in the budget to start: on a GPU a compile takes a minute or more
MIN_LEFT = {"off": 10.0, "on": 60.0}
FORBIDDEN = ("vllm", "lm_eval")             # the GPU machine has neither (scipy: tests/test_gpu_check.py)


def jobs(p: cases.Plan, device: torch.device, tmp: Path, peak: float | None) -> list[dict]:
    """Every case in run order: eager step variants and scorer, then compiled ones. ``run`` computes the
    figures; ``done`` (if any) frees what later cases must not carry (a group's shared student)."""
    teacher: dict[str, int] = {}

    def scorer(compiled: bool) -> dict:
        if "params" not in teacher:         # saved once, loaded by each scorer case
            teacher["params"] = cases.save_teacher(p, device, tmp / "teacher")
        return cases.scorer_case(tmp / "teacher", teacher["params"], compiled, p, device, peak)

    out = []
    for compile_ in ("off", "on"):
        for cfg, vocab in p.students:
            group = cases.StudentCases(cfg, vocab, compile_ == "on", p, device)
            for variant in cases.VARIANTS:
                out.append({"case": {"kind": "train_step", "model": cfg.name, "vocab": vocab, "variant": variant,
                                     "compile": compile_}, "run": lambda g=group, v=variant: g.run(v),
                            "done": group.close if variant == cases.VARIANTS[-1] else None})
        out.append({"case": {"kind": "scorer", "model": p.teacher.name, "vocab": p.scorer_vocab, "variant": "hf",
                             "compile": compile_}, "run": lambda c=compile_ == "on": scorer(c), "done": None})
    return out


def run_jobs(todo: list[dict], budget_s: float, clock=time.monotonic, start: float = T0,
             after=lambda records: None) -> list[dict]:
    """Each job's case record with its figures and ``status``: ok, error (with the error) or skipped (the budget
    left was below ``MIN_LEFT`` for its compile mode). ``after(records)`` runs after each job."""
    records = []
    for job in todo:
        rec = dict(job["case"])
        left = budget_s - (clock() - start)
        if left < MIN_LEFT[rec["compile"]]:
            rec.update(status="skipped", reason=f"budget: {max(left, 0):.0f} s left of {budget_s:.0f}")
        else:
            t0 = clock()
            try:
                rec.update(job["run"]())
                rec["status"] = "ok"
            except Exception as e:          # noqa: BLE001  (recorded: the other cases still run)
                rec.update(status="error", error=f"{type(e).__name__}: {str(e)[:800]}")
            rec["case_s"] = clock() - t0
            cases.free()
        if job["done"]:
            job["done"]()
        records.append(rec)
        after(records)
    return records


def add_ratios(records: list[dict]) -> None:
    """Step time and memory over the plain step of the same student and compile mode; compiled over eager."""
    ok = {(r["model"], r["vocab"], r["variant"], r["compile"]): r for r in records if r["status"] == "ok"}
    for (model, vocab, variant, compile_), r in ok.items():
        plain = ok.get((model, vocab, "plain", compile_))
        if r["kind"] == "train_step" and plain:
            r["x_plain_step"] = r["step_s"] / plain["step_s"]
            r["x_plain_mem"] = r["mem_mb"] / plain["mem_mb"]
        eager = ok.get((model, vocab, variant, "off"))
        if compile_ == "on" and eager:
            key = "step_s" if r["kind"] == "train_step" else "call_s"
            r["x_eager"] = r[key] / eager[key]


def device_info(device: torch.device) -> dict:
    name = platform.processor()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    elif Path("/proc/cpuinfo").exists():
        name = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                     if ln.startswith("model name")), name)
    return {"type": device.type, "name": name, "cpus": os.cpu_count(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "transformers": transformers.__version__, "python": platform.python_version()}


HEADER = (f"{'case':<44}{'status':>8}{'step/call s':>12}{'x plain':>8}{'x eager':>8}{'mem MB':>9}{'x plain':>8}"
          f"{'tok/s':>11}{'MFU':>7}")


def row(r: dict) -> str:
    """One case as a table row (and its error or skip reason on the next line)."""
    fmt = lambda k, f: format(r[k], f) if r.get(k) is not None else "-"
    name = f"{r['model']} v{r['vocab']} {r['variant']} compile={r['compile']}"
    line = (f"{name:<44}{r['status']:>8}{fmt('step_s' if 'step_s' in r else 'call_s', '.4f'):>12}"
            f"{fmt('x_plain_step', '.2f'):>8}{fmt('x_eager', '.2f'):>8}{fmt('mem_mb', '.0f'):>9}"
            f"{fmt('x_plain_mem', '.2f'):>8}{fmt('tokens_per_s', ',.0f'):>11}{fmt('mfu', '.3f'):>7}")
    return line if r["status"] == "ok" else f"{line}\n    {r.get('error') or r.get('reason')}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry", action="store_true", help="tiny shapes, same code paths (CPU, ~35 s); needs --out")
    ap.add_argument("--out", type=Path, help="JSON path (default: results/gpu_check.json beside this script)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget; later cases are skipped")
    ap.add_argument("--peak-tflops", type=float, help="the device's peak bf16 TFLOP/s for MFU (default: by name)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    if a.dry and a.out is None:
        ap.error("--dry needs --out (results/gpu_check.json holds the real run)")
    device = torch.device(a.device)
    if device.type != "cuda" and not a.dry:
        sys.exit("gpu_check: no CUDA device here; --dry --out PATH runs the tiny CPU check")
    if device.type == "cpu":
        torch.set_num_threads(1)    # tiny shapes: on a shared machine 2 threads' barriers made steps ~15x slower
    info = device_info(device)
    peak = a.peak_tflops * 1e12 if a.peak_tflops else next(
        (v for k, v in PEAK_BF16.items() if device.type == "cuda" and k in info["name"]), None)
    p = cases.plan(a.dry)
    out = a.out or REPO / "bench" / "results" / "gpu_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    res = {"check": "gpu_check", "dry": a.dry, "device": info, "peak_bf16_flops": peak, "budget_s": a.budget_s,
           "plan": {"students": [{"model": c.name, "vocab": v, "layers": c.num_layers, "hidden": c.hidden_size}
                                 for c, v in p.students],
                    "teacher": {"model": p.teacher.name, "layers": p.teacher.num_layers,
                                "hidden": p.teacher.hidden_size, "scorer_vocab": p.scorer_vocab},
                    "batch": [p.batch, p.seq_len], "warmup": p.warmup, "steps": p.steps,
                    "scorer_rows": p.scorer_rows, "scorer_batch": p.scorer_batch, "scorer_reps": p.scorer_reps,
                    "compile_backend": p.backend, "autocast": "bfloat16", "top_k": cases.TOP_K}}

    def save(records: list[dict], done: bool = False) -> None:
        """After every case: its row, and the JSON so far (a run killed at its time limit keeps what it did)."""
        add_ratios(records)
        if not done:
            print(row(records[-1]), flush=True)
        res.update(complete=done, elapsed_s=time.monotonic() - T0,
                   imported={m: m in sys.modules for m in FORBIDDEN}, cases=records)
        out.write_text(json.dumps(res, indent=2) + "\n")

    print(HEADER)
    with tempfile.TemporaryDirectory() as tmp:
        records = run_jobs(jobs(p, device, Path(tmp), peak), a.budget_s, after=save)
    save(records, done=True)
    print(f"{info['name']}: {res['elapsed_s']:.0f} s; imported "
          f"{[m for m, v in res['imported'].items() if v] or 'none'} of {list(FORBIDDEN)}\n-> {out}")


if __name__ == "__main__":
    main()
