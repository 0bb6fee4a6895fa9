"""The real slurm/ scripts on a real two-node SLURM cluster (2 ranks on CPU, the tiny model, digits).

The reference is one job on two nodes (one task each) that runs to the end of its epoch. An early USR1
to the batch shell (with the data staged to node-local disk), a time limit, a node lost mid-step, a hung
rank, and a chain of single-node jobs (two tasks on one node) without requeue must each end with bitwise
the same weights, in one MLflow run. Each job pays about 25 s of start-up (imports, FFCV compilation,
MLflow), so runs are short.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from clmae.checkpoint import find_latest, read_client_state
from clmae.weights import consolidated_state_dict
from tests.data_fixtures import make_imagenet

REPO = Path(__file__).resolve().parent.parent
STEPS_PER_EPOCH = 1497 // (2 * 64)  # 1497 digits in whole global batches of 2 ranks x 64
EPOCHS = 1
SBATCH_FOR_CPU = ("--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=6G")
# One task ("GPU") per node on two nodes: the same 2 ranks, so the same weights, as one node with two.
SBATCH_2_NODES = ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=6G")
# A lost node's peers end within TASK_EXIT_WAIT (30 s, srun --wait) + SLURM's KillWait (30 s) at most;
# on a connection that breaks (as here) at once. The bound the node-loss test holds the scripts to:
NODE_LOSS_BOUND_S = 60

pytestmark = [pytest.mark.slurm, pytest.mark.distributed]


def job_env(cluster, digits: Path, output_dir: Path, run_name: str, **extra: str) -> dict[str, str]:
    overrides = [
        "data.batch_size=64",
        f"train.epochs={EPOCHS}",
        "train.log_every=1",
        "checkpoint.every_steps=4",
        "tracking.system_metrics=false",
        "tracking.mask_images_every_epochs=0",
    ]
    env = dict(cluster.env)
    env.update(
        CLMAE_ROOT=str(REPO),
        PYTHON=sys.executable,
        CONFIG="tiny_digits",
        DATA_DIR=str(digits),
        OUTPUT_DIR=str(output_dir),
        RUN_NAME=run_name,
        DS_CONFIG="zero2_fp32",
        OVERRIDES=" ".join(overrides),
        OMP_NUM_THREADS="1",
        EARLY_SIGNAL_DELAY="5",
    )
    env.update(extra)
    return env


def submit(cluster, script: str, env: dict[str, str], log_dir: Path, *options: str, layout=SBATCH_2_NODES) -> int:
    return cluster.sbatch(
        REPO / "slurm" / script, *layout, f"--output={log_dir}/%x-%j.out", *options, env=env, cwd=REPO
    )


def job_log(log_dir: Path, job_id: int) -> str:
    return "".join(p.read_text() for p in log_dir.glob(f"*-{job_id}.out"))


def wait_for_log(cluster, log_dir: Path, job_id: int, text: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while text not in job_log(log_dir, job_id):
        state = cluster.job_info(job_id)["JobState"]
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            pytest.fail(f"job {job_id} ended ({state}) before {text!r}:\n{job_log(log_dir, job_id)[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {text!r} in job {job_id}'s log after {timeout} s:\n{job_log(log_dir, job_id)[-3000:]}")
        time.sleep(0.5)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = find_latest(run_dir)
    return {f"{e}.{k}": v for e in ("mae", "cmm") for k, v in consolidated_state_dict(latest, e).items()}


def mlflow_runs(run_dir: Path) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def wait_for_restart(cluster, log_dir: Path, job_id: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while cluster.job_info(job_id)["Restarts"] == "0":
        state = cluster.job_info(job_id)["JobState"]
        assert state not in ("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED"), (
            f"job {job_id} ended ({state}) without a restart:\n{job_log(log_dir, job_id)[-3000:]}"
        )
        assert time.monotonic() < deadline, job_log(log_dir, job_id)[-3000:]
        time.sleep(0.5)


def rank_pids(job_id: int, node: str) -> list[int]:
    """The training ranks (clmae.train processes) of a job on one node, found by the environment that
    SLURM gave them (all nodes of the test cluster are this machine)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if b"clmae.train" not in (proc / "cmdline").read_bytes():
                continue
            env = dict(item.split(b"=", 1) for item in (proc / "environ").read_bytes().split(b"\0") if b"=" in item)
        except OSError:
            continue
        if env.get(b"SLURM_JOB_ID") == str(job_id).encode() and env.get(b"SLURMD_NODENAME") == node.encode():
            pids.append(int(proc.name))
    return pids


def resumed_step(log: str) -> int:
    match = re.search(r"resumed from .*global step (\d+)\)", log)
    assert match, log[-3000:]
    return int(match.group(1))


def assert_finished_like(run_dir: Path, reference: Path) -> None:
    state = read_client_state(find_latest(run_dir))
    assert (state.epoch, state.global_step) == (EPOCHS, EPOCHS * STEPS_PER_EPOCH)
    runs = mlflow_runs(run_dir)
    assert len(runs) == 1 and runs[0].info.run_id == state.mlflow_run_id and runs[0].info.status == "FINISHED"
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history(state.mlflow_run_id, "mae/loss")]
    assert sorted(steps) == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    got, want = weights(run_dir), weights(reference)
    assert [k for k in want if not torch.equal(got[k], want[k])] == []


@pytest.fixture(scope="module")
def completed_run(slurm_cluster, digits, tmp_path_factory):
    """slurm/pretrain_vith.sh on two nodes, uninterrupted, to the end of its epochs."""
    work = tmp_path_factory.mktemp("slurm_complete")
    env = job_env(slurm_cluster, digits, work, "complete")
    job = submit(slurm_cluster, "pretrain_vith.sh", env, work, "--time=20")
    info = slurm_cluster.wait(job, timeout=900)
    return work / "complete", job, info, job_log(work, job)


def test_job_runs_to_completion_with_checkpoint_and_mlflow_run(completed_run):
    run_dir, _, info, log = completed_run
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), log[-3000:]
    assert "training finished" in log and "requeueing" not in log
    # Rank 1 on node2 met rank 0 on node1 at node1's NodeAddr (the node names resolve nowhere here).
    assert info["NodeList"] == "node[1-2]" and info["NumNodes"] == "2", info
    assert "nodes node[1-2] (2); master node1 at 127.0.1.1" in log
    assert "2 ranks (slurm, gloo)" in log
    assert find_latest(run_dir) is not None
    assert len(mlflow_runs(run_dir)) == 1


def test_usr1_to_the_batch_shell_checkpoints_requeues_and_resumes(completed_run, slurm_cluster, digits, tmp_path):
    # With the data staged to node-local disk ($TMPDIR; the two test nodes share it, so the second
    # node's verified copy replaces the first's, atomically).
    local = tmp_path / "node-local"
    local.mkdir()
    env = job_env(slurm_cluster, digits, tmp_path, "usr1", STAGE_DATA="1", TMPDIR=str(local))
    job = submit(slurm_cluster, "pretrain_vitb.sh", env, tmp_path, "--time=20")
    wait_for_log(slurm_cluster, tmp_path, job, "step 2 (epoch 0)")
    slurm_cluster.scancel("--signal=USR1", "--batch", job)
    info = slurm_cluster.wait(job, timeout=900)
    log = job_log(tmp_path, job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-3000:]
    assert "checkpoint (preemption signal)" in log and "checkpoint written; requeueing" in log
    assert "[slurm job" in log and "restart 1]" in log and "resumed from" in log
    # Both nodes' ranks wrote their part of the checkpoint (ZeRO-2 shards the optimiser state per rank).
    shards = {p.name for p in find_latest(tmp_path / "usr1").rglob("*optim_states.pt")}
    assert any("rank_0" in n for n in shards) and any("rank_1" in n for n in shards), shards
    # Staged once per node and start, checked, used, and removed at the end of each start.
    for node in ("node1", "node2"):
        assert log.count(f"[stage {node}] train.beton:") == 2 and log.count(f"[stage {node}] staged") == 2, log
    assert log.count(f"data staged: reading {local}/clmae-data-{job}") == 2
    assert list(local.glob("clmae-data-*")) == []  # (torch keeps its own caches in $TMPDIR)
    assert_finished_like(tmp_path / "usr1", completed_run[0])


def test_time_limit_checkpoints_requeues_and_resumes(completed_run, slurm_cluster, digits, tmp_path):
    # SLURM sends USR1 170 s before a 3-minute limit, but its controller checks limits only every 30 s, so
    # the signal comes 10 to about 40 s into the job: a whole tiny run (about 40 s) could end first. The
    # first start therefore waits in SETUP_CMD until the signal has come (`wait` returns when the batch
    # shell's trap runs), then trains: the scripts hold the signal, pass it on once the tasks run, and the
    # tasks checkpoint after their first step. Once the job has been requeued (the behaviour under test),
    # its limit is raised so that the second run can finish.
    # Also: staging asked for, but the local disk cannot keep STAGE_RESERVE_MB (1 PiB) free: every node
    # falls back to the shared DATA_DIR with a warning.
    env = job_env(slurm_cluster, digits, tmp_path, "timelimit", STAGE_DATA=str(tmp_path), STAGE_RESERVE_MB=str(2**30))
    env["SETUP_CMD"] = "if [[ ${SLURM_RESTART_COUNT:-0} == 0 ]]; then sleep 150 & wait $!; kill $! 2>/dev/null; fi"
    job = submit(slurm_cluster, "pretrain_vitl.sh", env, tmp_path, "--time=3", "--signal=B:USR1@170")
    wait_for_restart(slurm_cluster, tmp_path, job)
    subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=20"], env=slurm_cluster.env, check=True)
    info = slurm_cluster.wait(job, timeout=900)
    log = job_log(tmp_path, job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert "signal received before the training step started" in log
    assert "checkpoint written; requeueing" in log and "resumed from" in log
    assert "[stage node1] too little space" in log and "[stage node2] too little space" in log
    assert log.count("warning: staging failed on at least one node") == 2 and "data staged" not in log
    assert_finished_like(tmp_path / "timelimit", completed_run[0])


def test_node_lost_mid_step_ends_the_job_quickly_and_resumes_exactly(completed_run, slurm_cluster, digits, tmp_path):
    # Every rank of node2 gets SIGKILL during step 6 (checkpoints come every 4 steps): rank 0 on node1 must
    # not wait for the 30-minute collective timeout. The job is requeued as a crash and resumes from step 4.
    env = job_env(slurm_cluster, digits, tmp_path, "nodeloss")
    job = submit(slurm_cluster, "pretrain_vith.sh", env, tmp_path, "--time=20")
    wait_for_log(slurm_cluster, tmp_path, job, "step 5 (epoch 0)")
    victims = rank_pids(job, "node2")
    assert len(victims) == 1 and rank_pids(job, "node1"), (victims, rank_pids(job, "node1"))
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    wait_for_log(slurm_cluster, tmp_path, job, "training failed with exit code", timeout=NODE_LOSS_BOUND_S + 30)
    ended_after = time.monotonic() - killed
    assert ended_after < NODE_LOSS_BOUND_S, f"the job took {ended_after:.0f} s to end after the node loss"
    info = slurm_cluster.wait(job, timeout=900)
    log = job_log(tmp_path, job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-3000:]
    assert "(crash 1 of at most 2 retries); requeueing" in log
    assert resumed_step(log) == 4
    assert_finished_like(tmp_path / "nodeloss", completed_run[0])


def test_hung_rank_is_stopped_by_the_watchdog_with_every_stack_then_resumes(
    completed_run, slurm_cluster, digits, tmp_path
):
    # The last rank (on node2) stops inside step 6 on the first start only (SETUP_CMD disarms the fault on
    # the restart); rank 0 waits for it in a collective. A 40 s step timeout ends both (the tiny model's
    # steps take well under a second; the first of a start a few seconds).
    env = job_env(slurm_cluster, digits, tmp_path, "hang", CLMAE_FAULT="hang@6")
    env["OVERRIDES"] += " dist.step_timeout_s=40"
    env["SETUP_CMD"] = "[[ ${SLURM_RESTART_COUNT:-0} == 0 ]] || unset CLMAE_FAULT"
    job = submit(slurm_cluster, "pretrain_vitb.sh", env, tmp_path, "--time=20")
    info = slurm_cluster.wait(job, timeout=900)
    log = job_log(tmp_path, job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-3000:]
    stacks = {}
    for rank in (0, 1):
        lines = [line for line in log.splitlines() if line.startswith(f"[rank {rank}] ")]
        quiet = re.search(
            r"watchdog: hung .*no optimiser step completed for (\d+) s \(dist.step_timeout_s: 40 s\)", lines[0]
        )
        assert quiet and 40 <= int(quiet.group(1)) <= 45, lines[:1]
        stacks[rank] = "\n".join(lines)
        # All threads: at least the main thread and the watchdog's own.
        assert len(re.findall(r"[Tt]hread 0x[0-9a-f]+ \(most recent call first\)", stacks[rank])) >= 2, stacks[rank]
    assert "in hang_forever" in stacks[1] and "faults.py" in stacks[1]
    assert "in optimizer_step" in stacks[0] and "hang_forever" not in stacks[0]
    assert "training failed with exit code 124" in log and "the watchdog stopped it" in log
    assert resumed_step(log) == 4
    assert_finished_like(tmp_path / "hang", completed_run[0])


def test_chain_jobs_resume_one_another(completed_run, slurm_cluster, digits, tmp_path):
    env = job_env(slurm_cluster, digits, tmp_path, "chain")
    # One node with two tasks (the other tests use two nodes with one each).
    options = [*SBATCH_FOR_CPU, "--time=20", f"--output={tmp_path}/%x-%j.out"]
    chain = subprocess.run(
        [str(REPO / "slurm" / "submit_chain.sh"), "3", str(REPO / "slurm" / "pretrain_vitb.sh"), *options],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    jobs = [int(line) for line in chain.stdout.split()]
    assert len(jobs) == 3
    assert f"afterany:{jobs[0]}" in slurm_cluster.job_info(jobs[1])["Dependency"]
    wait_for_log(slurm_cluster, tmp_path, jobs[0], "step 2 (epoch 0)")
    slurm_cluster.scancel("--signal=USR1", "--batch", jobs[0])
    infos = [slurm_cluster.wait(job, timeout=900) for job in jobs]
    logs = [job_log(tmp_path, job) for job in jobs]
    assert [(i["JobState"], i["ExitCode"], i["Restarts"]) for i in infos] == [("COMPLETED", "0:0", "0")] * 3, logs
    assert "not requeueing (REQUEUE=0)" in logs[0]
    assert "resumed from" in logs[1] and "training finished" in logs[1]
    assert "nothing to do: the run already finished" in logs[2]
    assert_finished_like(tmp_path / "chain", completed_run[0])


def test_submit_chain_rejects_bad_arguments(tmp_path):
    for args in (["0", "slurm/pretrain_vitb.sh"], ["two", "slurm/pretrain_vitb.sh"], ["2", str(tmp_path / "nope.sh")]):
        result = subprocess.run(
            [str(REPO / "slurm" / "submit_chain.sh"), *args], cwd=REPO, capture_output=True, text=True, env=os.environ
        )
        assert result.returncode == 2 and result.stderr.strip(), (args, result.stderr)


def test_convert_imagenet_job_writes_and_verifies(slurm_cluster, tmp_path):
    expected = make_imagenet(tmp_path / "raw", kaggle=False)
    env = dict(slurm_cluster.env, CLMAE_ROOT=str(REPO), PYTHON=sys.executable)
    env.update(IMAGENET_ROOT=str(tmp_path / "raw"), OUT_DIR=str(tmp_path / "out"), PREP_ARGS="--write-mode raw")
    job = slurm_cluster.sbatch(
        REPO / "slurm" / "convert_imagenet.sh",
        "--cpus-per-task=1",
        "--mem=2G",
        f"--output={tmp_path}/%x-%j.out",
        env=env,
        cwd=REPO,
    )
    info = slurm_cluster.wait(job, timeout=300)
    log = job_log(tmp_path, job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"train.beton", "val.beton", "classes.json"}
    assert f"wrote {len(expected['train'])} images" in log and "done:" in log


def test_a_run_resubmitted_on_one_task_and_back_continues_the_same_mlflow_run(
    completed_run, slurm_cluster, digits, tmp_path
):
    """Elastic resume through SLURM: the run starts on 2 tasks, is resubmitted (same RUN_NAME) on 1 task,
    which doubles train.accum_steps, then on 2 tasks again, and ends like the uninterrupted 2-task run (to
    the reduction order, tests/test_elastic.py) in one MLflow run. Resubmitted with another layout rather
    than requeued: a requeued job keeps its allocation's task count."""
    one_task = ("--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=6G")
    legs = [(SBATCH_2_NODES, " train.stop_at_step=4"), (one_task, " train.stop_at_step=8"), (SBATCH_2_NODES, "")]
    logs = []
    for layout, stop in legs:
        env = job_env(slurm_cluster, digits, tmp_path, "elastic")
        env["OVERRIDES"] += stop
        job = submit(slurm_cluster, "pretrain_vith.sh", env, tmp_path, "--time=20", layout=layout)
        info = slurm_cluster.wait(job, timeout=900)
        logs.append(job_log(tmp_path, job))
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), logs[-1][-3000:]
    assert "re-sharded from 2 to 1 ranks at global step 4 (epoch 0): train.accum_steps 1 -> 2" in logs[1]
    assert "re-sharded from 1 to 2 ranks at global step 8 (epoch 0): train.accum_steps 2 -> 1" in logs[2]
    run_dir = tmp_path / "elastic"
    state = read_client_state(find_latest(run_dir))
    assert (state.epoch, state.global_step, state.world_size) == (EPOCHS, EPOCHS * STEPS_PER_EPOCH, 2)
    runs = mlflow_runs(run_dir)
    assert len(runs) == 1 and runs[0].info.run_id == state.mlflow_run_id and runs[0].info.status == "FINISHED"
    assert {"resharded.step_000000004", "resharded.step_000000008"} <= set(runs[0].data.tags)
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history(state.mlflow_run_id, "mae/loss")]
    assert sorted(steps) == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    got, want = weights(run_dir), weights(completed_run[0])
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5)
