"""Where this process stands in a run, read from the launcher's environment variables (torchrun, srun,
submitit). Without torch, so that the CLI can ask before it loads anything (da_runner/distributed.py
does the rest)."""

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank `rank` of `size`, GPU `local_rank` of its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# Where launchers other than torchrun say how many tasks run and which one this is: (rank, count, local
# rank). SLURM's srun (hydra/launcher=slurm_ddp submits through it): the job step's task count, not the
# allocation's (SLURM_NTASKS), so a batch script that calls da-run without srun stays one process;
# submitit's local executor (hydra/launcher=submitit_local with tasks_per_node > 1), which runs the same
# job on one machine.
TASK_VARIABLES = (("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"),
                  ("SUBMITIT_LOCAL_GLOBALID", "SUBMITIT_LOCAL_NTASKS", "SUBMITIT_LOCAL_LOCALID"))


def from_environment(env=os.environ) -> World:
    """The world that torchrun (RANK, WORLD_SIZE, LOCAL_RANK), srun with several tasks (SLURM_PROCID,
    SLURM_STEP_NUM_TASKS, SLURM_LOCALID) or submitit's local executor describes; one process otherwise."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    for rank, count, local_rank in TASK_VARIABLES:
        if int(env.get(count, "1")) > 1 and rank in env:
            return World(int(env[rank]), int(env[count]), int(env.get(local_rank, 0)))
    return World()
