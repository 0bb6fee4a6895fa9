"""clmae.dist under a real SLURM scheduler: a 2-task sbatch job whose srun step initialises torch.distributed
through DeepSpeed, plus what SLURM really puts in the batch shell's and the tasks' environments."""

import json
import re
import sys

import pytest

from clmae.dist import slurm_master_port

# Launcher variables that, inherited from whatever runs pytest, would win over SLURM's in detect().
TORCH_LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

# One JSON file per process: its SLURM_* variables and what clmae.dist.detect makes of them. A file each, not
# a stdout line: slurmstepd forwards task output in 1 KiB pieces, so two tasks' lines longer than that
# interleave in the job's output file (seen on CI: a probe line cut in the middle by the other task's).
PROBE = """\
import json, os, sys
from dataclasses import asdict
from clmae.dist import detect
slurm_env = {k: v for k, v in os.environ.items() if k.startswith("SLURM_")}
record = {"where": sys.argv[1], "env": slurm_env, "detected": asdict(detect(cuda_available=False))}
with open(f"probe-{sys.argv[1]}-{os.environ.get('SLURM_PROCID', 'none')}.json", "w") as f:
    json.dump(record, f)
"""

DIST_LINE = re.compile(r"\[rank (\d+)\] DistEnv\((.*)\); all_reduce of \(rank\+1\) = (\S+) \(expected (\S+)\)")


@pytest.fixture(scope="module")
def dist_job(slurm_cluster, tmp_path_factory):
    """Runs one 2-task job: the probe in the batch shell, the probe as an srun step (step 0), then
    `python -m clmae.dist` as a second srun step. Returns (job id, scontrol record, output text, probe
    records)."""
    work = tmp_path_factory.mktemp("dist_slurm")
    (work / "probe.py").write_text(PROBE)
    script = work / "job.sh"
    # Absolute interpreter paths: PATH is the submitter's only under the default --export=ALL (with
    # --export=NONE the batch shell gets a login PATH and srun tasks none at all).
    script.write_text(
        "#!/bin/bash\n"
        "set -euo pipefail\n"
        f'"{sys.executable}" probe.py batch\n'
        f'srun --ntasks=2 "{sys.executable}" probe.py task\n'
        f'srun --ntasks=2 "{sys.executable}" -m clmae.dist\n'
    )
    env = {k: v for k, v in slurm_cluster.env.items() if k not in TORCH_LAUNCH_VARS}
    env["OMP_NUM_THREADS"] = "1"  # two ranks on a 2-core machine
    job_id = slurm_cluster.sbatch(
        script,
        "--job-name=clmae-dist",
        "--ntasks=2",
        "--cpus-per-task=1",
        "--time=10",
        f"--output={work / 'job-%j.out'}",
        env=env,
        cwd=work,
    )
    info = slurm_cluster.wait(job_id, timeout=300)
    output = (work / f"job-{job_id}.out").read_text()
    found = [json.loads(path.read_text()) for path in sorted(work.glob("probe-*.json"))]
    return job_id, info, output, found


@pytest.mark.slurm
@pytest.mark.distributed
def test_srun_step_ranks_meet_and_all_reduce(dist_job, slurm_cluster):
    job_id, info, output, _ = dist_job
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), f"{info}\n{output}\n{slurm_cluster.log_tail()}"

    ranks = {}
    for match in DIST_LINE.finditer(output):
        fields = dict(re.findall(r"(\w+)=('[^']*'|-?\d+)", match.group(2)))
        ranks[int(match.group(1))] = ({k: v.strip("'") for k, v in fields.items()}, match.group(3), match.group(4))
    assert sorted(ranks) == [0, 1], output

    # SLURM's NodeAddr of the first node (the test cluster's node names resolve nowhere, as on clusters
    # whose node names are not in DNS).
    master_addr = slurm_cluster.node_addr
    for rank, (fields, reduced, expected) in ranks.items():
        assert fields == {
            "rank": str(rank),
            "local_rank": str(rank),
            "world_size": "2",
            "local_world_size": "2",
            "master_addr": master_addr,
            "master_port": str(slurm_master_port(job_id, step_id=1)),  # the second srun of the job
            "backend": "gloo",
            "launcher": "slurm",
        }
        assert (reduced, expected) == ("3", "3")


@pytest.mark.slurm
@pytest.mark.distributed
def test_step_id_marks_srun_tasks_but_not_the_batch_shell(dist_job):
    """clmae.dist tells an srun task from a process started in the batch shell by SLURM_STEP_ID /
    SLURM_STEPID alone (the batch shell has SLURM_PROCID=0 too); pin what SLURM 22.05 really sets."""
    job_id, _, output, found = dist_job
    batch = [p for p in found if p["where"] == "batch"]
    tasks = sorted((p for p in found if p["where"] == "task"), key=lambda p: p["env"]["SLURM_PROCID"])
    assert len(batch) == 1 and len(tasks) == 2, output

    batch_env = batch[0]["env"]
    assert "SLURM_STEP_ID" not in batch_env and "SLURM_STEPID" not in batch_env, batch_env
    assert (batch_env["SLURM_PROCID"], batch_env["SLURM_JOB_ID"], batch_env["SLURM_NTASKS"]) == ("0", str(job_id), "2")
    assert batch[0]["detected"]["launcher"] == "single"

    for rank, task in enumerate(tasks):
        env = task["env"]
        # The first srun of the job is step 0.
        assert (env["SLURM_STEP_ID"], env["SLURM_STEPID"]) == ("0", "0"), env
        assert (env["SLURM_PROCID"], env["SLURM_LOCALID"], env["SLURM_STEP_NUM_TASKS"]) == (str(rank), str(rank), "2")
        detected = task["detected"]
        assert (detected["launcher"], detected["rank"], detected["world_size"]) == ("slurm", rank, 2)
