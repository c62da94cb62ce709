"""Dump the typed config every experiment (and the base train/refine configs) composes to, as sorted JSON.

Run it before and after a change to the config layout and diff the two files: the values a user gets must not
move by accident. ``python tools/dump_configs.py OUT.json [RD_CACHE]`` (RD_CACHE: the value to compose with,
default unset).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main(out: str, rd_cache: str | None = None) -> None:
    os.environ.pop("RD_CACHE", None)
    if rd_cache:
        os.environ["RD_CACHE"] = rd_cache
    sys.path.insert(0, str(REPO))
    from hydra import compose, initialize_config_dir

    from distill.config import to_config
    from refine.config import to_refine_config

    conf = REPO / "conf"
    cases = {"train": []}
    for exp in sorted(p.stem for p in (conf / "experiment").glob("*.yaml")):
        cases[f"train +experiment={exp}"] = [f"+experiment={exp}"]
        cases[f"train +experiment={exp} +debug=tiny"] = [f"+experiment={exp}", "+debug=tiny"]
    for group in ("model", "data", "schedule", "kd", "paths", "optim", "trainer"):
        for p in sorted((conf / group).glob("*.yaml")):
            cases[f"train {group}={p.stem}"] = [f"{group}={p.stem}"]
    dumps = {}
    with initialize_config_dir(str(conf), version_base="1.3"):
        for name, overrides in cases.items():
            cfg = to_config(compose("train", overrides=["run_dir=RUN_DIR", *overrides]))
            dumps[name] = json.loads(json.dumps(asdict(cfg), default=str))
        for name, overrides in {"refine": [], "refine paths=gemma": ["paths=gemma"]}.items():
            dumps[name] = json.loads(json.dumps(asdict(to_refine_config(compose("refine", overrides=overrides))),
                                                default=str))
    Path(out).write_text(json.dumps(dumps, indent=1, sort_keys=True) + "\n")
    print(f"{len(dumps)} configs -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
