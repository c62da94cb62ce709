"""The training loop: a ``Trainer`` owns one run's model, data, optimizer and records, and ``fit`` runs it.

Building a ``Trainer`` opens the data, builds (or, from the run folder's latest checkpoint, reloads) the student
and its optimizer, and writes ``run.json``; ``fit`` then repeats ``train_step`` up to ``trainer.max_steps``, with
``validate`` and ``save_checkpoint`` on their schedules. Under torchrun every rank builds its own ``Trainer``
(``distill.distributed``): what one rank does alone (packing, writing) goes through ``distributed.on_main``, so
an error there ends every rank with the same one line instead of leaving the others in a collective.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from distill import checkpoint, distributed, sharded_checkpoint
from distill.config import Precision, TrainConfig
from distill.data import BatchStream, open_instances, open_retokenized, val_batches
from distill.early_stop import EarlyStop
from distill.fused_loss import IGNORE
from distill.kd import Distiller
from distill.losses import lm_loss
from distill.metrics import Metrics, StepMeans, write_run_record, write_summary
from distill.models import build_student
from distill.optim import build_optimizer, build_scheduler, clip_gradients
from distill.schedules import plot_schedules
from refine.core.errors import InputError, everyone
from refine.core.instances import Instances
from refine.core.tokenizer import bos_prefix, tokenizer_hash
from refine.core.write import FolderLock

REAL_TOKENS = "_real_tokens"   # a key of the step's all-reduce, not a logged figure (no loss part has it)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where it pays (CUDA), fp32 elsewhere; one code path for both (the choice itself is the
    schema's ``Precision``)."""
    if precision == Precision.fp32 or (precision == Precision.auto and device.type != "cuda"):
        return None
    return torch.bfloat16


def autocast(device: torch.device, amp: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)


@torch.no_grad()
def evaluate(model, batches: list[torch.Tensor], device: torch.device, amp: torch.dtype | None) -> float:
    """Token-weighted mean LM loss over a fixed set of batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        with autocast(device, amp):
            logits = model(input_ids=batch).logits  # LossModule: with the student's BOS prefix
        n = batch[:, 1:].numel()
        total += lm_loss(logits, batch).item() * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


@contextlib.contextmanager
def run_folder_lock(d: distributed.Dist, run_dir: Path):
    """One trainer per run folder, for the whole run: rank 0 holds its lock (a second run with this run_name
    refuses, naming the first's host and pid), and every rank gets that refusal."""
    lock = FolderLock(run_dir, "trainer", "use another run_name")
    distributed.on_main(d, lock.__enter__)
    try:
        yield
    finally:
        if d.is_main:
            lock.__exit__(None, None, None)


class Trainer:
    """One run (under torchrun: this rank's part of it), in a run folder its caller holds (``run_folder_lock``)."""

    def __init__(self, cfg: TrainConfig, d: distributed.Dist, device: torch.device, tokenizer):
        self.cfg, self.d, self.device, self.tokenizer = cfg, d, device, tokenizer
        self.run_dir = Path(cfg.run_dir)
        if cfg.trainer.threads > 0:
            torch.set_num_threads(cfg.trainer.threads)
        self.amp = autocast_dtype(cfg.trainer.precision, device)
        self.resolved = asdict(cfg)
        # rank 0 packs a raw corpus into the cache first; the others then open what it packed
        self.train_set, self.val_set = distributed.on_main(d, self._open_data) or (None, None)
        with distributed.agreed(d):           # every rank alike; an input error on one ends them all here
            if not d.is_main:
                self.train_set, self.val_set = self._open_data(quiet=True)
            ckpt = checkpoint.latest(self.run_dir) if cfg.resume else None
            self.model, state = self._build_student(ckpt)
            self.distiller = Distiller(cfg.kd, self.train_set, tokenizer_hash(tokenizer), device,
                                       cfg.trainer.max_steps, cfg.seed, bos_id=bos_prefix(tokenizer))
        self.model.to(device).train()
        self.n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)   # before FSDP shards
        self.module = distributed.wrap(distributed.LossModule(self.model, self.distiller), d, device)
        self.student = distributed.eval_module(self.module)     # what evaluation calls with input_ids=
        self.opt = build_optimizer(self.module, cfg.optim)
        self.sched = build_scheduler(self.opt, cfg.trainer.max_steps, cfg.schedule)
        self.stream = BatchStream(self.train_set, cfg.data.batch_size, cfg.seed)
        self.step, self.tokens_seen, self.nan_run, self.last_ckpt = 0, 0, 0, ckpt
        self.early = EarlyStop(cfg.trainer.early_stop_patience, cfg.trainer.early_stop_min_delta)
        if ckpt is not None:
            self._resume(ckpt, state)
        self.metrics = (distributed.on_main(d, self._start_records)
                        or Metrics(self.run_dir, self.step, enabled=False))
        self.vbatches = val_batches(self.val_set, cfg.data.batch_size, cfg.trainer.eval_batches)

    # ---- setup ----

    def _open_data(self, quiet: bool = False) -> tuple[Instances, Instances]:
        """The training and validation instances (a raw corpus is packed into the cache on first use; a
        cross-tokenizer run reads the teacher's instances as student tokens)."""
        cfg, dc = self.cfg, self.cfg.data
        opts = dict(max_doc_bytes=dc.max_doc_bytes, quiet=quiet)
        if cfg.kd.signal == "cross_tokenizer":
            train = open_retokenized(dc.train, cfg.kd.teacher, self.tokenizer, dc.seq_len)
        else:
            train = open_instances(dc.train, self.tokenizer, dc.seq_len, cfg.paths.cache, dc.text_field, **opts)
        return train, open_instances(dc.val, self.tokenizer, dc.seq_len, cfg.paths.cache, dc.text_field, **opts)

    def _build_student(self, ckpt: Path | None) -> tuple[torch.nn.Module, dict | None]:
        """The student, initialised right after ``torch.manual_seed(cfg.seed)`` (a resume sets the saved RNG state
        last, ``_resume``: a fresh run and a resumed one draw exactly what the uninterrupted run drew), with
        ``ckpt``'s weights when resuming; and ``ckpt``'s trainer state (None for a fresh run)."""
        cfg = self.cfg
        if ckpt is not None:
            checkpoint.check_resumable(self.run_dir, self.resolved)
        torch.manual_seed(cfg.seed)
        model = build_student(cfg.model, self.tokenizer, cfg.seed)
        if ckpt is None:
            return model, None
        checkpoint.check_config(ckpt, model.config)
        if not sharded_checkpoint.is_sharded(ckpt):   # a sharded one's weights are read once the student is wrapped
            model = checkpoint.load_model(ckpt, model.config)
        return model, checkpoint.load_state(ckpt)

    def _resume(self, ckpt: Path, state: dict) -> None:
        try:
            if sharded_checkpoint.is_sharded(ckpt):      # weights and optimizer, resharded to this run's ranks
                sharded_checkpoint.load(self.module, self.opt, ckpt)
            else:
                distributed.load_optimizer_state(self.module, self.opt, state["optimizer"], self.d)
        except InputError as e:           # raised alike on every rank, before any collective
            raise everyone(e) from None
        self.step, self.tokens_seen = checkpoint.restore(state, self.sched, self.stream, self.early)
        if self.d.is_main:
            print(f"resuming {self.run_dir} from {ckpt.name} (step {self.step})", file=sys.stderr)

    def _start_records(self) -> Metrics:
        """rank 0: run.json, the schedules' plot, and metrics.jsonl opened at this step (a full disk: one line)."""
        write_run_record(self.run_dir, self.resolved, self.tokenizer, self.train_set, self.val_set,
                         parameters=self.n_params, device=self.device, world=self.d.world, parallel=self.d.mode,
                         amp=self.amp)
        try:
            plot_schedules(self.run_dir / "schedules.png", self.cfg, self.distiller.enabled)
        except OSError as e:              # matplotlib's failed write names no file
            e.filename = e.filename or str(self.run_dir / "schedules.png")
            raise
        return Metrics(self.run_dir, self.step, self.cfg.trainer.loggers, config=self.resolved,
                       defer_errors=self.d.world > 1)

    # ---- the loop ----

    def fit(self) -> dict:
        """Train to ``trainer.max_steps`` (from where a resumed run stopped); returns the run's summary."""
        tc = self.cfg.trainer
        val_loss = float("nan")
        show = tc.progress and self.d.is_main
        # a bar on a terminal; in a log file (CI, a refine training its reference) plain lines, not \r updates
        lines = show and not sys.stderr.isatty()
        bar = tqdm(total=tc.max_steps, initial=self.step, disable=not show or lines, desc=self.cfg.run_name,
                   dynamic_ncols=True)
        t_start = time.perf_counter()
        while self.step < tc.max_steps and not self.early.stopped:
            record = self.train_step()
            self.metrics.log(record)
            bar.update(1)
            if self.step % tc.log_every == 0:
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tok_s']:,.0f}")
                if lines:
                    print(f"{self.cfg.run_name}: step {self.step}/{tc.max_steps}, loss {record['loss']:.3f}, "
                          f"lr {record['lr']:.2e}, {record['tok_s']:,.0f} tok/s", flush=True)
            # the last step is always validated and saved, whatever the intervals: the summary reports it
            last = self.step == tc.max_steps
            if self.step % tc.eval_every == 0 or last:
                val = self.validate()
                val_loss = val["loss"]
                if self.d.is_main:
                    bar.write(f"step {self.step}: val loss {val_loss:.4f} (ppl {math.exp(val_loss):.1f})"
                              + (f", KL(teacher||student) {val['kl_teacher']:.4f}" if "kl_teacher" in val else ""))
                if self.early.update(self.step, val_loss) and not last:
                    if self.d.is_main:
                        bar.write(f"step {self.step}: stopping early: val loss has not improved on "
                                  f"{self.early.best:.4f} (step {self.early.best_step}) in {self.early.patience} "
                                  f"validations (trainer.early_stop_patience)")
                    last = True
            if self.step % tc.ckpt_every == 0 or last:
                self.last_ckpt = self.save_checkpoint()
        bar.close()
        self.metrics.close()
        elapsed = time.perf_counter() - t_start
        if math.isnan(val_loss):          # resumed at the end: nothing trained, still report the final model
            val_loss = evaluate(self.student, self.vbatches, self.device, self.amp)
        return self._finish(val_loss, elapsed)

    def train_step(self) -> dict:
        """One optimizer step over ``data.grad_accum`` micro-batches; returns its metrics record."""
        tc, accum = self.cfg.trainer, self.cfg.data.grad_accum
        t0 = time.perf_counter()
        means, real = StepMeans(accum), 0
        for micro in range(accum):
            loss, parts, n = self._micro_batch(last=micro == accum - 1)
            means.add(loss, parts)
            real += n
        grad_norm = clip_gradients(self.module, self.cfg.optim.grad_clip)
        lr = self.opt.param_groups[0]["lr"]
        # the ranks' mean of their slices' weighted mean losses: the global batch's (distill.distributed). The real
        # tokens ride in the same float64 all-reduce (exact)
        parts = self.d.mean({**means.means(), REAL_TOKENS: real})
        step_tokens = round(parts.pop(REAL_TOKENS) * self.d.world)
        train_loss = parts.pop("loss")
        finite = math.isfinite(train_loss) and math.isfinite(grad_norm)
        self.nan_run = 0 if finite else self.nan_run + 1
        if finite:
            self.opt.step()
        elif tc.nan_policy != "skip" or self.nan_run > tc.max_nan_skips:
            raise InputError(f"non-finite training loss or gradient at step {self.step + 1} (trainer.nan_policy="
                             f"{tc.nan_policy}, {self.nan_run} in a row); lower optim.lr or check the data")
        self.sched.step()                 # a skipped batch still counts as a step: schedules keep their shape
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += step_tokens
        dt = time.perf_counter() - t0
        return {"step": self.step, "split": "train", "loss": train_loss, **parts, "lr": lr, "grad_norm": grad_norm,
                "tokens": self.tokens_seen, "tok_s": step_tokens / dt, **({} if finite else {"skipped": 1})}

    def _micro_batch(self, last: bool) -> tuple[float, dict[str, float], int]:
        """Forward and backward of this rank's slice of one micro-batch; returns its loss, loss parts and real
        tokens (a re-tokenized row's PAD slots are no data: counted, a cross-tokenizer run would look further
        along in tokens than it is)."""
        d, stream = self.d, self.stream
        rows = d.local_rows(stream.next_rows())
        batch = stream.fetch(rows).to(self.device)
        with distributed.grad_sync(self.module, last=last):    # DDP: all-reduce on the last micro-batch only
            with autocast(self.device, self.amp):
                loss, parts = self.module(batch, rows, self.step)
            self.distiller.prefetch(d.local_rows(stream.peek_rows()))    # the next signal is read during backward
            (loss / self.cfg.data.grad_accum).backward()
        return loss.item(), parts, int((batch != IGNORE).sum())

    def validate(self) -> dict:
        """Val loss on the fixed val batches (and KL to the teacher when distilling), logged; returns the record."""
        # (the ranks' mean: every rank then takes the same early-stopping decision)
        val_loss = self.d.mean({"loss": evaluate(self.student, self.vbatches, self.device, self.amp)})["loss"]
        record = {"step": self.step, "split": "val", "loss": val_loss, "tokens": self.tokens_seen}
        if self.distiller.enabled and self.distiller.same_vocabulary and self.cfg.kd.val_kl_batches > 0:
            record["kl_teacher"] = self.distiller.val_kl(self.student, self.vbatches[: self.cfg.kd.val_kl_batches],
                                                         self.amp)
        self.metrics.log(record)
        return record

    def save_checkpoint(self) -> Path:
        """Weights + trainer state at this step; every rank calls it. Under FSDP each rank writes its shard
        (``distill.sharded_checkpoint``), the final checkpoint also the gathered weights; else rank 0 writes."""
        d, final = self.d, checkpoint.step_dir(self.run_dir, self.step)
        sharded = d.world > 1 and d.mode == "fsdp"
        last = self.step == self.cfg.trainer.max_steps or self.early.stopped
        weights = distributed.full_weights(self.module, d) if sharded and last else None   # a collective

        def state() -> dict:              # rank 0; a full disk here ends every rank with rank 0's one line
            if self.metrics.failed:       # metrics could not be written since the last checkpoint: resume there
                raise InputError(self.metrics.failed)
            opt_state = None if sharded else self.opt.state_dict()    # sharded: in dcp/ with the weights
            return checkpoint.trainer_state(self.step, self.tokens_seen, opt_state, self.sched, self.stream,
                                            self.early)

        keep = self.cfg.trainer.keep_checkpoints
        if sharded:
            sharded_checkpoint.save(d, self.module, self.opt, final, lambda tmp: checkpoint.write_folder(
                tmp, self.model, self.tokenizer, state(), weights, with_weights=last, shown=final))
            distributed.on_main(d, lambda: checkpoint.publish(self.run_dir, final, keep))
        else:
            distributed.on_main(d, lambda: checkpoint.save(self.run_dir, self.step, self.model, self.tokenizer,
                                                           state(), keep))
        return final

    def _finish(self, val_loss: float, elapsed: float) -> dict:
        """summary.json and the closing line (rank 0), then lm-eval on the final checkpoint if asked."""
        cfg = self.cfg
        summary = {"run_name": cfg.run_name, "steps": self.step, "tokens": self.tokens_seen, "val_loss": val_loss,
                   "val_ppl": math.exp(val_loss), **self.early.summary(), "checkpoint": str(self.last_ckpt),
                   "seconds_this_session": elapsed}
        if not self.d.is_main:
            return summary
        write_summary(self.run_dir, summary)
        print(f"done: {self.step} steps, {self.tokens_seen:,} tokens, val loss {val_loss:.4f}; "
              f"checkpoint {self.last_ckpt}")
        if cfg.eval.tasks:
            from distill.evaluate import evaluate_checkpoint, print_report

            print_report(evaluate_checkpoint(self.last_ckpt, cfg.eval.tasks, cfg.eval.limit or None, cfg.data.val,
                                             cfg.data.seq_len, cfg.eval.batch_size, str(self.device)))
        return summary
