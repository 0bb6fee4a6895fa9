"""Fault injection for the tests of the failure paths; never set in a normal run.

`CLMAE_FAULT=KIND@STEP` arms one fault (several, comma-separated: `nan_loss@5,nan_loss@17`):
- `nan_loss@N`: the MAE loss of the last rank becomes NaN at global step N (tests the NaN guard, and
  that every rank stops even though only one saw it);
- `kill_in_save@N`: rank 0 kills itself with SIGKILL in the middle of writing checkpoint N, after the
  engines' shards and before the COMPLETE marker (tests that `latest` never points at a partial save);
- `kill_all_in_save@N`: the same on every rank at once (a node's death during a save);
- `kill_before_save@N`: every rank kills itself as checkpoint N begins, before anything of it is written
  (with N the last step: a death after the last step, before the final checkpoint and the MLflow run's end);
- `hang@N`: the last rank stops inside global step N and never returns (tests the hang watchdog);
- `kill_all@N`: every rank kills itself with SIGKILL as global step N begins, after step N-1 is logged and
  before anything of step N runs (a node's death; with N before the first checkpoint, the case of a job that
  dies in its first minutes).
"""

from __future__ import annotations

import os
import signal
import time

ENV = "CLMAE_FAULT"


def armed(kind: str, step: int) -> bool:
    for spec in os.environ.get(ENV, "").split(","):
        name, _, at = spec.strip().partition("@")
        if name == kind and at.isdigit() and int(at) == step:
            return True
    return False


def nan_loss_due(rank: int, world_size: int, step: int) -> bool:
    """Whether the MAE loss of global step `step` is to be poisoned on this rank (`nan_loss@N`)."""
    return rank == world_size - 1 and armed("nan_loss", step)


def at_step(rank: int, world_size: int, step: int) -> bool:
    """The faults armed for global step `step` on this rank: hangs here for `hang@N`; returns whether the MAE
    loss is to be poisoned (`nan_loss@N`). One call in the loop, so that injection stays out of its reading."""
    if armed("kill_all", step):
        kill_self()
    if rank == world_size - 1 and armed("hang", step):
        hang_forever()
    return nan_loss_due(rank, world_size, step)


def in_save(rank: int, step: int, phase: str) -> None:
    """The faults armed for checkpoint `step` at `phase`: "begin" (before anything is written) or "written"
    (the engines' shards and the rank files are written, the manifest and COMPLETE are not)."""
    if phase == "begin" and armed("kill_before_save", step):
        kill_self()
    if phase == "written" and (armed("kill_all_in_save", step) or (rank == 0 and armed("kill_in_save", step))):
        kill_self()


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def hang_forever() -> None:
    """What a deadlocked rank looks like from outside: alive, silent, never at the next collective."""
    while True:
        time.sleep(1)
