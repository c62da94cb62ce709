"""Evaluate a checkpoint: held-out perplexity on our ``val`` split, and lm-eval benchmarks, offline.

Run::

    make benchmarks                                              # once: benchmark data from the registry
    python -m distill.evaluate runs/lm_baseline                  # a run folder (its latest checkpoint) or HF folder
    python -m distill.evaluate CKPT --tasks rd_piqa,rd_hellaswag --limit 500
    python -m distill.evaluate CKPT --backend vllm                # lm-eval's vLLM model instead of transformers
    make eval CKPT=runs/kd_wsd [TASKS=rd_core] [LIMIT=]

The tasks are the YAMLs in ``conf/eval/tasks/`` (``rd_core`` = all of them), which read the local benchmark
data; the same folder works with the lm-eval CLI: ``lm_eval --model hf --model_args pretrained=CKPT
--include_path conf/eval/tasks --tasks rd_core``. Results are merged into ``<CKPT>/eval.json`` (and printed):
``--tasks ''`` redoes only the val numbers and keeps the benchmark results already there. The val loss is the
trainer's measure (token-weighted next-token cross entropy over packed ``seq_len`` rows) over the *whole* val
split, also per corpus source and in bits per byte.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from refine.core.errors import InputError, exit_on_input_error
from refine.core.library_noise import no_library_bars
from refine.core.paths import REPO, benchmarks_dir, cache_dir, corpus_dir, resolve_model
from refine.core.write import write_json_atomic

TASKS_DIR = REPO / "conf" / "eval" / "tasks"


def val_loss(model, tokenizer, val: str | Path, seq_len: int, batch_size: int = 4, max_batches: int = 0) -> dict:
    """Held-out LM loss of ``model`` on the corpus or packed instances at ``val`` (all rows unless capped),
    overall and per corpus source (e.g. wiki / austen: a row counts for its documents' source, "mixed" if it
    spans two), which shows what a data selection traded away.

    Also bits per byte: the summed loss over the UTF-8 bytes of the predicted tokens' text, which compares
    students with different tokenizers; the bytes are counted by ``row_text_bytes`` (its docstring: the same
    counts as refine's, and what ``val_bytes_counted`` says when a tokenizer has no byte table).
    """
    from distill.data import open_instances, val_batches
    from refine.core.forward import forward_logits
    from refine.core.tokenizer import bos_prefix

    inst = open_instances(val, tokenizer, seq_len, cache_dir(), quiet=True)
    batches = val_batches(inst, batch_size, max_batches or len(inst))
    device = next(model.parameters()).device
    nats, n_bytes = [], []                       # per row: summed loss, UTF-8 bytes of the predicted text
    count_bytes, counted_by = row_text_bytes(tokenizer)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in batches:
            # with the BOS prefix the model was trained with (distill.kd: one rule for every model pass)
            logits = forward_logits(model, batch.to(device), bos_prefix(tokenizer))[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:].to(device), reduction="none")
            nats += nll.sum(1).tolist()
            n_bytes += count_bytes(batch[:, 1:].numpy()).tolist()
    model.train(was_training)
    nats, n_bytes = np.asarray(nats), np.asarray(n_bytes)
    by_source = "subset_of" not in inst.index      # a subset's rows: one "all" (its parents may be elsewhere)
    sources = np.asarray([inst.source_of(i) if by_source else "all" for i in range(len(nats))])

    def summary(rows: np.ndarray) -> dict:
        loss, tokens = nats[rows].sum(), (seq_len - 1) * int(rows.sum())
        return {"loss": loss / tokens, "bpb": loss / math.log(2) / max(int(n_bytes[rows].sum()), 1), "tokens": tokens}

    overall = summary(np.ones(len(nats), dtype=bool))
    return {"val_loss": overall["loss"], "val_ppl": math.exp(overall["loss"]), "val_tokens": overall["tokens"],
            "val_bpb": overall["bpb"], "val_bytes_counted": counted_by,
            "val_by_source": {s: summary(sources == s) for s in sorted(set(sources))}}


def row_text_bytes(tokenizer):
    """(count, how): ``count(rows [B, L]) -> int64 [B]``, the UTF-8 bytes each row's tokens spell, by the rule
    every byte count follows (``refine.core.token_bytes.text_bytes``: EOS 0, another special token its literal
    string, the text of a document that held it), so val bits per byte and refine's ``select.normalize=bytes``
    count the same bytes. ``how`` is ``"token_bytes"`` for that exact count. A tokenizer with no byte table
    (WordPiece; SentencePiece with a dummy prefix) still gets a number rather than no evaluation, marked
    ``"decode"``: each EOS-separated segment decoded, specials kept literally. It is approximate: a decoder that
    rewrites spacing (WordPiece) miscounts, SentencePiece's drops the leading space of a segment (right at a
    document start, one byte short where a row starts mid-document), a character cut by the row's edge counts
    as U+FFFD's 3 bytes."""
    from refine.core.token_bytes import byte_lengths, row_bytes

    try:
        lengths = byte_lengths(tokenizer)
    except InputError:
        eos = int(tokenizer.eos_token_id)

        def decoded(rows: np.ndarray) -> np.ndarray:
            def one(row: list[int]) -> int:
                cuts = [-1, *(i for i, t in enumerate(row) if t == eos), len(row)]
                return sum(len(tokenizer.decode(row[a + 1:b], skip_special_tokens=False,
                                                clean_up_tokenization_spaces=False).encode("utf-8"))
                           for a, b in zip(cuts, cuts[1:]))
            return np.array([one(r) for r in np.asarray(rows).tolist()], dtype=np.int64)
        return decoded, "decode"
    return (lambda rows: row_bytes(rows, lengths)), "token_bytes"


def run_lm_eval(model, tokenizer, tasks: list[str], limit: int | None, batch_size: int = 8,
                include_path: Path = TASKS_DIR, backend: str = "hf") -> dict:
    """lm-eval on ``model``: an in-memory HF model (``backend="hf"``) or, with ``backend="vllm"``, a model folder
    that lm-eval's vLLM model serves (``distill.lm_eval_vllm``). Returns {task: {metric: value,
    metric_stderr: value, samples: n}}."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(include_path), include_defaults=False)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise InputError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(sorted(tm.all_tasks))}")
    if backend == "vllm":
        from distill.lm_eval_vllm import lm_eval_vllm
        from refine.core.engine_settings import close_llm

        lm = lm_eval_vllm(model, batch_size=batch_size)
    elif backend == "hf":
        from lm_eval.models.huggingface import HFLM

        from refine.core.tokenizer import bos_prefix

        # lm-eval adds BOS only when told: a model whose tokenizer adds one was trained with it in front
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                  add_bos_token=bos_prefix(tokenizer) is not None)
    else:
        raise InputError(f"unknown eval backend {backend!r} (hf | vllm)")
    out = simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=limit, random_seed=0, numpy_random_seed=0,
                          torch_random_seed=0, fewshot_random_seed=0, log_samples=False)
    if backend == "vllm":
        close_llm(lm.model)
    results = {}
    for task, metrics in out["results"].items():
        # lm-eval keys are "<metric>,<filter>" (e.g. "acc,none", "acc_stderr,none")
        results[task] = {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float))}
        results[task]["samples"] = out.get("n-samples", {}).get(task, {}).get("effective")
    return results


def evaluate_checkpoint(ckpt: str | Path, tasks: list[str], limit: int | None = None, val: str | None = None,
                        seq_len: int = 256, batch_size: int = 8, device: str = "cpu", backend: str = "hf") -> dict:
    from refine.core.model_folder import load_causal_lm
    from refine.core.tokenizer import load_tokenizer

    path = resolve_model(ckpt)
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path).to(device).eval()
    report = {"checkpoint": str(path), "limit": limit}
    if val != "":
        report.update(val_loss(model, tokenizer, val or corpus_dir() / "val.jsonl", seq_len))
    if tasks:
        if not benchmarks_dir().is_dir():
            raise InputError(f"no benchmark data at {benchmarks_dir()} (run `make benchmarks`)")
        if backend == "vllm":   # the engine runs slower beside a loaded transformers model: free it first
            del model
            gc.collect()
            model = path
        report["tasks"] = run_lm_eval(model, tokenizer, tasks, limit, batch_size, backend=backend)
        report["backend"] = backend
    import lm_eval

    report["lm_eval"] = lm_eval.__version__
    report["seconds"] = time.perf_counter() - t0
    # Merge with what an earlier evaluation wrote (e.g. the tasks of the run's own eval when only the val loss
    # is redone), so nothing measured is lost; what was measured now wins.
    old = json.loads((path / "eval.json").read_text()) if (path / "eval.json").is_file() else {}
    merged = {**old, **report, "tasks": {**old.get("tasks", {}), **report.get("tasks", {})}}
    if not merged["tasks"]:
        del merged["tasks"]
    write_json_atomic(path / "eval.json", merged)
    return merged


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="an HF folder or a run folder (its latest checkpoint)")
    ap.add_argument("--tasks", default="rd_core", help="comma-separated task names or tags ('' = none)")
    ap.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    ap.add_argument("--val", default=None, help="val corpus or packed instances ('' = skip; default: val split)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                    help="lm-eval model: hf (in-process transformers) or vllm (lm-eval's vLLM model)")
    a = ap.parse_args(argv)
    tasks = [t for t in a.tasks.split(",") if t]
    with no_library_bars():     # transformers' loading bar says nothing here; lm-eval's own progress stays
        report = evaluate_checkpoint(a.checkpoint, tasks, a.limit, a.val, a.seq_len, a.batch_size, a.device,
                                     a.backend)
    print_report(report)


def print_report(r: dict) -> None:
    if "val_loss" in r:
        print(f"val loss {r['val_loss']:.4f} (ppl {r['val_ppl']:.1f}, {r['val_bpb']:.4f} bits/byte) over "
              f"{r['val_tokens']:,} tokens")
    for task, m in sorted(r.get("tasks", {}).items()):
        shown = ", ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float) and "stderr" not in k)
        print(f"{task:<20}{shown}  (n={m.get('samples')})")
    print(f"-> {Path(r['checkpoint']) / 'eval.json'} ({r['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
