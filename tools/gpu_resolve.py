"""Check that the CUDA install set resolves, without installing it (``make gpu-resolve``).

Runs pip's resolver (``pip install --dry-run --ignore-installed --report``) on ``.[gpu,eval,dev]``, the set
``make install`` installs on a CUDA machine, prints the resolved torch, vLLM, transformers and lm-eval, and exits 1
unless vLLM is the ``gpu`` extra's pin, one that ``refine.scorers.vllm``'s tensor path takes (``TENSOR_PATH_VLLM``),
and torch is the extra's pin, the torch that vLLM pins (a ``+cpu`` build fails). Wheel metadata is read with HTTP
range requests (``--use-feature fast-deps``): the CUDA wheels themselves (GBs) are not downloaded; the bytes read
are printed.

By default pip runs without this machine's pip config files, find-links and constraints: only the package index, as
a GPU machine without local wheel folders sees it (a local CPU torch wheel would satisfy ``torch==2.13.0`` too).
``--keep-pip-config``: resolve with them (e.g. behind a mirror).

Usage: python tools/gpu_resolve.py [--extras gpu,eval,dev] [--report PATH] [--keep-pip-config]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import ssl
import sys
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHOWN = ("torch", "vllm", "transformers", "lm-eval", "torchvision", "torchaudio", "triton", "flashinfer-python")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def gpu_pins(pyproject: Path = REPO / "pyproject.toml") -> dict[str, str]:
    """The ``gpu`` extra's ``name==version`` pins, by normalised name."""
    extra = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]["gpu"]
    pins = {}
    for req in extra:
        name, sep, version = req.partition("==")
        if sep:
            pins[norm(name.strip())] = version.strip()
    return pins


def tensor_path_versions(module: Path = REPO / "refine" / "scorers" / "vllm.py") -> tuple[str, ...]:
    """``TENSOR_PATH_VLLM`` of ``refine.scorers.vllm``, read from its source (no vLLM import)."""
    for node in ast.parse(module.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "TENSOR_PATH_VLLM" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise LookupError(f"no TENSOR_PATH_VLLM in {module}")


def _count_tls_bytes() -> list[int]:
    """Count what this process reads from TLS sockets from now on (pip's downloads: index pages, range reads);
    ``SSLSocket.recv``/``recv_into`` go through ``read``."""
    total = [0]
    read = ssl.SSLSocket.read

    def counted_read(self, *args, **kwargs):
        out = read(self, *args, **kwargs)
        total[0] += out if isinstance(out, int) else len(out)
        return out

    ssl.SSLSocket.read = counted_read
    return total


def resolve(extras: str, report: Path, keep_pip_config: bool) -> tuple[int, dict, int, float]:
    """pip's dry run in this process: (its exit code, the report, bytes read over TLS, seconds)."""
    if not keep_pip_config:
        os.environ["PIP_CONFIG_FILE"] = os.devnull
        for var in ("PIP_FIND_LINKS", "PIP_CONSTRAINT", "PIP_NO_INDEX"):
            os.environ.pop(var, None)
    os.environ.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    from pip._internal.cli.main import main as pip_main

    total = _count_tls_bytes()
    t0 = time.perf_counter()
    rc = pip_main(["install", "--dry-run", "--ignore-installed", "--quiet", "--use-feature", "fast-deps",
                   "--report", str(report), f"{REPO}[{extras}]"])
    seconds = time.perf_counter() - t0
    data = json.loads(report.read_text()) if rc == 0 and report.is_file() else {}
    return rc, data, total[0], seconds


def check(data: dict, pins: dict[str, str], accepted: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    """The resolved versions by normalised name, and what is wrong with them (empty: all good)."""
    installs = {norm(i["metadata"]["name"]): i for i in data.get("install", [])}
    versions = {name: i["metadata"]["version"] for name, i in installs.items()}
    problems = []
    for name in ("vllm", "torch"):
        if name not in pins:
            problems.append(f"pyproject's gpu extra pins no {name} (name==version)")
        elif versions.get(name) != pins[name]:
            problems.append(f"{name} resolved to {versions.get(name)}, the gpu extra pins {pins[name]}")
    if pins.get("vllm") not in accepted:
        problems.append(f"the gpu extra's vllm {pins.get('vllm')} is not one the tensor path takes {accepted}")
    vllm_torch = [r for r in installs.get("vllm", {}).get("metadata", {}).get("requires_dist", [])
                  if re.match(r"torch\s*==", r)]
    if vllm_torch and pins.get("torch") and vllm_torch[0].split("==")[1].split(";")[0].strip() != pins["torch"]:
        problems.append(f"vllm requires {vllm_torch[0]}, the gpu extra pins torch {pins['torch']}")
    return versions, problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--extras", default="gpu,eval,dev")
    ap.add_argument("--report", type=Path, help="keep pip's resolution report here (default: a temporary file)")
    ap.add_argument("--keep-pip-config", action="store_true")
    args = ap.parse_args(argv)
    pins, accepted = gpu_pins(), tensor_path_versions()
    with tempfile.TemporaryDirectory() as tmp:
        report = args.report or Path(tmp) / "report.json"
        rc, data, read, seconds = resolve(args.extras, report, args.keep_pip_config)
    if rc != 0:
        print(f"gpu-resolve: pip's resolver failed (exit {rc}) for .[{args.extras}]", file=sys.stderr)
        return 1
    versions, problems = check(data, pins, accepted)
    print(f"gpu-resolve: .[{args.extras}] resolves to {len(versions)} packages in {seconds:.0f} s, "
          f"{read / 1e6:.1f} MB read from the index (metadata only)")
    for name in SHOWN:
        print(f"  {name:18s} {versions.get(name, '-')}")
    print(f"  tensor path takes vllm {', '.join(accepted)}; gpu extra pins "
          + ", ".join(f"{k}=={v}" for k, v in sorted(pins.items())))
    for p in problems:
        print(f"gpu-resolve: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
