"""The refine stage (MiniPLM difference sampling + teacher logits for distillation): the Hydra entry point.

Run::

    python -m refine                                   # the bundled corpus (make refine)
    python -m refine corpus=my.jsonl name=mine         # any corpus refine.core.corpus reads
    python -m refine select.alpha=0.3                  # same settings, another alpha: the passes are reused
    python -m refine select_only=true select.alpha=0.3 # re-select from <out>'s saved scores only (make select)
    python -m refine pack.max_instances=512            # a quick look: 512 instances spread over the corpus

The steps are ``refine.pipeline``'s, what they write ``refine.outputs``'s, every default ``refine/config.py``'s.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from refine.config import to_refine_config
from refine.console import log_path
from refine.core.errors import exit_on_input_error
from refine.core.hydra_cli import config_groups_help, precheck_overrides
from refine.core.library_noise import library_noise_to
from refine.pipeline import refine

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# --help lists refine's own config groups (conf/refine.yaml's hydra.help.template), not the trainer's
OmegaConf.register_new_resolver("refine_groups", lambda: config_groups_help(CONF_DIR, "refine"), replace=True)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="refine")
@exit_on_input_error
def _hydra_main(cfg: DictConfig) -> None:
    rc = to_refine_config(cfg)
    with library_noise_to(None if rc.verbose else log_path(rc.out, "refine")):
        refine(rc)


def main() -> None:
    # `--shard i/N`, the usual command-line form, is Hydra's shard=i/N
    argv = sys.argv[1:]
    for i, arg in enumerate(argv):
        if arg == "--shard" and i + 1 < len(argv):
            argv[i:i + 2] = [f"shard={argv[i + 1]}"]
            break
        if arg.startswith("--shard="):
            argv[i] = "shard=" + arg.split("=", 1)[1]
            break
    sys.argv[1:] = argv
    precheck_overrides(CONF_DIR, "refine", sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
