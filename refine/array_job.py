"""Which part of a sharded refine run this process is, from the scheduler that started it (``shard=auto``).

A Slurm job array (``sbatch --array=0-3``) gives each task ``SLURM_ARRAY_TASK_ID`` with the array's
``_COUNT``, ``_MIN`` and ``_STEP``; torchrun-style launchers give ``RANK`` and ``WORLD_SIZE``. ``shard=auto``
reads the first of these that is set; with neither, the run is whole (``0/1``). docs/scale.md has an example
array script (tools/refine_array.sbatch).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from refine.core.errors import InputError


def scheduler_shard(env: Mapping[str, str] = os.environ) -> tuple[str, str]:
    """(``"i/N"``, where it came from) for ``shard=auto``."""
    if "SLURM_ARRAY_TASK_ID" in env:
        names = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP")
        try:
            task, count, first, step = (int(env.get(n) or default) for n, default in zip(names, ("x", "x", "0", "1")))
        except ValueError:
            raise InputError("shard=auto: SLURM_ARRAY_TASK_ID is set but not with integer SLURM_ARRAY_TASK_COUNT, "
                             "_MIN and _STEP (an array of one range, e.g. --array=0-3)") from None
        index, off = divmod(task - first, max(step, 1))
        if off or not 0 <= index < count:
            raise InputError(f"shard=auto: Slurm array task {task} is not one of {count} tasks from {first} in "
                             f"steps of {step}: give the array as one range (e.g. --array=0-{count - 1})")
        return f"{index}/{count}", f"Slurm array task {task}, {count} tasks"
    if "RANK" in env or "WORLD_SIZE" in env:
        try:
            rank, world = int(env.get("RANK", "")), int(env.get("WORLD_SIZE", ""))
        except ValueError:
            raise InputError("shard=auto: RANK and WORLD_SIZE must both be set, as integers") from None
        if not 0 <= rank < world:
            raise InputError(f"shard=auto: RANK={rank} is not below WORLD_SIZE={world}")
        return f"{rank}/{world}", f"RANK {rank} of WORLD_SIZE {world}"
    return "0/1", "no Slurm array or RANK/WORLD_SIZE variables: the whole run"
