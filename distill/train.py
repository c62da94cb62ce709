"""Pretrain a student LM with LM loss, optionally distilling a teacher (offline stored logits or online). Hydra app.

Run::

    python -m distill.train +experiment=lm_baseline                  # the bundled corpus, CPU-sized student
    python -m distill.train +experiment=lm_baseline +debug=tiny      # a seconds-long smoke run
    python -m distill.train +experiment=lm_baseline trainer.max_steps=2000 run_name=longer
    python -m distill.train +experiment=kd_wsd                       # KD from the refine stage's stored logits
    python -m distill.train --cfg job                                # print the composed config

Everything a run writes goes to ``runs/<run_name>/``: ``metrics.jsonl`` (one record per step, plus val),
``tb/`` (tensorboard), ``checkpoints/step_*/`` (HF folders + trainer state), ``run.json`` (resolved config,
code version, data fingerprints), ``summary.json``. Rerunning the same command resumes from the latest
checkpoint and reproduces the uninterrupted run's losses exactly (``resume=false`` starts over).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from distill import checkpoint, distributed
from distill.config import TrainConfig, to_config
from distill.data import BatchStream, open_instances, val_batches
from distill.kd import Distiller
from distill.losses import lm_loss
from distill.models import build_student
from distill.schedules import check as check_schedule
from distill.schedules import lr_multiplier, plot_schedules
from refine.core.errors import InputError, everyone, exit_on_input_error, write_error_line
from refine.core.folder_lock import FolderLock
from refine.core.hydra_cli import precheck_overrides
from refine.core.manifest import atomic_path, code_version, write_json_atomic
from refine.core.tokenizer import bos_prefix, load_tokenizer, tokenizer_hash

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# Config sections that must match for a run folder to be resumed (the rest, e.g. max_steps, may change).
RESUME_MUST_MATCH = ("model", "data", "optim", "seed", "kd")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where it pays (CUDA), fp32 elsewhere; one code path for both."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision in ("bf16", "auto"):
        return torch.bfloat16
    raise InputError(f"trainer.precision must be auto | fp32 | bf16, got {precision!r}")


class Metrics:
    """Append-only JSONL (+ tensorboard). On resume, records after the checkpoint's step are dropped."""

    def __init__(self, run_dir: Path, resume_step: int, tensorboard: bool, enabled: bool = True,
                 defer_errors: bool = False):
        # defer_errors (under torchrun): a failed write is kept for the next checkpoint, where every rank ends
        # with it (distributed.on_main); raised here, it would end rank 0 alone and leave the others in a collective
        self.path, self.enabled, self.defer_errors, self.failed = run_dir / "metrics.jsonl", enabled, defer_errors, None
        if not enabled:                   # ranks other than 0 under torchrun
            return
        if self.path.exists():
            lines = [line for line in self.path.read_text().splitlines() if line.strip()]
            if lines and not _parses(lines[-1]):
                lines.pop()               # a record cut short by a full disk: written again after the resume
            keep = [line for line in lines if json.loads(line)["step"] <= resume_step]
            with atomic_path(self.path) as tmp:
                tmp.write_text("".join(line + "\n" for line in keep))
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, record: dict) -> None:
        if not self.enabled or self.failed:   # after a failed write nothing more: a resume rewrites from there
            return
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as e:              # a failed write() names no file: the one-line error names this one
            e.filename = e.filename or str(self.path)
            if not self.defer_errors:
                raise
            self.failed = self.failed or write_error_line(e) or f"cannot write {self.path}: {e}"
            return
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("step", "split") and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{record['split']}/{k}", v, record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


@torch.no_grad()
def evaluate(model, batches: list[torch.Tensor], device: torch.device, amp: torch.dtype | None) -> float:
    """Token-weighted mean LM loss over a fixed set of batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(input_ids=batch).logits  # LossModule: with the student's BOS prefix
        n = batch[:, 1:].numel()
        total += lm_loss(logits, batch).item() * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def _check_resumable(run_dir: Path, resolved: dict) -> None:
    saved_path = run_dir / "run.json"
    if not saved_path.is_file():
        return
    saved = json.loads(saved_path.read_text())["config"]
    differs = [k for k in RESUME_MUST_MATCH if saved.get(k) != resolved.get(k)]
    if differs:
        raise InputError(f"{run_dir} holds a run with a different {', '.join(differs)} config; "
                         f"choose another run_name or pass resume=false to overwrite it")


def train(cfg: TrainConfig) -> dict:
    """One run; under torchrun, one rank of it (``distill.distributed``). Input errors end every rank with one
    line: what can be checked alone is checked on every rank before the process group exists (each raises the
    same error); what one rank does alone (packing, writing) reports through ``distributed.together``."""
    tc = cfg.trainer
    try:
        device = pick_device(tc.device)
        tokenizer = _check_inputs(cfg, device)
        d, device = distributed.setup(device, tc.parallel, cfg.data.batch_size)
    except InputError as e:
        raise everyone(e) from None
    with contextlib.ExitStack() as held:
        try:
            return _train(cfg, d, device, tokenizer, held)
        finally:
            distributed.shutdown(d)


def _check_inputs(cfg: TrainConfig, device: torch.device):
    """Checks that need no other process and no writes; returns the tokenizer."""
    tc, dc = cfg.trainer, cfg.data
    check_schedule(cfg.schedule, tc.max_steps)
    if tc.nan_policy not in ("stop", "skip"):
        raise InputError(f"trainer.nan_policy must be stop | skip, got {tc.nan_policy!r}")
    autocast_dtype(tc.precision, device)
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    for path in (dc.train, dc.val):
        if (Path(path) / "index.json").is_file():   # packed instances (refine output): seq_len, tokenizer
            open_instances(path, tokenizer, dc.seq_len, cfg.paths.cache, dc.text_field, quiet=True)
        elif not Path(path).exists():
            raise InputError(f"corpus not found: {path}")
    return tokenizer


def _train(cfg: TrainConfig, d: distributed.Dist, device: torch.device, tokenizer,
           held: contextlib.ExitStack) -> dict:
    run_dir = Path(cfg.run_dir)
    tc, dc = cfg.trainer, cfg.data
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    amp = autocast_dtype(tc.precision, device)

    def claim_and_pack():
        # One trainer per run folder: a second run with this run_name refuses, naming the first's host and pid.
        held.enter_context(FolderLock(run_dir, "trainer", "use another run_name"))
        return [open_instances(p, tokenizer, dc.seq_len, cfg.paths.cache, dc.text_field,
                               max_doc_bytes=dc.max_doc_bytes) for p in (dc.train, dc.val)]

    # rank 0 takes the run folder and packs a raw corpus into the cache first; the others then reuse it
    train_set, val_set = distributed.on_main(d, claim_and_pack) or (None, None)
    resolved = asdict(cfg)
    error = None
    try:                                  # every rank alike, no collectives: errors are agreed on below
        if not d.is_main:
            train_set, val_set = (open_instances(p, tokenizer, dc.seq_len, cfg.paths.cache, dc.text_field, quiet=True,
                                                 max_doc_bytes=dc.max_doc_bytes) for p in (dc.train, dc.val))
        ckpt = checkpoint.latest(run_dir) if cfg.resume else None
        if ckpt is not None:
            _check_resumable(run_dir, resolved)
        torch.manual_seed(cfg.seed)
        model = build_student(cfg.model, tokenizer, cfg.seed)
        if ckpt is not None:
            model = checkpoint.load_model(ckpt, model.config)
        state = checkpoint.load_state(ckpt) if ckpt is not None else None
        distiller = Distiller(cfg.kd, train_set, tokenizer_hash(tokenizer), device, tc.max_steps, cfg.seed,
                              bos_id=bos_prefix(tokenizer))
    except InputError as e:
        error = str(e)
    distributed.together(d, error)
    model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    module = distributed.wrap(distributed.LossModule(model, distiller), d, device)
    student = distributed.eval_module(module)     # what evaluation calls with input_ids=

    # Weight decay on matrices only (not norms): the usual GPT recipe.
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.optim.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, tc.max_steps, cfg.schedule))
    stream = BatchStream(train_set, dc.batch_size, cfg.seed)
    step, tokens_seen = 0, 0
    if ckpt is not None:
        try:
            distributed.load_optimizer_state(module, opt, state["optimizer"], d)
        except InputError as e:           # raised alike on every rank, before any collective
            raise everyone(e) from None
        sched.load_state_dict(state["scheduler"])
        stream.load_state_dict(state["data"])
        checkpoint.set_rng_state(state["rng"])
        step, tokens_seen = int(state["step"]), int(state["tokens"])
        if d.is_main:
            print(f"resuming {run_dir} from {ckpt.name} (step {step})", file=sys.stderr)

    def write_run_record() -> Metrics:     # rank 0's writes, their errors every rank's (a full disk: one line)
        write_json_atomic(run_dir / "run.json", {
            "config": resolved, "code_version": code_version(), "tokenizer_hash": tokenizer_hash(tokenizer),
            "train_instances": {"path": str(train_set.folder), "count": len(train_set),
                                "sha256": train_set.index["tokens_sha256"]},
            "val_instances": {"path": str(val_set.folder), "count": len(val_set),
                              "sha256": val_set.index["tokens_sha256"]},
            "parameters": n_params, "device": str(device), "processes": d.world,
            "parallel": d.mode if d.world > 1 else "none", "precision": str(amp or torch.float32),
            "torch": torch.__version__,
        })
        try:
            plot_schedules(run_dir / "schedules.png", cfg, distiller.enabled)
        except OSError as e:              # matplotlib's failed write names no file
            e.filename = e.filename or str(run_dir / "schedules.png")
            raise
        return Metrics(run_dir, step, tc.tensorboard, defer_errors=d.world > 1)

    metrics = distributed.on_main(d, write_run_record) or Metrics(run_dir, step, tc.tensorboard, enabled=False)
    vbatches = val_batches(val_set, dc.batch_size, tc.eval_batches)
    tokens_per_step = dc.batch_size * dc.grad_accum * dc.seq_len

    def save_checkpoint() -> Path:
        # FSDP gathers the full weights and optimizer state (collectives on every rank); rank 0 writes
        weights, opt_state = distributed.model_state(module, d), distributed.optimizer_state(module, opt, d)

        def write() -> None:              # a full disk here ends every rank with rank 0's one line
            if metrics.failed:            # metrics could not be written since the last checkpoint: resume there
                raise InputError(metrics.failed)
            state = {"step": step, "tokens": tokens_seen, "optimizer": opt_state, "scheduler": sched.state_dict(),
                     "data": stream.state_dict(), "rng": checkpoint.rng_state()}
            checkpoint.save(run_dir, step, model, tokenizer, state, tc.keep_checkpoints, weights)

        distributed.on_main(d, write)
        return checkpoint.step_dir(run_dir, step)

    val_loss = float("nan")
    bar = tqdm(total=tc.max_steps, initial=step, disable=not (tc.progress and d.is_main), desc=cfg.run_name,
               dynamic_ncols=True)
    t_start, last_ckpt, nan_run = time.perf_counter(), ckpt, 0
    while step < tc.max_steps:
        t0 = time.perf_counter()
        loss_sum, parts_sum = 0.0, {}
        for micro in range(dc.grad_accum):
            rows = d.local_rows(stream.next_rows())
            batch = stream.fetch(rows).to(device)
            with distributed.grad_sync(module, last=micro == dc.grad_accum - 1):
                with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    loss, parts = module(batch, rows, step)
                distiller.prefetch(d.local_rows(stream.peek_rows()))    # the next signal is read during backward
                (loss / dc.grad_accum).backward()
            loss_sum += loss.item()
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v / dc.grad_accum
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
        grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
        lr = opt.param_groups[0]["lr"]
        # each rank's loss is the mean over its equal slice: their mean is the global batch's
        parts_sum = d.mean({"loss": loss_sum / dc.grad_accum, **parts_sum})
        train_loss = parts_sum.pop("loss")
        finite = math.isfinite(train_loss) and math.isfinite(grad_norm)
        nan_run = 0 if finite else nan_run + 1
        if finite:
            opt.step()
        elif tc.nan_policy != "skip" or nan_run > tc.max_nan_skips:
            raise InputError(f"non-finite training loss or gradient at step {step + 1} (trainer.nan_policy="
                             f"{tc.nan_policy}, {nan_run} in a row); lower optim.lr or check the data")
        sched.step()                      # a skipped batch still counts as a step: schedules keep their shape
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step
        dt = time.perf_counter() - t0
        metrics.log({"step": step, "split": "train", "loss": train_loss, **parts_sum, "lr": lr,
                     "grad_norm": grad_norm, "tokens": tokens_seen, "tok_s": tokens_per_step / dt,
                     **({} if finite else {"skipped": 1})})
        bar.update(1)
        if step % tc.log_every == 0:
            bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_step / dt:,.0f}")
        if step % tc.eval_every == 0 or step == tc.max_steps:
            val_loss = evaluate(student, vbatches, device, amp)
            record = {"step": step, "split": "val", "loss": val_loss, "tokens": tokens_seen}
            if distiller.enabled and cfg.kd.val_kl_batches > 0:
                record["kl_teacher"] = distiller.val_kl(student, vbatches[: cfg.kd.val_kl_batches], amp)
            metrics.log(record)
            if d.is_main:
                bar.write(f"step {step}: val loss {val_loss:.4f} (ppl {math.exp(val_loss):.1f})"
                          + (f", KL(teacher||student) {record['kl_teacher']:.4f}" if "kl_teacher" in record else ""))
        if step % tc.ckpt_every == 0 or step == tc.max_steps:
            last_ckpt = save_checkpoint()
    bar.close()
    metrics.close()
    elapsed = time.perf_counter() - t_start
    if math.isnan(val_loss):  # resumed at the end: nothing trained, still report the final model
        val_loss = evaluate(student, vbatches, device, amp)
    summary = {"run_name": cfg.run_name, "steps": step, "tokens": tokens_seen, "val_loss": val_loss,
               "val_ppl": math.exp(val_loss), "checkpoint": str(last_ckpt), "seconds_this_session": elapsed}
    if not d.is_main:
        return summary
    write_json_atomic(run_dir / "summary.json", summary)
    print(f"done: {step} steps, {tokens_seen:,} tokens, val loss {val_loss:.4f}; checkpoint {last_ckpt}")
    if cfg.eval.tasks:
        from distill.evaluate import evaluate_checkpoint, print_report

        print_report(evaluate_checkpoint(last_ckpt, cfg.eval.tasks, cfg.eval.limit or None, dc.val, dc.seq_len,
                                         cfg.eval.batch_size, str(device)))
    return summary


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
@exit_on_input_error
def _hydra_main(cfg: DictConfig) -> None:
    train(to_config(cfg))


def main() -> None:
    precheck_overrides(CONF_DIR, "train", sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy's: Hydra's joblib launcher pickles the task
    # function, and cloudpickle copies a __main__ function by value with everything it reaches (including
    # unpicklable torch config modules), while an importable one goes by reference.
    from distill.train import main as _main

    _main()
