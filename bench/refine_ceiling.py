"""The teacher pass's host-side ceiling: every stage of it with a near-free teacher, today's path and the new one.

Run::

    python bench/refine_ceiling.py [--quick] [--vocabs 1024,49152,151552] [--seq-lens 256,2048]

A near-free teacher (random-init Llama, 1 layer, width 64, saved as an HF folder in a temp dir; no tokenizer:
the engine runs with ``skip_tokenizer_init``) at each vocabulary, so the model costs next to nothing and what
is left is the pass's own work: vLLM's engine with ``prompt_logprobs=50`` (its log_softmax and top-K over the
vocabulary included: on a GPU those run on the device), extraction to arrays, NLL, top-p-k truncation, RS-KD
draws (24 from the 50 candidates), the compact encoder, writing; and the whole pass (``refine.score_pass.run_pass``,
both stores). Per stage: positions/s and host CPU-seconds per million positions (``time.process_time``, all
threads), *old* (vLLM's public per-position lists, the encoder of commit 264cd0b read from git) and *new*
(tensor path, vectorised encoder, zstd frames over all cores) alternating on one engine, median of
``--rounds``. The vLLM stage is split into ``vllm_output`` (its output processor turning our prompt log-probs
into lists, or keeping the tensors: host work) and ``vllm_engine`` (the rest: scheduling, the model, the
log_softmax and top-K; device work on a GPU, on the CPU here). The served backend's ceiling: JSON decoding +
``parse_completion`` of vLLM's answer for the same rows (client side), and ``json.dumps`` of it (a lower bound
for the server's own rendering), no socket.
Writes ``bench/results/refine_ceiling.json``; ``python -m distill.plan`` reads its host-bound figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
BASE = "264cd0b"          # today's path: the encoder as it was before this benchmark's speed-ups
K, TOP_P, RS_SAMPLES = 50, 0.95, 24
POSITIONS = {1024: 32768, 49152: 4096, 151552: 2048}     # per (vocab, rows): the engine's log_softmax + top-K
# over the vocabulary run on the CPU here (~550 positions/s at 49,152), so fewer positions at a big vocabulary


def near_free_model(vocab: int, out: Path, max_len: int) -> Path:
    """A random-init 1-layer, width-64 Llama; tied embeddings of std 0.6 make logits of std ~5, so its
    next-token distributions are peaked like a real teacher's and top-0.95 keeps fewer than 50 ids."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=max_len,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.6)
    model.save_pretrained(out)
    return out


def instances(folder: Path, vocab: int, n: int, seq_len: int):
    """n rows of random ids as a packed-instances folder (run_pass reads one)."""
    from refine.core.instances import Instances, InstanceWriter, TokenizerInfo

    w = InstanceWriter(folder, seq_len, TokenizerInfo("near-free", f"near-free-{vocab}", vocab, 1))
    flat = np.random.default_rng(vocab + seq_len).integers(2, vocab, n * (seq_len - 1))
    w.add_batch(flat, np.full(n, seq_len - 1), [f"d{i}" for i in range(n)], ["bench"] * n)
    w.close()
    return Instances(folder)


def old_encoder():
    """``encode_shard`` as of ``BASE`` (git show), for the side-by-side; None outside a git checkout."""
    try:
        src = subprocess.run(["git", "show", f"{BASE}:refine/core/logits/compact_encoder.py"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    with tempfile.TemporaryDirectory(prefix="old_encoder_") as tmp:
        path = Path(tmp) / "old_compact_encoder.py"
        path.write_text(src)
        spec = importlib.util.spec_from_file_location("old_compact_encoder", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod     # dataclasses look their module up
        spec.loader.exec_module(mod)
    return mod.encode_shard


class Clock:
    """Wall and process CPU seconds of named stages, per path, one list entry per round."""

    def __init__(self):
        self.t: dict = {}

    def __call__(self, stage: str, path: str, fn, *args, **kwargs):
        w, c = time.perf_counter(), time.process_time()
        out = fn(*args, **kwargs)
        self.add(stage, path, time.perf_counter() - w, time.process_time() - c)
        return out

    def add(self, stage: str, path: str, wall: float, cpu: float) -> None:
        self.t.setdefault(stage, {}).setdefault(path, []).append((wall, cpu))

    def summary(self, positions: int) -> dict:
        return {stage: {path: {"pos_s": positions / float(np.median([w for w, _ in v])),
                               "cpu_s_per_mpos": 1e6 * float(np.median([c for _, c in v])) / positions}
                        for path, v in paths.items()} for stage, paths in self.t.items()}


def bench_rows(scorer, inst, tmp: Path, rounds: int, encoders: dict) -> dict:
    """Every stage and the whole pass on ``inst``'s rows, both paths alternating."""
    import refine.core.logits.writer as writer_mod
    from refine.config import LogitsConfig, ModelPassConfig
    from refine.core.logits.truncate import truncate_top_p_k
    from refine.score_pass import PassConfig, _write_sampled, run_pass

    rows = np.asarray(inst.tokens)
    positions = rows.shape[0] * (rows.shape[1] - 1)
    clock, kept = Clock(), None
    base = encoders.get("old", encoders["new"])

    def old_enc(*args, threads=1, **kwargs):      # the old encoder has no threads
        return base(*args, **kwargs)

    for r in range(rounds):
        for path in ("old", "new"):
            scorer.tensor_path = path == "new"
            w, c = time.perf_counter(), time.process_time()
            scores = scorer.score(rows)
            wall, cpu = time.perf_counter() - w, time.process_time() - c
            ext, out = scorer.last_timing["extract_s"], scorer.last_timing["output_s"]
            clock.add("vllm", path, wall - ext, cpu - ext)       # one thread each: their CPU = their wall
            clock.add("vllm_output", path, out, out)
            clock.add("vllm_engine", path, wall - ext - out, cpu - ext - out)
            clock.add("extraction", path, ext, ext)
        clock("nll", "both", scores.mean_nll)
        counts = clock("truncation", "both", truncate_top_p_k, scores.topk_logprobs, TOP_P, K)
        kept = float(counts.mean())
        keep = np.arange(K) < counts[..., None]
        pairs = (counts, scores.topk_ids[keep], scores.topk_logprobs[keep], inst.tokenizer.vocab_size)
        for name, enc in encoders.items():
            blob = clock("encoding", name, enc, *pairs)
        clock("rs_draws", "both", _write_sampled, _NullWriter(), 0, scores.topk_ids, scores.topk_logprobs,
              RS_SAMPLES, 1.0, 0)
        clock("writing", "both", _write_bytes, tmp / "shard.bin", blob)
        for path in ("old", "new"):                       # the whole pass: both stores, one write worker
            scorer.tensor_path = path == "new"
            writer_mod.encode_shard = encoders["new"] if path == "new" else old_enc
            cfg = PassConfig(str(inst.folder), str(tmp / f"pass-{path}-{r}"),
                             ModelPassConfig(str(inst.folder), batch_rows=max(1, 8192 // rows.shape[1])),
                             shard_size=max(1, 32768 // rows.shape[1]),
                             logits=LogitsConfig(top_p=TOP_P, top_k=K, rs_samples=RS_SAMPLES), quiet=True)
            clock("end_to_end", path, run_pass, cfg, scorer)
    writer_mod.encode_shard = encoders["new"]
    return {"rows": int(rows.shape[0]), "seq_len": int(rows.shape[1]), "positions": positions,
            "kept_per_position": kept, "stages": clock.summary(positions), "served": served_ceiling(scores, rows)}


class _NullWriter:
    """Takes the RS-KD draws ``_write_sampled`` would encode: the draws alone are timed."""

    def write_shard(self, *args):
        return None


def _write_bytes(path: Path, blob: bytes) -> None:
    from refine.core.manifest import sha256_file
    from refine.core.write import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(blob)
    sha256_file(path)


def served_ceiling(scores, rows: np.ndarray) -> dict:
    """What the served backend's host does per row: vLLM's JSON answer decoded and parsed (client), and
    rendered (``json.dumps``: a lower bound for the server, which also builds a pydantic object per entry)."""
    from refine.scorers.served_api import parse_completion

    n = min(len(rows), max(1, 4096 // rows.shape[1]))
    bodies = []
    for i in range(n):
        plp = [None]
        for t in range(rows.shape[1] - 1):
            pos = {str(int(rows[i, t + 1])): {"logprob": float(scores.token_logprobs[i, t]), "rank": 99,
                                              "decoded_token": None}}
            for j in range(K):
                pos[str(int(scores.topk_ids[i, t, j]))] = {"logprob": float(scores.topk_logprobs[i, t, j]),
                                                           "rank": j + 1, "decoded_token": None}
            plp.append(pos)
        bodies.append({"choices": [{"prompt_logprobs": plp, "text": ""}]})
    w = time.perf_counter()
    raw = [json.dumps(b).encode() for b in bodies]
    render = time.perf_counter() - w
    w = time.perf_counter()
    for i, b in enumerate(raw):
        parse_completion(json.loads(b), "bench", rows[i], K, None, 1 << 31)
    parse = time.perf_counter() - w
    pos = n * (rows.shape[1] - 1)
    return {"client_pos_s": pos / parse, "server_render_pos_s": pos / render,
            "bytes_per_position": sum(map(len, raw)) / pos}


def machine() -> dict:
    from bench.refine_bench import machine as software

    return {**software(), "load_average": os.getloadavg()}     # other jobs on the machine skew the wall clock


def main() -> None:
    from refine.core.logits.compact_encoder import encode_shard
    from refine.scorers.vllm import VLLMScorer

    ap = argparse.ArgumentParser()
    ap.add_argument("--vocabs", default="1024,49152,151552")
    ap.add_argument("--seq-lens", default="256,2048")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a quarter of the positions, one round")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "refine_ceiling.json"))
    a = ap.parse_args()
    rounds, scale = (1, 4) if a.quick else (a.rounds, 1)
    seq_lens = [int(x) for x in a.seq_lens.split(",")]
    threads = os.cpu_count() or 1
    encoders = {"new": encode_shard, "new_threads": lambda *x: encode_shard(*x, threads=threads)}
    old = old_encoder()
    if old is not None:
        encoders = {"old": old, **encoders}
    else:
        print(f"warning: no git checkout with {BASE}: the old encoder is left out", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="refine_ceiling_"))
    results = []
    for vocab in [int(x) for x in a.vocabs.split(",")]:
        model = near_free_model(vocab, tmp / f"model-{vocab}", max(seq_lens) + 64)
        t = time.perf_counter()
        scorer = VLLMScorer(str(model), top_k=K, max_model_len=max(seq_lens) + 16, enforce_eager=True,
                            max_num_batched_tokens=max(8192 if vocab < 100_000 else 0, max(seq_lens) + 16))
        start_s = time.perf_counter() - t
        scorer.score(np.full((2, 16), 2))                 # warm-up
        for seq_len in seq_lens:
            n = max(1, POSITIONS.get(vocab, 16384) // scale // seq_len)
            inst = instances(tmp / f"inst-{vocab}-{seq_len}", vocab, n, seq_len)
            res = {"vocab": vocab, "engine_start_s": start_s,
                   **bench_rows(scorer, inst, tmp / f"run-{vocab}-{seq_len}", rounds, encoders)}
            results.append(res)
            _print_run(res)
        scorer.close()
    out = {"runs": results, "host_ceiling": host_ceiling(results),
           "setup": {"top_k": K, "top_p": TOP_P, "rs_samples": RS_SAMPLES, "rounds": rounds,
                     "teacher": "near-free random Llama (1 layer, width 64), fp32, enforce_eager",
                     "old": f"vLLM's public FlatLogprobs lists; encoder of {BASE}",
                     "new": "tensor path; vectorised encoder (refine.score_pass's zstd threads in end_to_end)"},
           "machine": machine()}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"-> {a.out}")


def host_ceiling(runs: list[dict]) -> dict:
    """Per vocabulary (its longest rows): host CPU-seconds per million positions the new path adds to vLLM's
    engine for a top-p-k store (``cpu_s_per_mpos``: its output processing of our prompt log-probs, extraction,
    NLL, truncation, encoding, writing) and with an RS-KD store besides (+ the draws and a second encoding, a
    bound: that store is smaller). Not in it: the engine's own host work (scheduling, per-step Python), which
    this CPU machine cannot tell from its compute; the engine stage at the smallest vocabulary
    (``engine_cpu_s_per_mpos``: the near-free model's compute, log_softmax and top-K included) bounds it."""
    smallest = min(runs, key=lambda r: (r["vocab"], -r["seq_len"]))
    out = {}
    for r in runs:
        if r["seq_len"] != max(x["seq_len"] for x in runs if x["vocab"] == r["vocab"]):
            continue
        cpu = {k: v.get("new", v.get("both"))["cpu_s_per_mpos"] for k, v in r["stages"].items()}
        top_p_k = sum(cpu[k] for k in ("vllm_output", "extraction", "nll", "truncation", "encoding", "writing"))
        out[str(r["vocab"])] = {"cpu_s_per_mpos": top_p_k,
                                "with_rs_kd_cpu_s_per_mpos": top_p_k + cpu["rs_draws"] + cpu["encoding"],
                                "seq_len": r["seq_len"],
                                "engine_cpu_s_per_mpos": smallest["stages"]["vllm_engine"]["new"]["cpu_s_per_mpos"],
                                "engine_measured_at_vocab": smallest["vocab"]}
    return out


def _print_run(r: dict) -> None:
    print(f"\nvocab {r['vocab']:,}, {r['rows']} rows x {r['seq_len']} ({r['positions']:,} positions, "
          f"{r['kept_per_position']:.1f} kept per position)")
    print(f"{'stage':<12}{'path':<13}{'positions/s':>14}{'CPU-s/Mpos':>12}{'new/old':>9}")
    for stage, paths in r["stages"].items():
        base = paths.get("old", {}).get("pos_s")
        for path, v in paths.items():
            ratio = f"{v['pos_s'] / base:.2f}" if base and path != "old" else ""
            print(f"{stage:<12}{path:<13}{v['pos_s']:>14,.0f}{v['cpu_s_per_mpos']:>12.1f}{ratio:>9}")
    s = r["served"]
    print(f"served: client decode+parse {s['client_pos_s']:,.0f} pos/s, server render >= "
          f"{s['server_render_pos_s']:,.0f} pos/s, {s['bytes_per_position']:,.0f} B/position")


if __name__ == "__main__":
    main()
