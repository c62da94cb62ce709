"""Running a fuzz's cases in a child process under an address-space cap, and reading that child's peak memory:
shared by the store fuzz (``test_fuzz_store``) and the corpus fuzz (``test_fuzz_corpus``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def peak_mib() -> float:
    """VmHWM: this process image's own peak. (ru_maxrss keeps the forking parent's peak across exec: in a long
    pytest session that is the test runner's, GBs, not the child's.)"""
    status = Path("/proc/self/status").read_text()
    return round(int(status.split("VmHWM:")[1].split()[0]) / 1024, 1)


def run_capped(module: str, root: Path, cases: int, seed: int, cap_bytes: int, timeout: float,
               env: dict[str, str] | None = None) -> dict:
    """``module.run_cases(root, cases, seed)`` in a child whose address space is capped at ``cap_bytes``; what
    it returns (JSON, its last stdout line)."""
    code = ("import json, resource, sys; from pathlib import Path; "
            f"resource.setrlimit(resource.RLIMIT_AS, ({cap_bytes}, {cap_bytes})); "
            f"from {module} import run_cases; "
            f"print(json.dumps(run_cases(Path({str(root)!r}), {cases}, {seed})))")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           **(env or {})}
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])
