"""A private SLURM cluster for tests: its own munged, slurmctld and one slurmd per node under a temp dir.

Several nodes on one machine use SLURM's own mechanism for it (Debian's slurmd is built with
--enable-multiple-slurmd): every node is a `NodeName=nodeI NodeHostname=<this host> NodeAddr=127.0.1.I
Port=<its own>` line and its own `slurmd -N nodeI`, with per-node spool, pid and log files (`%n`). The node
addresses are loopback addresses (all of 127/8 is loopback), so no traffic leaves the machine, and the
node names resolve nowhere: whatever needs a node's address must take SLURM's NodeAddr, as on a cluster
whose node names are not in DNS. A job step on "node2" runs in its own slurmstepd under node2's slurmd,
so killing every process of one node is a real node loss as far as SLURM and the other ranks can tell.

Nothing system-wide is read or written: the daemons get a generated slurm.conf, a fresh munge key and
socket, free ports and their own state/spool/log paths, and every client call goes through `env`
(which carries SLURM_CONF). Needs root (slurmd launches jobs as their owner) and the Debian packages
slurmctld, slurmd, slurm-client and munge (`make setup` installs them).

    with LocalSlurmCluster(nodes=2) as cluster:
        job_id = cluster.sbatch("job.sh", "--nodes=2", "--ntasks-per-node=1", "--output=job.out")
        info = cluster.wait(job_id)
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0"
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path

# Everything a job can end in; `wait` stops here even when the caller hoped for another state.
TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
# Daemons live in sbin, which is not on a non-login PATH everywhere.
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
# Inherited from an enclosing allocation (a CI job running under SLURM), these would steer our own
# sbatch/srun calls towards that allocation instead of the private cluster.
_FOREIGN_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_")


class SlurmClusterError(RuntimeError):
    """The private cluster could not start, or a job did not behave as waited for."""


def find_binary(name: str) -> str | None:
    search_path = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN_DIRS])
    return shutil.which(name, path=search_path)


def missing_binaries() -> list[str]:
    """The daemons and client commands this helper needs but cannot find."""
    return [name for name in (*DAEMONS, *CLIENTS) if find_binary(name) is None]


def parse_scontrol_record(line: str) -> dict[str, str]:
    """One `scontrol show ... -o` line as a dict. Values may contain spaces (Command=script args) and
    '=' (TRES=cpu=2,mem=1G), so a new field starts only where whitespace is followed by `Key=`."""
    fields = re.split(r"\s+(?=[A-Za-z][\w:/.]*=)", line.strip())
    return dict(field.split("=", 1) for field in fields if "=" in field)


def _free_ports(count: int) -> list[int]:
    # All sockets stay bound until every port is chosen, so the ports are distinct.
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _mem_total_mb() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise SlurmClusterError("no MemTotal in /proc/meminfo")


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as error:
        return f"({error.strerror})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


def _is_live_process(pid: int) -> bool:
    """True for a running process; False once it has exited, including a zombie that nobody reaps
    (PID 1 on these machines does not reap orphans)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _step_daemons(conf_path: Path) -> list[int]:
    """Live slurmstepd processes of the cluster whose config is `conf_path`. slurmd double-forks them
    (their parent is PID 1), so they are found by the SLURM_CONF they inherit from slurmd."""
    marker = f"SLURM_CONF={conf_path}".encode()
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if (proc / "comm").read_text().strip() != "slurmstepd":
                continue
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in environ and _is_live_process(int(proc.name)):
            pids.append(int(proc.name))
    return pids


class LocalSlurmCluster:
    """`nodes` nodes (node1, node2, ...), one partition, one controller, all private to this instance.

    cpus: CPUs each node advertises. More than the machine has is allowed (slurmd's config_overrides)
        so that a 2-task job and a few small jobs fit side by side on a 2-core CI machine.
    """

    PARTITION = "debug"

    def __init__(self, cpus: int | None = None, start_timeout: float = 30.0, nodes: int = 2) -> None:
        if not 1 <= nodes <= 250:
            raise ValueError(f"nodes={nodes}: between 1 and 250 (one loopback address each)")
        self.cpus = cpus if cpus is not None else max(8, os.cpu_count() or 1)
        # Each node advertises most of the machine's memory: the nodes share it, and tests ask for little.
        self.real_memory_mb = int(_mem_total_mb() * 0.85)
        self.start_timeout = start_timeout
        self.host = socket.gethostname().split(".")[0]
        self.node_names = [f"node{i}" for i in range(1, nodes + 1)]
        self.node_addrs = [f"127.0.1.{i}" for i in range(1, nodes + 1)]
        # The first node: where single-node jobs go first (SLURM fills nodes in config order).
        self.node_name, self.node_addr = self.node_names[0], self.node_addrs[0]
        self.dir: Path | None = None
        self.conf_path: Path | None = None
        self.munge_socket: Path | None = None
        self.env: dict[str, str] = {}
        self._processes: dict[str, subprocess.Popen] = {}
        # Set once the node is idle: only then can jobs exist, and only then do client calls answer
        # promptly (against a controller that never came up they retry for minutes).
        self._up = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> LocalSlurmCluster:
        missing = missing_binaries()
        if missing:
            raise SlurmClusterError(f"SLURM/munge commands not found: {', '.join(missing)}; run `make setup`")
        if os.geteuid() != 0:
            raise SlurmClusterError("the local SLURM cluster needs root: slurmd starts jobs as their owner")
        self.dir = Path(tempfile.mkdtemp(prefix="clmae-slurm-"))
        self.conf_path = self.dir / "slurm.conf"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN_ENV_PREFIXES)}
        self.env["SLURM_CONF"] = str(self.conf_path)
        try:
            self._start_munged()
            self._write_config()
            self._spawn("slurmctld", [find_binary("slurmctld"), "-D", "-i", "-c", "-f", str(self.conf_path)])
            for node in self.node_names:
                self._spawn(f"slurmd-{node}", [find_binary("slurmd"), "-D", "-f", str(self.conf_path), "-N", node])
            self._wait_until_idle()
            self._up = True
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel jobs, then end the daemons by their recorded PIDs (TERM, then KILL) and remove the dir."""
        try:
            if self._up:
                self._kill_jobs()
        finally:
            self._up = False
            # Reverse start order: slurmd reports to slurmctld, and both need munged to the end.
            for name in reversed(list(self._processes)):
                process = self._processes.pop(name)
                if process.poll() is None:
                    process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    # slurmd ignores SIGTERM while it retries an unreachable controller.
                    process.kill()
                    process.wait()
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir = None

    def __enter__(self) -> LocalSlurmCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ jobs

    def sbatch(
        self,
        script: str | os.PathLike,
        *options: str,
        script_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
    ) -> int:
        """Submit `script` (a file) with sbatch `options`; returns the job id.

        env: the whole environment of the sbatch call, which jobs inherit under the default
            --export=ALL; `self.env` when omitted. SLURM_CONF is always set to this cluster's.
        """
        call_env = {**(self.env if env is None else env), "SLURM_CONF": str(self.conf_path)}
        out = self._run(["sbatch", "--parsable", *options, os.fspath(script), *script_args], env=call_env, cwd=cwd)
        # --parsable prints "id" or "id;cluster".
        return int(out[-1].split(";")[0])

    def job_info(self, job_id: int | str) -> dict[str, str]:
        """`scontrol show job -o` as a dict (for an array, the record of that exact JobId or the first)."""
        records = [parse_scontrol_record(line) for line in self._run(["scontrol", "show", "job", "-o", str(job_id)])]
        return next((r for r in records if r.get("JobId") == str(job_id)), records[0])

    def wait(
        self, job_id: int | str, states: Collection[str] = TERMINAL_STATES, timeout: float = 300.0
    ) -> dict[str, str]:
        """Poll until the job's state is one of `states`; returns its job_info.

        Raises SlurmClusterError if it ends in a state not in `states` (it would never get there) or
        the timeout passes, with the daemons' log tails in the message.
        """
        deadline = time.monotonic() + timeout
        while True:
            info = self.job_info(job_id)
            state = info.get("JobState", "")
            if state in states:
                return info
            if state in TERMINAL_STATES:
                raise SlurmClusterError(
                    f"job {job_id} ended {state} (waiting for {sorted(states)}): {info}\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise SlurmClusterError(
                    f"job {job_id} still {state} after {timeout:g} s (waiting for {sorted(states)}): {info}\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.5)

    def scancel(self, *args: str | int) -> None:
        """`scancel ARGS`: job ids and options, e.g. scancel(job_id, "--signal=USR1", "--batch")."""
        self._run(["scancel", *map(str, args)])

    def log_tail(self, lines: int = 30) -> str:
        """The end of every daemon's log, for failure messages."""
        if self.dir is None:
            return "(cluster not started)"
        parts = []
        for name in ("munged", "slurmctld", *(f"slurmd-{node}" for node in self.node_names)):
            # The log file also gets slurmstepd's messages; stdout has what a daemon said before it
            # opened its log (a fatal config error, say), and all of munged's output.
            log = self.dir / f"{name}.log"
            path = log if log.exists() and log.stat().st_size else self.dir / f"{name}.stdout"
            parts.append(f"--- {path.name}\n{_tail(path, lines)}")
        return "\n".join(parts)

    # ------------------------------------------------------------------ internals

    def _run(
        self, argv: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None
    ) -> list[str]:
        try:
            result = subprocess.run(
                [find_binary(argv[0]) or argv[0], *argv[1:]],
                env=self.env if env is None else env,
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=60,
            )
        except subprocess.TimeoutExpired as error:
            raise SlurmClusterError(f"`{' '.join(argv)}` hung for 60 s\n{self.log_tail()}") from error
        if result.returncode != 0:
            raise SlurmClusterError(f"`{' '.join(argv)}` failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout.splitlines()

    def _spawn(self, name: str, argv: Iterable[str]) -> None:
        assert self.dir is not None
        with open(self.dir / f"{name}.stdout", "wb") as stdout:
            # A new session (setsid) keeps terminal signals (Ctrl-C on pytest) away from the daemons;
            # stop() ends them in order instead.
            self._processes[name] = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=subprocess.STDOUT,
                # The scrubbed environment: no SLURM_* of an enclosing allocation reaches the daemons either.
                env=self.env,
                start_new_session=True,
            )

    def _start_munged(self) -> None:
        assert self.dir is not None
        munge_dir = self.dir / "munge"
        # munged warns unless every directory above its socket is executable by all; 0o711 keeps them unlistable.
        self.dir.chmod(0o711)
        munge_dir.mkdir(mode=0o711)
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.munge_socket = munge_dir / "munge.socket"
        self._spawn(
            "munged",
            [
                find_binary("munged"),
                "--foreground",
                "--force",
                f"--key-file={key}",
                f"--socket={self.munge_socket}",
                f"--pid-file={munge_dir / 'munged.pid'}",
                f"--log-file={self.dir / 'munged.log'}",
                f"--seed-file={munge_dir / 'munged.seed'}",
            ],
        )
        self._poll(lambda: self.munge_socket.exists(), "munged did not create its socket")

    def _write_config(self) -> None:
        assert self.dir is not None
        ctld_port, *slurmd_ports = _free_ports(1 + len(self.node_names))
        for sub in ("state", *(f"spool/{node}" for node in self.node_names)):
            (self.dir / sub).mkdir(parents=True)
        (self.dir / "plugstack.conf").write_text("")
        d = self.dir
        lines = [
            "ClusterName=clmae-test",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_ports[0]}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire=10: a requeued job runs again after ~12 s instead of ~120 s.
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            f"StateSaveLocation={d / 'state'}",
            # %n: the node name, so that the slurmd daemons of this one host keep apart.
            f"SlurmdSpoolDir={d / 'spool' / '%n'}",
            f"SlurmctldPidFile={d / 'slurmctld.pid'}",
            f"SlurmdPidFile={d / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={d / 'slurmctld.log'}",
            f"SlurmdLogFile={d / 'slurmd-%n.log'}",
            # An empty plugin stack, so the system's /etc/slurm/plugstack.conf(.d) is never read.
            f"PlugStackConfig={d / 'plugstack.conf'}",
            # pgid, not linuxproc: linuxproc leaks a job's background processes.
            "ProctrackType=proctrack/pgid",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            # No slurmdbd, hence no sacct: a finished job is read from scontrol (kept MinJobAge s) or this log.
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={d / 'jobcomp.log'}",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "MinJobAge=600",
            "JobRequeue=1",
            # Take CPUs/RealMemory from this file rather than the hardware, so the node may advertise more.
            "SlurmdParameters=config_overrides",
            # Without a default, a job that asks for no memory takes the whole node and blocks the rest.
            f"DefMemPerCPU={self.real_memory_mb // self.cpus}",
            *(
                f"NodeName={node} NodeHostname={self.host} NodeAddr={addr} Port={port} CPUs={self.cpus} "
                f"RealMemory={self.real_memory_mb} State=UNKNOWN"
                for node, addr, port in zip(self.node_names, self.node_addrs, slurmd_ports, strict=True)
            ),
            f"PartitionName={self.PARTITION} Nodes={','.join(self.node_names)} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf_path.write_text("\n".join(lines) + "\n")

    def _wait_until_idle(self) -> None:
        def node_idle() -> bool:
            try:
                result = subprocess.run(
                    [find_binary("sinfo"), "--noheader", "--Node", "--nodes", ",".join(self.node_names), "--format=%T"],
                    env=self.env,
                    capture_output=True,
                    text=True,
                    timeout=5,
                )
            except subprocess.TimeoutExpired:
                return False
            return result.returncode == 0 and result.stdout.split() == ["idle"] * len(self.node_names)

        self._poll(node_idle, f"nodes {', '.join(self.node_names)} did not become idle")

    def _poll(self, ready: Callable[[], bool], what: str) -> None:
        """Poll `ready()` until true; fail loudly (with log tails) on timeout or when a daemon dies."""
        deadline = time.monotonic() + self.start_timeout
        while not ready():
            dead = {name: p.returncode for name, p in self._processes.items() if p.poll() is not None}
            if dead or time.monotonic() > deadline:
                reason = f"daemons exited: {dead}" if dead else f"timed out after {self.start_timeout:g} s"
                raise SlurmClusterError(f"local SLURM cluster failed to start: {what} ({reason})\n{self.log_tail()}")
            time.sleep(0.2)

    def _kill_jobs(self) -> None:
        """SIGKILL every job's processes and cancel the jobs, then wait for their slurmstepd processes
        to go: once slurmd is gone nothing would end them. The tests are over, so no grace period."""
        for extra in (["--signal=KILL", "--full"], []):
            try:
                subprocess.run(
                    [find_binary("scancel"), *extra, f"--partition={self.PARTITION}"],
                    env=self.env,
                    capture_output=True,
                    timeout=30,
                )
            except subprocess.TimeoutExpired:
                break
        deadline = time.monotonic() + 15
        while _step_daemons(self.conf_path) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in _step_daemons(self.conf_path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
