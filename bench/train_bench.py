"""Training-step cost and memory: LM-only vs offline KD vs online KD, fused loss vs plain, side by side.

Run (needs `make refine`, or pass --refined)::

    python bench/train_bench.py [--refined .cache/refined/default] [--steps 6] [--rounds 2] [--vocabs 49152,151552]

A step is what the trainer does: forward, loss, backward, AdamW step, on the same batch of 4 x 256 tokens, for
the llama_small student (4 layers, width 256). Variants:

* ``lm_plain``   ``model(...).logits`` + ``F.cross_entropy``: the plain transformers step, the reference;
* ``kd_naive``   the same logits + the reference ``lm_loss`` + ``kd_loss`` (a second log-softmax): the old path;
* ``lm``         the trainer's LM-only step (``distill.kd.Distiller`` without a teacher: fused loss);
* ``kd_offline`` the trainer's offline KD step (stored top-0.95-50 logits, fused loss), store read included;
* ``kd_online``  the trainer's online KD step (live SmolLM2-135M teacher, top-k from its hidden states);
* ``lm_xtok``    cross_family_kd's student (qwen2_small, GPT-2 tokenizer) LM-only on the same SmolLM2 rows
                 re-tokenized (4 x 288 GPT-2 tokens, padded);
* ``kd_xtok``    the same with cross-tokenizer KD from the stored SmolLM2 logits (``kd.signal=cross_tokenizer``):
                 re-tokenizing, aligning and mapping the batch's signal are inside the timed step (the
                 alignment cache is off here; the trainer does it on the prefetch thread, during backward).

Each variant runs in its own process (peak memory is its own), all alternating for ``--rounds`` rounds; a
variant's step time is the median of its timed steps (after one warm-up step); its memory is the peak of live
tensors during one profiled step (the profiler's memory timeline: the CPU analogue of
``torch.cuda.max_memory_allocated``) and the process's peak RSS (glibc keeps freed memory cached, so RSS is the
coarser figure). ``paired``: the trainer's LM-only and offline-KD steps alternating on one student in one
process (drift cancels: the sharper KD/LM ratio).

At the 152k vocabulary (the PD paper's GLM-4 size) the student is built with 151,552 ids, and batch tokens and
stored teacher ids are mapped into it (id -> 3 id), so the KD signal keeps the real store's sizes; there is
no 152k teacher here, so no online variant. Writes ``bench/results/train_cpu.json`` (``train_cuda.json`` on
a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.step_timing import peak_mb, tensor_peak_mb, train_step  # noqa: E402  (after the path insert)

TEACHER_VOCAB = 49152
ALL = ("lm_plain", "kd_naive", "lm", "kd_offline", "kd_online", "lm_xtok", "kd_xtok")


class _Spread:
    """A teacher whose stored ids are mapped into a larger student vocabulary (id -> 3 id)."""

    def __init__(self, inner):
        self.inner = inner

    def signal(self, rows, tokens):
        s = self.inner.signal(rows, tokens)
        s.ids = s.ids * 3
        return s


def make_step(variant: str, refined: str, vocab: int, model=None):
    """(model, step function, device) for ``variant``: one training step of it on a fixed batch. ``model``: reuse
    this student (paired timing) instead of building one."""
    import torch
    import torch.nn.functional as F
    from hydra import compose, initialize_config_dir

    from distill.config import to_config
    from distill.data import BatchStream, open_instances, open_retokenized
    from distill.kd import Distiller
    from distill.losses import kd_loss, lm_loss
    from distill.models import hf_config
    from distill.train import CONF_DIR
    from distill.trainer import autocast_dtype, pick_device
    from refine.core.tokenizer import load_tokenizer, tokenizer_hash

    exp = {"lm_plain": "lm_baseline", "lm": "lm_baseline", "kd_naive": "kd_offline", "kd_offline": "kd_offline",
           "kd_online": "kd_online", "lm_xtok": "cross_family_kd", "kd_xtok": "cross_family_kd"}[variant]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = to_config(compose("train", overrides=[f"+experiment={exp}", "run_dir=/tmp/unused",
                                                     f"paths.refined={refined}", f"kd.logits={refined}/teacher/logits",
                                                     f"data.train={refined}/instances_scored"]))
    device = pick_device("auto")
    amp = autocast_dtype("auto", device)
    tok = load_tokenizer(cfg.model.tokenizer)
    if variant.endswith("xtok"):
        train_set = open_retokenized(cfg.data.train, cfg.kd.teacher, tok, cfg.data.seq_len)
        train_set.cross._cache_rows = 0         # every step aligns its rows again, as the trainer's does once
        vocab = len(tok)
        if variant == "lm_xtok":
            cfg.kd.signal = "none"
    else:
        train_set = open_instances(cfg.data.train, tok, cfg.data.seq_len, cfg.paths.cache, quiet=True)
    if model is None:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(hf_config(cfg.model, vocab, tok.bos_token_id, tok.eos_token_id))
        model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    distiller = Distiller(cfg.kd, train_set, tokenizer_hash(tok), device, 1000)
    if vocab != TEACHER_VOCAB and distiller.teacher is not None and not variant.endswith("xtok"):
        distiller.teacher = _Spread(distiller.teacher)
    stream = BatchStream(train_set, cfg.data.batch_size, seed=0)
    rows = stream.next_rows()
    batch = stream.fetch(rows).to(device) * (3 if vocab not in (TEACHER_VOCAB, len(tok)) else 1)

    def loss_fn():
        if variant == "lm_plain":
            logits = model(input_ids=batch).logits
            return F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), batch[:, 1:].reshape(-1))
        if variant == "kd_naive":
            logits = model(input_ids=batch).logits
            signal = distiller.teacher.signal(rows, batch).to(device)
            return 0.1 * lm_loss(logits, batch) + 0.9 * kd_loss(logits[:, :-1], signal)
        return distiller.loss(model, batch, rows, 100)[0]

    return model, train_step(loss_fn, opt, device, amp), device


def run_variant(variant: str, refined: str, steps: int, vocab: int) -> dict:
    _, step, device = make_step(variant, refined, vocab)
    step()                                      # warms up allocators and kernels
    rss_before = peak_mb(device)                # after AdamW's state exists: what a step adds comes after
    times = [step() for _ in range(steps)]
    peak = peak_mb(device)
    return {"step_s": float(np.median(times)), "peak_mb": peak, "step_peak_mb": peak - rss_before,
            "tensor_peak_mb": tensor_peak_mb(step, device), "device": str(device)}


def run_paired(refined: str, steps: int, vocab: int, xtok: bool = False) -> dict:
    """LM-only and offline-KD steps of one student alternating in one process: the machine's drift hits both
    alike, so their ratio is sharper than that of separate processes (which the memory figures need).
    ``xtok``: the cross-tokenizer pair (lm_xtok, kd_xtok) instead."""
    model, lm_step, device = make_step("lm_xtok" if xtok else "lm", refined, vocab)
    _, kd_step, _ = make_step("kd_xtok" if xtok else "kd_offline", refined, vocab, model=model)
    lm_step(), kd_step()
    pairs = [(lm_step(), kd_step()) for _ in range(steps)]
    lm, kd = (float(np.median(x)) for x in zip(*pairs))
    return {"lm_step_s": lm, "kd_step_s": kd, "kd_over_lm": kd / lm,
            "pair_ratios": [b / a for a, b in pairs], "device": str(device)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--refined", default=str(REPO / ".cache" / "refined" / "default"))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--vocabs", default=f"{TEACHER_VOCAB},151552")
    ap.add_argument("--paired-steps", type=int, default=10, help="LM/KD step pairs in the paired run")
    ap.add_argument("--variants", default=",".join(ALL), help="a subset of the variants, comma-separated")
    ap.add_argument("--out", help="results file name in bench/results (default train_cpu.json / train_cuda.json)")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, default=TEACHER_VOCAB, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.variant:
        run = run_paired(a.refined, a.steps, a.vocab, a.variant == "paired_xtok") if a.variant.startswith("paired") \
            else run_variant(a.variant, a.refined, a.steps, a.vocab)
        print(json.dumps(run))
        return
    names = [v for v in ALL if v in a.variants.split(",")]
    jobs = [(v, int(voc)) for voc in a.vocabs.split(",") for v in names
            if not (v in ("kd_online", "lm_xtok", "kd_xtok") and int(voc) != TEACHER_VOCAB)]

    def child(variant: str, vocab: int, steps: int) -> dict:
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--vocab", str(vocab), "--refined",
                              a.refined, "--steps", str(steps)], capture_output=True, text=True, cwd=REPO)
        if out.returncode:
            sys.exit(f"variant {variant} (vocab {vocab}) failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    results: dict[str, list[dict]] = {}
    for _ in range(a.rounds):
        for v, voc in jobs:
            results.setdefault(_key(v, voc), []).append(child(v, voc, a.steps))
    res = {}
    for key, runs in results.items():
        res[f"{key}_step_s"] = float(np.median([r["step_s"] for r in runs]))
        res[f"{key}_peak_mb"] = float(max(r["peak_mb"] for r in runs))
        res[f"{key}_step_peak_mb"] = float(max(r["step_peak_mb"] for r in runs))
        res[f"{key}_tensor_peak_mb"] = float(max(r["tensor_peak_mb"] for r in runs))
    for voc in a.vocabs.split(",") if "kd_offline" in names else []:
        paired = child("paired", int(voc), a.paired_steps)
        res[f"{_key('kd_offline', int(voc))}_over_lm_paired"] = paired["kd_over_lm"]
        res.setdefault("paired", {})[voc] = paired
    if "kd_xtok" in names:
        paired = child("paired_xtok", TEACHER_VOCAB, a.paired_steps)
        res["kd_xtok_over_lm_xtok_paired"] = paired["kd_over_lm"]
        res.setdefault("paired", {})["xtok"] = paired
    for voc in a.vocabs.split(","):
        for v in names:
            key, base = _key(v, int(voc)), _key(_lm_of(v), int(voc))
            if f"{key}_step_s" in res and f"{base}_step_s" in res and key != base:
                res[f"{key}_over_lm"] = res[f"{key}_step_s"] / res[f"{base}_step_s"]
    res["rounds"] = results
    from bench.refine_bench import machine

    dev = next(iter(results.values()))[0]["device"]
    res["setup"] = {"student": "llama_small (4 x 256; 16M params at vocab 49,152)", "batch": "4 x 256",
                    "xtok_student": "qwen2_small, GPT-2 tokenizer (50,257), 4 x 288 re-tokenized SmolLM2 rows",
                    "teacher": "SmolLM2-135M", "store": "top-0.95-50", "steps_timed": a.steps, "device": dev}
    res["machine"] = machine()
    print(f"{'variant':<22}{'step s':>9}{'x LM':>7}{'x plain':>9}{'tensor MB':>11}{'peak RSS MB':>13}")
    for key in results:
        voc = key.rsplit("_v", 1)[1] if "_v" in key else str(TEACHER_VOCAB)
        step = res[f"{key}_step_s"]
        lm, plain = (res.get(f"{_key(v, int(voc))}_step_s", float("nan")) for v in (_lm_of(key), "lm_plain"))
        print(f"{key:<22}{step:>9.3f}{step / lm:>7.2f}{step / plain:>9.2f}{res[f'{key}_tensor_peak_mb']:>11.0f}"
              f"{res[f'{key}_peak_mb']:>13.0f}")
    for voc, p in res.get("paired", {}).items():
        print(f"paired, {'cross-tokenizer' if voc == 'xtok' else f'vocab {voc}'}: LM {p['lm_step_s']:.3f} s, KD "
              f"{p['kd_step_s']:.3f} s -> KD/LM {p['kd_over_lm']:.3f} (median of {a.paired_steps} alternating "
              f"steps, one process)")
    out = REPO / "bench" / "results" / (a.out or ("train_cpu.json" if dev == "cpu" else "train_cuda.json"))
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"-> {out}")


def _lm_of(variant: str) -> str:
    """The LM-only step a variant is compared with (its own student and batch)."""
    return "lm_xtok" if variant.startswith(("lm_xtok", "kd_xtok")) else "lm"


def _key(variant: str, vocab: int) -> str:
    """``lm``, ``kd_offline``... at the teacher's vocabulary (the keys earlier results used); ``..._v151552``."""
    return variant if vocab == TEACHER_VOCAB else f"{variant}_v{vocab}"


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
