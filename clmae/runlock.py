"""One run directory, one writer: a lock that dies with its holder, also across nodes on a shared filesystem.

`<run_dir>/clmae.lock` holds the writer's host, pid, SLURM job id and start time. It is created atomically
with `os.link` (atomic on NFS too, where `flock`/`fcntl` locks between nodes are not dependable), and a
thread of the holder touches it every `timeout / 6` seconds. A holder is dead when

- it ran on this host and its pid is gone (or is another process now), or
- its heartbeat (the file's mtime) is older than `run.lock_timeout_seconds`, or has not moved for that
  long while we watched (which needs no clock agreement between nodes).

A new launch takes over a dead holder's lock; a live holder makes it wait up to the timeout (a requeued job
may start while the previous one is still tearing down), then refuse with RunLockedError: exit code 2,
nothing in the run directory touched. Breaking a dead lock is serialised by a second, short-lived file
(`clmae.lock.takeover`), so that two launches cannot both take it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from clmae.errors import ClmaeError

LOCK_FILE = "clmae.lock"
TAKEOVER_SUFFIX = ".takeover"
HEARTBEATS_PER_TIMEOUT = 6


class RunLockedError(ClmaeError, RuntimeError):
    """Another live run writes this run directory (raised on every rank: hold_run_dir broadcasts it)."""

    every_rank = True


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    job_id: str
    started: str
    token: str
    pid_start: str | None  # the process's start time in clock ticks since boot: tells a reused pid apart

    @classmethod
    def me(cls) -> Holder:
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            job_id=os.environ.get("SLURM_JOB_ID", "none"),
            started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            token=uuid.uuid4().hex,
            pid_start=_process_start(os.getpid()),
        )

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, job id {self.job_id}, started {self.started}"


def _process_start(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # field 22, counted after the command name


def _pid_gone(holder: Holder) -> str | None:
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return f"pid {holder.pid} is gone"
    except PermissionError:
        pass  # exists, under another user
    start = _process_start(holder.pid)
    if holder.pid_start is not None and start is not None and start != holder.pid_start:
        return f"pid {holder.pid} is another process now"
    return None


class RunLock:
    """The lock of one run directory. acquire() before writing anything there; release() at the end."""

    def __init__(self, run_dir: str | os.PathLike, timeout: float, log=print):
        self.path = Path(run_dir) / LOCK_FILE
        self.timeout = timeout
        self.log = log
        self.me = Holder.me()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.timeout
        seen_mtime, seen_since, announced = None, time.monotonic(), False
        while not self._create():
            read = self._read()
            if read is None:
                continue  # released between our two steps: try again at once
            holder, mtime = read
            if mtime != seen_mtime:
                seen_mtime, seen_since = mtime, time.monotonic()
            reason = self._dead(holder, mtime, time.monotonic() - seen_since)
            if reason is not None:
                if self._break(holder):
                    self.log(f"run directory lock: took over from a dead run ({holder.describe()}: {reason})")
                continue
            if time.monotonic() >= deadline:
                raise RunLockedError(
                    f"run directory {self.path.parent} is in use by another live run ({holder.describe()}); "
                    f"refusing to write it too. Wait for that run to end, stop it (scancel {holder.job_id} / "
                    f"kill {holder.pid}), or choose another run.name. Lock file: {self.path}"
                )
            if not announced:
                wait = f"waiting up to {self.timeout:g} s for it to end"
                self.log(f"run directory is in use ({holder.describe()}); {wait}")
                announced = True
            time.sleep(min(1.0, self.timeout / 10))
        self._thread = threading.Thread(target=self._heartbeat, name="clmae-run-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            read = self._read()
            if read is not None and read[0].token == self.me.token:
                self.path.unlink(missing_ok=True)

    # ---- internals -----------------------------------------------------------------------------------

    def _create(self) -> bool:
        """Link a complete lock file into place: readers never see half of one, and only one link wins."""
        tmp = self.path.with_name(f".{LOCK_FILE}.{self.me.token}")
        tmp.write_text(json.dumps(asdict(self.me)))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:
            # NFS can report a failure for a link that succeeded (a lost reply): the link count knows.
            return tmp.stat().st_nlink == 2
        finally:
            tmp.unlink(missing_ok=True)

    def _read(self) -> tuple[Holder, float] | None:
        try:
            mtime = self.path.stat().st_mtime
            return Holder(**json.loads(self.path.read_text())), mtime
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as err:
            raise RunLockedError(f"{self.path}: not a clmae lock file ({err}); remove it if no run uses it") from None

    def _dead(self, holder: Holder, mtime: float, unchanged_for: float) -> str | None:
        if holder.host == self.me.host:
            return _pid_gone(holder)
        age = time.time() - mtime
        if age > self.timeout:
            return f"no heartbeat for {age:.0f} s"
        if unchanged_for > self.timeout:
            return f"heartbeat unchanged for {unchanged_for:.0f} s"
        return None

    def _break(self, holder: Holder) -> bool:
        """Remove a dead holder's lock, unless someone else is already doing it or did it."""
        guard = self.path.with_name(LOCK_FILE + TAKEOVER_SUFFIX)
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:  # a breaker that died while holding the guard must not block every later launch
                if time.time() - guard.stat().st_mtime > 2 * self.timeout:
                    guard.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            time.sleep(0.1)
            return False
        try:
            read = self._read()
            if read is not None and read[0].token == holder.token:
                self.path.unlink(missing_ok=True)
                return True
            return False
        finally:
            os.close(fd)
            guard.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        interval = max(self.timeout / HEARTBEATS_PER_TIMEOUT, 0.1)
        while not self._stop.wait(interval):
            try:
                read = self._read()
                if read is not None and read[0].token == self.me.token:
                    os.utime(self.path)
                    continue
                lost = f"taken by {read[0].describe()}" if read is not None else "removed"
            except (OSError, RunLockedError) as err:
                self.log(f"run directory lock: heartbeat failed ({err}); retrying")
                continue
            # Another run took the directory over (it judged us dead): stop writing at once.
            print(f"error: run directory lock {self.path} was {lost}; stopping this run", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def hold_run_dir(run_dir: str | os.PathLike, timeout: float) -> RunLock | None:
    """Collective: rank 0 takes the run directory's lock, and every rank raises RunLockedError if it could not.
    Returns the lock on rank 0 (release it at the end), None on the other ranks."""
    import torch.distributed as tdist

    from clmae import dist

    lock = RunLock(run_dir, timeout, log=dist.log) if dist.is_main() else None
    refusal = None
    if lock is not None:
        try:
            lock.acquire()
        except RunLockedError as err:
            refusal = str(err)
    if tdist.is_available() and tdist.is_initialized():
        box = [refusal]
        tdist.broadcast_object_list(box, src=0)
        refusal = box[0]
    if refusal is not None:
        raise RunLockedError(refusal)
    return lock
