"""Shared by the Hydra entry points: a bad override ends with one clear line, not Hydra's multi-line report."""

from __future__ import annotations

import sys
from pathlib import Path

from refine.core.errors import InputError


def compose_config(conf_dir: Path, config_name: str, overrides: list[str]):
    """Hydra's composition of ``config_name`` with ``overrides``; what it refuses is one ``InputError`` line (a bad
    value or choice checked by the schema: ``bad config: key='v' is not one of a | b``)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException, ValidationError

    from refine.core.schema import find_omegaconf_error, one_line

    try:
        with initialize_config_dir(str(conf_dir), version_base="1.3"):
            return compose(config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        cause = find_omegaconf_error(e)
        if isinstance(cause, ValidationError):
            raise InputError(one_line(cause)) from None
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        msg = " ".join(ln for ln in lines if not ln.startswith(("full_key", "object_type")))
        raise InputError(f"bad config override: {msg}") from None


def precheck_overrides(conf_dir: Path, config_name: str, args: list[str]) -> None:
    """Compose once before Hydra does; on failure print ``error: ...`` and exit 2."""
    if any(a.startswith("-") for a in args):  # --multirun, --cfg, --help...: leave those to Hydra
        return
    try:
        compose_config(conf_dir, config_name, args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def config_groups_help(conf_dir: Path, config_name: str) -> str:
    """Hydra's ``group: option, ...`` lines for the groups ``config_name``'s own defaults list names: ``--help``
    shows these instead of every group in ``conf_dir`` (which the refine and training apps share)."""
    from omegaconf import OmegaConf

    lines = []
    for entry in OmegaConf.load(conf_dir / f"{config_name}.yaml").get("defaults", []):
        if not isinstance(entry, str) and len(entry) == 1:
            group = str(next(iter(entry))).removeprefix("optional ").lstrip("+")
            if not group.startswith(("override ", "hydra")) and (conf_dir / group).is_dir():
                options = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
                lines.append(f"{group}: {', '.join(options)}")
    return "\n".join(lines)
