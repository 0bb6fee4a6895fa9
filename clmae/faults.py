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


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def hang_forever() -> None:
    """What a deadlocked rank looks like from outside: alive, silent, never at the next collective."""
    while True:
        time.sleep(1)
