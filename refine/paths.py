"""Where fetched data, converted models and packed tokens live: an ignored cache folder.

Default ``<repo>/.cache``; set ``RD_CACHE=/some/dir`` to share one cache between checkouts.
"""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    return Path(os.environ.get("RD_CACHE", REPO / ".cache")).resolve()


def downloads_dir() -> Path:
    return cache_dir() / "downloads"


def corpus_dir() -> Path:
    return cache_dir() / "data" / "corpus"


def models_dir() -> Path:
    return cache_dir() / "models"


def teacher_dir() -> Path:
    return models_dir() / "smollm2-135m"
