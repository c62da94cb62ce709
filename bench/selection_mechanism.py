"""Does difference sampling do what MiniPLM says it does? Planted classes whose right answer is known.

MiniPLM's selection should (1) drop common, easy text both models know, (2) keep what the teacher knows and the
reference does not, (3) drop noise neither knows. This builds a corpus of three planted classes from what the
machine has (no download):

* ``prose``: the bundled corpus's Wikipedia leads and Austen, in documents of ~3,000 characters;
* ``boilerplate``: the openings (3,000 characters) of the licence texts of ``/usr/share/common-licenses`` (web text
  the teacher has seen thousands of times), each 8 times with its own copyright line, so it is common in the corpus
  too and D_ref holds copies of it (boilerplate the reference never sees is, rightly, kept: the split below says
  which is which);
* ``noise``: prose with its words shuffled, and random characters;

then refines it at alpha 0.5 through the default flow (``python -m refine``, vLLM teacher, D_ref carved from the
corpus) once per reference setting given, and prints the kept rate of each class, the score's Spearman with
each NLL and the reference's size, tokens, time and perplexity. Targets (issue 30): noise <= 5%, boilerplate
<= 25%, prose >= 55%.

    .venv/bin/python bench/selection_mechanism.py [--instances 320] [--settings fixed auto]
    # a setting: fixed | auto | auto:KEY=VALUE,KEY=VALUE (more refine overrides,
    #   e.g. auto:ref_split.min_train_tokens=500000)

Writes bench/results/selection_mechanism.json (what each setting kept, on this machine).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from refine.core.paths import cache_dir, corpus_dir, teacher_dir  # noqa: E402

LICENCES = Path("/usr/share/common-licenses")
TARGETS = {"noise": ("<=", 0.05), "boilerplate": ("<=", 0.25), "prose": (">=", 0.55)}
DOC_CHARS = 3000
COPIES = 8              # of each licence: common in the corpus, so D_ref holds some (0.7^8: 6% chance of none)


def build_corpus(path: Path, seed: int = 0) -> dict:
    """The planted corpus as JSONL (``source`` = class); returns characters per class."""
    rng = random.Random(seed)
    rows = [json.loads(line) for line in (corpus_dir() / "train.jsonl").read_text().splitlines()]
    wiki = [r["text"] for r in rows if r["source"] == "wiki"]
    austen = "\n\n".join(r["text"] for r in rows if r["source"] == "austen")
    docs: list[dict] = []

    def add(cls: str, text: str) -> None:
        docs.append({"id": f"{cls}/{len(docs)}", "source": cls, "text": text})

    prose, buf = [], ""
    for text in wiki[:1400]:
        buf = f"{buf}\n\n{text}" if buf else text
        if len(buf) >= DOC_CHARS:
            prose.append(buf)
            buf = ""
    prose += [austen[a:a + DOC_CHARS] for a in range(0, 300 * DOC_CHARS, DOC_CHARS)]
    for text in prose:
        add("prose", text)
    names = ["Acme Corp", "The Contributors", "Jane Doe", "Example Project", "OpenSoft Foundation", "J. Smith"]
    for lic in sorted(p for p in LICENCES.iterdir() if p.is_file() and not p.is_symlink()):
        body = lic.read_text(errors="replace")[:DOC_CHARS]      # a licence's opening, as web pages carry it
        for _ in range(COPIES):
            add("boilerplate", f"Copyright (c) {rng.randint(1995, 2024)} {rng.choice(names)}\n\n{body}")
    n_prose_chars = sum(len(t) for t in prose)
    noise_chars = 0
    alphabet = "abcdefghijklmnopqrstuvwxyz      .,;:-'"
    while noise_chars < n_prose_chars / 3:
        if len(docs) % 2:
            words = rng.choice(prose).split()
            rng.shuffle(words)
            text = " ".join(words)
        else:
            text = "".join(rng.choice(alphabet) for _ in range(DOC_CHARS))
        add("noise", text)
        noise_chars += len(text)
    rng.shuffle(docs)                          # corpus order mixes the classes
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    chars: dict[str, int] = {}
    for d in docs:
        chars[d["source"]] = chars.get(d["source"], 0) + len(d["text"])
    return chars


def run_setting(corpus: Path, setting: str, instances: int, fraction: float) -> dict:
    sizing, _, extra = setting.partition(":")
    version = hashlib.sha256(corpus.read_bytes()).hexdigest()[:6]      # a changed corpus gets new folders
    name = f"mechanism_{version}_" + "".join(c if c.isalnum() else "_" for c in setting)
    out = cache_dir() / "refined" / name
    args = [sys.executable, "-m", "refine", f"corpus={corpus}", f"name={name}", "select.alpha=0.5",
            f"pack.max_instances={instances}", f"ref_split.fraction={fraction}", f"ref_split.sizing={sizing}",
            *(extra.split(",") if extra else [])]
    # The teacher pass is the same for every setting (same corpus, D_ref split and instances): a finished one from
    # another setting's folder is copied in, and refine reuses it only if its key (model, instances hash) matches.
    done = [p for p in sorted((cache_dir() / "refined").glob(f"mechanism_{version}_*/teacher/pass.json"))
            if p.parents[1] != out]
    if done and not out.exists():
        shutil.copytree(done[0].parent, out / "teacher")
    t0 = time.perf_counter()
    res = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{setting}: refine failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    m = json.loads((out / "manifest.json").read_text())
    r, ref = m["report"], m.get("reference_model", {})
    training = ref.get("training") or {}
    plan = ref.get("plan") or {}
    return {"setting": setting, "out": str(out), "seconds": seconds, "kept": r["kept_fraction_by_source"],
            "boilerplate_by_d_ref": boilerplate_by_d_ref(corpus, out, Path(ref.get("run", out)).parent),
            "instances": r["instances_by_source"], "spearman_ref": r["spearman_score_ref_nll"],
            "spearman_teacher": r["spearman_score_teacher_nll"], "warnings": r["warnings"],
            "teacher_ppl": math.exp(r["teacher_mean_nll"]), "reference_ppl": math.exp(r["reference_mean_nll"]),
            "reference_params": plan.get("params"), "reference_tokens": training.get("tokens"),
            "reference_steps": training.get("steps"), "reference_val_ppl": training.get("val_ppl"),
            "reference_stopped_early": training.get("stopped_early"),
            "reference_seconds": training.get("seconds_this_session"),
            "top": [line for line in (out / "report.md").read_text().splitlines() if line.startswith("- **")],
            "stdout_reference": [line for line in res.stdout.splitlines() if line.startswith(("reference LM",
                                                                                                "warning"))]}


def boilerplate_by_d_ref(corpus: Path, out: Path, d_ref: Path) -> dict:
    """Kept rate of the all-boilerplate instances whose licence has a copy in D_ref (the reference could learn
    it: MiniPLM drops it) and of those whose licence has none (only the teacher knows it: MiniPLM keeps it)."""
    import numpy as np

    from refine.core.instances import Instances

    docs = {d["id"]: d for d in map(json.loads, corpus.read_text().splitlines())}
    licence = {i: d["text"].split("\n\n", 1)[1] for i, d in docs.items() if d["source"] == "boilerplate"}
    held = {licence[json.loads(line)["id"]] for f in ("d_ref.jsonl", "d_ref_val.jsonl") if (d_ref / f).is_file()
            for line in (d_ref / f).read_text().splitlines() if json.loads(line)["id"] in licence}
    inst, kept = Instances(out / "instances_scored"), set(np.load(out / "scores.npz")["kept"].tolist())
    counts: dict[str, list[int]] = {}
    for r in range(len(inst)):
        ids = inst.doc_ids(r)
        if all(i in licence for i in ids):
            c = counts.setdefault("copy in D_ref" if licence[ids[0]] in held else "none in D_ref", [0, 0])
            c[0] += 1
            c[1] += r in kept
    return {k: {"instances": n, "kept": k_ / n} for k, (n, k_) in counts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--instances", type=int, default=320, help="instances scored (pack.max_instances)")
    ap.add_argument("--fraction", type=float, default=0.3, help="ref_split.fraction (D_ref's share of documents)")
    ap.add_argument("--settings", nargs="+", default=["fixed", "auto"])
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "selection_mechanism.json"))
    args = ap.parse_args()
    if not (teacher_dir() / "config.json").is_file() or not (corpus_dir() / "train.jsonl").is_file():
        raise SystemExit("needs the teacher and the bundled corpus: make data models")
    corpus = cache_dir() / "data" / "planted" / "planted.jsonl"
    chars = build_corpus(corpus)
    print(f"planted corpus {corpus}: " + ", ".join(f"{k} {v:,} chars" for k, v in sorted(chars.items())))
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    results = [run_setting(corpus, s, args.instances, args.fraction) for s in args.settings]
    print(f"\n{'setting':<40}{'prose':>8}{'boiler':>8}{'noise':>8}{'rho ref':>9}{'rho tch':>9}"
          f"{'ref M':>7}{'ref tok':>11}{'ref ppl':>9}{'s':>7}")
    for r in results:
        k = r["kept"]
        print(f"{r['setting']:<40}{k.get('prose', 0):>8.0%}{k.get('boilerplate', 0):>8.0%}{k.get('noise', 0):>8.0%}"
              f"{r['spearman_ref']:>9.2f}{r['spearman_teacher']:>9.2f}"
              f"{(r['reference_params'] or 0) / 1e6:>7.1f}{r['reference_tokens'] or 0:>11,}"
              f"{r['reference_val_ppl'] or 0:>9.1f}{r['seconds']:>7.0f}")
        print("  boilerplate by D_ref: " + ", ".join(f"{k} {v['kept']:.0%} of {v['instances']}"
                                                     for k, v in sorted(r["boilerplate_by_d_ref"].items())))
    met = {r["setting"]: {c: (r["kept"].get(c, 0) <= t if op == "<=" else r["kept"].get(c, 0) >= t)
                          for c, (op, t) in TARGETS.items()} for r in results}
    print("targets (noise <= 5%, boilerplate <= 25%, prose >= 55%) met: " + json.dumps(met))
    Path(args.out).write_text(json.dumps({"machine": {"cpu": platform.processor() or platform.machine(),
                                                      "cores": os.cpu_count()},
                                          "corpus_chars": chars, "instances": args.instances,
                                          "ref_fraction": args.fraction, "results": results, "targets_met": met},
                                         indent=1) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
