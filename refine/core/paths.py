"""Where fetched data, converted models and packed tokens live: an ignored cache folder.

Default ``<repo>/.cache``; set ``RD_CACHE=/some/dir`` to share one cache between checkouts. ``PathsConfig`` is
the ``paths`` group both stages' configs share (``conf/paths/``).
"""

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from refine.core.errors import InputError

REPO = Path(__file__).resolve().parents[2]   # the repository root (refine/core/paths.py)

TEACHER = "smollm2-135m"   # the default teacher's folder under models/ (refine.fetch.models fetches it)


@dataclass
class PathsConfig:
    """Relative paths are relative to where you launch (Hydra does not chdir); the cache's default is not: it is
    ``cache_dir()``, so an app launched from any folder finds what ``make data models`` fetched."""
    cache: str = "${rd_cache:}"                        # fetched data, converted models, packed tokens (git-ignored)
    runs: str = "runs"                                 # training runs (the reference model's among them)
    teacher: str = f"${{paths.cache}}/models/{TEACHER}"
    corpus: str = "${paths.cache}/data/corpus"
    refined: str = "${paths.cache}/refined/default"    # make refine's output (instances/, instances_scored/, logits/)


def cache_dir() -> Path:
    """``RD_CACHE``, else the repository's ``.cache``: the one default of every cache path (configs read it
    through the ``${rd_cache:}`` resolver)."""
    return Path(os.environ.get("RD_CACHE", REPO / ".cache")).resolve()


if not OmegaConf.has_resolver("rd_cache"):
    OmegaConf.register_new_resolver("rd_cache", lambda: str(cache_dir()))


def downloads_dir() -> Path:
    return cache_dir() / "downloads"


def corpus_dir() -> Path:
    return cache_dir() / "data" / "corpus"


def models_dir() -> Path:
    return cache_dir() / "models"


def teacher_dir() -> Path:
    return models_dir() / TEACHER


def benchmarks_dir() -> Path:
    """Benchmark data for lm-eval (``make benchmarks``); ``RD_BENCHMARKS`` overrides it."""
    return Path(os.environ.get("RD_BENCHMARKS", cache_dir() / "benchmarks")).resolve()


def resolve_model(path: str | Path) -> Path:
    """An HF folder, a hub id (``org/name[@revision]``, through the hub cache), or a training run folder
    (``runs/<name>``), which means its latest checkpoint."""
    from refine.core.hub import local_model

    p = local_model(path)
    pointer = p / "checkpoints" / "latest"
    if pointer.is_file():
        p = p / "checkpoints" / checked_step_name(pointer)
    if not (p / "config.json").is_file():
        hint = " (run `make reference`)" if "reference" in str(path) else ""
        raise InputError(f"no model at {path}{hint}")
    if (p / "dcp").is_dir() and not any(p.glob("*.safetensors")):   # an FSDP run's intermediate checkpoint
        raise InputError(f"{p} is a sharded checkpoint (FSDP): make it an HF folder first with "
                         f"`python -m distill.export {p} OUT`")
    return p


def checked_step_name(pointer: Path) -> str:
    """The ``step_*`` folder name a ``checkpoints/latest`` file holds; one line for anything else (``../x``, an
    absolute path, a link out of the checkpoints folder): the pointer may not lead outside its folder."""
    name = pointer.read_text(errors="replace").strip()
    target = pointer.parent / name
    if not re.fullmatch(r"step_\d+", name) or not target.resolve().is_relative_to(pointer.parent.resolve()):
        raise InputError(f"{pointer} names {name[:100]!r}, not a step_* folder inside {pointer.parent}")
    return name


def config_int(model_dir: str | Path, key: str) -> int | None:
    """An integer of a model folder's ``config.json`` (its ``text_config`` for multimodal models), or None."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        n = cfg.get("text_config", cfg).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return int(n) if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None
