"""Build a markdown report with plots from training run folders (``make report``).

Run::

    python -m distill.report runs/kd_compare --name kd_compare      # -> reports/kd_compare.md + PNGs
    make report RUNS=runs/sweeps/lm_baseline NAME=lr_sweep

Every folder below the given ones that holds a finished run (``summary.json`` + ``run.json`` +
``metrics.jsonl``) is one run; runs that differ only in ``seed`` are one row, with the mean and the spread
(min..max) over seeds. For a Hydra sweep run the row is the run name plus the overrides it was launched with
(``.hydra/overrides.yaml``), except the seed and the sweep-wide ones (e.g. ``kd_offline kd.alpha.peak=0.5``).
Benchmark and bits-per-byte columns come from each run's final checkpoint's ``eval.json`` (``make eval``, or
``eval.tasks`` in the run), when present.
Figures: held-out val loss against tokens per run; the benchmark table as bars; storage vs quality when runs
read offline stores of different sizes (bytes/token of the store against val loss, e.g. over (p, k)); with
``--refined``, the refine stage's difference-score histogram. Nothing is recomputed: the report only reads
what the runs and the refine stage wrote.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections import defaultdict
from pathlib import Path
from statistics import mean

from refine.core.errors import InputError, exit_on_input_error
from refine.core.paths import REPO
from refine.core.write import atomic_path, write_text_atomic


def find_runs(roots: list[Path]) -> list[Path]:
    found = []
    for root in roots:
        if not root.exists():
            raise InputError(f"no such runs folder: {root}")
        found += [p.parent for p in root.rglob("summary.json")
                  if (p.parent / "run.json").is_file() and (p.parent / "metrics.jsonl").is_file()]
    if not found:
        where = ", ".join(map(str, roots))
        raise InputError(f"no finished runs (summary.json + run.json + metrics.jsonl) under {where}")
    return sorted(set(found))


def _overrides(folder: Path) -> list[str]:
    """The Hydra sweep overrides a run was launched with (Hydra's ``.hydra/overrides.yaml``) other than the seed
    and the keys that only name or size the sweep (the config's ``override_dirname.exclude_keys``). Paths are shown
    by their last component."""
    from omegaconf import OmegaConf

    overrides, hydra_cfg = folder / ".hydra" / "overrides.yaml", folder / ".hydra" / "hydra.yaml"
    if not overrides.is_file():
        return []
    skip = {"seed", "+experiment", "run_name"}
    if hydra_cfg.is_file():
        skip |= set(OmegaConf.select(OmegaConf.load(hydra_cfg), "hydra.job.config.override_dirname.exclude_keys")
                    or [])
    extra = []
    for item in OmegaConf.to_container(OmegaConf.load(overrides)):
        key, _, value = str(item).partition("=")
        if key not in skip and not key.startswith("hydra"):
            extra.append(f"{key}={Path(value).name if '/' in value else value}")
    return extra


def label_runs(runs: list[dict]) -> None:
    """Each run's row: its run name plus its overrides, less those every run of the report shares (they say
    nothing about how the rows differ)."""
    shared = set.intersection(*(set(r["overrides"]) for r in runs)) if len(runs) > 1 else set()
    for r in runs:
        r["label"] = " ".join([r["name"], *(o for o in r["overrides"] if o not in shared)])


def _store_bytes(kd: dict) -> float | None:
    """Bytes/token of an offline run's logits store, when it is still on disk."""
    from refine.core.logits import LogitsStore

    path = Path(kd.get("logits") or "")
    if kd.get("signal") != "offline" or not (path / "store.json").is_file():
        return None
    return LogitsStore(path).bytes_per_token()


def read_run(folder: Path) -> dict:
    run = json.loads((folder / "run.json").read_text())
    summary = json.loads((folder / "summary.json").read_text())
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    val = [r for r in records if r["split"] == "val"]
    cfg = run["config"]
    ckpt = Path(summary.get("checkpoint", ""))
    ev = json.loads((ckpt / "eval.json").read_text()) if (ckpt / "eval.json").is_file() else {}
    return {"folder": str(folder), "name": cfg["run_name"], "overrides": _overrides(folder),
            "seed": cfg["seed"], "tokens": summary["tokens"], "val_loss": summary["val_loss"],
            "val_bpb": ev.get("val_bpb"),
            "val_bpb_by_source": {k: v["bpb"] for k, v in ev.get("val_by_source", {}).items()},
            "kl_teacher": val[-1].get("kl_teacher") if val else None,
            "curve": [(r["tokens"], r["loss"]) for r in val], "kd": cfg["kd"]["signal"],
            "store_bytes_per_token": _store_bytes(cfg["kd"]), "student": cfg.get("model", {}).get("name", "?"),
            "train": cfg["data"]["train"], "params": run.get("parameters"),
            "tasks": {t: m.get("acc_norm", m.get("acc")) for t, m in ev.get("tasks", {}).items()}}


def group(runs: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        groups[r["label"]].append(r)
    return dict(groups)


def _fmt(values: list[float | None], digits: int = 4) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{mean(vals):.{digits}f} ({min(vals):.{digits}f}..{max(vals):.{digits}f})"


def _plots(groups: dict[str, list[dict]], tasks: list[str], out_dir: Path, name: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for g, runs in groups.items():
        for i, r in enumerate(runs):
            xs, ys = zip(*r["curve"]) if r["curve"] else ((), ())
            ax.plot(xs, ys, marker="o", ms=3, label=g if i == 0 else None, color=f"C{list(groups).index(g) % 10}")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out val LM loss (nats/token)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    files.append(_save(fig, out_dir / f"{name}_val_loss.png"))
    if tasks:
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tasks)), 4))
        width = 0.8 / len(groups)
        for j, (g, runs) in enumerate(groups.items()):
            ys = [mean([r["tasks"][t] for r in runs if t in r["tasks"]] or [0]) for t in tasks]
            ax.bar([i + j * width for i in range(len(tasks))], ys, width, label=g)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], [t.removeprefix("rd_") for t in tasks])
        ax.set_ylabel("accuracy (acc_norm where defined)")
        ax.legend(fontsize=8)
        files.append(_save(fig, out_dir / f"{name}_benchmarks.png"))
    stores = {g: rs for g, rs in groups.items() if rs[0]["store_bytes_per_token"] is not None}
    if len({rs[0]["store_bytes_per_token"] for rs in stores.values()}) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        for g, rs in stores.items():
            x, y = rs[0]["store_bytes_per_token"], mean(r["val_loss"] for r in rs)
            ax.scatter([x], [y])
            ax.annotate(g, (x, y), fontsize=7, xytext=(4, 2), textcoords="offset points")
        ax.set_xlabel("teacher logits store (bytes/token)")
        ax.set_ylabel("student val LM loss (nats/token)")
        ax.grid(alpha=0.3)
        files.append(_save(fig, out_dir / f"{name}_storage_vs_loss.png"))
    return files


def _score_histogram(refined: Path, out_dir: Path, name: str) -> str:
    """The refine stage's own difference-score histogram (kept vs dropped), copied beside the report."""
    src = refined / "score_hist.png"
    if not src.is_file():
        raise InputError(f"no score histogram at {src} (run `make refine`)")
    with atomic_path(out_dir / f"{name}_scores.png") as tmp:
        shutil.copyfile(src, tmp)
    return f"{name}_scores.png"


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:                     # (same name: savefig takes the format from its suffix)
        fig.savefig(tmp, dpi=110, bbox_inches="tight")   # labels and annotations kept inside the image
    plt.close(fig)
    return path.name


def compare(groups: dict[str, list[dict]], baseline: str) -> list[dict]:
    """Every other group against the ``baseline`` group (its label, or a run name only it has): did it beat it,
    by how much, on the val loss and, where every run was evaluated, the whole val split's bits per byte."""
    base_key = baseline if baseline in groups else next(
        (g for g, rs in groups.items() if rs[0]["name"] == baseline), None)
    if base_key is None:
        raise InputError(f"no baseline run {baseline!r} among: {', '.join(groups)}")
    out = []
    for g, rs in groups.items():
        if g == base_key:
            continue
        row = {"run": g, "baseline": base_key}
        for key in ("val_loss", "val_bpb"):
            ours, theirs = [r[key] for r in rs], [r[key] for r in groups[base_key]]
            if None not in ours + theirs:
                row[key] = {"run": mean(ours), "baseline": mean(theirs), "delta": mean(ours) - mean(theirs)}
        lower = [row[k]["delta"] < 0 for k in ("val_loss", "val_bpb") if k in row]
        # True / False when every measure agrees; None when they disagree (or nothing to compare)
        row["beat_baseline"] = True if lower and all(lower) else False if lower and not any(lower) else None
        row["seeds"] = (len(rs), len(groups[base_key]))
        out.append(row)
    return out


def _comparison_lines(rows: list[dict]) -> list[str]:
    lines = []
    for c in rows:
        verdict = {True: "**yes**", False: "**no**", None: "**mixed**"}[c["beat_baseline"]]
        parts = [f"{k.replace('val_', 'val ').replace('bpb', 'bits/byte')} {v['run']:.4f} vs {v['baseline']:.4f} "
                 f"({v['delta']:+.4f})" for k, v in c.items() if k in ("val_loss", "val_bpb")]
        seeds = c["seeds"]
        noise = (" One seed each: at this scale seeds differ by a few hundredths of a nat "
                 "(bench/results/kd_compare_cpu.json), so a smaller gap is not a finding." if max(seeds) == 1 else "")
        lines.append(f"- Did `{c['run']}` beat `{c['baseline']}` here? {verdict}: {'; '.join(parts)}.{noise}")
    return lines


def build(roots: list[Path], name: str, out_dir: Path, refined: Path | None = None,
          notes: Path | None = None, baseline: str | None = None) -> Path:
    runs = [read_run(f) for f in find_runs(roots)]
    label_runs(runs)
    groups = group(runs)
    tasks = sorted({t for r in runs for t in r["tasks"]})
    out_dir.mkdir(parents=True, exist_ok=True)
    files = _plots(groups, tasks, out_dir, name)
    if refined is not None:
        files.append(_score_histogram(refined, out_dir, name))
    sources = sorted({k for r in runs for k in r["val_bpb_by_source"]} - {"all", "mixed"})
    head = (["run", "student", "seeds", "tokens", "data", "KD", "val loss", "val bits/byte"]
            + [f"{s} bits/byte" for s in sources] + ["KL(T‖S)"] + [t.removeprefix("rd_") for t in tasks])
    lines = [f"# Report: {name}", "",
             f"{len(runs)} runs in {len(groups)} groups from {', '.join(str(r) for r in roots)}. Values are the mean "
             f"over seeds (min..max in brackets when there are several). Val loss: the trainer's held-out "
             f"next-token loss (nats/token, its fixed val batches) at the end of training, the last point of the "
             f"curves; val bits/byte: the whole val split scored by `distill.evaluate`, comparable across "
             f"tokenizers, overall and per corpus source; KL(T‖S): teacher-to-student KL on val batches (KD "
             f"runs); benchmarks: lm-eval accuracy (acc_norm where defined) on the items in each run's eval.json.",
             "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g, rs in groups.items():
        row = [g, rs[0]["student"], ",".join(str(r["seed"]) for r in rs), f"{rs[0]['tokens']:,}",
               Path(rs[0]["train"]).name, rs[0]["kd"], _fmt([r["val_loss"] for r in rs]),
               _fmt([r["val_bpb"] for r in rs])]
        row += [_fmt([r["val_bpb_by_source"].get(src) for r in rs]) for src in sources]
        row += [_fmt([r["kl_teacher"] for r in rs], 3)]
        row += [_fmt([r["tasks"].get(t) for r in rs], 3) for t in tasks]
        lines.append("| " + " | ".join(row) + " |")
    comparison = compare(groups, baseline) if baseline else []
    if comparison:
        lines += ["", *_comparison_lines(comparison)]
    if notes is not None:
        if not notes.is_file():
            raise InputError(f"no notes file at {notes}")
        lines += ["", notes.read_text().strip()]
    lines += [""] + [f"![{f}]({f})" for f in files]
    path = out_dir / f"{name}.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    write_text_atomic(out_dir / f"{name}.json", json.dumps({"runs": runs, "comparison": comparison}, indent=1))
    return path


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="folders holding run folders (searched recursively)")
    ap.add_argument("--name", default=None, help="report name (default: the first folder's name)")
    ap.add_argument("--out", default=str(REPO / "reports"))
    ap.add_argument("--refined", default=None, help="a refine output folder: add its score histogram")
    ap.add_argument("--notes", default=None, help="a markdown file placed after the table (findings)")
    ap.add_argument("--baseline", default=None,
                    help="a run name or row label: say for every other row whether it beat it (val loss, bits/byte)")
    a = ap.parse_args(argv)
    roots = [Path(r) for r in a.runs]
    path = build(roots, a.name or roots[0].name, Path(a.out), a.refined and Path(a.refined),
                 a.notes and Path(a.notes), a.baseline)
    print(path.read_text())
    print(f"-> {path}")


if __name__ == "__main__":
    main()
