"""One reader guard (``refine.core.read_guard``): every reader stays inside its folder and reads regular files
only: corpus folders and globs, hub cache snapshots, saved datasets, hub revisions, checkpoints and exports."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
from pathlib import Path

import pytest

from refine.core.corpus import CorpusStats, corpus_units, iter_documents
from refine.core.errors import InputError
from refine.core.pack import corpus_fingerprint
from tests.conftest import HUB_COMMIT, offline_hub_repo

SECRET = "-----BEGIN OPENSSH PRIVATE KEY----- secret"
COMMIT = HUB_COMMIT


class Fifos:
    """FIFOs a test plants, watched by a thread: whenever a reader has one open (an ``open`` that would block for
    ever), the thread opens and closes its writing end, so the reader sees an empty file and goes on, and the
    FIFO is recorded in ``opened``: a reader that opens one fails the test instead of hanging it."""

    def __init__(self):
        self.paths: list[Path] = []
        self.opened: set[str] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def make(self, path: Path) -> Path:
        os.mkfifo(path)
        self.paths.append(path)
        return path

    def _watch(self):
        while not self.stop.wait(0.05):
            for p in list(self.paths):
                try:
                    os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))   # ENXIO: nobody reads it
                except OSError:
                    continue
                self.opened.add(p.name)


@pytest.fixture
def fifos():
    watch = Fifos()
    yield watch
    watch.stop.set()
    watch.thread.join()


def _one_line(e) -> str:
    assert "\n" not in str(e.value)
    return str(e.value)


# --- 4: a hub snapshot link counts only into the repo's real blobs/ folder -------------------------------------

@pytest.mark.parametrize("repo_name", ["x", "datasets--org--x"])
def test_a_linked_blobs_folder_does_not_make_a_snapshot_link_readable(tmp_path, repo_name):
    secret_dir = tmp_path / "home" / ".ssh"
    secret_dir.mkdir(parents=True)
    (secret_dir / "id_rsa").write_text(SECRET)
    corp = tmp_path / "corp"
    (corp / repo_name / "snapshots" / "r").mkdir(parents=True)
    (corp / "a.txt").write_text("real document")
    before = corpus_fingerprint(corp)
    os.symlink(secret_dir, corp / repo_name / "blobs")
    os.symlink(secret_dir / "id_rsa", corp / repo_name / "snapshots" / "r" / "notes.txt")
    os.symlink("../../blobs/id_rsa", corp / repo_name / "snapshots" / "r" / "rel.txt")
    for path, links in ((corp, 3), (f"{corp}/**/*.txt", 2)):      # a folder: blobs, notes.txt, rel.txt
        stats = CorpusStats()
        docs = list(iter_documents(path, stats=stats))
        assert SECRET not in "".join(d.text for d in docs) and [d.text for d in docs] == ["real document"]
        assert stats.skipped_links == links
    with pytest.raises(InputError, match=r"no corpus files match .*\(2 links, 0 FIFOs, devices or sockets skipped"):
        corpus_units(corp / repo_name / "snapshots" / "r" / "*.txt")    # only the links match: nothing to read
    assert corpus_fingerprint(corp) == before == corpus_fingerprint(f"{corp}/**/*.txt")


def test_a_snapshot_named_by_the_user_reads_only_through_a_real_blobs_folder(tmp_path):
    """The corpus path inside a hub cache: its repo is above it; a ``blobs`` link is still refused."""
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    (secret_dir / "id_rsa").write_text(SECRET)
    repo = tmp_path / "hub" / "datasets--org--corpus"
    snap = repo / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "real.txt").write_text("real document")
    os.symlink(secret_dir, repo / "blobs")
    os.symlink("../../blobs/id_rsa", snap / "notes.txt")
    stats = CorpusStats()
    assert [d.text for d in iter_documents(snap, stats=stats)] == ["real document"] and stats.skipped_links == 1
    os.unlink(repo / "blobs")                             # the real layout: the same link is read
    (repo / "blobs").mkdir()
    shutil.copy(secret_dir / "id_rsa", repo / "blobs" / "id_rsa")
    assert sorted(d.text for d in iter_documents(snap)) == sorted(["real document", SECRET])


# --- 6: FIFOs, devices and sockets are skipped and counted in a walk, one line as the corpus itself ------------

def test_fifos_devices_and_sockets_are_skipped_and_counted(tmp_path, fifos):
    root = tmp_path / "c"
    root.mkdir()
    (root / "a.txt").write_text("real document")
    fifos.make(root / "pipe.txt")
    fifos.make(root / "pipe.jsonl")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "s.txt"))
    try:
        with pytest.raises(InputError, match="no corpus files match"):  # only FIFOs match: one line, no hang
            corpus_fingerprint(f"{root}/p*")
        with pytest.raises(InputError, match=r"no corpus files match .*\(0 links, 2 FIFOs, devices or sockets"):
            list(iter_documents(f"{root}/p*"))
        for path in (root, f"{root}/*"):
            stats = CorpusStats()
            assert [d.text for d in iter_documents(path, stats=stats)] == ["real document"]
            assert stats.skipped_special == 3 and stats.skipped_links == 0
            corpus_fingerprint(path)                      # returns
    finally:
        sock.close()
    assert not fifos.opened


def test_a_fifo_or_device_as_the_corpus_is_one_line(tmp_path, fifos):
    fifos.make(tmp_path / "corpus.jsonl")
    os.symlink(tmp_path / "corpus.jsonl", tmp_path / "named.jsonl")  # a link the user names is followed
    for path, what in ((tmp_path / "corpus.jsonl", "a FIFO"), (tmp_path / "named.jsonl", "a FIFO"),
                       (Path("/dev/null"), "a character device")):
        for read in (lambda p: list(iter_documents(p)), corpus_fingerprint):
            with pytest.raises(InputError, match=rf"corpus {path} is {what}, not a regular file or folder") as e:
                read(path)
            _one_line(e)
    assert not fifos.opened


# --- 7: a saved dataset names only plain files of its own --------------------------------------------------------

def _saved(path: Path, texts: list[str], dict_split: str | None = None) -> Path:
    import datasets

    ds = datasets.Dataset.from_dict({"text": texts})
    (datasets.DatasetDict({dict_split: ds}) if dict_split else ds).save_to_disk(str(path))
    return path


def _data_file(d: Path) -> Path:
    return d / json.loads((d / "state.json").read_text())["_data_files"][0]["filename"]


def _set_data_file(d: Path, name: str) -> None:
    state = json.loads((d / "state.json").read_text())
    state["_data_files"][0]["filename"] = name
    (d / "state.json").write_text(json.dumps(state))


@pytest.mark.parametrize("how", ["absolute", "dotdot", "link", "hidden", "fifo"])
def test_a_saved_dataset_reads_no_file_outside_its_folder(tmp_path, how, fifos):
    secret = _saved(tmp_path / "secret_ds", [SECRET])
    ds = _saved(tmp_path / "corpus" / "ds", ["real document"])
    assert [d.text for d in iter_documents(tmp_path / "corpus")] == ["real document"]
    arrow = _data_file(ds)
    if how == "absolute":
        _set_data_file(ds, str(_data_file(secret)))
    elif how == "dotdot":
        _set_data_file(ds, f"../../secret_ds/{_data_file(secret).name}")
    elif how == "hidden":                                  # inside, but the fingerprint leaves hidden files out
        shutil.copy(_data_file(secret), ds / ".data.arrow")
        _set_data_file(ds, ".data.arrow")
    elif how == "link":
        arrow.unlink()
        os.symlink(_data_file(secret), arrow)
    else:
        arrow.unlink()
        fifos.make(arrow)
    expected = {"absolute": r"state\.json: data file '/.*' is not a plain name inside .*ds; refusing",
                "dotdot": r"state\.json: data file '\.\./\.\./secret_ds/.*' is not a plain name",
                "hidden": r"state\.json: data file '\.data\.arrow' is not a plain name",
                "link": r"data-.*\.arrow: a symbolic link, not a regular file; refusing",
                "fifo": r"data-.*\.arrow: a FIFO, not a regular file; refusing"}[how]
    for path in (ds, tmp_path / "corpus", f"{tmp_path}/corpus/*"):
        for read in (lambda p: list(iter_documents(p)), corpus_fingerprint):
            with pytest.raises(InputError, match=expected) as e:
                read(path)
            _one_line(e)
    assert not fifos.opened


def test_a_saved_dataset_dict_split_stays_inside(tmp_path):
    _saved(tmp_path / "secret_dict", [SECRET], dict_split="train")
    d = _saved(tmp_path / "corpus", ["real document"], dict_split="train")
    assert [x.text for x in iter_documents(d)] == ["real document"]
    for splits, expected in ((["../secret_dict/train"], r"split '\.\./secret_dict/train' is not a plain name"),
                             ([str(tmp_path / "secret_dict" / "train")], r"split '/.*' is not a plain name")):
        (d / "dataset_dict.json").write_text(json.dumps({"splits": splits}))
        with pytest.raises(InputError, match=expected):
            list(iter_documents(d, split=splits[0]))
    (d / "dataset_dict.json").write_text(json.dumps({"splits": ["other"]}))
    os.symlink(tmp_path / "secret_dict" / "train", d / "other")
    with pytest.raises(InputError, match=r"other: a symbolic link, not a split folder"):
        list(iter_documents(d, split="other"))


# --- 9: offline hub revisions are branch/tag names or commits, and resolve inside the repo's snapshots ----------

@pytest.fixture
def hub_home(tmp_path, monkeypatch) -> Path:
    repo = offline_hub_repo(tmp_path, monkeypatch)
    (repo / "snapshots" / COMMIT / "config.json").write_text("{}")
    return repo


def test_a_hub_revision_cannot_leave_the_repo(hub_home, tmp_path):
    from refine.core.hub import hub_id, local_model

    assert local_model("acme/tiny").name == COMMIT
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "config.json").write_text("{}")
    (tmp_path / "planted").write_text(str(victim))          # read as a ref, it names the victim folder
    up = "../" * len(hub_home.joinpath("refs").relative_to(tmp_path).parts)
    for name in (f"acme/tiny@{up}planted", f"acme/tiny@{tmp_path}/planted", "acme/tiny@refs/../../x",
                 "acme/tiny@a//b", "acme/tiny@.hidden", "acme/tiny@main/"):
        with pytest.raises(InputError, match=r"is not a hub revision \(a branch or tag name, or a commit hash") as e:
            local_model(name)
        assert str(victim) not in _one_line(e)
    assert hub_id("acme/tiny@refs/pr/1") == ("acme/tiny", "refs/pr/1") and hub_id("acme/tiny@v1.0") == (
        "acme/tiny", "v1.0")
    (hub_home / "refs" / "main").write_text("../../../../victim")   # a poisoned ref names a folder elsewhere
    with pytest.raises(InputError, match=r"acme/tiny: the hub cache's snapshot .* is not a folder inside "):
        local_model("acme/tiny")


# --- 12: local-looking paths are local ------------------------------------------------------------------------

def test_a_missing_local_path_is_not_taken_for_a_hub_id(hub_home, tiny_tokenizer_dir):
    from refine.core.hub import hub_id
    from refine.core.paths import resolve_model
    from refine.core.tokenizer import load_tokenizer

    assert not Path("runs").exists()
    for local in ("runs/reference", "outputs/x", "multirun/x", "checkpoints/x", "runs/x@main"):
        assert hub_id(local) is None
    assert hub_id("acme/tiny") == ("acme/tiny", None)
    with pytest.raises(InputError, match=r"^no model at runs/reference") as e:
        resolve_model("runs/reference")
    assert "hub" not in _one_line(e)
    with pytest.raises(InputError, match=r"^tokenizer folder not found: runs/tok") as e:
        load_tokenizer("runs/tok")
    assert "hub" not in _one_line(e)


# --- 10: an export or a resume reads a checkpoint's own regular files only --------------------------------------

def _step(tmp_path) -> Path:
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_1"
    step.mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_1")
    (step / "config.json").write_text("{}")
    (step / "trainer_state.pt").write_bytes(b"state")
    (tmp_path / "secret.txt").write_text(SECRET)
    return run


@pytest.mark.parametrize("planted", ["link", "fifo"])
def test_export_refuses_links_and_fifos_in_the_checkpoint(tmp_path, planted, fifos):
    from distill.export import export

    run = _step(tmp_path)
    step = run / "checkpoints" / "step_1"
    if planted == "link":
        os.symlink(tmp_path / "secret.txt", step / "notes.txt")
    else:
        fifos.make(step / "vocab.json")
    what = "a symbolic link" if planted == "link" else "a FIFO"
    for src in (run, step):
        with pytest.raises(InputError, match=rf"refusing checkpoint .*step_1: .*step_1/\w+\.\w+ is {what}") as e:
            export(src, tmp_path / "out")
        _one_line(e)
        assert not (tmp_path / "out").exists()
    assert not fifos.opened


def test_resume_refuses_a_planted_link_in_the_latest_checkpoint(tmp_path):
    from distill import checkpoint

    run = _step(tmp_path)
    assert checkpoint.latest(run) == run / "checkpoints" / "step_1"
    state = run / "checkpoints" / "step_1" / "trainer_state.pt"
    state.unlink()
    os.symlink(tmp_path / "secret.txt", state)
    with pytest.raises(InputError, match=r"refusing checkpoint .*step_1: .*trainer_state\.pt is a symbolic link"):
        checkpoint.latest(run)


# --- the guard itself -----------------------------------------------------------------------------------------

def test_regular_file_inside(tmp_path):
    from refine.core.read_guard import is_plain, regular_file_inside

    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "sub" / "f").write_text("x")
    (tmp_path / "outside").write_text("x")
    os.symlink(tmp_path / "d" / "sub", tmp_path / "d" / "via")
    os.mkfifo(tmp_path / "d" / "pipe")
    d = tmp_path / "d"
    assert regular_file_inside(d / "sub" / "f", d) == d / "sub" / "f" and is_plain(d / "sub") and is_plain(d)
    assert not is_plain(d / "via") and not is_plain(d / "pipe") and not is_plain(d / "missing")
    for path, expected in ((d / ".." / "outside", "outside"), (tmp_path / "outside", "outside"),
                           (d / "via" / "f", "reached through a symbolic link"),
                           (d / "pipe", "a FIFO, not a regular file"), (d / "missing", "missing"),
                           (d / "sub", "a folder, not a regular file")):
        with pytest.raises(InputError, match=expected):
            regular_file_inside(path, d)


def test_a_saved_dataset_in_a_hub_snapshot_is_read_and_fingerprinted_through_its_blob_links(tmp_path):
    """A ``save_to_disk`` folder downloaded from the hub: every file a link into the repo's blobs, all read and
    all part of the cache key."""
    import hashlib

    _saved(tmp_path / "made", ["hub document"])
    repo = tmp_path / "hub" / "datasets--org--saved"
    (repo / "blobs").mkdir(parents=True)
    ds = repo / "snapshots" / "r" / "ds"
    ds.mkdir(parents=True)
    for f in (tmp_path / "made").iterdir():
        sha = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, repo / "blobs" / sha)
        os.symlink(f"../../../blobs/{sha}", ds / f.name)
    assert [d.text for d in iter_documents(ds.parent)] == ["hub document"]
    key = corpus_fingerprint(ds.parent)
    arrow = _data_file(ds)
    blob = arrow.resolve()
    blob.unlink()
    shutil.copy(_data_file(_saved(tmp_path / "other", ["changed document"])), blob)
    assert [d.text for d in iter_documents(ds.parent)] == ["changed document"] and corpus_fingerprint(ds.parent) != key
