"""Shared by the Hydra entry points: a bad override ends with one clear line, not Hydra's multi-line report."""

from __future__ import annotations

import sys
from pathlib import Path


def precheck_overrides(conf_dir: Path, config_name: str, args: list[str]) -> None:
    """Compose once before Hydra does; on failure print ``error: ...`` and exit 2."""
    if any(a.startswith("-") for a in args):  # --multirun, --cfg, --help...: leave those to Hydra
        return
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(str(conf_dir), version_base="1.3"):
            compose(config_name, overrides=args)
    except (HydraException, OmegaConfBaseException) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        msg = " ".join(ln for ln in lines if not ln.startswith(("full_key", "object_type")))
        print(f"error: bad config override: {msg}", file=sys.stderr)
        sys.exit(2)
