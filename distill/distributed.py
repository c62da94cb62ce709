"""Training across processes with torchrun: DDP, or FSDP2 for students too big to replicate.

    torchrun --nproc_per_node 2 -m distill.train +experiment=kd_wsd                       # DDP
    torchrun --nproc_per_node 8 -m distill.train +experiment=kd_wsd model=pd_6_8b trainer.parallel=fsdp
    torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node 8 -m distill.train ...  # 2 machines

``data.batch_size`` is the *global* micro-batch. Every rank walks the same seeded ``BatchStream`` and keeps its
own contiguous slice of each batch's rows, so the data order, the stream position a checkpoint saves, and the
loss (the mean over the global batch) are those of one process with the same batch. Each rank's mean is
weighted by its slice's target count over the ranks' mean count (``distill.kd.Distiller._rank_weights``): padded
re-tokenized rows (``kd.signal=cross_tokenizer``) give slices of unequal counts, which a plain average of the
ranks' means would weigh unequally. A run can therefore resume with another number of processes. Without
torchrun (``WORLD_SIZE`` unset) nothing here does anything.

The step's loss is computed inside ``LossModule.forward``, the module DDP/FSDP wrap, because the fused loss
(``distill.fused_loss``) reads the student's hidden states and LM-head weight directly: DDP must see a forward
to sync gradients, and FSDP must have the (tied) head weight gathered while the loss uses it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from refine.core.errors import InputError, everyone, write_error_line


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    mode: str = "ddp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_rows(self, rows: np.ndarray) -> np.ndarray:
        """This rank's contiguous share of a global batch's rows."""
        n = len(rows) // self.world
        return rows[self.rank * n:(self.rank + 1) * n]

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Means over ranks of per-rank scalars (the logged loss parts of each rank's slice)."""
        if self.world == 1:
            return values
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        return {k: v / self.world for k, v in zip(keys, t.tolist())}

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def together(d: Dist, error: str | None) -> None:
    """Every rank raises the same one-line ``InputError`` if any rank brought one, else none does. A collective:
    every rank calls it at the same point, so an input error on one rank ends all of them with that one line
    (printed by rank 0) instead of leaving the others in a barrier until gloo reports a closed connection."""
    if d.world > 1:
        errors: list = [None] * d.world
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        raise everyone(InputError(error))


@contextlib.contextmanager
def agreed(d: Dist):
    """A block every rank runs alike, with no collective inside: an input error on any rank ends every rank
    with that one line at the block's end (``together``), so none is left waiting in a later collective."""
    error = None
    try:
        yield
    except InputError as e:
        error = str(e)
    together(d, error)


def on_main(d: Dist, fn):
    """``fn()`` on rank 0 only (writing, packing), its input or write error raised on every rank (``together``)."""
    result, error = None, None
    if d.is_main:
        try:
            result = fn()
        except InputError as e:
            error = str(e)
        except OSError as e:
            error = write_error_line(e)
            if error is None:
                raise
    together(d, error)
    return result


def setup(device: torch.device, mode: str, batch_size: int) -> tuple[Dist, torch.device]:
    """Join the torchrun process group (gloo on CPU, NCCL on CUDA); one CUDA device per local rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), device
    if batch_size % world:
        raise InputError(f"data.batch_size {batch_size} (the global micro-batch) must divide by the {world} "
                         f"processes")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), world, mode), device


def shutdown(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


class LossModule(torch.nn.Module):
    """The student plus the step's loss. Called with ``input_ids=`` it is the student (evaluation: an HF output
    with ``.logits``), with the student's BOS prefix like every other model pass (``distill.kd``)."""

    def __init__(self, model, distiller):
        super().__init__()
        self.model = model
        self.distiller = distiller          # a plain object: a live teacher's weights are not ours to sync

    def forward(self, batch=None, rows=None, step=None, input_ids=None):
        if input_ids is not None:
            from transformers.modeling_outputs import CausalLMOutput

            from refine.core.forward import forward_logits

            return CausalLMOutput(logits=forward_logits(self.model, input_ids, self.distiller.bos_id))
        return self.distiller.loss(self.model, batch, rows, step)


def wrap(module: LossModule, d: Dist, device: torch.device) -> torch.nn.Module:
    """DDP or FSDP2 around the loss module (itself when single-process). FSDP2 shards each decoder block and
    the rest (embeddings, final norm, head) as one root group."""
    if d.world == 1:
        return module
    if d.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # broadcast_buffers off: the only buffers are rotary tables, identical on every rank by construction
        return DDP(module, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False)
    from torch.distributed.fsdp import fully_shard

    layers = getattr(module.model.base_model, "layers", None)
    if layers is None:
        raise InputError(f"trainer.parallel=fsdp: no decoder layers found in {type(module.model).__name__}")
    for layer in layers:
        fully_shard(layer)
    fully_shard(module)
    return module


def grad_sync(wrapped: torch.nn.Module, last: bool):
    """Context for one micro-batch's forward + backward: DDP all-reduces gradients only on the last micro-batch
    of an accumulated step (``no_sync`` on the others: one all-reduce per step, not per micro-batch). FSDP2
    keeps reduce-scattering every micro-batch, so gradients stay sharded (memory is why one shards)."""
    if last or not hasattr(wrapped, "no_sync"):
        return contextlib.nullcontext()
    return wrapped.no_sync()


def eval_module(wrapped: torch.nn.Module) -> torch.nn.Module:
    """What evaluation calls with ``input_ids=``: DDP's inner module (no collectives, every rank evaluates the
    same batches), the FSDP root itself (its forward gathers the shards; all ranks call it alike)."""
    return getattr(wrapped, "module", wrapped)


def full_weights(wrapped: torch.nn.Module, d: Dist) -> dict | None:
    """The student's full state dict for an HF ``model.safetensors`` (FSDP: gathered to CPU, a collective; None
    = the student's own tensors already are full)."""
    if d.world == 1 or d.mode != "fsdp":
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    if wrapped.model.config.tie_word_embeddings:   # gathered copies are no longer shared: keep the source only
        for key in getattr(wrapped.model, "_tied_weights_keys", None) or ():
            sd.pop(key, None)
    return sd


def load_optimizer_state(wrapped: torch.nn.Module, opt, state: dict, d: Dist) -> None:
    """Load an optimizer state from ``trainer_state.pt``: keyed by parameter index (single-process and DDP
    checkpoints, which move between any numbers of processes) or, from FSDP checkpoints of earlier versions, by
    parameter name. FSDP loads it by name (each rank keeps its shard of the full state)."""
    by_name = any(isinstance(p, str) for g in state.get("param_groups", []) for p in g["params"])
    if not by_name and not (d.world > 1 and d.mode == "fsdp"):
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(wrapped, opt, state if by_name else _keyed_by_name(wrapped, opt, state),
                             options=StateDictOptions(full_state_dict=True))


def _keyed_by_name(wrapped: torch.nn.Module, opt, state: dict) -> dict:
    """An index-keyed optimizer state keyed by parameter name instead: index i is the i-th parameter of the
    optimizer's groups in order, the same parameters (``build_optimizer``) under any wrapping."""
    names = {id(p): n for n, p in wrapped.named_parameters()}
    order = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    return {"state": {order[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}
