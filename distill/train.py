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

This module is the entry point only (config, input checks, process group); the loop is ``distill.trainer``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from distill import distributed
from distill.config import TrainConfig, to_config
from distill.data import open_instances, open_retokenized
from distill.schedules import check as check_schedule
from distill.schedules import check_wsd_phases
from distill.trackers import check_installed as check_loggers
from distill.trainer import Trainer, pick_device, run_folder_lock
from refine.core.errors import InputError, everyone, exit_on_input_error
from refine.core.hydra_cli import precheck_overrides
from refine.core.library_noise import no_library_bars
from refine.core.tokenizer import load_tokenizer

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def train(cfg: TrainConfig) -> dict:
    """One run; under torchrun, one rank of it (``distill.distributed``). Input errors end every rank with one
    line: what can be checked alone is checked on every rank before the process group exists (each raises the
    same error); what one rank does alone (packing, writing) reports through ``distributed.together``."""
    tc = cfg.trainer
    try:
        device = pick_device(tc.device)
        tokenizer = _check_inputs(cfg)
        d, device = distributed.setup(device, tc.parallel, cfg.data.batch_size)
    except InputError as e:
        raise everyone(e) from None
    try:
        with run_folder_lock(d, Path(cfg.run_dir)):     # held until the run ends, either way
            return Trainer(cfg, d, device, tokenizer).fit()
    finally:
        distributed.shutdown(d)


def _check_inputs(cfg: TrainConfig):
    """Checks that need no other process and no writes; returns the tokenizer."""
    tc, dc = cfg.trainer, cfg.data
    check_schedule(cfg.schedule, tc.max_steps)
    check_loggers(tc.loggers)
    if cfg.kd.alpha.schedule == "wsd":
        check_wsd_phases("kd.alpha", cfg.kd.alpha.warmup_steps, cfg.kd.alpha.decay_fraction, tc.max_steps)
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    for path in (dc.train, dc.val):
        if path == dc.train and cfg.kd.signal == "cross_tokenizer":   # the teacher's instances, re-tokenized
            open_retokenized(path, cfg.kd.teacher, tokenizer, dc.seq_len)
        elif (Path(path) / "index.json").is_file():   # packed instances (refine output): seq_len, tokenizer
            open_instances(path, tokenizer, dc.seq_len, cfg.paths.cache, dc.text_field, quiet=True)
        elif not Path(path).exists():
            raise InputError(f"corpus not found: {path}")
    return tokenizer


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
@exit_on_input_error
def _hydra_main(cfg: DictConfig) -> None:
    with no_library_bars():                 # transformers' "Writing model shards" bar at every checkpoint
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
