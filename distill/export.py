"""Turn a checkpoint into a plain HF folder (``config.json`` + ``model.safetensors`` + tokenizer).

    python -m distill.export runs/pd_6_8b runs/pd_6_8b-hf                  # a run folder: its latest checkpoint
    python -m distill.export runs/pd_6_8b/checkpoints/step_0010000 out/    # any step

An FSDP run writes sharded checkpoints (``distill.sharded_checkpoint``); only its final one also holds the
gathered weights. This reads the shards of any step in one process (the whole model must fit in host memory:
it is the one place that needs it) and writes the folder atomically, loadable by transformers, vLLM and
``lm_eval --model hf``. A checkpoint that already is an HF folder is copied as it is. A checkpoint holding
anything but regular files and folders (a link, a FIFO, a device; a hub cache snapshot's blob links excepted)
is refused in one line (``refine.core.read_guard.check_tree``): the export never copies a link's target.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from distill import sharded_checkpoint
from refine.core.errors import InputError, exit_on_input_error
from refine.core.paths import checked_step_name
from refine.core.read_guard import check_tree
from refine.core.write import atomic_path

HF_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja")


def step_folder(path: str | Path) -> Path:
    """A ``step_*`` folder, or a run folder's latest checkpoint."""
    p = Path(path)
    pointer = p / "checkpoints" / "latest"
    if pointer.is_file():
        p = p / "checkpoints" / checked_step_name(pointer)
    if not (p / "config.json").is_file():
        raise InputError(f"no checkpoint at {path} (a run folder or one of its checkpoints/step_* folders)")
    return p


class _Holder(torch.nn.Module):
    """The student under the name the trainer's loss module gives it, so the shards' names match."""

    def __init__(self, model):
        super().__init__()
        self.model = model


def export(src: str | Path, out: str | Path) -> Path:
    from transformers import AutoModelForCausalLM

    from refine.core.model_folder import load_config
    from refine.core.tokenizer import load_tokenizer

    step, out = step_folder(src), Path(out)
    if out.exists():
        raise InputError(f"{out} exists; choose another output folder")
    check_tree(step, "checkpoint")     # a link (to ~/.ssh/id_rsa) or a FIFO is never copied into the export
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        if sharded_checkpoint.is_sharded(step):
            model = AutoModelForCausalLM.from_config(load_config(step), dtype=torch.float32)
            sharded_checkpoint.load(_Holder(model), None, step)
            model.save_pretrained(tmp, safe_serialization=True)
            load_tokenizer(step).save_pretrained(tmp)
        else:
            for f in (f for pattern in HF_FILES for f in step.glob(pattern)):
                shutil.copyfile(f, tmp / f.name)
    print(f"exported {step} -> {out}")
    return out


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m distill.export", description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="a run folder (its latest checkpoint) or a checkpoints/step_* folder")
    ap.add_argument("out", help="the HF folder to write (must not exist)")
    args = ap.parse_args(argv)
    export(args.checkpoint, args.out)


if __name__ == "__main__":
    main()
