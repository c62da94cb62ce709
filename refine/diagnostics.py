"""Whether a selection did what difference sampling is for, in figures a user can read in the report.

MiniPLM's score ``NLL_ref - NLL_teacher`` is meant to rank what the teacher knows and the reference does not. When
the reference is weak, one NLL ranks alone: the reference's (the selection keeps what a small model finds hard:
rare domains, boilerplate it never saw) or, when the reference finds everything about equally hard, the teacher's
(it keeps what the teacher finds easy: boilerplate again), not what only the teacher knows. The rank correlation of the
score with each NLL says which one ranks the instances; the kept set's diversity against a random set's says
whether the selection narrowed the corpus. Either failing is a warning line on the terminal and in the report.
"""

from __future__ import annotations

import math

import numpy as np

REFERENCE_DOMINATES = 0.9          # |Spearman| of the score with one NLL at or above which the selection is suspect


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation (ties get their mean rank); NaN for fewer than 3 values or a constant one."""
    from scipy.stats import rankdata

    if len(a) < 3:
        return float("nan")
    ra, rb = rankdata(a), rankdata(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def score_ranks(scores: np.ndarray, teacher_nll: np.ndarray, ref_nll: np.ndarray) -> dict:
    return {"spearman_score_ref_nll": spearman(scores, ref_nll),
            "spearman_score_teacher_nll": spearman(scores, teacher_nll)}


def warnings(figures: dict) -> list[str]:
    """Plain lines for what says the selection cannot be trusted (``figures``: the report's)."""
    out = []
    rho_ref, rho_t = figures.get("spearman_score_ref_nll"), figures.get("spearman_score_teacher_nll")
    if rho_ref is not None and not math.isnan(rho_ref) and rho_ref >= REFERENCE_DOMINATES:
        out.append(f"the selection is ranked almost entirely by the reference's NLL (Spearman {rho_ref:.2f} with "
                   f"NLL_ref, {rho_t:.2f} with NLL_teacher): it keeps what the reference does not know rather than "
                   f"what the teacher knows; train a stronger reference (ref_split.sizing=auto, more "
                   f"ref_split.min_train_tokens) or give a pretrained small sibling of the teacher (reference.path=)")
    if rho_t is not None and not math.isnan(rho_t) and rho_t <= -REFERENCE_DOMINATES:
        out.append(f"the selection is ranked almost entirely by the teacher's NLL (Spearman {rho_t:.2f} with "
                   f"NLL_teacher, {rho_ref:.2f} with NLL_ref): the reference adds little, so it keeps what the "
                   f"teacher finds easy (boilerplate, repeated text) rather than what only the teacher knows; train "
                   f"a stronger reference (ref_split.sizing=auto, more ref_split.min_train_tokens) or give a "
                   f"pretrained small sibling of the teacher (reference.path=)")
    d = figures.get("diversity") or {}
    if d and d["refined"] < d["random_same_size"]:
        out.append(f"the kept set is less diverse than a random set of its size ({d['refined']:.4f} against "
                   f"{d['random_same_size']:.4f}, reference-embedding distance): the selection narrowed the corpus")
    return out


def reference_lines(ref_model: dict, figures: dict, tokenizers: tuple[str, str]) -> list[str]:
    """Markdown table rows about the reference: which kind, its size and training, its perplexity (next to the
    teacher's when they share a vocabulary; on rows of their own, each per its own token, when not).
    ``tokenizers``: the teacher's and the reference's names, as markdown text."""
    rows = [f"| reference | {ref_model.get('kind', 'unknown')} |"]
    p = ref_model.get("plan")
    if p:
        s = p["shape"]
        rows.append(f"| reference size | {s['arch']}, {p['params'] / 1e6:.1f}M parameters ({s['layers']} layers x "
                    f"{s['hidden']}), 1/{p['teacher_params'] / p['params']:.0f} of the teacher |")
        rows.append(f"| reference budget | {p['train_tokens']:,} tokens ({p['max_steps']:,} steps of "
                    f"{p['batch_size']} x {p['seq_len']}) on D_ref's {p['d_ref_tokens']:,} |")
    t = ref_model.get("training")
    if t and t.get("val_loss") is not None:
        stop = (f", stopped early (best at step {t['best_step']:,}: {math.exp(t['best_val_loss']):.1f})"
                if t.get("stopped_early") else "")
        secs = f", {t['seconds_this_session']:.0f} s" if t.get("seconds_this_session") else ""
        rows.append(f"| reference training | {t['steps']:,} steps, {t['tokens']:,} tokens{secs}; D_ref-validation "
                    f"perplexity {t['val_ppl']:.1f}{stop} |")
    ppl_t, ppl_r = math.exp(figures["teacher_mean_nll"]), math.exp(figures["reference_mean_nll"])
    if "reference_bits_per_byte" not in figures:       # one vocabulary (refine.report._figures)
        return rows + [f"| perplexity teacher / reference (scored text, per own token) | {ppl_t:.1f} / {ppl_r:.1f} |"]
    # two vocabularies: a perplexity is per token of its own tokenizer, so the two do not compare
    return rows + [f"| teacher perplexity (per teacher token, {tokenizers[0]}) | {ppl_t:.1f} |",
                   f"| reference perplexity (per reference token, {tokenizers[1]}) | {ppl_r:.1f} |"]
