"""Paper-scale plan: what refining and distilling N tokens costs, from this project's measurements.

    python -m distill.plan --tokens 100e9 --vocab 151552 --top-p 0.95 --top-k 50 \\
        --teacher-params 9.4e9 --student pd_1_9b [--gpu-tflops 989 --mfu 0.4]

Prints, for N tokens:

* **logit storage**: ids kept per position at (p, k), measured by re-truncating a real stored store (the default
  refine output, top-0.95-50; a larger p or k than it holds is capped at k, an upper bound), times the
  bytes per kept pair of the raw codec (2-byte ids up to 65,536 ids, 4 above) and of the compact codec
  measured on that store (``bench/logits_store_bench.py``; + log2(V / 49,152) bits per id for a larger
  vocabulary, whose sorted-id gaps are that much longer);
* **teacher scoring**: GPU-hours FLOPs-bound (2 N per token at ``--gpu-tflops`` x ``--mfu``) and host-bound (the
  pass's own host CPU-seconds per position for a top-p-k store at the nearest vocabulary, measured with a
  near-free teacher by ``bench/refine_ceiling.py``, over ``--host-cores`` cores per GPU; vLLM's own scheduling
  is not in it); the plan takes the larger. Also the hours at the throughput measured by
  ``bench/refine_bench.py`` on its machine (tokens/s scaled from its teacher's size to ``--teacher-params`` by
  parameter count);
* **student training**: GPU-hours from FLOPs (6 N per token) at the same rate, times the offline-KD step cost
  over the LM-only step measured by ``bench/train_bench.py``; online KD adds the teacher's forward (2 N per
  token) on every batch.

Every measured input names the file and machine it came from; anything not measured is an assumption shown.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
SMOLLM2_PARAMS = 134.5e6            # the teacher refine_bench measures


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def pairs_per_position(store_dir: str | None, top_p: float, top_k: int, sample: int = 64) -> tuple[float, str]:
    """Mean ids kept per position at (top_p, top_k), from a real store when it holds at least that budget."""
    from refine.core.logits import LogitsStore, truncate_top_p_k

    if store_dir and (Path(store_dir) / "store.json").is_file():
        store = LogitsStore(store_dir)
        h = store.header
        if h.kind == "top_p_k" and top_p <= h.top_p and top_k <= h.top_k:
            rows = np.unique(np.linspace(0, len(store) - 1, min(sample, len(store))).astype(int))
            _, lps, mask = store.padded(rows)
            counts = np.minimum(truncate_top_p_k(lps, top_p, top_k), mask.sum(-1))
            return float(counts.mean()), f"measured on {store_dir} ({len(rows)} instances)"
    return float(top_k), f"no store holding top-{top_p}-{top_k}: upper bound k"


def plan(tokens: float, vocab: int, top_p: float, top_k: int, teacher_params: float, student_params: float,
         gpu_tflops: float, mfu: float, store_dir: str | None, host_cores: float = 4, ref_fraction: float = 0.05,
         ref_params: float | None = None, ref_epochs: float = 1.0) -> dict:
    pairs, pairs_src = pairs_per_position(store_dir, top_p, top_k)
    id_bytes = 2 if vocab <= 65536 else 4
    raw_bpt = 1 + pairs * (id_bytes + 2)                       # count byte + (id, fp16 log-prob) per pair
    out = {"tokens": tokens, "vocab": vocab, "top_p": top_p, "top_k": top_k, "pairs_per_position": pairs,
           "pairs_source": pairs_src, "raw_bytes_per_token": raw_bpt, "raw_tb": raw_bpt * tokens / 1e12}
    store_bench = _load("logits_store.json")
    if store_bench and store_bench.get("ids_per_position"):
        per_pair = store_bench["bytes_per_token"] / store_bench["ids_per_position"]
        # a gap-coded id costs ~ log2(mean gap) bits and gaps grow with the vocabulary: + log2(V / 49,152) bits
        per_pair += max(np.log2(vocab / 49152), 0) / 8
        out.update(compact_bytes_per_token=per_pair * pairs, compact_tb=per_pair * pairs * tokens / 1e12,
                   compact_source=f"bench/results/logits_store.json ({store_bench.get('machine', {}).get('cpu')})")
    rate = gpu_tflops * 1e12 * mfu
    out["teacher_gpu_hours_flops"] = 2 * teacher_params * tokens / rate / 3600
    out["teacher_gpu_hours"] = out["teacher_gpu_hours_flops"]
    # the reference (refine.reference_size's defaults): 1/17 of the teacher, trained on ref_epochs passes over
    # D_ref (ref_fraction of the corpus), then scoring the rest
    ref_params = ref_params or teacher_params * 0.0588
    out.update(reference_params=ref_params, reference_train_tokens=ref_fraction * tokens * ref_epochs,
               reference_train_gpu_hours=6 * ref_params * ref_fraction * tokens * ref_epochs / rate / 3600,
               reference_scoring_gpu_hours=2 * ref_params * (1 - ref_fraction) * tokens / rate / 3600)
    host = _host_ceiling(_load("refine_ceiling.json") or {}, vocab)
    if host:
        cpu_s, src = host
        out.update(teacher_gpu_hours_host=tokens * cpu_s / host_cores / 3600, teacher_host_source=src,
                   teacher_gpu_hours=max(out["teacher_gpu_hours_flops"], tokens * cpu_s / host_cores / 3600))
    refine_bench = _load("refine_cuda.json") or _load("refine_cpu.json")
    if refine_bench:
        tok_s = refine_bench["pipeline_tok_s"] * SMOLLM2_PARAMS / teacher_params
        out.update(teacher_tok_s_measured=tok_s, teacher_hours_measured=tokens / tok_s / 3600,
                   teacher_measured_on=f"{refine_bench['machine']['cpu']}, {refine_bench['setup']['teacher']}, "
                                       f"{refine_bench['pipeline_tok_s']:,.0f} tok/s")
    train_bench = _load("train_cuda.json") or _load("train_cpu.json")
    kd_over_lm = _kd_over_lm(train_bench or {}, vocab)
    lm_hours = 6 * student_params * tokens / rate / 3600
    out.update(student_lm_gpu_hours=lm_hours, kd_offline_over_lm=kd_over_lm,
               student_kd_offline_gpu_hours=lm_hours * kd_over_lm,
               student_kd_online_gpu_hours=lm_hours * kd_over_lm + out["teacher_gpu_hours_flops"],
               assumptions=f"{gpu_tflops:g} TFLOP/s peak x MFU {mfu:g}; training 6 N FLOPs/token, teacher "
                           f"forward 2 N FLOPs/token; {host_cores:g} host cores per GPU for the teacher pass")
    return out


def _host_ceiling(bench: dict, vocab: int) -> tuple[float, str] | None:
    """Host CPU-seconds per position of the teacher pass at the measured vocabulary nearest to ``vocab``, and
    where it was measured."""
    ceiling = bench.get("host_ceiling") or {}
    if not ceiling:
        return None
    nearest = min(ceiling, key=lambda v: abs(math.log(int(v) / vocab)))
    c = ceiling[nearest]
    return c["cpu_s_per_mpos"] / 1e6, (f"bench/results/refine_ceiling.json, {bench.get('machine', {}).get('cpu')}: "
                                       f"{c['cpu_s_per_mpos']:.1f} CPU-s per million positions at vocab "
                                       f"{int(nearest):,}, rows of {c['seq_len']}; vLLM's own scheduling not included")


def _kd_over_lm(train_bench: dict, vocab: int) -> float:
    """The offline-KD / LM-only step ratio: the paired one (both steps alternating in one process, so the
    machine's drift cancels) measured at the vocabulary nearest to ``vocab``; else the separate-process one."""
    paired = train_bench.get("paired") or {}
    if paired:
        nearest = min(paired, key=lambda v: abs(math.log(int(v) / vocab)))
        return float(paired[nearest]["kd_over_lm"])
    return float(train_bench.get("kd_offline_over_lm", 1.0))


def _h(hours: float) -> str:
    return f"{hours:,.0f}" if hours >= 100 else f"{hours:.3g}"


def _print(p: dict) -> None:
    t = p["tokens"]
    print(f"plan for {t:,.0f} tokens, vocab {p['vocab']:,}, top-{p['top_p']}-{p['top_k']}")
    print(f"  ids kept per position   {p['pairs_per_position']:.1f}  ({p['pairs_source']})")
    print(f"  logits, raw codec       {p['raw_bytes_per_token']:.1f} B/token = {p['raw_tb']:,.2f} TB")
    if "compact_tb" in p:
        print(f"  logits, compact codec   {p['compact_bytes_per_token']:.1f} B/token = {p['compact_tb']:,.2f} TB"
              f"  (scaled from {p['compact_source']})")
    print(f"  teacher scoring         {_h(p['teacher_gpu_hours'])} GPU-hours, the larger of:")
    print(f"                          {_h(p['teacher_gpu_hours_flops'])} FLOPs-bound")
    if "teacher_gpu_hours_host" in p:
        print(f"                          {_h(p['teacher_gpu_hours_host'])} host-bound ({p['teacher_host_source']})")
    if "teacher_hours_measured" in p:
        print(f"                          {_h(p['teacher_hours_measured'])} hours on the measuring machine, its "
              f"throughput scaled to this teacher ({p['teacher_tok_s_measured']:,.1f} tok/s; measured: "
              f"{p['teacher_measured_on']})")
    print(f"  reference LM training   {_h(p['reference_train_gpu_hours'])} GPU-hours FLOPs-bound "
          f"({p['reference_params'] / 1e6:,.0f}M parameters, {p['reference_train_tokens']:,.0f} tokens of D_ref)")
    print(f"  reference scoring       {_h(p['reference_scoring_gpu_hours'])} GPU-hours FLOPs-bound")
    print(f"  student, LM only        {_h(p['student_lm_gpu_hours'])} GPU-hours")
    print(f"  student, offline KD     {_h(p['student_kd_offline_gpu_hours'])} GPU-hours "
          f"(x{p['kd_offline_over_lm']:.2f} measured KD/LM step)")
    print(f"  student, online KD      {_h(p['student_kd_online_gpu_hours'])} GPU-hours (+ teacher forward)")
    print(f"  assumptions: {p['assumptions']}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m distill.plan", description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=float, required=True)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--teacher-params", type=float, default=SMOLLM2_PARAMS)
    ap.add_argument("--student", default="pd_1_9b", help="a conf/model size config (parameters at --vocab)")
    ap.add_argument("--student-params", type=float, help="instead of --student")
    ap.add_argument("--gpu-tflops", type=float, default=989.0, help="peak dense bf16 TFLOP/s (H100 SXM: 989)")
    ap.add_argument("--mfu", type=float, default=0.4)
    ap.add_argument("--host-cores", type=float, default=4,
                    help="host cores per GPU the teacher pass keeps busy (its engine thread + write workers)")
    ap.add_argument("--store", default=str(REPO / ".cache" / "refined" / "default" / "teacher" / "logits"))
    ap.add_argument("--ref-fraction", type=float, default=0.05, help="D_ref's share of the corpus (ref_split)")
    ap.add_argument("--ref-params", type=float, help="reference parameters (default: 1/17 of the teacher's)")
    ap.add_argument("--ref-epochs", type=float, default=1.0, help="passes over D_ref (ref_split.epochs)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    a = ap.parse_args(argv)
    student = a.student_params or _config_params(a.student, a.vocab)
    p = plan(a.tokens, a.vocab, a.top_p, a.top_k, a.teacher_params, student, a.gpu_tflops, a.mfu, a.store,
             a.host_cores, a.ref_fraction, a.ref_params, a.ref_epochs)
    p["student_params"] = student
    print(json.dumps(p, indent=1)) if a.json else _print(p)


def _config_params(name: str, vocab: int) -> float:
    from omegaconf import OmegaConf

    from distill.config import ModelConfig
    from distill.models import count_params
    from refine.core.errors import InputError

    path = REPO / "conf" / "model" / f"{name}.yaml"
    if not path.is_file():
        raise InputError(f"no model config {path}")
    raw = OmegaConf.load(path)
    raw.tokenizer = "unused"
    return float(count_params(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), raw)), vocab))


if __name__ == "__main__":
    main()
