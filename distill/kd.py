"""The distillation objective the trainer calls: LM loss, plus KD from a teacher signal, weighted by alpha.

    L = (1 - alpha(step)) * L_lm + alpha(step) * L_kd          (PD paper)

``Distiller`` builds the teacher side from ``cfg.kd`` (none | offline store | online model), checks that it
matches the student (tokenizer hash, instance count and length), and returns the loss with its parts for
logging. ``val_kl`` measures KL(teacher || student) on validation batches with the full teacher distribution.
"""

from __future__ import annotations

import torch

from distill.config import KDConfig
from distill.fused_loss import fused_lm_kd, last_hidden, lm_head_weight
from distill.losses import adaptive_temperature, kd_loss, lm_loss
from distill.schedules import alpha_at
from refine.errors import InputError
from refine.instances import Instances


def _check_teacher_tokenizer(teacher_dir: str, student_hash: str) -> None:
    from refine.tokenizer import load_tokenizer, tokenizer_hash

    if tokenizer_hash(load_tokenizer(teacher_dir)) != student_hash:
        raise InputError(f"teacher {teacher_dir} uses another tokenizer than the student; logit KD needs one "
                         f"vocabulary (cross-tokenizer KD is another loss)")


class Distiller:
    def __init__(self, cfg: KDConfig, train_set: Instances, student_tokenizer_hash: str, device: torch.device,
                 max_steps: int, seed: int = 0):
        self.cfg, self.device, self.max_steps = cfg, device, max_steps
        self.student_hash = student_tokenizer_hash
        self.teacher = None
        self.sampled = False
        self._val_teacher = None
        if cfg.signal == "none":
            return
        if cfg.signal == "offline":
            from distill.signal import OfflineTeacher
            from refine.logits_store import LogitsStore

            if not cfg.logits:
                raise InputError("kd.signal=offline needs kd.logits (a refine logits store aligned with data.train)")
            store = LogitsStore(cfg.logits, verify="lazy")
            store.check_tokenizer(student_tokenizer_hash)
            if len(store) != len(train_set) or store.header.positions != train_set.seq_len - 1:
                raise InputError(f"logits store {cfg.logits} ({len(store)} instances x {store.header.positions + 1}"
                                 f" tokens) is not aligned with data.train {train_set.folder} ({len(train_set)} x "
                                 f"{train_set.seq_len}); use the store written next to those instances")
            self.teacher = OfflineTeacher(store)
            self.sampled = store.header.kind == "sampled"
        elif cfg.signal == "online":
            from distill.signal import OnlineTeacher

            _check_teacher_tokenizer(cfg.teacher, student_tokenizer_hash)
            self.teacher = OnlineTeacher(cfg.teacher, cfg.top_p, cfg.top_k, device=str(device),
                                         rs_samples=cfg.rs_samples, rs_temperature=cfg.rs_temperature, seed=seed)
            self.sampled = cfg.rs_samples > 0
        else:
            raise InputError(f"unknown kd.signal {cfg.signal!r} (none | offline | online)")
        if self.sampled and (cfg.temperature != 1 or cfg.adaptive_temperature or cfg.loss == "mse"):
            # Sampled targets are importance weights, not teacher log-probs: rescaling them by 1/tau or
            # regressing logits on them estimates nothing. Their temperature is the sampling temperature.
            raise InputError("a sampled (RS-KD) teacher signal needs kd.temperature=1, no adaptive temperature "
                             "and a kld | nll | rkl loss; set the sampling temperature when capturing instead")

    @property
    def enabled(self) -> bool:
        return self.teacher is not None

    def prefetch(self, rows) -> None:
        """Start reading the signal of the batch that comes next (a stored teacher; a live one has nothing to
        read ahead)."""
        if hasattr(self.teacher, "prefetch"):
            self.teacher.prefetch(rows)

    def loss(self, model, batch: torch.Tensor, rows, step: int) -> tuple[torch.Tensor, dict]:
        """The step's loss for ``model`` on ``batch`` (call under the trainer's autocast) and its parts for
        logging. Through ``distill.fused_loss`` (no [tokens, vocab] tensor) when the model's logits are a plain
        ``hidden @ W^T``; otherwise through the full logits and the reference losses."""
        cfg, signal = self.cfg, None
        alpha, kd_weight, tau = 0.0, 0.0, torch.tensor(1.0)
        if self.teacher is not None:
            signal = self.teacher.signal(rows, batch).to(batch.device)
            tau = adaptive_temperature(signal, cfg.temperature, cfg.adaptive_beta) if cfg.adaptive_temperature \
                else torch.tensor(cfg.temperature)
            alpha = alpha_at(step, self.max_steps, cfg.alpha)
            # tau^2 (Hinton) rescales the KD gradient; it multiplies the KD term like a weight
            kd_scale = tau.float().pow(2).mean().item() if cfg.tau_squared else 1.0
            kd_weight = alpha * kd_scale
        weight = lm_head_weight(model)
        if weight is not None:
            hidden = last_hidden(model, batch)[:, :-1]
            total, lm, kd = fused_lm_kd(hidden, weight, batch[:, 1:], signal, lm_weight=1 - alpha,
                                        kd_weight=kd_weight, loss=cfg.loss, temperature=tau,
                                        missing_mass=cfg.missing_mass)
        else:
            logits = model(input_ids=batch).logits
            lm = lm_loss(logits, batch)
            kd = kd_loss(logits[:, :-1], signal, cfg.loss, tau, cfg.missing_mass) if signal is not None else lm * 0
            total = (1 - alpha) * lm + kd_weight * kd
        if signal is None:
            return total, {"lm_loss": lm.item()}
        return total, {"lm_loss": lm.item(), "kd_loss": kd.item() * kd_scale, "alpha": alpha,
                       "tau": tau.float().mean().item()}

    @torch.no_grad()
    def val_kl(self, model, batches: list[torch.Tensor], amp) -> float:
        """Mean per-token KL(teacher || student) over the full vocabulary (teacher: ``kd.teacher``)."""
        if self._val_teacher is None:
            from transformers import AutoModelForCausalLM

            _check_teacher_tokenizer(self.cfg.teacher, self.student_hash)
            self._val_teacher = AutoModelForCausalLM.from_pretrained(
                self.cfg.teacher, dtype=torch.float32, local_files_only=True).to(self.device).eval()
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        for batch in batches:
            batch = batch.to(self.device)
            t = torch.log_softmax(self._val_teacher(input_ids=batch).logits[:, :-1].float(), -1)
            with torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                s = model(input_ids=batch).logits[:, :-1]
            s = torch.log_softmax(s.float(), -1)
            total += (t.exp() * (t - s)).sum().item()
            count += batch[:, 1:].numel()
        model.train(was_training)
        return total / max(count, 1)
