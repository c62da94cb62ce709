"""Build a markdown report with plots from training run folders (``make report``).

Run::

    python -m distill.report runs/kd_compare --name kd_compare      # -> reports/kd_compare.md + PNGs
    make report RUNS=runs/sweeps/lm_baseline NAME=lr_sweep

Every folder below the given ones that holds a finished run (``summary.json`` + ``run.json`` +
``metrics.jsonl``) is one row; runs that share a ``run_name`` and differ only in ``seed`` are grouped, with
the mean and the spread (min..max) over seeds. Benchmark columns come from each run's latest checkpoint's
``eval.json`` (``make eval``), when present. Figures: held-out val loss against tokens per run, and the
benchmark table as bars. Nothing is recomputed here: the report only reads what the runs wrote.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from statistics import mean

from refine.errors import InputError, exit_on_input_error
from refine.paths import REPO


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


def read_run(folder: Path) -> dict:
    run = json.loads((folder / "run.json").read_text())
    summary = json.loads((folder / "summary.json").read_text())
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    val = [r for r in records if r["split"] == "val"]
    cfg = run["config"]
    ckpt = Path(summary.get("checkpoint", ""))
    ev = json.loads((ckpt / "eval.json").read_text()) if (ckpt / "eval.json").is_file() else {}
    return {"folder": str(folder), "name": cfg["run_name"], "seed": cfg["seed"], "tokens": summary["tokens"],
            "val_loss": summary["val_loss"], "kl_teacher": val[-1].get("kl_teacher") if val else None,
            "curve": [(r["tokens"], r["loss"]) for r in val], "kd": cfg["kd"]["signal"],
            "train": cfg["data"]["train"], "params": run.get("parameters"),
            "tasks": {t: m.get("acc_norm", m.get("acc")) for t, m in ev.get("tasks", {}).items()}}


def group(runs: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        groups[r["name"]].append(r)
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
    fig.tight_layout()
    files.append(f"{name}_val_loss.png")
    fig.savefig(out_dir / files[-1], dpi=110)
    plt.close(fig)
    if tasks:
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tasks)), 4))
        width = 0.8 / len(groups)
        for j, (g, runs) in enumerate(groups.items()):
            ys = [mean([r["tasks"][t] for r in runs if t in r["tasks"]] or [0]) for t in tasks]
            ax.bar([i + j * width for i in range(len(tasks))], ys, width, label=g)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], [t.removeprefix("rd_") for t in tasks])
        ax.set_ylabel("accuracy (acc_norm where defined)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        files.append(f"{name}_benchmarks.png")
        fig.savefig(out_dir / files[-1], dpi=110)
        plt.close(fig)
    return files


def build(roots: list[Path], name: str, out_dir: Path) -> Path:
    runs = [read_run(f) for f in find_runs(roots)]
    groups = group(runs)
    tasks = sorted({t for r in runs for t in r["tasks"]})
    out_dir.mkdir(parents=True, exist_ok=True)
    files = _plots(groups, tasks, out_dir, name)
    head = ["run", "seeds", "tokens", "data", "KD", "val loss", "KL(T‖S)"] + [t.removeprefix("rd_") for t in tasks]
    lines = [f"# Report: {name}", "",
             f"{len(runs)} runs in {len(groups)} groups from {', '.join(str(r) for r in roots)}. Values are the mean "
             f"over seeds (min..max in brackets when there are several). Val loss: held-out next-token loss on the "
             f"val split at the end of training; benchmarks: lm-eval accuracy (acc_norm where defined).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g, rs in groups.items():
        row = [g, ",".join(str(r["seed"]) for r in rs), f"{rs[0]['tokens']:,}", Path(rs[0]["train"]).name, rs[0]["kd"],
               _fmt([r["val_loss"] for r in rs]), _fmt([r["kl_teacher"] for r in rs], 3)]
        row += [_fmt([r["tasks"].get(t) for r in rs], 3) for t in tasks]
        lines.append("| " + " | ".join(row) + " |")
    lines += [""] + [f"![{f}]({f})" for f in files]
    path = out_dir / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    (out_dir / f"{name}.json").write_text(json.dumps({"runs": runs}, indent=1))
    return path


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="folders holding run folders (searched recursively)")
    ap.add_argument("--name", default=None, help="report name (default: the first folder's name)")
    ap.add_argument("--out", default=str(REPO / "reports"))
    a = ap.parse_args(argv)
    roots = [Path(r) for r in a.runs]
    path = build(roots, a.name or roots[0].name, Path(a.out))
    print(path.read_text())
    print(f"-> {path}")


if __name__ == "__main__":
    main()
