"""The write layer (``refine.core.write``) under planted files: a link or a FIFO where a run writes.

Another account that can write a shared output or run folder plants a link at a name a run writes (the writer
lock, a log, ``metrics.jsonl``, ``report.md``, a claim's temporary): nothing is written through it, the file it
names stays byte for byte as it was (a run that refuses at once included), and the run either refuses in one line
(logs and the lock: appended or truncated in place) or replaces the link with its own file (atomic renames). A FIFO
there never blocks the run. The tests reach the layer through the names the rest of the code uses (``FolderLock``,
``claim_json``, ``LogFile``, ``Metrics``, the reports), so they also ran against the code before the layer.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from refine.core.errors import InputError
from tests.conftest import REPO

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
PRECIOUS = "someone else's file: not the run's to touch\n"


@pytest.fixture
def victim(tmp_path) -> Path:
    """A file a planted link points at; every test requires it unchanged."""
    path = tmp_path / "elsewhere" / "victim.txt"
    path.parent.mkdir()
    path.write_text(PRECIOUS)
    return path


def _plant(link: Path, target: Path) -> Path:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return link


def _one_line(e: pytest.ExceptionInfo, *words: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    return msg


def _python(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``code`` in a child (a FIFO that blocks an open must not hang the test run: the child times out)."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


# ---- the writer lock ----

@pytest.mark.parametrize("shared", [False, True])
def test_a_lock_planted_as_a_link_is_refused_and_its_target_kept(tmp_path, victim, shared):
    from refine.core.write import FolderLock

    _plant(tmp_path / "out" / ".writer.lock", victim)
    with pytest.raises(InputError) as e:
        with FolderLock(tmp_path / "out", "refine run", "use another out=", shared=shared):
            pass
    _one_line(e, ".writer.lock", "symbolic link", "use another out=")
    assert victim.read_text() == PRECIOUS


def test_a_dangling_lock_link_creates_nothing(tmp_path):
    from refine.core.write import FolderLock

    target = tmp_path / "elsewhere" / "new-file"
    target.parent.mkdir()                                         # (its folder exists: only the file is missing)
    _plant(tmp_path / "run" / ".writer.lock", target)
    with pytest.raises(InputError):
        with FolderLock(tmp_path / "run", "trainer", "use another run_name"):
            pass
    assert not target.exists()


def test_a_fifo_lock_is_refused(tmp_path):
    from refine.core.write import FolderLock

    (tmp_path / "out").mkdir()
    os.mkfifo(tmp_path / "out" / ".writer.lock")
    with pytest.raises(InputError) as e:
        with FolderLock(tmp_path / "out", "refine run", "use another out="):
            pass
    _one_line(e, "FIFO")


def test_the_lock_still_works(tmp_path):
    """The usual case: a plain lock file is created, held, and its holder named to the next writer."""
    from refine.core.write import FolderLock

    with FolderLock(tmp_path, "refine run", "use another out="):
        assert (tmp_path / ".writer.lock").read_text().startswith(f"{socket.gethostname()} {os.getpid()} ")
    assert (tmp_path / ".writer.lock").is_file() and not (tmp_path / ".writer.lock").is_symlink()


# ---- the refine and trainer commands, failing at once ----

def _error_lines(res: subprocess.CompletedProcess) -> list[str]:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and lines and lines[-1].startswith("error: "), res.stderr[-3000:]
    return [line for line in lines if line.startswith("error: ")]


@pytest.mark.integration
@pytest.mark.parametrize("planted", [".writer.lock", "logs/refine.log"])
def test_a_refine_run_that_fails_at_once_leaves_the_target_intact(tmp_path, victim, planted):
    out = tmp_path / "out"
    _plant(out / planted, victim)
    (tmp_path / "c.jsonl").write_text('{"id": "a", "text": "some words"}\n')
    res = subprocess.run([sys.executable, "-m", "refine", f"corpus={tmp_path / 'c.jsonl'}",
                          f"teacher.path={tmp_path / 'x'}", f"reference.path={tmp_path / 'x'}", f"out={out}"],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert victim.read_text() == PRECIOUS, res.stderr[-3000:]
    errors = _error_lines(res)
    assert len(errors) == 1 and Path(planted).name in errors[0] and "link" in errors[0], res.stderr[-3000:]


@pytest.mark.integration
def test_a_trainer_that_fails_at_once_leaves_the_target_intact(tiny_tokenizer_dir, tmp_path, victim):
    run, empty = tmp_path / "run", tmp_path / "empty.jsonl"     # an empty corpus: refused once the lock is taken
    _plant(run / ".writer.lock", victim)
    empty.write_text("")
    res = subprocess.run([sys.executable, "-m", "distill.train", "+experiment=lm_baseline", "+debug=tiny",
                          f"model.tokenizer={tiny_tokenizer_dir}", f"data.train={empty}", f"data.val={empty}",
                          f"paths.cache={tmp_path / 'cache'}", f"run_dir={run}"], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert victim.read_text() == PRECIOUS, res.stderr[-3000:]
    errors = _error_lines(res)
    assert len(errors) == 1 and ".writer.lock" in errors[0] and "link" in errors[0], res.stderr[-3000:]


# ---- appended logs: refine's logs/<name>.log, the trainer's metrics.jsonl ----

def test_a_log_planted_as_a_link_is_refused(tmp_path, victim):
    from refine.console import LogFile, log_path

    _plant(log_path(tmp_path, "teacher"), victim)
    with pytest.raises(InputError) as e:
        LogFile(log_path(tmp_path, "teacher"), "teacher pass").close()
    _one_line(e, "teacher.log", "symbolic link")
    assert victim.read_text() == PRECIOUS


def test_a_dangling_log_link_creates_nothing(tmp_path):
    from refine.console import LogFile, log_path

    target = tmp_path / "elsewhere" / "created"
    target.parent.mkdir()
    _plant(log_path(tmp_path, "teacher"), target)
    with pytest.raises(InputError):
        LogFile(log_path(tmp_path, "teacher"), "teacher pass").close()
    assert not target.exists()


def test_the_library_log_planted_as_a_link_is_refused(tmp_path, victim):
    import logging

    from refine.core.library_noise import library_noise_to

    path = _plant(tmp_path / "logs" / "refine.log", victim)
    with pytest.raises(InputError) as e:
        with library_noise_to(path):
            logging.getLogger("transformers").warning("library noise")
    _one_line(e, "refine.log", "symbolic link")
    assert victim.read_text() == PRECIOUS


def test_the_library_log_still_works(tmp_path):
    import logging

    from refine.core.library_noise import library_noise_to

    path = tmp_path / "logs" / "refine.log"
    with library_noise_to(path):
        logging.getLogger("transformers").warning("library noise")
    assert "library noise" in path.read_text()


@pytest.mark.parametrize("existing", [True, False])
def test_metrics_planted_as_a_link_are_refused(tmp_path, victim, existing):
    """An existing target is neither read nor rewritten; a dangling link's target is not created."""
    from distill.metrics import Metrics

    target = victim if existing else tmp_path / "elsewhere" / "created"
    _plant(tmp_path / "run" / "metrics.jsonl", target)
    with pytest.raises(InputError) as e:
        Metrics(tmp_path / "run", resume_step=0).close()
    _one_line(e, "metrics.jsonl", "symbolic link")
    assert victim.read_text() == PRECIOUS and (existing or not target.exists())


def test_metrics_still_append_and_resume(tmp_path):
    from distill.metrics import Metrics

    m = Metrics(tmp_path, resume_step=0)
    for step in (1, 2, 3):
        m.log({"step": step, "split": "train", "loss": 1.0})
    m.close()
    m = Metrics(tmp_path, resume_step=2)      # resumed at step 2: step 3 is dropped
    m.log({"step": 3, "split": "train", "loss": 0.5})
    m.close()
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in recs] == [(1, 1.0), (2, 1.0), (3, 0.5)]


def test_open_append_refuses_links_and_what_is_not_a_file(tmp_path, victim):
    from refine.core.write import open_append

    _plant(tmp_path / "a.log", victim)
    with pytest.raises(InputError) as e:
        open_append(tmp_path / "a.log")
    _one_line(e, "a.log", "symbolic link")
    (tmp_path / "folder.log").mkdir()
    with pytest.raises(InputError) as e:
        open_append(tmp_path / "folder.log")
    _one_line(e, "folder.log", "a folder")
    with pytest.raises(InputError) as e:
        open_append("/dev/null")                                  # a device
    _one_line(e, "/dev/null", "character device")
    with open_append(tmp_path / "b.log") as f:
        f.write("one\n")
    with open_append(tmp_path / "b.log") as f:
        f.write("two\n")
    assert (tmp_path / "b.log").read_text() == "one\ntwo\n" and victim.read_text() == PRECIOUS


# ---- FIFOs: refused, never waited on (in a child: an open that blocks would hang the tests) ----

@pytest.mark.parametrize("reader", [False, True])
def test_a_fifo_at_the_log_path_does_not_block(tmp_path, reader):
    path = tmp_path / "logs" / "teacher.log"
    path.parent.mkdir()
    os.mkfifo(path)
    keep = os.open(path, os.O_RDONLY | os.O_NONBLOCK) if reader else None    # with a reader a FIFO opens at once
    try:
        res = _python("import sys\nfrom pathlib import Path\nfrom refine.console import LogFile\n"
                      "from refine.core.errors import InputError\n"
                      f"try:\n    LogFile(Path({str(path)!r}), 'teacher pass').close()\n"
                      "except InputError as e:\n    print(e); sys.exit(2)\n", timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("opening a FIFO at the log path blocked the run")
    finally:
        if keep is not None:
            os.close(keep)
    assert res.returncode == 2 and "FIFO" in res.stdout and len(res.stdout.splitlines()) == 1, res


def test_a_fifo_at_metrics_does_not_block(tmp_path):
    os.mkfifo(tmp_path / "metrics.jsonl")
    try:
        res = _python("import sys\nfrom pathlib import Path\nfrom distill.metrics import Metrics\n"
                      "from refine.core.errors import InputError\n"
                      f"try:\n    Metrics(Path({str(tmp_path)!r}), 0).close()\n"
                      "except InputError as e:\n    print(e); sys.exit(2)\n", timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("a FIFO at metrics.jsonl blocked the trainer")
    assert res.returncode == 2 and "FIFO" in res.stdout, res


# ---- report.md: written by an atomic rename, which replaces a link and never writes through it ----

class _Tok:
    def decode(self, ids):
        return " ".join(f"w{i}" for i in ids)


def _instances(folder: Path):
    from refine.core.instances import Instances, InstanceWriter, TokenizerInfo

    w = InstanceWriter(folder, 8, TokenizerInfo("tiny", "h", 50, 0))
    for i in range(6):
        w.add(list(range(1, 12)), f"doc/{i}", "src")
    w.close()
    return Instances(folder)


def test_refine_report_replaces_a_planted_link(tmp_path, victim):
    from refine.report import write_report

    out = tmp_path / "out"
    inst = _instances(out / "instances_all")
    _plant(out / "report.md", victim)
    _plant(out / "score_hist.png", victim)
    scores, kept = np.linspace(-1, 1, len(inst)), np.arange(len(inst) // 2)
    passes = {"tok_s": 1.0, "mean_nll": 1.0}
    diversity = {"scored": 0.3, "refined": 0.2, "random_same_size": 0.25}
    write_report(out, inst, inst, scores, kept, _Tok(), {}, passes, passes, 1, "tokens", (scores, scores),
                 {"kind": "given (reference.path)"}, diversity)
    assert victim.read_text() == PRECIOUS
    text = (out / "report.md").read_text()
    assert not (out / "report.md").is_symlink() and "Refine report" in text
    assert "## Diversity" in text and "less diverse than a random set" in text   # written whole, once
    assert not (out / "score_hist.png").is_symlink()


def test_the_training_report_replaces_planted_links(tmp_path, victim):
    from distill.report import build

    run = tmp_path / "runs" / "lm_s0"
    (run / "checkpoints" / "step_0000010").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"config": {"run_name": "lm", "seed": 0, "kd": {"signal": "none"},
                                                         "data": {"train": "/x/t"}}, "parameters": 10}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 10, "split": "val", "loss": 7.0, "tokens": 100}) + "\n")
    (run / "summary.json").write_text(json.dumps({"val_loss": 7.0, "tokens": 100,
                                                  "checkpoint": str(run / "checkpoints" / "step_0000010")}))
    reports = tmp_path / "reports"
    for name in ("r.md", "r.json", "r_val_loss.png"):
        _plant(reports / name, victim)
    build([tmp_path / "runs"], "r", reports)
    assert victim.read_text() == PRECIOUS
    assert not any((reports / n).is_symlink() for n in ("r.md", "r.json", "r_val_loss.png"))


# ---- claimed records (scoring.json, key.json) ----

def _old_claim_names(path: Path) -> list[Path]:
    """Every name the claim's temporary had before it moved into a private folder: this host and pid's."""
    return [path.with_name(f".{path.name}.claim-{socket.gethostname()}-{os.getpid()}")]


def test_claim_writes_through_no_link_at_a_predictable_name(tmp_path, victim):
    from refine.core.write import claim_json

    path = tmp_path / "out" / "scoring.json"
    for name in _old_claim_names(path):
        _plant(name, victim)
    assert claim_json(path, {"a": 1}) == {"a": 1}
    assert victim.read_text() == PRECIOUS
    assert json.loads(path.read_text()) == {"a": 1} and not path.is_symlink()
    assert not list(path.parent.glob(".scoring.json.tmp-*"))          # the private temporary is gone


@pytest.mark.parametrize("existing", [True, False])
def test_a_record_planted_as_a_link_is_refused(tmp_path, victim, existing):
    from refine.core.write import claim_json

    target = victim if existing else tmp_path / "elsewhere" / "created"
    path = _plant(tmp_path / "out" / "scoring.json", target)
    with pytest.raises(InputError) as e:
        claim_json(path, {"a": 1})
    _one_line(e, "scoring.json", "symbolic link")
    assert victim.read_text() == PRECIOUS and (existing or not target.exists())


def test_claims_stay_exclusive_and_old_stale_claims_are_swept(tmp_path):
    """Of writers claiming at once, one record wins and every one reads it; a temporary an older version's writer
    left when it was killed (``.NAME.claim-HOST-PID``, its pid dead) goes, a live pid's stays."""
    from refine.core.write import claim_json

    path = tmp_path / "key.json"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    (tmp_path / f".key.json.claim-{host}-{dead.pid}").write_text("{}")
    (tmp_path / f".key.json.claim-{host}-{os.getppid()}").write_text("{}")    # a live process's
    results, start = [None] * 8, threading.Barrier(8)

    def claim(i):
        start.wait()
        results[i] = claim_json(path, {"writer": i})

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({json.dumps(r) for r in results}) == 1 and results[0] == json.loads(path.read_text())
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([f".key.json.claim-{host}-{os.getppid()}", "key.json"]), names
