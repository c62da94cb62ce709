"""What the cross-tokenizer alignment keeps (distill.token_alignment), over a whole stored logits store.

    python bench/xtok_stats.py [--refined .cache/refined/default] [--student .cache/models/gpt2-tokenizer] \
        [--teacher .cache/models/smollm2-135m] [--seq-len 288]

Every row of ``<refined>/instances_scored`` (what ``teacher/logits`` was scored on) is re-tokenized with the
student tokenizer and aligned with its teacher row; printed: the student row lengths (and what a ``seq_len`` cut
drops), the positions that pair (of the student's and of the teacher's predicting positions), the vocabulary share
the exact token map maps, and the alignment's cost per row; then per target rule (``kd.xtok_targets``: exact,
first_token, skip) the teacher mass its targets keep (of the stored mass at the paired positions), the share of
paired positions with a target, and the mean target probability (renormalised) on the student's true next token,
over all those positions and over those where the teacher's next token is longer than the student's. Writes
``bench/results/xtok_stats.json`` (``--out``: another name, or a path).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    cache = Path(os.environ.get("RD_CACHE", REPO / ".cache"))
    ap = argparse.ArgumentParser()
    ap.add_argument("--refined", default=str(cache / "refined" / "default"))
    ap.add_argument("--teacher", default=str(cache / "models" / "smollm2-135m"))
    ap.add_argument("--student", default=str(cache / "models" / "gpt2-tokenizer"))
    ap.add_argument("--seq-len", type=int, default=288)
    ap.add_argument("--out", default="xtok_stats.json", help="file name under bench/results/")
    a = ap.parse_args()

    from distill.data import RetokenizedInstances
    from distill.token_alignment import TARGETS, stats
    from refine.core.instances import Instances
    from refine.core.logits import LogitsStore
    from refine.core.tokenizer import load_tokenizer

    refined = Path(a.refined)
    inst, store = Instances(refined / "instances_scored"), LogitsStore(refined / "teacher" / "logits")
    store.check_aligned(inst)
    data = RetokenizedInstances(inst, load_tokenizer(a.teacher), load_tokenizer(a.student), 1 << 20)
    cross = data.cross
    t0 = time.perf_counter()
    _ = cross.first_map                      # built once, on a run's first signal: what that costs
    first_map_s = time.perf_counter() - t0
    lengths, pairs, t_pos, s_pos = [], 0, 0, 0
    sums = {rule: {} for rule in TARGETS}
    align_s = map_s = 0.0
    for start in range(0, len(inst), 64):
        rows = np.arange(start, min(start + 64, len(inst)))
        t1 = time.perf_counter()
        aligned = data.alignments(rows)
        align_s += time.perf_counter() - t1
        signal = store.padded(rows)
        for al in aligned:
            lengths.append(len(al.ids))
            pairs += len(al.student)
            s_pos += len(al.ids) - 1
            t_pos += inst.seq_len - 1
        for rule in TARGETS:
            t1 = time.perf_counter()
            *_, got = cross.target_sums(aligned, *signal, targets=rule, width=max(len(al.ids) for al in aligned))
            map_s += time.perf_counter() - t1
            for key, v in got.items():
                sums[rule][key] = sums[rule].get(key, 0.0) + v
    lengths = np.asarray(lengths)
    per_rule = {}
    for rule, got in sums.items():
        st = stats(got)
        per_rule[rule] = {"mass_kept_of_stored": st["xtok_mass_kept"], "pos_covered_of_aligned": st["xtok_pos_covered"],
                          "true_prob": st["xtok_true_prob"],
                          "true_prob_where_teacher_longer":       # none where no such position has a target
                              got["true_prob_longer"] / got["longer_covered"] if got["longer_covered"] else None}
    longer = sums["exact"]["longer"] / max(pairs, 1)
    cut = np.maximum(lengths - a.seq_len, 0)
    res = {
        "rows": int(len(inst)), "teacher_tokens_per_row": int(inst.seq_len),
        "student_tokens_per_row": {"mean": float(lengths.mean()), "p99": float(np.percentile(lengths, 99)),
                                   "max": int(lengths.max())},
        "seq_len": a.seq_len, "rows_cut": int((cut > 0).sum()), "student_tokens_cut": int(cut.sum()),
        "pos_aligned_of_student": pairs / s_pos, "pos_aligned_of_teacher": pairs / t_pos,
        "stored_mass_at_aligned": sums["exact"]["mass_stored"] / pairs,
        "mass_kept_of_stored": per_rule["exact"]["mass_kept_of_stored"],
        "teacher_vocab_mapped": float((cross.id_map >= 0).mean()), "teacher_longer_of_aligned": longer,
        "rules": per_rule, "first_map_s": first_map_s,
        "map_ms_per_row_per_rule": 1000 * map_s / len(TARGETS) / len(inst),
        "align_ms_per_row": 1000 * align_s / len(inst), "seconds": time.perf_counter() - t0,
        "teacher": Path(a.teacher).name, "student": Path(a.student).name, "store": str(store.folder),
    }
    from bench.refine_bench import machine

    res["machine"] = machine()
    print(f"{res['teacher']} -> {res['student']}, {res['rows']} rows of {inst.seq_len} teacher tokens "
          f"({store.folder})")
    print("| student tokens/row: mean / p99 / max | rows cut at seq_len | positions aligned: of student / of "
          "teacher | stored mass at aligned | mass kept (exact map) | teacher vocab mapped | align ms/row |")
    print("|---|---|---|---|---|---|---|")
    st = res["student_tokens_per_row"]
    print(f"| {st['mean']:.1f} / {st['p99']:.0f} / {st['max']} | {res['rows_cut']} at {a.seq_len} "
          f"({res['student_tokens_cut']} tokens) | {res['pos_aligned_of_student']:.4f} / "
          f"{res['pos_aligned_of_teacher']:.4f} | {res['stored_mass_at_aligned']:.4f} | "
          f"{res['mass_kept_of_stored']:.4f} | {res['teacher_vocab_mapped']:.4f} | {res['align_ms_per_row']:.2f} |")
    print(f"\nteacher's next token longer than the student's at {longer:.4f} of aligned positions")
    print("| rule | mass kept | aligned positions with a target | target prob. on the true next token: all / "
          "where the teacher's is longer |")
    print("|---|---|---|---|")
    for rule, r in per_rule.items():
        hard = r["true_prob_where_teacher_longer"]
        print(f"| {rule} | {r['mass_kept_of_stored']:.4f} | {r['pos_covered_of_aligned']:.4f} | {r['true_prob']:.4f} / "
              f"{'-' if hard is None else f'{hard:.4f}'} |")
    out = REPO / "bench" / "results" / a.out
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
