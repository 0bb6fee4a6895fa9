"""Hang watchdog: a rank that stops making progress dumps every thread's Python stack and exits.

One stuck rank (a dead peer, a deadlocked loader, a wedged collective) freezes every other rank until the
collective timeout (`dist.timeout_minutes`, 30 by default), and then often without saying where. A daemon
thread per rank watches the optimiser steps instead:

- Step timeout (`dist.step_timeout_s`): if no optimiser step completes within it, the rank writes a
  header and the stacks of all its threads (faulthandler) to stderr, every line tagged `[rank R]`, and
  exits with EXIT_HUNG. (A fixed timeout applies from the second step of a start; the first gets at least
  STARTUP_TIMEOUT_S.) The peers are stuck too (they wait for it), so their own watchdogs fire within the
  same poll interval; each waits a few seconds after its dump before exiting, so that its exit does not
  break a peer's socket before that peer has dumped. The time between two steps includes whatever the
  loop does there (logging, a checkpoint save). `null` (the default) derives it: 1800 s until
  WARMUP_STEPS steps have completed (start-up compiles kernels and fills loaders), then
  max(600 s, 10 x the median of the last 100 step intervals). 0 disables the watchdog.
- Signal grace (`dist.signal_grace_s`): after SIGTERM or SIGUSR1 the loop stops at its next step boundary.
  A rank blocked in a collective whose peers are gone never gets there, and would ignore the signal until
  the collective timeout; if the boundary is not reached within the grace period, it dumps and exits the
  same way. 0 disables this part.

The SLURM scripts treat EXIT_HUNG as a crash: requeue, resume from the last complete checkpoint.

    watchdog.start(cfg.dist, rank)   # once, before the first step
    watchdog.step_done()             # after every optimiser step, on every rank
    watchdog.stop()                  # when the loop ends, whichever way
"""

from __future__ import annotations

import faulthandler
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable

EXIT_HUNG = 124  # as coreutils `timeout`: the work did not finish in time
WARMUP_STEPS = 5
STARTUP_TIMEOUT_S = 1800.0
AUTO_FLOOR_S = 600.0
AUTO_FACTOR = 10.0
POLL_S = 0.5
# After its dump, a rank waits this long before exiting so that its peers' watchdogs (which poll every
# POLL_S and started counting at the same step, give or take a collective) dump theirs first.
EXIT_DELAY_S = 3.0


def auto_timeout(intervals: list[float]) -> float:
    """The derived step timeout for the step intervals measured so far (seconds)."""
    if len(intervals) < WARMUP_STEPS:
        return STARTUP_TIMEOUT_S
    return max(AUTO_FLOOR_S, AUTO_FACTOR * statistics.median(intervals))


class Watchdog:
    """step_timeout_s: None derives it (auto_timeout); 0 off. signal_grace_s: 0 off."""

    def __init__(
        self,
        step_timeout_s: float | None,
        signal_grace_s: float,
        rank: int,
        before_exit: Callable[[], None] | None = None,
    ) -> None:
        self.fixed_timeout = step_timeout_s
        self.before_exit = before_exit
        self.signal_grace_s = signal_grace_s
        self.rank = rank
        self.steps = 0
        self.last_step = time.monotonic()
        self.signal_at: float | None = None
        # Warm-up steps are slow (compilation), so they do not count towards the median.
        self.intervals: deque[float] = deque(maxlen=100)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="clmae-watchdog", daemon=True)

    def timeout(self) -> float | None:
        if self.fixed_timeout == 0:
            return None
        if self.fixed_timeout is None:
            return auto_timeout(list(self.intervals))
        # The first step of a start compiles kernels and fills the loaders: never less than start-up's.
        return self.fixed_timeout if self.steps else max(self.fixed_timeout, STARTUP_TIMEOUT_S)

    def step_done(self) -> None:
        now = time.monotonic()
        self.steps += 1
        if self.steps > WARMUP_STEPS:
            self.intervals.append(now - self.last_step)
        self.last_step = now
        self.signal_at = None  # the boundary was reached: the loop acts on the signal itself

    def signalled(self) -> None:
        """Called from the SIGTERM / SIGUSR1 handler: only records the time (async-signal context)."""
        if self.signal_at is None:
            self.signal_at = time.monotonic()

    def overdue(self, now: float) -> str | None:
        """Why this rank counts as hung at `now`, or None."""
        timeout = self.timeout()
        if timeout is not None and now - self.last_step > timeout:
            quiet = now - self.last_step
            return f"no optimiser step completed for {quiet:.0f} s (dist.step_timeout_s: {timeout:.0f} s)"
        signal_at = self.signal_at
        if self.signal_grace_s and signal_at is not None and now - signal_at > self.signal_grace_s:
            return (
                f"stop signal {now - signal_at:.0f} s ago and the step boundary not reached "
                f"(dist.signal_grace_s: {self.signal_grace_s:g} s)"
            )
        return None

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            reason = self.overdue(time.monotonic())
            if reason is not None:
                self._dump_and_exit(reason)

    def _dump_and_exit(self, reason: str) -> None:
        tag = f"[rank {self.rank}]"
        # faulthandler writes to a file descriptor; through a temporary file every line gets the rank tag
        # and the whole dump goes out in one write, not interleaved with a peer's.
        with tempfile.TemporaryFile("w+") as dump:
            faulthandler.dump_traceback(file=dump, all_threads=True)
            dump.seek(0)
            stacks = dump.read()
        header = (
            f"{tag} watchdog: hung after global step {self.steps} of this start: {reason}; "
            f"Python stacks of all threads follow; exiting with {EXIT_HUNG}"
        )
        lines = [header, *(f"{tag} {line}" for line in stacks.splitlines())]
        sys.stderr.write("\n".join(lines) + "\n")
        sys.stderr.flush()
        sys.stdout.flush()
        started = time.monotonic()
        if self.before_exit is not None:
            # In a thread of its own, bounded by the delay: an unreachable tracking server must not keep a
            # hung rank alive.
            last_words = threading.Thread(target=self._run_before_exit, daemon=True)
            last_words.start()
            last_words.join(EXIT_DELAY_S)
        time.sleep(max(0.0, EXIT_DELAY_S - (time.monotonic() - started)))
        os._exit(EXIT_HUNG)  # the main thread is stuck: only a hard exit ends the process

    def _run_before_exit(self) -> None:
        try:
            self.before_exit()
        except Exception as err:  # the exit goes ahead whatever happens here
            sys.stderr.write(f"[rank {self.rank}] watchdog: before exiting: {type(err).__name__}: {err}\n")

    def start(self) -> None:
        self.last_step = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


_ACTIVE: Watchdog | None = None


def start(dist_cfg, rank: int, before_exit: Callable[[], None] | None = None) -> Watchdog | None:
    """Watch this rank's steps with the `dist` section's settings (nothing to watch when both are 0).
    `before_exit` runs after the dump, before the exit, for at most EXIT_DELAY_S (the MLflow run's status)."""
    global _ACTIVE
    stop()
    if dist_cfg.step_timeout_s == 0 and not dist_cfg.signal_grace_s:
        return None
    _ACTIVE = Watchdog(dist_cfg.step_timeout_s, dist_cfg.signal_grace_s, rank, before_exit)
    _ACTIVE.start()
    return _ACTIVE


def step_done() -> None:
    if _ACTIVE is not None:
        _ACTIVE.step_done()


def signalled() -> None:
    if _ACTIVE is not None:
        _ACTIVE.signalled()


def stop() -> None:
    global _ACTIVE
    if _ACTIVE is not None:
        _ACTIVE.stop()
        _ACTIVE = None
