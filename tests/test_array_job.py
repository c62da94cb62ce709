"""``shard=auto``: the part of a sharded refine run, from a Slurm array's or torchrun's variables."""

from __future__ import annotations

import pytest

from refine.array_job import scheduler_shard
from refine.core.errors import InputError


@pytest.mark.parametrize("env, shard", [
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0"}, "2/4"),
    ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"}, "3/4"),  # 1-4
    ({"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0",
      "SLURM_ARRAY_TASK_STEP": "2"}, "3/4"),                                    # --array=0-6:2
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2", "RANK": "0", "WORLD_SIZE": "8"}, "1/2"),
    ({"RANK": "3", "WORLD_SIZE": "8"}, "3/8"),
    ({}, "0/1"),
])
def test_the_part_comes_from_the_scheduler(env, shard):
    assert scheduler_shard(env)[0] == shard


@pytest.mark.parametrize("env, line", [
    ({"SLURM_ARRAY_TASK_ID": "1"}, "SLURM_ARRAY_TASK_ID is set but not with integer SLURM_ARRAY_TASK_COUNT"),
    ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0"},
     "Slurm array task 7 is not one of 4 tasks"),
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0",
      "SLURM_ARRAY_TASK_STEP": "2"}, "Slurm array task 3 is not one of 4 tasks from 0 in steps of 2"),
    ({"RANK": "2"}, "RANK and WORLD_SIZE must both be set"),
    ({"RANK": "8", "WORLD_SIZE": "8"}, "RANK=8 is not below WORLD_SIZE=8"),
])
def test_variables_that_name_no_part_are_one_line(env, line):
    with pytest.raises(InputError, match=line):
        scheduler_shard(env)
