"""clmae.watchdog in real processes: a stalled loop and a rank that ignores SIGTERM while blocked are
ended with their stacks and exit code 124. (The 2-rank hang through SLURM: tests/test_slurm_scripts.py.)"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from clmae import watchdog

# A process that makes `steps` steps, then blocks in a function named after what it imitates. It installs
# the same kind of handler as clmae.train (sets a flag and tells the watchdog) and prints READY when blocked.
CHILD = """\
import signal, sys, threading, time
from types import SimpleNamespace
from clmae import watchdog
stop = []
def on_signal(signum, frame):
    stop.append(signum)
    watchdog.signalled()
signal.signal(signal.SIGTERM, on_signal)
def before_exit():  # clmae.train marks the MLflow run FAILED here
    sys.stderr.write("[rank 3] before_exit ran\\n")
    sys.stderr.flush()
watchdog.start(
    SimpleNamespace(step_timeout_s=float(sys.argv[1]), signal_grace_s=float(sys.argv[2])), 3, before_exit
)
for _ in range(3):
    time.sleep(0.05)
    watchdog.step_done()
def blocked_in_collective():
    print("READY", flush=True)
    threading.Event().wait()  # like a gloo all_reduce whose peer is gone: no Python code runs here
blocked_in_collective()
"""


def run_child(step_timeout: float, grace: float, send_sigterm: bool) -> tuple[int, str, float]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(step_timeout), str(grace)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "READY"
    blocked = time.monotonic()
    if send_sigterm:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, err, time.monotonic() - blocked


def assert_dumped(err: str) -> None:
    lines = err.splitlines()
    assert lines and all(line.startswith("[rank 3] ") for line in lines), err
    assert "in blocked_in_collective" in err and "clmae/watchdog.py" in err  # the main thread and its own
    assert err.count("(most recent call first)") >= 2, err
    assert lines[-1] == "[rank 3] before_exit ran", err  # after the dump, before the exit


def test_no_step_within_the_timeout_dumps_every_thread_and_exits_124():
    code, err, took = run_child(step_timeout=2, grace=0, send_sigterm=False)
    assert code == watchdog.EXIT_HUNG, err
    assert "no optimiser step completed for 2 s (dist.step_timeout_s: 2 s)" in err.splitlines()[0], err
    assert_dumped(err)
    assert took < 2 + 2 * watchdog.POLL_S + watchdog.EXIT_DELAY_S + 5


def test_sigterm_while_blocked_dumps_and_exits_after_the_grace_period():
    # Without the grace period this process would ignore SIGTERM (its handler only sets a flag) forever.
    code, err, took = run_child(step_timeout=0, grace=2, send_sigterm=True)
    assert code == watchdog.EXIT_HUNG, err
    assert "stop signal 2 s ago and the step boundary not reached (dist.signal_grace_s: 2 s)" in err, err
    assert_dumped(err)
    assert took < 2 + 2 * watchdog.POLL_S + watchdog.EXIT_DELAY_S + 5


def test_reaching_the_step_boundary_after_a_signal_disarms_the_grace_period():
    dog = watchdog.Watchdog(step_timeout_s=0, signal_grace_s=5, rank=0)
    start = time.monotonic()
    dog.signalled()
    assert dog.overdue(start + 4) is None and "stop signal" in dog.overdue(start + 6)
    dog.step_done()
    assert dog.overdue(time.monotonic() + 3600) is None  # timeout 0: no step timeout either


def test_auto_timeout_rule():
    # Until WARMUP_STEPS intervals are measured: the start-up timeout; then max(floor, 10 x median).
    assert watchdog.auto_timeout([1.0] * (watchdog.WARMUP_STEPS - 1)) == watchdog.STARTUP_TIMEOUT_S == 1800
    assert watchdog.auto_timeout([1.0] * 50) == watchdog.AUTO_FLOOR_S == 600
    assert watchdog.auto_timeout([90.0] * 40 + [5000.0] * 10) == 900
    dog = watchdog.Watchdog(step_timeout_s=None, signal_grace_s=0, rank=0)
    for _ in range(watchdog.WARMUP_STEPS + 3):  # warm-up steps are not measured
        dog.step_done()
    assert len(dog.intervals) == 3 and dog.timeout() == watchdog.STARTUP_TIMEOUT_S
    # A fixed timeout holds from the second step of a start on; the first may take start-up's.
    fixed = watchdog.Watchdog(step_timeout_s=20, signal_grace_s=0, rank=0)
    assert fixed.timeout() == watchdog.STARTUP_TIMEOUT_S
    fixed.step_done()
    assert fixed.timeout() == 20


@pytest.mark.parametrize("settings", [SimpleNamespace(step_timeout_s=0, signal_grace_s=0)])
def test_both_off_starts_no_thread(settings):
    assert watchdog.start(settings, rank=0) is None
