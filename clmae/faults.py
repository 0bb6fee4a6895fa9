"""Fault injection for the tests of the failure paths; never set in a normal run.

`CLMAE_FAULT=KIND@STEP` arms one fault:
- `nan_loss@N`: the MAE loss of the last rank becomes NaN at global step N (tests the NaN guard, and
  that every rank stops even though only one saw it);
- `kill_in_save@N`: rank 0 kills itself with SIGKILL in the middle of writing checkpoint N, after the
  engines' shards and before the COMPLETE marker (tests that `latest` never points at a partial save);
- `hang@N`: the last rank stops inside global step N and never returns (tests the hang watchdog).
"""

from __future__ import annotations

import os
import signal
import time

ENV = "CLMAE_FAULT"


def armed(kind: str, step: int) -> bool:
    spec = os.environ.get(ENV, "")
    name, _, at = spec.partition("@")
    return name == kind and at.isdigit() and int(at) == step


def nan_loss_due(rank: int, world_size: int, step: int) -> bool:
    """Whether the MAE loss of global step `step` is to be poisoned on this rank (`nan_loss@N`)."""
    return rank == world_size - 1 and armed("nan_loss", step)


def at_step(rank: int, world_size: int, step: int) -> bool:
    """The faults armed for global step `step` on this rank: hangs here for `hang@N`; returns whether the MAE
    loss is to be poisoned (`nan_loss@N`). One call in the loop, so that injection stays out of its reading."""
    if rank == world_size - 1 and armed("hang", step):
        hang_forever()
    return nan_loss_due(rank, world_size, step)


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def hang_forever() -> None:
    """What a deadlocked rank looks like from outside: alive, silent, never at the next collective."""
    while True:
        time.sleep(1)
