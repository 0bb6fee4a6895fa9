"""clmae.runlock: one writer per run directory; a lock that dies with its holder (issue 18, section 3).
The multi-rank launches (refusal of a second writer, takeover after SIGKILL, ranks dying with their
launcher) are in tests/test_train.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from clmae.runlock import LOCK_FILE, RunLock, RunLockedError

HOLD = """
import sys, time
from clmae.runlock import RunLock
lock = RunLock(sys.argv[1], float(sys.argv[2]))
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def start_holder(run_dir, timeout: float = 3.0, env: dict | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir), str(timeout)],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, **(env or {})),
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_holder_is_refused_by_name_after_the_wait(tmp_path):
    holder = start_holder(tmp_path, env={"SLURM_JOB_ID": "4242"})
    try:
        before = (tmp_path / LOCK_FILE).read_text()
        started = time.monotonic()
        with pytest.raises(RunLockedError, match=rf"pid {holder.pid}, job id 4242") as refused:
            RunLock(tmp_path, timeout=1.5, log=lambda _: None).acquire()
        assert time.monotonic() - started >= 1.5  # waited for it to end first
        assert "host " in str(refused.value) and "is in use by another live run" in str(refused.value)
        assert (tmp_path / LOCK_FILE).read_text() == before  # nothing changed
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_holder_is_taken_over(tmp_path):
    holder = start_holder(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    messages = []
    lock = RunLock(tmp_path, timeout=30, log=messages.append)
    started = time.monotonic()
    lock.acquire()
    assert time.monotonic() - started < 5  # same host, pid gone: no need to wait for the heartbeat
    assert "took over from a dead run (host" in messages[0] and f"pid {holder.pid} is gone" in messages[0]
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_holder_on_another_host_is_dead_when_its_heartbeat_stops(tmp_path):
    # A lock written by a node that crashed: its mtime never moves again.
    (tmp_path / LOCK_FILE).write_text(
        json.dumps(
            {"host": "node-that-crashed", "pid": 1, "job_id": "77", "started": "x", "token": "t", "pid_start": None}
        )
    )
    lock = RunLock(tmp_path, timeout=1.0, log=lambda _: None)
    started = time.monotonic()
    lock.acquire()
    assert 1.0 <= time.monotonic() - started < 10
    lock.release()


def test_a_live_holder_keeps_its_heartbeat_and_a_stolen_lock_stops_it(tmp_path):
    holder = start_holder(tmp_path, timeout=0.6)
    try:
        first = (tmp_path / LOCK_FILE).stat().st_mtime_ns
        time.sleep(0.5)
        assert (tmp_path / LOCK_FILE).stat().st_mtime_ns > first  # heartbeat every timeout / 6
        # Someone judged it dead and took the directory: the holder must stop writing at once.
        data = json.loads((tmp_path / LOCK_FILE).read_text())
        (tmp_path / LOCK_FILE).write_text(json.dumps(dict(data, token="someone-else")))
        assert holder.wait(timeout=10) == -signal.SIGKILL
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
