"""The distributed environment: who am I, who are the others, and how do we meet.

One place turns whatever launched us into (rank, local rank, world size, master address/port,
backend), then initialises `torch.distributed` through DeepSpeed:

- torchrun / `deepspeed` launcher: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT are set.
- SLURM `srun` (one task per GPU): SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, SLURM_JOB_NODELIST;
  the master is the first host of the node list, the port derived from the job id so that two jobs
  sharing a node do not collide.
- Nothing: a single process (rank 0 of 1) on localhost.

Also the rank-0-only logging helpers (`log`, `progress`), since whether to print is a question of rank.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from clmae.errors import ClmaeError

T = TypeVar("T")

DEFAULT_PORT = 29500
# SLURM master ports: 20000-31999, below Linux's ephemeral range (32768+) where srun itself listens;
# the job id picks a block of 12 and the step id a port in it, so concurrent steps of a job differ too.
SLURM_PORT_BASE = 20000
SLURM_PORT_STEPS = 12
SLURM_PORT_JOBS = 1000


def slurm_master_port(job_id: int, step_id: int) -> int:
    return SLURM_PORT_BASE + (job_id % SLURM_PORT_JOBS) * SLURM_PORT_STEPS + step_id % SLURM_PORT_STEPS


class DistError(ClmaeError, RuntimeError):
    """The environment describes an impossible or incomplete distributed setup."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    backend: str
    launcher: str  # "torchrun" | "deepspeed" | "slurm" | "single"

    @classmethod
    def single(cls) -> DistEnv:
        """Rank 0 of 1: for work every rank does on the whole of something (e.g. the same images)."""
        return cls(0, 0, 1, 1, "127.0.0.1", DEFAULT_PORT, "gloo", "single")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> str:
        return f"cuda:{self.local_rank}" if self.backend == "nccl" else "cpu"


def _int(environ: Mapping[str, str], name: str) -> int:
    value = environ.get(name)
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DistError(f"environment variable {name}={value!r} is not an integer") from None


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: `node[01-02,05],gpu7` -> `node01`; `rack[1-2]-n[3-4]` -> `rack1-n3`.

    Only the first host is needed (it hosts rank 0), so only the first element of each bracket is taken;
    zero padding is kept because it is part of the host name.
    """
    nodelist = nodelist.strip()
    if not nodelist:
        raise DistError("SLURM node list is empty")
    # The first comma outside brackets ends the first host expression.
    depth = 0
    for i, ch in enumerate(nodelist):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            nodelist = nodelist[:i]
            break
    if depth != 0 or nodelist.count("[") != nodelist.count("]"):
        raise DistError(f"malformed SLURM node list: {nodelist!r}")

    def first_of_bracket(match: re.Match[str]) -> str:
        first = match.group(1).split(",")[0]
        return first.split("-")[0]

    host = re.sub(r"\[([^\]]*)\]", first_of_bracket, nodelist)
    if not host or "[" in host:
        raise DistError(f"malformed SLURM node list: {nodelist!r}")
    return host


def _slurm_node_addr(host: str) -> str | None:
    """NodeAddr of a node as SLURM knows it, for clusters whose node names do not resolve in DNS."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "node", host], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"NodeAddr=(\S+)", out)
    return match.group(1) if match else None


def resolve_master_addr(host: str) -> str:
    """SLURM's NodeAddr of `host` first: it is how slurmctld itself reaches the node, and it exists where node
    names are not in DNS (a name lookup there would go to a resolver and fail, or time out). The name itself
    when SLURM cannot be asked. slurm/lib/pretrain.sh does this once per job and exports MASTER_ADDR, so
    that the ranks of a large job do not each ask slurmctld."""
    addr = _slurm_node_addr(host)
    if addr:
        return addr
    try:
        socket.gethostbyname(host)
        return host
    except OSError:
        raise DistError(
            f"master host '{host}' (first host of SLURM_JOB_NODELIST) has no NodeAddr in `scontrol show node` "
            "and does not resolve; set MASTER_ADDR explicitly"
        ) from None


def detect(
    environ: Mapping[str, str] | None = None, cuda_available: bool | None = None, backend: str = "auto"
) -> DistEnv:
    """Read the launcher's environment. Pure apart from name resolution; never initialises anything."""
    env = os.environ if environ is None else environ
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if cuda_available else "gloo"
    elif backend == "nccl" and not cuda_available:
        raise DistError("dist.backend=nccl needs CUDA, but no GPU is visible; use dist.backend=gloo or auto")

    if "RANK" in env and "WORLD_SIZE" in env:
        # torchrun sets TORCHELASTIC_RUN_ID; the deepspeed launcher sets CROSS_RANK / LOCAL_SIZE.
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "deepspeed"
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        local_world = (
            _int(env, "LOCAL_WORLD_SIZE")
            if "LOCAL_WORLD_SIZE" in env
            else _int(env, "LOCAL_SIZE")
            if "LOCAL_SIZE" in env
            else world
        )
        master_addr = env.get("MASTER_ADDR", "127.0.0.1")
        master_port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_PORT
    elif "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        # Inside an srun step. (The batch shell also has SLURM_PROCID, but no step id: a process
        # started there directly is a single process, not rank 0 of the job's tasks.)
        launcher = "slurm"
        rank = _int(env, "SLURM_PROCID")
        world = _int(env, "SLURM_STEP_NUM_TASKS") if "SLURM_STEP_NUM_TASKS" in env else _int(env, "SLURM_NTASKS")
        local_rank = _int(env, "SLURM_LOCALID")
        local_world = _slurm_local_world(env, world)
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if "MASTER_ADDR" in env:
            master_addr = env["MASTER_ADDR"]
        elif nodelist:
            master_addr = resolve_master_addr(first_host(nodelist))
        else:
            raise DistError("SLURM step without SLURM_JOB_NODELIST: cannot find the master host")
        if "MASTER_PORT" in env:
            master_port = _int(env, "MASTER_PORT")
        else:
            job_id = _int(env, "SLURM_JOB_ID") if "SLURM_JOB_ID" in env else 0
            step_id = _int(env, "SLURM_STEP_ID" if "SLURM_STEP_ID" in env else "SLURM_STEPID")
            master_port = slurm_master_port(job_id, step_id)
    else:
        launcher = "single"
        rank, local_rank, world, local_world = 0, 0, 1, 1
        master_addr = env.get("MASTER_ADDR", "127.0.0.1")
        master_port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else _free_port()

    if world < 1 or not 0 <= rank < world:
        raise DistError(f"rank {rank} is outside world size {world} ({launcher} environment)")
    if not 0 <= local_rank < max(local_world, 1):
        raise DistError(f"local rank {local_rank} is outside local world size {local_world} ({launcher})")
    return DistEnv(rank, local_rank, world, local_world, master_addr, master_port, backend, launcher)


def _slurm_local_world(env: Mapping[str, str], world: int) -> int:
    # SLURM_STEP_TASKS_PER_NODE looks like "2(x3),1"; the first node's count is what rank 0's node has,
    # and for the homogeneous layouts we launch every node has the same.
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if spec:
        match = re.match(r"(\d+)", spec)
        if match:
            return int(match.group(1))
    if "SLURM_NTASKS_PER_NODE" in env:
        return _int(env, "SLURM_NTASKS_PER_NODE")
    return world


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def exit_with_launcher(environ: Mapping[str, str] | None = None, interval: float = 0.5) -> bool:
    """Make this rank die (SIGKILL) as soon as the process that launched it does.

    torchrun and the deepspeed launcher start their workers in sessions of their own, so a SIGKILL of the
    launcher (or of its process group) leaves them training, checkpointing and logging on their own, beside
    the run that is resumed next. A thread watches the parent pid instead of prctl(PR_SET_PDEATHSIG): that
    fires when the launcher's *thread* that forked us ends, which is not the launcher's death. Only for
    ranks started by a launcher (RANK or an srun step in the environment): a single process may outlive
    its shell on purpose (nohup). Returns whether the watch runs.
    """
    env = os.environ if environ is None else environ
    if not ("RANK" in env or "SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        return False
    import signal
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="clmae-launcher-watch", daemon=True).start()
    return True


_ENV: DistEnv | None = None


def _pin_op_build_environment() -> None:
    """Make DeepSpeed's JIT build of its CPU comm op the same in every process of this environment.

    The build cache is kept per environment, so two venvs (or two CI jobs) never rebuild each other's copy.
    torch runs whichever `ninja` comes first on PATH, and ninja 1.13 (the venv's, a DeepSpeed dependency)
    hashes build commands differently from 1.11 (a distribution's): launches with and without the venv on
    PATH then rebuild the op for each other every time, 1-3 minutes per launch. The venv's ninja goes first.
    Only a virtual environment's bin directory is moved: a system interpreter's (/usr/bin) would shadow
    the tools a user put before it.
    """
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    env_bin = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    in_venv = sys.prefix != sys.base_prefix
    if in_venv and os.path.isfile(os.path.join(env_bin, "ninja")) and path.split(os.pathsep)[0] != env_bin:
        os.environ["PATH"] = os.pathsep.join([env_bin, path]) if path else env_bin


def init(backend: str = "auto", timeout_minutes: int = 30, environ: Mapping[str, str] | None = None) -> DistEnv:
    """Detect the environment, export it the way torch/DeepSpeed read it, and init the process group."""
    global _ENV
    dist_env = detect(environ, backend=backend)
    os.environ.update(
        RANK=str(dist_env.rank),
        LOCAL_RANK=str(dist_env.local_rank),
        WORLD_SIZE=str(dist_env.world_size),
        LOCAL_WORLD_SIZE=str(dist_env.local_world_size),
        MASTER_ADDR=dist_env.master_addr,
        MASTER_PORT=str(dist_env.master_port),
    )
    _pin_op_build_environment()
    import deepspeed
    import torch

    if dist_env.backend == "nccl":
        torch.cuda.set_device(dist_env.local_rank)
    deepspeed.init_distributed(
        dist_backend=dist_env.backend,
        auto_mpi_discovery=False,
        distributed_port=dist_env.master_port,
        verbose=False,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    _ENV = dist_env
    return dist_env


def shutdown() -> None:
    """Tear the process group down explicitly (ZeRO-3 runs can abort at exit otherwise)."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def rank() -> int:
    if _ENV is not None:
        return _ENV.rank
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)


def is_main() -> bool:
    return rank() == 0


# --------------------------------------------------------------------------------------------------
# Rank-0 logging
# --------------------------------------------------------------------------------------------------


def log(message: str, all_ranks: bool = False) -> None:
    """Timestamped line on stdout from rank 0 (or from every rank, tagged with its rank)."""
    if not (all_ranks or is_main()):
        return
    from tqdm.auto import tqdm

    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    tag = f" [rank {rank()}]" if all_ranks else ""
    tqdm.write(f"[{stamp}]{tag} {message}", file=sys.stdout)  # keeps a progress bar intact below it
    sys.stdout.flush()


def progress(iterable: Iterable[T], **tqdm_kwargs) -> Iterable[T]:
    """tqdm on rank 0, the bare iterable elsewhere (N ranks drawing N bars garbles the log). Off when
    stdout is not a terminal (a SLURM log file), where the periodic log lines say the same."""
    if not is_main():
        return iterable
    from tqdm.auto import tqdm

    tqdm_kwargs.setdefault("dynamic_ncols", True)
    tqdm_kwargs.setdefault("leave", False)
    tqdm_kwargs.setdefault("disable", None)
    return tqdm(iterable, **tqdm_kwargs)


def _selftest() -> int:
    """`python -m clmae.dist`: init, all_reduce the ranks, print what was detected. Used by `make setup`
    to build DeepSpeed's CPU comm op once, and by users to check a cluster allocation."""
    import torch
    import torch.distributed as tdist

    dist_env = init()
    value = torch.tensor([float(dist_env.rank + 1)])
    tdist.all_reduce(value)
    expected = dist_env.world_size * (dist_env.world_size + 1) / 2
    log(f"{dist_env}; all_reduce of (rank+1) = {value.item():g} (expected {expected:g})", all_ranks=True)
    ok = value.item() == expected
    shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    from clmae.cli import run_main

    run_main(_selftest, skip_teardown=True)
