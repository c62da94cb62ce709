"""One timed training step and its memory, measured alike by ``train_bench.py`` (CPU) and ``gpu_check.py``.

A step is what the trainer does: forward and loss under autocast, backward, optimizer step, gradients freed.
On CUDA the clock reads after ``torch.cuda.synchronize`` (kernels run asynchronously); memory is
``torch.cuda.max_memory_allocated``. On CPU the closest analogue is the peak of live tensors in the profiler's
memory timeline (``tensor_peak_mb``): peak RSS also counts what glibc keeps cached between steps.
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(loss_fn: Callable[[], torch.Tensor], opt: torch.optim.Optimizer, device: torch.device,
               amp: torch.dtype | None) -> Callable[[], float]:
    """A function running one step of ``loss_fn`` (autocast to ``amp``, or fp32 when None) and returning its
    seconds."""

    def step() -> float:
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - t0

    return step


def peak_mb(device: torch.device) -> float:
    """The CUDA allocator's peak since its last reset, or this process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tensor_peak_mb(step: Callable[[], object], device: torch.device) -> float:
    """Peak MB of live tensors during one more ``step()``, from the profiler's memory timeline: the CPU analogue
    of ``torch.cuda.max_memory_allocated``, unlike peak RSS blind to what glibc keeps cached between steps."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)      # deprecated for CUDA, the only CPU timeline
            prof.export_memory_timeline(f"{tmp}/t.json", device="cpu" if device.type == "cpu" else "cuda:0")
        _, sizes = json.loads(Path(f"{tmp}/t.json").read_text())
    return float(np.asarray(sizes).sum(1).max() / 2**20)
