"""The teacher signal: one type for stored (offline) and live (online) teacher logits.

``TeacherSignal`` holds, for every predicted position of a batch ([B, T] with T = seq_len - 1, position t
predicting token t+1), up to K candidate token ids with the teacher's *full-softmax* log-probs at
temperature 1 (for a sampled RS-KD signal: log importance weights, ``refine.core.sparse_sampling``), padded to
the batch's largest K with ``mask``. Losses see only this type, never the teacher:

* ``OfflineTeacher`` reads the refine stage's top-p-k store (``refine.core.logits``), aligned row by row with
  the packed instances the student trains on;
* ``OnlineTeacher`` runs a frozen HF teacher forward on the same batch and applies the same top-p-k rule
  (``top_k = 0`` keeps the full vocabulary).

Because both keep full-softmax log-probs of the kept ids, the probability mass outside them is known
(``1 - exp(logprobs).sum(-1)``) and a KD temperature tau is applied later, in the loss.

Why no co-trained "online" teacher (PD paper's sense: logits of a teacher still being pretrained in the same
run)? The paper finds such logits worse than a converged teacher's; here the teacher is a released,
converged model, and a run that also trains the teacher is teacher pretraining, a different job.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from distill.fused_loss import lm_head_weight, topk_logprobs
from refine.core.forward import forward_logits
from refine.core.logits import LogitsStore, truncate_top_p_k
from refine.core.sparse_sampling import sample_sparse, seed_for


@dataclass
class TeacherSignal:
    ids: torch.Tensor        # [B, T, K] int64, padding 0
    logprobs: torch.Tensor   # [B, T, K] float32 full-softmax log-probs, padding -inf
    mask: torch.Tensor       # [B, T, K] bool
    stats: dict | None = None  # a cross-tokenizer signal's alignment statistics (logged)

    def to(self, device) -> TeacherSignal:
        return TeacherSignal(self.ids.to(device), self.logprobs.to(device), self.mask.to(device), self.stats)

    def kept_mass(self) -> torch.Tensor:
        return self.logprobs.exp().masked_fill(~self.mask, 0).sum(-1)


def from_sorted_topk(ids: torch.Tensor, logprobs: torch.Tensor, top_p: float, top_k: int) -> TeacherSignal:
    """Apply the top-p-then-top-k rule (``refine.core.logits.truncate_top_p_k``) to sorted candidates."""
    ids, logprobs = ids[..., :top_k], logprobs[..., :top_k].float()
    counts = torch.from_numpy(truncate_top_p_k(logprobs.detach().cpu().numpy(), top_p, top_k).astype(np.int64))
    mask = torch.arange(ids.shape[-1], device=ids.device) < counts.to(ids.device)[..., None]
    return TeacherSignal(ids.masked_fill(~mask, 0).long(), logprobs.masked_fill(~mask, float("-inf")), mask)


class OfflineTeacher:
    """Stored top-p-k logits for the rows of the student's packed instances.

    ``prefetch(rows)`` starts reading the next batch's rows in a background thread (decoding the compact codec
    in line would add to every GPU step; its cost: bench/logits_store_bench.py, bench/README.md); ``signal``
    returns that read when asked for the same rows, and reads in line otherwise. One read at a time: a store's
    decoders are not thread-safe."""

    def __init__(self, store: LogitsStore):
        self.store = store
        self._pool: ThreadPoolExecutor | None = None
        self._next: tuple[np.ndarray, Future] | None = None

    def _read(self, rows: np.ndarray) -> TeacherSignal:
        return TeacherSignal(*map(torch.from_numpy, self.store.padded(rows)))

    def prefetch(self, rows: np.ndarray) -> None:
        self._settle()
        self._pool = self._pool or ThreadPoolExecutor(max_workers=1, thread_name_prefix="signal")
        rows = np.array(rows)
        self._next = (rows, self._pool.submit(self._read, rows))

    def _settle(self) -> tuple[np.ndarray, TeacherSignal] | None:
        """The prefetched read, finished (its errors raised here), and forgotten."""
        if self._next is None:
            return None
        rows, job = self._next
        self._next = None
        return rows, job.result()

    def signal(self, rows: np.ndarray, tokens: torch.Tensor | None = None) -> TeacherSignal:
        ready = self._settle()
        if ready is not None and np.array_equal(ready[0], rows):
            return ready[1]
        return self._read(rows)


class CrossTokenizerTeacher(OfflineTeacher):
    """Stored top-p-k logits of a teacher with another tokenizer, moved to the student's positions and vocabulary
    (``distill.token_alignment``: byte-aligned positions, exact token-string map); each signal carries its
    alignment statistics (positions aligned, teacher mass kept), which the trainer logs."""

    def __init__(self, store: LogitsStore, retokenized):
        super().__init__(store)
        self.retokenized = retokenized          # distill.data.RetokenizedInstances: the rows' alignments

    def _read(self, rows: np.ndarray) -> TeacherSignal:
        aligned = self.retokenized.alignments(rows)
        *arrays, stats = self.retokenized.cross.map_signal(aligned, *self.store.padded(rows))
        signal = TeacherSignal(*map(torch.from_numpy, arrays))
        signal.stats = stats
        return signal


def load_teacher(model_dir: str, device: str, dtype: torch.dtype, trust_remote_code: bool = False):
    """A frozen HF teacher in its own dtype and the BOS prefix its tokenizer asks for (as the refine scorers)."""
    from refine.core.model_folder import load_causal_lm
    from refine.core.paths import resolve_model
    from refine.core.tokenizer import bos_prefix, load_tokenizer

    model_dir = resolve_model(model_dir)     # a folder, a run (its latest checkpoint) or a hub id
    model = load_causal_lm(model_dir, dtype, trust_remote_code).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, bos_prefix(load_tokenizer(model_dir, trust_remote_code))


class OnlineTeacher:
    """A frozen HF teacher run on each batch, truncated like the stored logits (or the full vocabulary), or
    sampled RS-KD style (``rs_samples`` draws per position from the full distribution).

    It runs in its own ``dtype`` outside the student's autocast: under the student's bf16 autocast its top-50
    log-probs moved by up to 0.013 and half of the rank slots changed id, so its targets would not be the ones
    a stored (fp32) pass gives for the same rows."""

    def __init__(self, model_dir: str | torch.nn.Module, top_p: float = 0.95, top_k: int = 50, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, trust_remote_code: bool = False, rs_samples: int = 0,
                 rs_temperature: float = 1.0, seed: int = 0):
        """``model_dir``: a teacher folder (or anything ``load_teacher`` resolves), or a frozen model already on
        its device and in its dtype, run without a BOS prefix (bench/gpu_check.py's random-init teachers, which
        have no tokenizer)."""
        self.top_p, self.top_k = top_p, top_k
        self.rs_samples, self.rs_temperature, self.seed = rs_samples, rs_temperature, seed
        if isinstance(model_dir, torch.nn.Module):
            self.model, self.bos_id = model_dir, None
        else:
            self.model, self.bos_id = load_teacher(model_dir, device, dtype, trust_remote_code)

    @torch.no_grad()  # not inference_mode: the signal enters the student's autograd graph as a constant
    def signal(self, rows: np.ndarray | None, tokens: torch.Tensor) -> TeacherSignal:
        with torch.autocast(self.model.device.type, enabled=False):
            return self._signal(rows, tokens.to(self.model.device))

    def _signal(self, rows: np.ndarray | None, tokens: torch.Tensor) -> TeacherSignal:
        head = lm_head_weight(self.model)
        if not self.rs_samples and self.top_k > 0 and head is not None:
            # The usual case, without the teacher's [tokens, vocab] log-softmax: top-k from hidden states
            hidden = forward_logits(self.model, tokens, self.bos_id, hidden=True)[:, :-1]
            return from_sorted_topk(*topk_logprobs(hidden, head, self.top_k), self.top_p, self.top_k)
        logp = torch.log_softmax(forward_logits(self.model, tokens, self.bos_id)[:, :-1].float(), dim=-1)
        if self.rs_samples:
            # A row's draws depend only on (seed, row): a resumed run draws them again, and neither the micro-batch
            # size nor the number of torchrun ranks (which regroup rows) changes them.
            if rows is None:
                raise ValueError("sampled online KD needs the batch's row indices (its random stream)")
            vocab = torch.arange(logp.shape[-1], device=logp.device).expand_as(logp[0])
            drawn = [sample_sparse(vocab, row_logp, self.rs_samples, self.rs_temperature,
                                   torch.Generator(device=logp.device).manual_seed(seed_for(self.seed, int(row))),
                                   with_tail=False)
                     for row, row_logp in zip(np.asarray(rows).tolist(), logp, strict=True)]
            ids, logw, counts = (torch.stack(parts) for parts in zip(*drawn, strict=True))
            mask = torch.arange(self.rs_samples, device=ids.device) < counts[..., None]
            return TeacherSignal(ids, logw, mask)
        # full vocabulary (top_k = 0), or a head that is not a plain matmul
        if self.top_k <= 0:
            ids = torch.arange(logp.shape[-1], device=logp.device).expand_as(logp)
            return TeacherSignal(ids.clone(), logp.clone(), torch.ones_like(logp, dtype=torch.bool))
        top = torch.topk(logp, self.top_k, dim=-1)
        return from_sorted_topk(top.indices, top.values, self.top_p, self.top_k)
