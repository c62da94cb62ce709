"""trainer.loggers: one tiny training run logs to tensorboard, W&B (offline) and trackio (its
local store); a resume continues the same W&B and trackio runs; a tracker that is not installed is
one line before anything runs.

Nothing here reaches a network: W&B runs offline (WANDB_MODE), trackio has no Space, and every
folder either writes is under the test's tmp_path. The W&B run is read from its own transaction log
(``run-<id>.wandb``: records of W&B's own protobuf), the trackio store from its SQLite file."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from distill.config import to_config
from distill.train import CONF_DIR, train
from refine.core.errors import InputError

REPO = Path(CONF_DIR).parent
# A constant lr: a resume to more steps replays the steps after its checkpoint with the same
# numbers, as a resume of the same command does (a cosine's lr at a step depends on max_steps).
STEPS = ["trainer.eval_every=3", "trainer.ckpt_every=3", "trainer.keep_checkpoints=2",
         "schedule=constant"]


def _wandb_records(path: Path):
    """A ``.wandb`` file's records: W&B's header, then LevelDB-log blocks of ``Record``s."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (kind == 0 and length == 0):    # a block's padding
            pos += left
            continue
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):                              # a whole record, or the last part of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def _wandb_run(folder: Path) -> tuple[dict, list[dict]]:
    """An offline run folder's config (its top-level keys, decoded) and its history rows."""
    (log,) = folder.glob("run-*.wandb")
    config, history = {}, []
    for r in _wandb_records(log):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            config = {u.key: json.loads(u.value_json) for u in r.run.config.update}
        elif kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                            for i in r.history.item})
    return config, history


def _train(overrides: list[str], env: dict) -> None:
    res = subprocess.run([sys.executable, "-m", "distill.train", *overrides], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.integration
def test_one_run_logs_to_tensorboard_wandb_and_trackio_and_a_resume_continues_them(
        tiny_overrides, tmp_path):
    run_dir = tmp_path / "runs" / "run"
    # each place either package could write to outside the run folder, under tmp_path; a process of
    # its own, since trackio reads TRACKIO_DIR once, when it is imported
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb_dir"),
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
           "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
           "WANDB_DATA_DIR": str(tmp_path / "wandb_data"), "TRACKIO_DIR": str(tmp_path / "trackio"),
           "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    loggers = ["trainer.loggers=[tensorboard,wandb,trackio]", "trainer.log_project=rd_test"]
    _train(tiny_overrides + loggers + STEPS + ["trainer.max_steps=6"], env)
    # as if the run had died after step 6 with its last checkpoint at step 3: the resume replays
    # steps 4..6, then goes on
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    assert [c.name for c in ckpts] == ["step_0000003", "step_0000006"]
    shutil.rmtree(ckpts[-1])
    (run_dir / "checkpoints" / "latest").write_text(ckpts[0].name + "\n")
    _train(tiny_overrides + loggers + STEPS + ["trainer.max_steps=9"], env)

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = {r["step"]: r for r in records if r["split"] == "train"}
    val_rows = {r["step"]: r for r in records if r["split"] == "val"}
    assert sorted(train_rows) == list(range(1, 10)) and sorted(val_rows) == [3, 6, 9]

    # W&B: two offline run folders (one per start) of one run id, the id kept in the run folder
    run_id = (run_dir / "wandb" / "run_id").read_text().strip()
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(f"-{run_id}") for f in folders)
    assert not (tmp_path / "wandb_dir").exists()         # the run folder, not WANDB_DIR
    (config, first), (_, second) = _wandb_run(folders[0]), _wandb_run(folders[1])
    assert config["trainer"]["loggers"] == ["tensorboard", "wandb", "trackio"]
    assert config["run_dir"] == str(run_dir)
    assert [h["_step"] for h in first] == list(range(1, 7))
    assert [h["_step"] for h in second] == [7, 8, 9]       # steps 4..6 were sent before: not again
    logged = {h["_step"]: h for h in first + second}
    for step, r in train_rows.items():
        assert logged[step]["train/loss"] == pytest.approx(r["loss"], rel=1e-6)
        assert logged[step]["train/lr"] == pytest.approx(r["lr"], rel=1e-6)
    for step, r in val_rows.items():
        assert logged[step]["val/loss"] == pytest.approx(r["loss"], rel=1e-6)

    # trackio: one run in the project's store, named after the run folder; each step once
    db = sqlite3.connect(tmp_path / "trackio" / "rd_test.db")
    rows = db.execute("SELECT run_name, step, metrics FROM metrics ORDER BY step, id").fetchall()
    assert {name for name, _, _ in rows} == {"run"}
    by_step: dict[int, dict] = {}
    for _, step, metrics in rows:
        again = set(json.loads(metrics)) & set(by_step.get(step, {}))
        assert not again, f"step {step}: {again} logged twice"
        by_step.setdefault(step, {}).update(json.loads(metrics))
    assert sorted(by_step) == list(range(1, 10))
    for step, r in train_rows.items():
        assert by_step[step]["train/loss"] == pytest.approx(r["loss"], rel=1e-6)
    assert {s for s, m in by_step.items() if "val/loss" in m} == {3, 6, 9}
    (saved,) = [json.loads(c) for (c,) in db.execute("SELECT config FROM configs")]
    assert saved["trainer"]["log_project"] == "rd_test" and saved["seed"] == 0

    # tensorboard: each step once, the replayed ones written again (purge_step)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(run_dir / "tb"))
    tb.Reload()
    events = tb.Scalars("train/loss")
    assert [e.step for e in events] == list(range(1, 10))
    losses = [train_rows[s]["loss"] for s in range(1, 10)]
    assert [e.value for e in events] == pytest.approx(losses, rel=1e-6)


def _cfg(overrides: list[str]):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return to_config(compose("train", overrides=overrides))


@pytest.mark.parametrize("name", ["wandb", "trackio"])
def test_a_tracker_not_installed_is_one_line_before_anything_runs(tiny_overrides, tmp_path,
                                                                  monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)     # as `import` and find_spec see a missing one
    cfg = _cfg(tiny_overrides + [f"trainer.loggers=[tensorboard,{name}]"])
    with pytest.raises(InputError) as e:
        train(cfg)
    assert str(e.value) == (f"trainer.loggers names {name}, which is not installed: "
                            f"pip install {name}")
    assert not (tmp_path / "runs" / "run").exists()  # before the run folder, the data or the model
