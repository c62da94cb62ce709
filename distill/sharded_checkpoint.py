"""Sharded checkpoints under FSDP: each rank writes its own shard with ``torch.distributed.checkpoint`` (DCP).

Why: gathering the full weights and optimizer state on rank 0 at every save (``full_state_dict``) needs host
memory for the whole model three times over (weights + Adam's two moments): tens of GB for ``pd_6_8b``. Here
rank 0 holds about its shard, like every other rank.

A sharded ``step_XXXXXXX/`` holds ``dcp/`` (``__<rank>_0.distcp`` per rank + ``.metadata``) beside rank 0's
``config.json``, tokenizer and ``trainer_state.pt`` (step, data position, RNG; the optimizer is in ``dcp/``).
It is written under a temporary name and renamed like every checkpoint (``checkpoint.atomic_path``), and
resumes under any number of processes, FSDP or not: DCP matches tensors by name and each rank reads the
slices it holds (one process without a process group reads them all). The run's final checkpoint also gets
the gathered ``model.safetensors`` (a plain HF folder for evaluation); ``python -m distill.export`` turns any
other step into one.

DCP reads ``.metadata`` with ``pickle.load`` and non-tensor entries with ``torch.load(weights_only=False)``:
both are replaced here (an unpickler that admits only DCP's metadata records, sizes and dtypes; and
``weights_only=True``), so a checkpoint folder from elsewhere cannot run code. Its tensors are read by DCP
itself with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_state_dict

from distill.distributed import Dist, on_main, together
from refine.core.errors import InputError, everyone, write_error_line
from refine.core.write import atomic_path

DCP_DIR = "dcp"
# What DCP's .metadata pickles (torch 2.4-2.13), as exact (module, name) pairs: its own records, torch sizes,
# dtypes and layouts, plain containers. Never a whole module: pickle protocol 4 resolves dotted names, so
# admitting a module admits everything reachable from it (``filesystem`` + ``os.system`` is ``os.system``).
_DCP = "torch.distributed.checkpoint"
_SAFE_GLOBALS = frozenset({
    *((f"{_DCP}.metadata", n) for n in ("Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata",
                                        "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
                                        "_MEM_FORMAT_ENCODING")),
    (f"{_DCP}.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch", "device"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice")})


def is_sharded(step: str | Path) -> bool:
    return (Path(step) / DCP_DIR / ".metadata").is_file()


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        value = getattr(torch, name, None) if module == "torch" and name.isidentifier() else None
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            return value                       # torch.float32 and its kind: values, never callables
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


class SafeReader(FileSystemReader):
    """DCP's file reader, its metadata read by ``_MetadataUnpickler``: a planted pickle is one clear error."""

    def read_metadata(self, *args, **kwargs):
        path = Path(self.path) / ".metadata"
        try:
            metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt or foreign file
            raise InputError(f"refusing {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__} "
                             f"(resume only checkpoints this trainer wrote)") from None
        from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

        if not isinstance(metadata, Metadata):
            raise InputError(f"refusing {path}: it holds a {type(metadata).__name__}, not checkpoint metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor entries (an optimizer's hyper-parameters, step counts) read with ``weights_only=True``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def save(d: Dist, module: torch.nn.Module, opt, final: Path, write_rest: Callable[[Path], None]) -> None:
    """Every rank writes its shard of ``module`` (and ``opt``) into ``final``'s temporary; then rank 0's
    ``write_rest(tmp)`` adds its files and the temporary becomes ``final``. A write error on any rank ends every
    rank with one line, the temporary removed: the previous checkpoint stands."""
    with contextlib.ExitStack() as stack:    # rank 0's: leaving it renames the temporary (or removes it on error)
        def open_tmp() -> str:
            tmp = stack.enter_context(atomic_path(final))
            tmp.mkdir(parents=True)
            return str(tmp)

        names = [on_main(d, open_tmp)]
        if d.world > 1:
            dist.broadcast_object_list(names, src=0)
        tmp = Path(names[0])
        model_sd, optim_sd = get_state_dict(module, opt)
        aliases = _tied_aliases(module, model_sd)
        model_sd = {k: v for k, v in model_sd.items() if k not in aliases}
        error = None
        try:
            with _one_process_quiet():
                dcp.save({"model": model_sd, "optim": optim_sd},
                         storage_writer=FileSystemWriter(tmp / DCP_DIR, thread_count=1))
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's gathers every rank's failure
            error = _write_error(e, final / DCP_DIR)
            if error is None:
                raise
        together(d, error)
        on_main(d, lambda: write_rest(tmp))


@contextlib.contextmanager
def _one_process_quiet():
    """Without a process group DCP warns that it assumes one process: that is what we mean (2 -> 1, export)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _write_error(e: BaseException, where: Path) -> str | None:
    """One line for a failed shard write, also when DCP wrapped it (``CheckpointException.failures``: rank ->
    (exception, traceback))."""
    for cause in _causes(e):
        line = write_error_line(cause, where)
        if line:
            return line
    return None


def _causes(e: BaseException) -> list[BaseException]:
    """``e`` and, for DCP's ``CheckpointException``, each rank's failure (rank -> (exception, traceback))."""
    return [e] + [f[0] if isinstance(f, tuple) else f for f in getattr(e, "failures", {}).values()]


def _tied_aliases(module: torch.nn.Module, model_sd: dict) -> dict[str, str]:
    """Second names of a shared parameter (a tied LM head: ``lm_head.weight`` is ``embed_tokens.weight``), each
    with its first name, where both are keys of ``model_sd``. DCP would store the tensor once per name: for
    Gemma-3-270M's 168M-parameter embedding, 670 MB more per fp32 checkpoint. Saves write the first name only;
    loads read it and give it to both, so checkpoints that hold both names (written before) still load."""
    first, aliases = {}, {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) not in first:
            first[id(p)] = name
        elif name in model_sd and first[id(p)] in model_sd:
            aliases[name] = first[id(p)]
    return aliases


def load(module: torch.nn.Module, opt, step: Path) -> None:
    """Put the weights (and, with ``opt``, the optimizer state) of the sharded checkpoint ``step`` into
    ``module``, however it is distributed now (a collective under torchrun: every rank calls it)."""
    reader = SafeReader(step / DCP_DIR)
    try:
        reader.read_metadata()        # every rank reads the same file: a refusal here is the same on all of them
    except InputError as e:
        raise everyone(e) from None
    if opt is None:
        model_sd, optim_sd = get_model_state_dict(module), None
        state = {"model": model_sd}
    else:
        model_sd, optim_sd = get_state_dict(module, opt)
        state = {"model": model_sd, "optim": optim_sd}
    aliases = _tied_aliases(module, model_sd)
    state["model"] = {k: v for k, v in model_sd.items() if k not in aliases}
    try:
        with _one_process_quiet():
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner())
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's gathers every rank's failure
        refused = next((c for c in _causes(e) if isinstance(c, pickle.UnpicklingError)), None)
        if refused is None:
            raise
        raise everyone(InputError(f"refusing {step / DCP_DIR}: {str(refused).splitlines()[0]} (resume only "
                                  f"checkpoints this trainer wrote)")) from None
    state["model"].update({alias: state["model"][name] for alias, name in aliases.items()})
    if opt is None:
        module.load_state_dict(state["model"])
    else:
        set_state_dict(module, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
