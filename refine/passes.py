"""A model's scoring pass, run (or reused) in a child process (``refine.score_pass``), which gets its
``PassConfig`` as JSON on stdin. Each pass folder keeps its ``key.json`` (model fingerprint, instances hash,
capture settings): another key is refused, never mixed in (``refine.folder_key``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from dataclasses import asdict, replace
from pathlib import Path

from refine.config import LogitsConfig, RefineConfig
from refine.console import ChildOutput, LogFile, log_path
from refine.core.errors import InputError
from refine.core.instances import Instances
from refine.core.logits import LogitsStore, convert
from refine.core.manifest import sha256_file
from refine.core.tokenizer import bos_prefix, load_tokenizer
from refine.core.write import atomic_path, claim_json, write_json_atomic
from refine.folder_key import differences, normal, refusal
from refine.score_pass import PassConfig, ShardFiles, parse_shard

PASSES = ("teacher", "reference")


def model_fingerprint(model: Path) -> str:
    files = sorted(model.glob("*.safetensors")) + [model / "config.json"]
    return "|".join(f"{f.name}:{f.stat().st_size}:{sha256_file(f)[:16]}" for f in files)


def score(cfg: RefineConfig, name: str, model: Path, inst: Instances) -> dict:
    """Run (or reuse) pass ``name`` (teacher: NLL + the ``logits`` capture; reference: NLL only) of ``model`` over
    ``inst`` (the teacher's rows, or for a reference of another tokenizer those rows re-tokenized:
    ``refine.cross_reference``) in ``<out>/<name>``; return its summary (a partial one for one part of a sharded
    run). The finished shards of the same pass in ``merge_from`` are copied in first. A pass folder holding another
    key is refused (``overwrite``: replaced); the caller holds the refine folder's lock."""
    assert name in PASSES
    pass_cfg, out = getattr(cfg, name), Path(cfg.out) / name
    logits = cfg.logits if name == "teacher" else LogitsConfig(top_p=1.0, top_k=0)
    key = pass_key(cfg, name, model, inst)
    summary = _reuse(out, key, logits.codec, cfg.overwrite)
    if summary is not None:
        return summary
    held = claim_json(out / "key.json", key)  # exclusive: a part starting at the same moment elsewhere loses
    if held != normal(key):
        raise refusal(out, differences(held, normal(key)))
    for src in cfg.merge_from:
        _copy_shards(Path(src) / out.name, out, key)
    child = PassConfig(instances=str(inst.folder), out=str(out), model=replace(pass_cfg, path=str(model)),
                       shard_size=cfg.shard_size, logits=logits, shard=cfg.shard, events=True)
    top_k, top_p = logits.top_k, logits.top_p
    print(f"scoring {len(inst)} instances with {model} ({pass_cfg.backend}, {pass_cfg.dtype}"
          f"{f', top-{top_p}-{top_k} logits' if top_k else ''})", flush=True)
    part, parts = parse_shard(cfg.shard)
    log = LogFile(log_path(cfg.out, name if parts == 1 else f"{name}.part-{part}-of-{parts}"),
                  f"{name} pass: {model} ({pass_cfg.backend}, {pass_cfg.dtype}, shard {cfg.shard})")
    output = ChildOutput(log, name, cfg.verbose)
    try:
        returncode, stdout = _run_child([sys.executable, "-m", "refine.score_pass", "-"], json.dumps(asdict(child)),
                                        output)
    finally:
        output.close_progress()
        log.close()
    if returncode == 2 and output.errors:     # the child's one-line error is this run's one line
        raise InputError(output.errors[-1])
    if returncode != 0:
        raise InputError(f"scoring with {model} failed ({output.failure(returncode)}); rerun to resume its shards")
    summary = json.loads(stdout.strip().splitlines()[-1])
    if "partial" in summary:
        print(f"  part {summary['partial']}: {summary['shards_done']} of {summary['shards']} shards scored here")
        return summary
    print(f"  {summary['tokens']:,} tokens in {summary['score_seconds']:.0f} s: {summary['tok_s']:,.0f} tok/s "
          f"(+{summary['engine_load_seconds']:.0f} s engine start)")
    return summary


def pass_key(cfg: RefineConfig, name: str, model: Path, inst: Instances) -> dict:
    """What a pass's scores depend on: a folder holding another key is never reused or mixed in."""
    pass_cfg = getattr(cfg, name)
    logits = cfg.logits if name == "teacher" else LogitsConfig(top_p=1.0, top_k=0)
    key = {"model": model_fingerprint(model), "instances": inst.index["tokens_sha256"], **asdict(logits),
           "dtype": pass_cfg.dtype, "backend": pass_cfg.backend, "shard_size": cfg.shard_size}
    bos = bos_prefix(load_tokenizer(model, pass_cfg.engine.get("trust_remote_code", False)))
    if bos is not None:   # what the pass puts first (a Gemma converted without its BOS scored without it)
        key["bos_prefix"] = bos
    if "retokenized_from" in inst.index:      # a reference of another tokenizer: its rows and what each counts
        key.update(counted=inst.index["counted_sha256"], retokenized_from=inst.index["retokenized_from"])
    return key


def _reuse(out: Path, key: dict, codec: str, overwrite: bool) -> dict | None:
    """The finished pass in ``out`` if it was made with ``key`` (a store of another codec is converted, not
    rescored), else None; a folder with another key is refused, or emptied with ``overwrite``."""
    key_file = out / "key.json"
    old = json.loads(key_file.read_text()) if key_file.is_file() else key
    if old != key and (out / "pass.json").is_file() and {**old, "codec": codec} == key:
        for name in ("logits", "logits_rs"):  # only the codec changed (or a pre-codec cache): no rescoring
            if (out / name / "store.json").is_file() and LogitsStore(out / name).header.codec != codec:
                print(f"converting {out / name} to the {codec} codec (no rescoring)", flush=True)
                convert(out / name, out / name, str(codec))
        write_json_atomic(key_file, key)
    elif old != key and not overwrite:        # another model/config/data: its shards must not be mixed in
        raise refusal(out, differences(normal(old), normal(key)))
    elif old != key:
        shutil.rmtree(out)
    if (out / "pass.json").is_file() and key_file.is_file():
        return json.loads((out / "pass.json").read_text())
    return None


def _run_child(cmd: list[str], stdin: str, output: ChildOutput) -> tuple[int, str]:
    """Run a scoring child with ``stdin``; each line of its stderr goes to ``output`` (its log, its progress, its
    ``error: ...`` line: the parent ends with that one line instead of adding its own)."""
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            errors="replace")

    def pump() -> None:
        for line in proc.stderr:
            output(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    proc.stdin.write(stdin)
    proc.stdin.close()
    stdout = proc.stdout.read()
    proc.wait()
    reader.join()
    return proc.returncode, stdout


def _copy_shards(src: Path, dst: Path, key: dict) -> None:
    """Another machine's finished shards of this pass (same key: model, instances, capture settings): each
    shard's data files, then its json (the mark of a finished shard), so a crash mid-copy leaves no shard
    that looks finished but is not."""
    src_key = src / "key.json"
    if not src_key.is_file():
        raise InputError(f"merge_from: {src} holds no scoring pass (no key.json)")
    if json.loads(src_key.read_text()) != key:
        raise InputError(f"merge_from: {src} was scored with another model, instances or settings than this run")
    copied = 0
    for shard in ShardFiles.finished(src):
        if ShardFiles(dst, shard.index).done:
            continue
        for data in [*shard.data(), shard.marker]:      # the marker last
            target = dst / data.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as tmp:
                shutil.copyfile(data, tmp)
        copied += 1
    print(f"merge_from: {copied} finished shards of {src}")
