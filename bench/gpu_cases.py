"""The cases ``bench/gpu_check.py`` runs, built from the project's own code on random-init models.

Models are ``transformers`` Llamas from ``distill.models.hf_config``, random-init on the device (no weights, no
tokenizer, no data). A training step is ``bench.step_timing.train_step`` with the trainer's optimizer
(``distill.optim.build_optimizer``) and autocast (bf16 on fp32 weights), on one batch of random tokens:

* ``plain``       ``model(input_ids, labels=input_ids).loss``: the plain transformers step, the reference;
* ``lm``          ``distill.kd.Distiller.loss`` without a teacher: the fused LM loss from hidden states;
* ``kd_offline``  the same with a stored top-p-k signal: synthetic top-50 ids and log-probs of the store's shape
  (``synthetic_signal``), handed over on the host and moved each step, as ``OfflineTeacher`` does;
* ``kd_online``   the same with ``distill.signal.OnlineTeacher`` around a random-init bf16 teacher (the scorer's
  ~1B shape at the student's vocabulary) run on each batch.

``compile=on``: ``torch.compile`` of the whole model for ``plain`` (what a user of that step would do), of the
decoder (``model.base_model``, which the fused path calls for hidden states) for the others; the fused loss
and the online teacher run eagerly. The three fused variants share one student, so it compiles once.
The scorer case is ``refine.scorers.hf.HFScorer`` itself (bf16, top-50 on the device) loading a saved
random-init teacher.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from bench.step_timing import peak_mb, sync, tensor_peak_mb, train_step
from distill.config import KDConfig, ModelConfig, OptimConfig, auto_missing_mass
from distill.kd import Distiller
from distill.models import SIZES_DIR, hf_config, size_config
from distill.optim import build_optimizer
from distill.signal import OnlineTeacher, TeacherSignal, from_sorted_topk

VARIANTS = ("plain", "lm", "kd_offline", "kd_online")
TOP_K, TOP_P = KDConfig.top_k, KDConfig.top_p      # the online teacher's defaults, the stores' too: 50, 0.95
# GPT-3 Small's shape (12 x 768, SwiGLU width 8/3 x 768): 123M parameters at vocab 49,152
STUDENT_125M = ModelConfig(name="student_125m", tokenizer="unused", hidden_size=768, num_layers=12, num_heads=12,
                           num_kv_heads=12, intermediate_size=2048)
# Llama-3.2-1B's shape: 1.07B parameters at vocab 49,152, 1.28B at 151,552
TEACHER_1B = ModelConfig(name="teacher_1b", tokenizer="unused", hidden_size=2048, num_layers=16, num_heads=32,
                         num_kv_heads=8, intermediate_size=8192)
TINY = ModelConfig(name="tiny", tokenizer="unused")                  # --dry: the tests' llama_tiny


@dataclass
class Plan:
    students: list[tuple[ModelConfig, int]]     # (size, vocabulary)
    teacher: ModelConfig
    scorer_vocab: int
    batch: int
    seq_len: int
    warmup: int
    steps: int
    scorer_rows: int                            # rows per timed scoring call (a multiple of scorer_batch)
    scorer_batch: int
    scorer_reps: int
    backend: str = "inductor"                   # torch.compile's backend


def plan(dry: bool) -> Plan:
    if dry:     # the same code paths at shapes a CPU runs fast: one student (a second adds time, no code path)
        return Plan([(TINY, 512)], TINY, 512, batch=2, seq_len=32, warmup=1, steps=2,
                    scorer_rows=4, scorer_batch=2, scorer_reps=2, backend="aot_eager")
    return Plan([(STUDENT_125M, 49152), (size_config(SIZES_DIR / "pd_330m.yaml"), 151552)], TEACHER_1B, 49152,
                batch=8, seq_len=2048, warmup=2, steps=10, scorer_rows=64, scorer_batch=8, scorer_reps=3)


def random_model(cfg: ModelConfig, vocab: int, device: torch.device, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    with torch.device(device):      # initialised where it runs: no host init and copy of a 1B model
        return AutoModelForCausalLM.from_config(hf_config(cfg, vocab, None, 0), dtype=dtype)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())      # tied embeddings once


def frozen(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def synthetic_signal(batch: int, positions: int, vocab: int, seed: int = 0) -> TeacherSignal:
    """A stored top-p-k signal's shape and kind: 50 distinct ids per position with sorted full-softmax log-probs,
    peaked at some positions and flat at others, 72-100% of the mass in the 50 (86% on average, as in the bundled
    store), cut by the stores' top-p-k rule (``from_sorted_topk``): ~43 ids kept per position (the store: 36)."""
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(0, vocab, (batch, positions, 1), generator=g)
    ids = (first + torch.arange(TOP_K) * max(1, vocab // TOP_K)) % vocab
    decay = torch.empty(batch, positions, 1).uniform_(0.05, 1.5, generator=g)
    mass = torch.empty(batch, positions, 1).uniform_(0.72, 1.0, generator=g)
    logprobs = torch.log_softmax(-decay * torch.arange(TOP_K), -1) + mass.log()
    return from_sorted_topk(ids, logprobs, TOP_P, TOP_K)


class _Stored:
    """``Distiller.teacher`` with a fixed stored signal (``OfflineTeacher``'s interface, no store)."""

    def __init__(self, signal: TeacherSignal):
        self.sig = signal

    def signal(self, rows, tokens) -> TeacherSignal:
        return self.sig


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def compile_fresh(module: torch.nn.Module, backend: str) -> None:
    """``torch.compile`` ``module`` in place, dynamo's caches and counters cleared first: every compiled model
    starts as in a fresh process (no recompile limit reached through earlier cases' entries), and
    ``compile_stats`` counts its graphs alone."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    module.compile(backend=backend)


def compile_stats() -> dict:
    """What dynamo made of the model compiled last: 0 graphs means it ran eagerly."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


def measure(step, p: Plan, device: torch.device) -> dict:
    """Warm-up (compiling, when compiled), then the median of ``p.steps`` timed steps and the memory figures."""
    first = [step() for _ in range(p.warmup)]
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    resident = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    times = [step() for _ in range(p.steps)]
    out = {"step_s": float(np.median(times)), "steps_s": times, "first_step_s": first[0],
           "tokens_per_s": p.batch * p.seq_len / float(np.median(times))}
    if device.type == "cuda":   # max_memory_allocated; and what a step adds to the resident weights and state
        out.update(mem_mb=peak_mb(device), step_mem_mb=peak_mb(device) - resident)
    else:                       # the profiler's live-tensor peak of one more step
        out.update(mem_mb=tensor_peak_mb(step, device))
    return out


class StudentCases:
    """The step variants of one student size with compile off or on."""

    def __init__(self, cfg: ModelConfig, vocab: int, compiled: bool, p: Plan, device: torch.device):
        self.cfg, self.vocab, self.compiled, self.p, self.device = cfg, vocab, compiled, p, device
        self.amp = torch.bfloat16
        self.fused = None           # the fused variants' student, built (and compiled) once
        g = torch.Generator().manual_seed(1)
        self.batch = torch.randint(0, vocab, (p.batch, p.seq_len), generator=g).to(device)

    def run(self, variant: str) -> dict:
        out = self._run(variant)
        free()          # the case's model (plain), optimizer state and teacher are gone with _run's frame
        return out

    def _run(self, variant: str) -> dict:
        p, device = self.p, self.device
        if variant == "plain":
            model = random_model(self.cfg, self.vocab, device).train()
            if self.compiled:
                compile_fresh(model, p.backend)
            loss_fn = lambda: model(input_ids=self.batch, labels=self.batch).loss
        else:
            if self.fused is None:
                self.fused = random_model(self.cfg, self.vocab, device).train()
                if self.compiled:
                    compile_fresh(self.fused.base_model, p.backend)
            model, teacher = self.fused, None
            distiller = Distiller(KDConfig(), None, "", device, max_steps=1000)    # signal none: LM loss only
            if variant == "kd_offline":
                teacher = _Stored(synthetic_signal(p.batch, p.seq_len - 1, self.vocab))
            elif variant == "kd_online":
                teacher = OnlineTeacher(frozen(random_model(self.p.teacher, self.vocab, device, torch.bfloat16)),
                                        TOP_P, TOP_K)
            if teacher is not None:     # what Distiller.__init__ sets for a stored / live top-p-k teacher
                distiller.teacher = teacher
                distiller.missing_mass = auto_missing_mass(variant.removeprefix("kd_"), sampled=False)
            rows = np.arange(p.batch)
            loss_fn = lambda: distiller.loss(model, self.batch, rows, 500)[0]
        opt = build_optimizer(model, OptimConfig())
        out = {"n_params": n_params(model), **measure(train_step(loss_fn, opt, device, self.amp), p, device)}
        if self.compiled:
            out.update(compile_stats())
        if variant == "kd_offline":
            out["signal_kept_mean"] = float(teacher.sig.mask.float().sum(-1).mean())
        if variant == "kd_online":      # its weights are in mem_mb too
            out["teacher_params"] = n_params(teacher.model)
        return out

    def close(self) -> None:
        self.fused = None
        free()


def save_teacher(p: Plan, device: torch.device, folder: Path) -> int:
    """A random-init bf16 teacher saved as safetensors for the HF scorer to load; its parameter count."""
    model = random_model(p.teacher, p.scorer_vocab, device, torch.bfloat16)
    model.save_pretrained(folder)
    count = n_params(model)
    del model
    free()
    return count


def scorer_case(folder: Path, count: int, compiled: bool, p: Plan, device: torch.device,
                peak_flops: float | None) -> dict:
    """``HFScorer.score`` on ``scorer_rows`` random rows: tokens/s and MFU = 2 x parameters x tokens/s / peak."""
    from refine.scorers.hf import HFScorer

    scorer = HFScorer(str(folder), top_k=TOP_K, dtype="bfloat16", batch_size=p.scorer_batch, device=str(device))
    if compiled:
        compile_fresh(scorer.model, p.backend)
    rows = np.random.default_rng(2).integers(0, p.scorer_vocab, (p.scorer_rows, p.seq_len))
    t0 = time.perf_counter()
    scorer.score(rows[:p.scorer_batch])        # warm-up (compiles): the same batch shape as every timed batch
    first = time.perf_counter() - t0
    times = []
    for _ in range(p.scorer_reps):
        t0 = time.perf_counter()
        scores = scorer.score(rows)             # returns host arrays: the device work is done
        times.append(time.perf_counter() - t0)
    assert scores.topk_ids.shape == (p.scorer_rows, p.seq_len - 1, TOP_K)
    tok_s = rows.size / float(np.median(times))
    stats = compile_stats() if compiled else {}
    scorer.close()
    free()
    return {"n_params": count, "tokens_per_s": tok_s, "call_s": float(np.median(times)), "calls_s": times,
            "first_batch_s": first, "mfu": 2 * count * tok_s / peak_flops if peak_flops else None, **stats}
