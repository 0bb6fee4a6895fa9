"""Distributed environment: launcher variables -> rank/world/master/backend, and a real 2-rank init."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from clmae.dist import DistError, _pin_op_build_environment, detect, first_host, slurm_master_port


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [
        ("node01", "node01"),
        ("node[01-02]", "node01"),
        ("node[05,01-02]", "node05"),
        ("gpu[007-012],cpu3", "gpu007"),
        ("n1,n2,n3", "n1"),
        ("rack[1-2]-node[03-04]", "rack1-node03"),
        ("a-[10-11]-ib", "a-10-ib"),
    ],
)
def test_first_host_of_slurm_nodelist(nodelist, host):
    assert first_host(nodelist) == host


@pytest.mark.parametrize("nodelist", ["", "node[01-02", "node01]"])
def test_malformed_nodelist_is_an_error(nodelist):
    with pytest.raises(DistError):
        first_host(nodelist)


def test_torchrun_environment():
    env = {
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "4",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "10.0.0.7",
        "MASTER_PORT": "29555",
        "TORCHELASTIC_RUN_ID": "abc",
    }
    got = detect(env, cuda_available=False)
    assert (got.rank, got.local_rank, got.world_size, got.local_world_size) == (3, 1, 4, 2)
    assert (got.master_addr, got.master_port, got.launcher, got.backend) == ("10.0.0.7", 29555, "torchrun", "gloo")
    assert not got.is_main and got.device == "cpu"


def test_deepspeed_launcher_environment_on_cuda():
    env = {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "8",
        "LOCAL_SIZE": "8",
        "MASTER_ADDR": "h1",
        "MASTER_PORT": "29500",
        "CROSS_RANK": "0",
    }
    got = detect(env, cuda_available=True)
    assert got.launcher == "deepspeed" and got.backend == "nccl" and got.device == "cuda:0"
    assert (got.world_size, got.local_world_size) == (8, 8)


def test_slurm_multi_node_step():
    # Rank 5 of 2 nodes x 4 tasks: the second task on the second node.
    env = {
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "8",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
        "SLURM_JOB_NODELIST": "localhost,node[01-02]",  # first host must resolve here
        "SLURM_JOB_ID": "123456",
        "SLURM_STEP_ID": "0",
    }
    got = detect(env, cuda_available=True)
    assert (got.rank, got.local_rank, got.world_size, got.local_world_size) == (5, 1, 8, 4)
    assert got.launcher == "slurm" and got.backend == "nccl" and got.device == "cuda:1"
    assert got.master_addr == "localhost"
    assert got.master_port == 20000 + 456 * 12 + 0 == 25472


def test_slurm_master_port_is_unique_per_step_and_below_ephemeral_ports():
    ports = {slurm_master_port(job, step) for job in range(1000) for step in range(12)}
    assert len(ports) == 12000
    assert min(ports) == 20000 and max(ports) < 32768


def test_slurm_master_falls_back_to_explicit_master_addr():
    env = {
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_JOB_NODELIST": "node[01-02]",  # does not resolve here; MASTER_ADDR wins
        "SLURM_STEPID": "0",
        "MASTER_ADDR": "192.0.2.1",
        "MASTER_PORT": "31000",
    }
    got = detect(env, cuda_available=False)
    assert (got.master_addr, got.master_port, got.world_size) == ("192.0.2.1", 31000, 2)


def test_unresolvable_slurm_master_is_a_clear_error():
    env = {
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_JOB_NODELIST": "no-such-node-clmae[01-02]",  # neither DNS nor scontrol knows it
        "SLURM_STEP_ID": "0",
    }
    with pytest.raises(DistError, match="no-such-node-clmae01"):
        detect(env, cuda_available=False)


def test_slurm_batch_shell_without_step_is_a_single_process():
    # The batch script itself has SLURM_PROCID=0 and the job's SLURM_NTASKS but is not a task of a step.
    env = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "node[01-02]"}
    got = detect(env, cuda_available=False)
    assert (got.launcher, got.rank, got.world_size) == ("single", 0, 1)


def test_single_process_defaults():
    got = detect({}, cuda_available=False)
    assert (got.rank, got.local_rank, got.world_size, got.launcher, got.master_addr) == (0, 0, 1, "single", "127.0.0.1")
    assert 0 < got.master_port < 65536


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "2", "WORLD_SIZE": "2"}, "rank 2 is outside world size 2"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2"}, "local rank 3"),
    ],
)
def test_inconsistent_launcher_environment(env, message):
    with pytest.raises(DistError, match=message):
        detect(env, cuda_available=False)


def test_nccl_without_gpu_is_refused():
    with pytest.raises(DistError, match=r"dist\.backend=nccl needs CUDA"):
        detect({}, cuda_available=False, backend="nccl")


def without_env_bin(path: str) -> str:
    """PATH as a shell without this venv activated has it."""
    env_bin = os.path.dirname(sys.executable)
    return os.pathsep.join(entry for entry in path.split(os.pathsep) if entry != env_bin)


def test_op_build_uses_this_environments_ninja(monkeypatch):
    monkeypatch.setenv("PATH", without_env_bin(os.environ["PATH"]))
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    _pin_op_build_environment()
    assert shutil.which("ninja") == os.path.join(os.path.dirname(sys.executable), "ninja")
    assert os.environ["TORCH_EXTENSIONS_DIR"] == os.path.join(sys.prefix, "torch_extensions")


@pytest.mark.distributed
def test_two_rank_deepspeed_init_and_all_reduce():
    """Two real processes (torchrun, gloo) meet through deepspeed.init_distributed and all_reduce, launched
    as from a shell without the venv activated; DeepSpeed's comm op, once built (`make setup` builds it with
    the venv's tools), is reused rather than rebuilt."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=without_env_bin(os.environ["PATH"]))
    env.pop("TORCH_EXTENSIONS_DIR", None)
    build_log = Path(sys.prefix) / "torch_extensions" / "deepspeed_shm_comm" / ".ninja_log"
    built_before = build_log.read_text() if build_log.exists() else None
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "clmae.dist"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for rank in (0, 1):
        assert f"DistEnv(rank={rank}, local_rank={rank}, world_size=2" in out.stdout
    assert out.stdout.count("backend='gloo', launcher='torchrun'); all_reduce of (rank+1) = 3 (expected 3)") == 2
    if built_before is None:
        assert build_log.exists(), f"DeepSpeed's comm op was not built into {build_log.parent}"
    else:
        assert build_log.read_text() == built_before, "DeepSpeed's comm op was rebuilt"
