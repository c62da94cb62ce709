"""The distillation objective the trainer calls: LM loss, plus KD from a teacher signal, weighted by alpha.

    L = (1 - alpha(step)) * L_lm + alpha(step) * L_kd          (PD paper)

``Distiller`` builds the teacher side from ``cfg.kd`` (none | offline store | online model), checks that it
matches the student (tokenizer hash, instance count and length), and returns the loss with its parts for
logging. ``val_kl`` measures KL(teacher || student) on validation batches with the full teacher distribution.

Every model pass here (student, live teacher, validation teacher) goes through ``refine.core.forward.forward_logits``
with the BOS prefix its tokenizer asks for (``refine.core.tokenizer.bos_prefix``), as the refine scorers do.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from distill.config import KDConfig
from distill.fused_loss import IGNORE, fused_lm_kd, lm_head_weight
from distill.losses import adaptive_temperature, kd_loss, lm_loss
from distill.schedules import alpha_at
from refine.core.errors import InputError
from refine.core.forward import DTYPES, forward_logits
from refine.core.instances import Instances


def _check_teacher_tokenizer(teacher_dir: str, student_hash: str) -> None:
    from refine.core.tokenizer import load_tokenizer, tokenizer_hash

    if tokenizer_hash(load_tokenizer(teacher_dir)) != student_hash:
        raise InputError(f"teacher {teacher_dir} uses another tokenizer than the student; logit KD needs one "
                         f"vocabulary (cross-tokenizer KD is another loss)")


class Distiller:
    def __init__(self, cfg: KDConfig, train_set: Instances, student_tokenizer_hash: str, device: torch.device,
                 max_steps: int, seed: int = 0, bos_id: int | None = None):
        from distill.data import RetokenizedInstances

        self.cfg, self.device, self.max_steps = cfg, device, max_steps
        self.padded = isinstance(train_set, RetokenizedInstances)   # rows padded with PAD after their text
        self.student_hash, self.bos_id = student_tokenizer_hash, bos_id      # bos_id: the student's BOS prefix
        self.teacher = None
        self.sampled = False
        self.missing_mass = cfg.missing_mass
        self._val_teacher = None
        if cfg.signal == "none":
            return
        if cfg.signal in ("offline", "cross_tokenizer"):
            from distill.signal import CrossTokenizerTeacher, OfflineTeacher
            from refine.core.logits import LogitsStore

            store = LogitsStore(cfg.logits, verify="lazy")
            if cfg.signal == "offline":
                store.check_tokenizer(student_tokenizer_hash)
                store.check_aligned(train_set, "data.train")
                self.teacher = OfflineTeacher(store)
            else:       # data.train: the teacher's instances, read as student tokens (distill.data.open_retokenized)
                assert self.padded, "cross_tokenizer's data.train is read by distill.data.open_retokenized"
                store.check_tokenizer(train_set.teacher.tokenizer.hash)
                store.check_aligned(train_set.teacher, "data.train")
                train_set.cross.targets = cfg.xtok_targets     # where the teacher's next token is longer
                self.teacher = CrossTokenizerTeacher(store, train_set)
            self.sampled = store.header.kind == "sampled"
        elif cfg.signal == "online":
            from distill.signal import OnlineTeacher

            _check_teacher_tokenizer(cfg.teacher, student_tokenizer_hash)
            self.teacher = OnlineTeacher(cfg.teacher, cfg.top_p, cfg.top_k, device=str(device),
                                         dtype=DTYPES[cfg.teacher_dtype], rs_samples=cfg.rs_samples,
                                         rs_temperature=cfg.rs_temperature, seed=seed)
            self.sampled = cfg.rs_samples > 0
        self.missing_mass = cfg.check_targets(self.sampled)   # the store's kind known now
        if self.missing_mass == "tail" and cfg.signal != "online":
            self.teacher.store.check_tail_mass()

    @property
    def enabled(self) -> bool:
        return self.teacher is not None

    @property
    def same_vocabulary(self) -> bool:
        """Teacher and student share a vocabulary (``val_kl`` compares their full distributions)."""
        return self.cfg.signal != "cross_tokenizer"

    def prefetch(self, rows) -> None:
        """Start reading the signal of the batch that comes next (a stored teacher; a live one has nothing to
        read ahead)."""
        if hasattr(self.teacher, "prefetch"):
            self.teacher.prefetch(rows)

    def _rank_weights(self, batch: torch.Tensor, signal) -> tuple[float, float]:
        """Weights of this rank's LM and KD means: its target count over the ranks' mean count. DDP/FSDP average
        the ranks' gradients, so where slices hold unequal numbers of targets (padded re-tokenized rows, positions
        without an aligned teacher) a plain per-rank mean would weigh each target 1 / its own rank's count; so
        weighted, the step's loss is the global batch's mean. 1.0 without torchrun and for unpadded rows, whose
        slices are all full (every rank runs the same config, so all or none join the all-reduce)."""
        if not (self.padded and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return 1.0, 1.0
        n_lm = (batch[:, 1:] != IGNORE).sum()
        n_kd = signal.mask.any(-1).sum() if signal is not None else n_lm
        counts = torch.stack([n_lm, n_kd]).to(torch.float64).clamp_min(1)   # the fused loss's clamp too
        mean = counts.clone()
        dist.all_reduce(mean)
        return tuple((counts * dist.get_world_size() / mean).tolist())

    def loss(self, model, batch: torch.Tensor, rows, step: int) -> tuple[torch.Tensor, dict]:
        """The step's loss for ``model`` on ``batch`` (call under the trainer's autocast) and its parts for
        logging. Through ``distill.fused_loss`` (no [tokens, vocab] tensor) when the model's logits are a plain
        ``hidden @ W^T``; otherwise through the full logits and the reference losses."""
        cfg, signal = self.cfg, None
        alpha, tau = 0.0, torch.tensor(1.0)
        if self.teacher is not None:
            signal = self.teacher.signal(rows, batch).to(batch.device)
            tau = adaptive_temperature(signal, cfg.temperature, cfg.adaptive_beta) if cfg.adaptive_temperature \
                else torch.tensor(cfg.temperature)
            alpha = alpha_at(step, self.max_steps, cfg.alpha)
        kd_opts = {"loss": cfg.loss, "temperature": tau, "missing_mass": self.missing_mass,
                   "tau_squared": cfg.tau_squared}          # tau^2 (Hinton) per position, inside the KD term
        weight = lm_head_weight(model)
        # a re-tokenized row is padded with PAD (= the losses' ignore index) after its end: any id does as input
        # there, since no earlier position attends to it
        inputs = batch.clamp_min(0) if self.padded else batch
        r_lm, r_kd = self._rank_weights(batch, signal)
        if weight is not None:
            hidden = forward_logits(model, inputs, self.bos_id, hidden=True)[:, :-1]
            total, lm, kd = fused_lm_kd(hidden, weight, batch[:, 1:], signal, lm_weight=(1 - alpha) * r_lm,
                                        kd_weight=alpha * r_kd, **kd_opts)
        else:
            logits = forward_logits(model, inputs, self.bos_id)
            lm = lm_loss(logits, batch)
            kd = kd_loss(logits[:, :-1], signal, **kd_opts) if signal is not None else lm * 0
            total = (1 - alpha) * r_lm * lm + alpha * r_kd * kd
        lm, kd = lm * r_lm, kd * r_kd        # this rank's share: the ranks' mean is the global batch's mean
        if signal is None:
            return total, {"lm_loss": lm.item()}
        return total, {"lm_loss": lm.item(), "kd_loss": kd.item(), "alpha": alpha, "tau": tau.float().mean().item(),
                       **(signal.stats or {})}

    @torch.no_grad()
    def val_kl(self, model, batches: list[torch.Tensor], amp) -> float:
        """Mean per-token KL(teacher || student) over the full vocabulary (teacher: ``kd.teacher``, in
        ``kd.teacher_dtype``, with its BOS prefix; the student ``model`` is ``distill.distributed.LossModule``,
        which adds the student's own)."""
        if self._val_teacher is None:
            from distill.signal import load_teacher

            _check_teacher_tokenizer(self.cfg.teacher, self.student_hash)
            self._val_teacher = load_teacher(self.cfg.teacher, str(self.device), DTYPES[self.cfg.teacher_dtype])
        teacher, teacher_bos = self._val_teacher
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        for batch in batches:
            batch = batch.to(self.device)
            with torch.autocast(self.device.type, enabled=False):
                t = torch.log_softmax(forward_logits(teacher, batch, teacher_bos)[:, :-1].float(), -1)
            with torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                s = model(input_ids=batch).logits[:, :-1]
            s = torch.log_softmax(s.float(), -1)
            total += (t.exp() * (t - s)).sum().item()
            count += batch[:, 1:].numel()
        model.train(was_training)
        return total / max(count, 1)
