"""Checkpoints: an HF ``save_pretrained`` folder plus the trainer state, written atomically.

``<run_dir>/checkpoints/step_0000100/`` holds ``config.json`` + ``model.safetensors`` + the tokenizer
(loadable by transformers, vLLM and ``lm_eval --model hf``) and ``trainer_state.pt`` (optimizer, scheduler,
step, data position, RNG states), loaded with ``weights_only=True`` (no pickled code). The folder is
written under a temporary name and renamed; ``checkpoints/latest`` names the newest complete one, so a
crash at any moment leaves the previous checkpoint usable. Under FSDP the weights and optimizer state are
sharded instead (``dcp/``, ``distill.sharded_checkpoint``). ``trainer_state`` / ``restore`` say what the trainer
state holds; ``check_resumable`` refuses to continue a run folder under a config that would make another run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import PreTrainedModel

from refine.core.errors import InputError, write_error_line
from refine.core.model_folder import load_causal_lm, load_config
from refine.core.paths import checked_step_name
from refine.core.read_guard import check_tree
from refine.core.write import atomic_path, write_text_atomic

STATE = "trainer_state.pt"
# Fields that define the architecture: a checkpoint that differs in any of them belongs to another model.
ARCH_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "tie_word_embeddings", "state_size", "expand")
# Config sections that must match for a run folder to be resumed (the rest, e.g. max_steps, may change).
RESUME_MUST_MATCH = ("model", "data", "optim", "seed", "kd")


def ckpt_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: str | Path, step: int) -> Path:
    return ckpt_root(run_dir) / f"step_{step:07d}"


def save(run_dir: str | Path, step: int, model, tokenizer, state: dict, keep: int) -> Path:
    """One process's checkpoint (single-process and DDP: every rank holds the whole model): rank 0 calls it."""
    final = step_dir(run_dir, step)
    with atomic_path(final) as tmp:       # an error removes the temporary: the previous checkpoint stands
        tmp.mkdir(parents=True)
        write_folder(tmp, model, tokenizer, state, shown=final)
    publish(run_dir, final, keep)
    return final


def write_folder(folder: Path, model, tokenizer, state: dict, weights: dict | None = None,
                 with_weights: bool = True, shown: Path | None = None) -> None:
    """The HF folder (``model.safetensors`` unless ``with_weights`` is off: a sharded checkpoint keeps them in
    ``dcp/``) plus ``trainer_state.pt``. ``weights``: the gathered state dict when ``model``'s own tensors are
    shards (FSDP's final checkpoint). A failed write is one ``InputError`` line naming ``shown`` (the folder the
    temporary ``folder`` becomes)."""
    try:
        if with_weights:
            model.save_pretrained(folder, safe_serialization=True, state_dict=weights)
        else:
            model.config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        _torch_save(state, folder / STATE)
    except Exception as e:  # noqa: BLE001 - safetensors and torch.save wrap the OSError of a full disk in their own
        line = write_error_line(e, shown or folder)
        if line is None:
            raise
        raise InputError(line) from None


def publish(run_dir: str | Path, final: Path, keep: int) -> None:
    """Point ``checkpoints/latest`` at the complete ``final`` and drop the oldest beyond ``keep``."""
    root = ckpt_root(run_dir)
    write_text_atomic(root / "latest", final.name + "\n")
    _prune(root, keep, final)


class _Recording:
    """A file whose failed write is remembered: torch.save turns the OSError of a full disk into a RuntimeError
    ("unexpected pos"), losing the path and the cause that the one-line error needs."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        return self.f.flush()


def _torch_save(obj, path: Path) -> None:
    with open(path, "wb") as f:
        rec = _Recording(f)
        try:
            torch.save(obj, rec)
        except RuntimeError:
            if rec.error is None:
                raise
            rec.error.filename = str(path)
            raise rec.error from None


def _prune(root: Path, keep: int, newest: Path) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[: max(len(steps) - max(keep, 1), 0)]:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)


def latest(run_dir: str | Path) -> Path | None:
    pointer = ckpt_root(run_dir) / "latest"
    if not pointer.is_file():
        return None
    path = ckpt_root(run_dir) / checked_step_name(pointer)
    if not (path / STATE).is_file():
        raise InputError(f"{pointer} names {path.name}, which is missing or incomplete; "
                         f"delete {pointer} to start over or point it at another step_* folder")
    check_tree(path, "checkpoint")     # resume reads its own regular files only: no planted link, no FIFO
    return path


def check_config(path: str | Path, expected_config) -> None:
    """Refuse a checkpoint made for another architecture than ``expected_config``."""
    saved = load_config(path)   # every default filled in, so absent keys compare as what they mean
    diff = {k: (getattr(saved, k, None), getattr(expected_config, k, None)) for k in ARCH_FIELDS
            if getattr(saved, k, None) != getattr(expected_config, k, None)}
    if diff:
        shown = ", ".join(f"{k} {a} vs {b}" for k, (a, b) in diff.items())
        raise InputError(f"checkpoint {path} is for another model config ({shown}); "
                         f"use another run_name or resume=false")


def load_model(path: str | Path, expected_config) -> PreTrainedModel:
    """Load a checkpoint's weights, refusing one made for another architecture; safetensors only (a pickled
    ``pytorch_model.bin`` is never unpickled, ``weights_only`` or not: one line instead)."""
    check_config(path, expected_config)
    return load_causal_lm(path, what="checkpoint")


def load_state(path: str | Path) -> dict:
    try:
        return torch.load(Path(path) / STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt or foreign file
        raise InputError(f"corrupt trainer state {Path(path) / STATE}: {str(e).splitlines()[0]}") from None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainer_state(step: int, tokens: int, optimizer_state: dict, scheduler, stream, early_stop) -> dict:
    """Everything besides the weights that a resumed run needs to continue bit for bit."""
    return {"step": step, "tokens": tokens, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
            "data": stream.state_dict(), "rng": rng_state(), "early_stop": early_stop.state_dict()}


def restore(state: dict, scheduler, stream, early_stop) -> tuple[int, int]:
    """Put back what ``trainer_state`` saved (the optimizer aside: ``distributed.load_optimizer_state``, which
    knows the sharding); returns (step, tokens seen)."""
    scheduler.load_state_dict(state["scheduler"])
    stream.load_state_dict(state["data"])
    set_rng_state(state["rng"])
    early_stop.load_state_dict(state.get("early_stop", {}))    # (checkpoints from before early stopping: none)
    return int(state["step"]), int(state["tokens"])


def check_resumable(run_dir: Path, resolved: dict) -> None:
    """Refuse a run folder whose ``run.json`` was written under another ``RESUME_MUST_MATCH`` config."""
    saved_path = run_dir / "run.json"
    if not saved_path.is_file():
        return
    saved = json.loads(saved_path.read_text())["config"]
    differs = [k for k in RESUME_MUST_MATCH if saved.get(k) != resolved.get(k)]
    if differs:
        raise InputError(f"{run_dir} holds a run with a different {', '.join(differs)} config; "
                         f"choose another run_name or pass resume=false to overwrite it")
