"""The refine report: what was kept, from where, how the scores look, what the logits cost."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np

from refine.core.instances import Instances
from refine.core.logits import LogitsStore
from refine.core.write import atomic_path, write_text_atomic
from refine.diagnostics import reference_lines, score_ranks, warnings

# Corpus text is data, not markup: every character that could start HTML, a link, a (remote) image, emphasis
# or a table cell is backslash-escaped, which CommonMark renders as the character itself.
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()!|<>&~#])")


def md_text(s: str) -> str:
    """``s`` as inert markdown text on one line."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(s).split()))


def md_code(s: str) -> str:
    """``s`` as a code span (literal in markdown: no HTML, no links) that no backtick in it can close."""
    return "`" + " ".join(str(s).replace("`", "'").split()) + "`"


def _score_unit(normalize: str) -> str:
    """What a difference score measures under ``select.normalize``."""
    return "bits/byte of the same text" if normalize == "bytes" else "nats/token"


def _histogram(scores: np.ndarray, kept: np.ndarray, path: Path, unit: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mask = np.zeros(len(scores), bool)
    mask[kept] = True
    bins = np.histogram_bin_edges(scores, bins=60)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(scores[~mask], bins=bins, alpha=0.7, label=f"dropped ({(~mask).sum():,})")
    ax.hist(scores[mask], bins=bins, alpha=0.7, label=f"kept ({mask.sum():,})")
    ax.set_xlabel(f"difference score = NLL_ref - NLL_teacher ({unit})")
    ax.set_ylabel("instances")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:           # (same name: savefig takes the format from its suffix)
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def write_report(out: Path, inst: Instances, refined: Instances, scores: np.ndarray, kept: np.ndarray, tok,
                 stores: dict[str, LogitsStore], tpass: dict, rpass: dict, examples: int, normalize: str,
                 nlls: tuple[np.ndarray, np.ndarray], ref_model: dict, diversity: dict | None) -> dict:
    """``stores``: the kept instances' logits stores by folder name (``logits``, ``logits_rs``); ``normalize``:
    the scores' unit (``select.normalize``); ``nlls``: the teacher's and the reference's per instance;
    ``ref_model``: which reference (``refine.outputs.Scored.ref_model``); ``diversity``: kept against random
    (``refine.dedup.diversity``), or None. Returns the report's figures, ``warnings`` among them
    (``refine.diagnostics``)."""
    unit = _score_unit(normalize)
    per_source = _per_source(out, inst, kept)
    _histogram(scores, kept, out / "score_hist.png", unit)
    figures = _figures(out, inst, refined, scores, kept, stores, tpass, rpass, nlls, ref_model, diversity,
                       per_source)
    names = md_text(inst.tokenizer.name), md_text(figures["reference_tokenizer"])    # the teacher's, the reference's
    lines = [
        f"# Refine report: {out.name}", "",
        f"Scored **{len(inst):,}** instances of {inst.seq_len} tokens; kept **{len(refined):,}** "
        f"({len(refined) / len(inst):.0%}) by difference score (NLL_ref − NLL_teacher, {unit}).", "",
        "| figure | value |", "|---|---|",
        f"| teacher throughput | {tpass['tok_s']:,.0f} tok/s |",
        f"| reference throughput | {rpass['tok_s']:,.0f} tok/s |",
        *_nll_lines(figures, names),
        f"| reference tokenizer | {names[1]}"
        f"{' (another: rows re-tokenized, scored per byte)' if rpass.get('retokenized') else ''} |",
        f"| mean score / lowest kept | {figures['score_mean']:+.3f} / {figures['score_kept_min']:+.3f} |",
        f"| Spearman of the score with NLL_ref / NLL_teacher | {figures['spearman_score_ref_nll']:+.2f} / "
        f"{figures['spearman_score_teacher_nll']:+.2f} |",
        *reference_lines(ref_model, figures, names),
        *_store_lines(stores, figures),
        *_tail_lines(per_source, diversity, figures["warnings"]),
    ]
    order = np.argsort(-scores, kind="stable")

    def quote(i: int) -> str:
        text = tok.decode(np.asarray(inst.tokens[i]).tolist()).replace("\n", " ")
        return f"- **{scores[i]:+.3f}** {md_code(', '.join(inst.doc_ids(i))[:80])}: {md_text(text[:400])}…"

    lines += ["", "## Highest-scored instances (kept)", "", *[quote(int(i)) for i in order[:examples]]]
    lines += ["", "## Lowest-scored instances (dropped)", "", *[quote(int(i)) for i in order[::-1][:examples]]]
    write_text_atomic(out / "report.md", "\n".join(lines) + "\n")
    return figures


def _per_source(out: Path, inst: Instances, kept: np.ndarray) -> dict[str, Counter]:
    """Instances scored and kept per corpus source (of the packed stream at the end of the subset chain)."""
    root, root_rows = inst.root_rows(within=out)
    per_source: dict[str, Counter] = {}
    kept_set = set(kept.tolist())
    for i in range(len(inst)):
        c = per_source.setdefault(root.source_of(int(root_rows[i])), Counter())
        c["total"] += 1
        c["kept"] += i in kept_set
    return per_source


def _figures(out: Path, inst: Instances, refined: Instances, scores: np.ndarray, kept: np.ndarray,
             stores: dict[str, LogitsStore], tpass: dict, rpass: dict, nlls: tuple[np.ndarray, np.ndarray],
             ref_model: dict, diversity: dict | None, per_source: dict[str, Counter]) -> dict:
    """The report's figures (the manifest's ``report``), its warnings among them."""
    figures = {
        "instances_scored": len(inst), "instances_kept": len(refined), "seq_len": inst.seq_len,
        "teacher_tok_s": tpass["tok_s"], "reference_tok_s": rpass["tok_s"],
        "teacher_mean_nll": tpass["mean_nll"], "reference_mean_nll": rpass["mean_nll"],
        # a reference of another tokenizer scored the teacher's rows re-tokenized (refine.cross_reference)
        "reference_tokenizer": rpass.get("tokenizer", {}).get("name") or f"the teacher's ({inst.tokenizer.name})",
        "score_mean": float(scores.mean()), "score_kept_min": float(scores[kept].min()),
        "kept_fraction_by_source": {s: c["kept"] / c["total"] for s, c in sorted(per_source.items())},
        "instances_by_source": {s: c["total"] for s, c in sorted(per_source.items())},
        **score_ranks(scores, *nlls), "reference_kind": ref_model.get("kind", "unknown"),
        **({"diversity": diversity} if diversity else {}),
    }
    if rpass.get("retokenized"):    # per-token NLLs of two vocabularies do not compare: the score's bits per byte do
        from refine.cross_reference import FOLDER, cross_bits_per_byte

        t_bpb, r_bpb = cross_bits_per_byte(inst, Instances(out / FOLDER), *nlls)
        figures["teacher_bits_per_byte"], figures["reference_bits_per_byte"] = float(t_bpb.mean()), float(r_bpb.mean())
    figures["warnings"] = warnings(figures)
    for name, store in stores.items():
        for k, v in store.stats().items():
            figures[f"{name}_{k}"] = v
    return figures


def _nll_lines(figures: dict, names: tuple[str, str]) -> list[str]:
    """The two passes' mean NLLs: side by side per token when they share a vocabulary, else side by side per
    byte (the score's terms: their means' difference is the mean score) and per token each on its own row.
    ``names``: the teacher's and the reference's tokenizers, as markdown text."""
    t, r = figures["teacher_mean_nll"], figures["reference_mean_nll"]
    if "reference_bits_per_byte" not in figures:
        return [f"| mean NLL teacher / reference | {t:.3f} / {r:.3f} nats/token |"]
    return [f"| mean bits/byte teacher / reference (the same text) | {figures['teacher_bits_per_byte']:.3f} / "
            f"{figures['reference_bits_per_byte']:.3f} |",
            f"| teacher mean NLL (per teacher token, {names[0]}) | {t:.3f} nats/token |",
            f"| reference mean NLL (per reference token, {names[1]}) | {r:.3f} nats/token |"]


def _store_lines(stores: dict[str, LogitsStore], figures: dict) -> list[str]:
    lines = []
    for name, store in stores.items():
        h = store.header
        what = f"top-{h.top_p}-{h.top_k}" if h.kind == "top_p_k" else \
            f"RS-KD {h.samples} draws, t={h.sample_temperature}"
        lines += [f"| `{name}/` ({what}) bytes/token | {figures[f'{name}_bytes_per_token']:.1f} |",
                  f"| `{name}/` ids per position | {figures[f'{name}_ids_per_position']:.1f} |",
                  f"| `{name}/` mean kept probability mass | {figures[f'{name}_mean_kept_mass']:.3f} |"]
    return lines


def _tail_lines(per_source: dict[str, Counter], diversity: dict | None, warned: list[str]) -> list[str]:
    """Kept per source, diversity, warnings and the histogram, after the figures table."""
    lines = ["", "| source | instances | kept |", "|---|---|---|"]
    lines += [f"| {md_text(s)} | {c['total']:,} | {c['kept'] / c['total']:.0%} |"
              for s, c in sorted(per_source.items())]
    if diversity:
        lines += ["", "## Diversity (mean pairwise cosine distance of reference-model embeddings)", "",
                  f"scored {diversity['scored']:.4f} · refined {diversity['refined']:.4f} · random, same size "
                  f"{diversity['random_same_size']:.4f}"]
    if warned:
        lines += ["", "## Warnings", "", *[f"- {md_text(w)}" for w in warned]]
    return lines + ["", "![score histogram](score_hist.png)"]
