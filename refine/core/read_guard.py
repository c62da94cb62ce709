"""One guard for every reader: what a reader opens inside a folder stays inside it and is a regular file.

A folder someone else filled (a downloaded corpus, a saved dataset, a checkpoint, a hub cache) may hold symbolic
links (to ``~/.ssh/id_rsa``, to ``..``), FIFOs and devices (an ``open`` that never returns, a read that never
ends) and metadata naming files elsewhere (``state.json`` listing ``/etc/x.arrow`` or ``../other.arrow``). The
rules, in one place:

* ``is_plain(p)``: a regular file or a folder, not a link (``lstat``). Walkers (corpus folders and globs) read
  only these and skip and count the rest (``refine.core.corpus.CorpusStats``).
* ``regular_file_inside(path, root)``: the path a piece of metadata names, checked before it is opened: below
  ``root`` with no ``..``, no link on the way, itself a regular file; else one ``InputError`` line naming it.
* ``hub_snapshot_file(p, root)``: the one kind of link a reader follows, a file of a huggingface_hub cache
  snapshot (``<type>s--<org>--<name>/snapshots/<rev>/...`` linked to a regular file directly inside that repo's
  ``blobs/`` folder, which is a real folder, not a link, and is reached from ``root`` through no link either).
* ``check_tree(folder, what)``: everything under a folder that is read as a whole (a checkpoint to export or
  resume) is a regular file, a folder or such a hub snapshot link; one line for anything else.
* ``check_saved_dataset(d)``: a ``save_to_disk`` folder names only plain files of its own (``state.json``'s
  ``_data_files``, ``dataset_dict.json``'s splits) before ``datasets.load_from_disk`` opens any.

The path a user names (the corpus, the checkpoint) may itself be a link: whoever names it chose it.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

from refine.core.errors import InputError

HUB_REPO = re.compile(r"(models|datasets|spaces)--.+")   # how huggingface_hub names a repo's cache folder
MAX_METADATA_BYTES = 16 << 20                             # a state.json / dataset_dict.json is a few KB
_KINDS = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"),
          (stat.S_ISREG, "a regular file"))


def kind(p: str | Path, follow: bool = False) -> str:
    """What ``p`` is, not following a link (unless ``follow``): ``"a FIFO"``, ``"a symbolic link"``, ``"missing"``..."""
    try:
        mode = (os.stat if follow else os.lstat)(p).st_mode
    except OSError:
        return "missing"
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def is_plain(p: str | Path) -> bool:
    """A regular file or a folder, and not a link."""
    try:
        mode = os.lstat(p).st_mode
    except OSError:
        return False
    return stat.S_ISREG(mode) or stat.S_ISDIR(mode)


def is_link_below(p: Path, root: Path) -> bool:
    """``p`` or a folder between ``root`` and it is a symbolic link (not followed inside a folder)."""
    while p != root and p != p.parent:
        if p.is_symlink():
            return True
        p = p.parent
    return False


def hub_snapshot_file(p: Path, root: Path) -> Path | None:
    """The blob a hub cache snapshot link ``p`` (found under ``root``) stands for, or None for any other link.

    Accepted only as huggingface_hub lays a download out: ``p`` sits in ``<repo>/snapshots/<rev>/`` (a repo
    folder named ``models--``/``datasets--``/``spaces--``), no link on the way from ``root`` to it, and it
    resolves to a regular file directly inside ``<repo>/blobs``, which is a real folder, not a link (a planted
    ``blobs -> ~/.ssh`` must not make ``snapshots/r/notes.txt -> ../../blobs/id_rsa`` readable)."""
    p, root = Path(p), Path(root)
    if not p.is_symlink() or is_link_below(p.parent, root):
        return None
    try:
        where = root.resolve() / p.relative_to(root)      # the link's real place (no link between root and it)
        target = p.resolve(strict=True)
    except (ValueError, OSError, RuntimeError):           # not below root; dangling; a loop
        return None
    parts = where.parts
    marks = [i for i, part in enumerate(parts[:-2]) if part == "snapshots"]  # <repo>/snapshots/<rev>/.../p
    if not marks:
        return None
    repo = Path(*parts[: marks[-1]])
    blobs = repo / "blobs"
    if not HUB_REPO.fullmatch(repo.name) or kind(blobs) != "a folder":
        return None
    if target.parent != blobs.resolve() or kind(target) != "a regular file":
        return None
    return target


def regular_file_inside(path: str | Path, root: str | Path, hub_links: bool = False) -> Path:
    """``path`` (below ``root``, as metadata or a walk names it), checked to be a regular file reached without
    ``..`` or links; with ``hub_links`` a hub snapshot link (``hub_snapshot_file``) is accepted too. Returns the
    file to open; InputError (one line naming ``path``) for anything else."""
    path, root = Path(path), Path(root)
    try:
        rel = path.relative_to(root)
    except ValueError:
        rel = None
    if rel is None or ".." in rel.parts or not rel.parts:
        raise InputError(f"{path}: outside {root}; refusing to read it")
    if is_link_below(path.parent, root):
        raise InputError(f"{path}: reached through a symbolic link inside {root}; refusing to read it")
    what = kind(path)
    if what == "a symbolic link" and hub_links and (target := hub_snapshot_file(path, root)) is not None:
        return target
    if what == "missing":
        raise InputError(f"{path}: missing")
    if what != "a regular file":
        raise InputError(f"{path}: {what}, not a regular file; refusing to read it")
    return path


def check_tree(folder: str | Path, what: str) -> None:
    """Every entry under ``folder`` (hidden ones too) is a regular file, a folder or a hub snapshot link; one
    InputError line naming the first that is not (a link, a FIFO, a device, a socket)."""
    folder = Path(folder)
    for top, dirs, files in os.walk(folder):              # os.walk does not descend into linked folders
        for name in sorted(dirs) + sorted(files):
            p = Path(top) / name
            if is_plain(p) or hub_snapshot_file(p, folder) is not None:
                continue
            raise InputError(f"refusing {what} {folder}: {p} is {kind(p)}, not a regular file "
                             f"(it is read only from its own regular files)")


def _plain_name(name, where: Path, field: str) -> str:
    """A file or folder name as ``save_to_disk`` writes it: one component, not hidden, no ``/`` or ``..``."""
    if not isinstance(name, str) or not name or name != Path(name).name or name.startswith(".") or "\\" in name:
        raise InputError(f"{where}: {field} {str(name)[:100]!r} is not a plain name inside {where.parent}; "
                         f"refusing to read it")
    return name


def _metadata(f: Path, root: Path, key: str):
    regular_file_inside(f, root, hub_links=True)
    try:
        with open(f, "rb") as fh:
            data = fh.read(MAX_METADATA_BYTES + 1)
        if len(data) > MAX_METADATA_BYTES:
            raise InputError(f"{f}: over {MAX_METADATA_BYTES} bytes, not a saved dataset's metadata")
        value = json.loads(data)[key]
    except InputError:
        raise
    except RecursionError:
        raise InputError(f"{f}: JSON nested too deeply to read") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{f}: not a saved dataset's metadata (no readable {key!r}: "
                         f"{type(e).__name__})") from None
    if not isinstance(value, list):
        raise InputError(f"{f}: {key!r} is {type(value).__name__}, not a list")
    return value


def check_saved_dataset(d: str | Path) -> None:
    """The files ``datasets.load_from_disk(d)`` would open are regular files inside ``d`` (hub snapshot links
    accepted): ``dataset_info.json`` and ``state.json`` and each of ``state.json``'s ``_data_files``, or, for a
    ``DatasetDict``, each split of ``dataset_dict.json`` as a plain subfolder checked the same way. Decided as
    ``load_from_disk`` decides (a ``Dataset`` when both ``dataset_info.json`` and ``state.json`` are files)."""
    d = Path(d)
    if (d / "dataset_info.json").is_file() and (d / "state.json").is_file():
        _check_dataset(d, d)
    elif (d / "dataset_dict.json").is_file():
        for split in _metadata(d / "dataset_dict.json", d, "splits"):
            sub = d / _plain_name(split, d / "dataset_dict.json", "split")
            if kind(sub) != "a folder":
                raise InputError(f"{sub}: {kind(sub)}, not a split folder of {d}; refusing to read it")
            _check_dataset(sub, d)


def _check_dataset(s: Path, root: Path) -> None:
    regular_file_inside(s / "dataset_info.json", root, hub_links=True)
    for entry in _metadata(s / "state.json", root, "_data_files"):
        name = entry.get("filename") if isinstance(entry, dict) else entry
        regular_file_inside(s / _plain_name(name, s / "state.json", "data file"), root, hub_links=True)
