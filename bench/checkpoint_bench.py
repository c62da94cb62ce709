"""FSDP checkpoint cost per rank: sharded (``distill.sharded_checkpoint``) vs gathered on rank 0, side by side.

Run::

    python bench/checkpoint_bench.py [--procs 2] [--hidden 768] [--layers 12] [--vocab 32000]

Each variant is a fresh ``torchrun`` of ``--procs`` gloo processes on this machine holding one random-init Llama
student under FSDP2 with AdamW state (one step taken), in this order:

* ``gathered``: what the trainer did before: ``full_state_dict`` weights and optimizer state gathered to rank
  0's CPU memory (a collective), rank 0 writes them (``save_pretrained`` + ``torch.save``);
* ``sharded``: every rank writes its own shard with torch.distributed.checkpoint, rank 0 its small files.

Per rank: the rise of peak resident memory during the save over the memory just before it (``VmHWM`` reset via
``/proc/self/clear_refs``), seconds, and bytes the rank wrote. Prints a table, writes
``bench/results/checkpoint_cpu.json``. Both variants hold the same state: the ratio is what counts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _rss_mb(field: str) -> float:
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(field))
    return int(line.split()[1]) / 1024


def _folder_bytes(folder: Path, rank: int, world: int) -> int:
    files = [p for p in folder.rglob("*") if p.is_file()]
    mine = [p for p in files if p.name.startswith(f"__{rank}_")] if world > 1 else files
    if rank == 0:   # rank 0 also writes everything that is not another rank's shard
        mine += [p for p in files if not p.name.startswith("__")]
    return sum(p.stat().st_size for p in set(mine))


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill import distributed, sharded_checkpoint

    torch.set_num_threads(1)
    d, device = distributed.setup(torch.device("cpu"), "fsdp", args.procs)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 64, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    module = distributed.wrap(distributed.LossModule(model, type("NoTeacher", (), {"bos_id": None})()), d, device)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    module(input_ids=torch.randint(0, args.vocab, (2, 64))).logits.float().mean().backward()
    opt.step()
    out = Path(args.out)
    d.barrier()
    Path("/proc/self/clear_refs").write_text("5")          # peak RSS := current RSS
    before = _rss_mb("VmRSS")
    t0 = time.perf_counter()
    if args.mode == "sharded":
        sharded_checkpoint.save(d, module, opt, out, lambda tmp: model.config.save_pretrained(tmp))
    else:
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(module, options=full)
        optim = get_optimizer_state_dict(module, opt, options=full)
        if d.is_main:
            out.mkdir(parents=True)
            model.save_pretrained(out, state_dict={k.removeprefix("model."): v for k, v in weights.items()
                                                   if k != "model.lm_head.weight"})
            torch.save({"optimizer": optim}, out / "trainer_state.pt")
    d.barrier()
    seconds = time.perf_counter() - t0
    row = {"mode": args.mode, "rank": d.rank, "params_m": n_params / 1e6, "rss_before_mb": before,
           "peak_rise_mb": _rss_mb("VmHWM") - before, "seconds": seconds,
           "written_mb": _folder_bytes(out, d.rank, d.world) / 2**20}
    rows = [None] * d.world
    dist.all_gather_object(rows, row)
    if d.is_main:
        Path(args.result).write_text(json.dumps(rows))
    distributed.shutdown(d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="sharded", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    from bench.refine_bench import machine

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("gathered", "sharded"):
            result = Path(tmp) / f"{mode}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.procs}",
                   __file__, "--worker", "--mode", mode, "--out", str(Path(tmp) / mode / "step_0000001"),
                   "--result", str(result), "--procs", str(args.procs), "--hidden", str(args.hidden),
                   "--layers", str(args.layers), "--vocab", str(args.vocab)]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
            rows += json.loads(result.read_text())
    print(f"FSDP checkpoint save, {rows[0]['params_m']:.1f}M parameters + AdamW state, {args.procs} gloo processes")
    print(f"{'mode':<9} {'rank':>4} {'peak rise MB':>13} {'RSS before MB':>14} {'written MB':>11} {'seconds':>8}")
    for r in rows:
        print(f"{r['mode']:<9} {r['rank']:>4} {r['peak_rise_mb']:>13.1f} {r['rss_before_mb']:>14.1f} "
              f"{r['written_mb']:>11.1f} {r['seconds']:>8.2f}")
    rank0 = {r["mode"]: r for r in rows if r["rank"] == 0}
    ratio = rank0["gathered"]["peak_rise_mb"] / max(rank0["sharded"]["peak_rise_mb"], 1e-9)
    print(f"rank 0's peak rise, gathered / sharded: {ratio:.1f}x")
    out = REPO / "bench" / "results" / "checkpoint_cpu.json"
    out.write_text(json.dumps({"machine": machine(), "procs": args.procs, "rows": rows,
                               "rank0_peak_rise_ratio": ratio}, indent=1) + "\n")
    print(f"-> {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
