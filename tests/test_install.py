"""clmae installed like a library: a wheel (not an editable install) in a fresh virtual environment, used
from an empty directory outside the source tree, the way a cluster user runs it.

What must hold there: every shipped YAML config and DeepSpeed config is found by name (they are package
data), the console scripts work, a 2-rank pre-training runs through the real sbatch script with `PYTHON=`
the new environment, and every path the user gives is relative to where they run the command.

The new environment gets clmae from the wheel alone; its third-party dependencies (torch, DeepSpeed, FFCV,
...: 6 GB) come from the development environment through a path entry in a `.pth` file instead of a
second 3-minute install. That entry adds the directory only: the development environment's own `.pth`
files (among them the editable install of this checkout) are not processed, so the source tree cannot leak
in; the test checks where clmae is imported from.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from clmae.checkpoint import find_latest

REPO = Path(__file__).resolve().parent.parent
SBATCH_FOR_CPU = ("--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=6G")

pytestmark = [pytest.mark.slurm, pytest.mark.distributed]


def source_copy(dest: Path) -> Path:
    """The checkout's files as git sees them (tracked and new, not ignored): a wheel built in the checkout
    itself would reuse setuptools' build/ directory, which keeps files that were deleted since."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        src, target = REPO / name, dest / name
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the working tree, not yet in the index
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target, follow_symlinks=False)
    return dest


def run(argv: list, cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    result = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{argv} failed ({result.returncode}):\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    )
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv bin directory, source copy, environment): clmae's wheel installed into a fresh venv."""
    root = tmp_path_factory.mktemp("install")
    src = source_copy(root / "src")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", root / "dist", src],
        cwd=root, env=dict(os.environ))  # fmt: skip
    wheel = next((root / "dist").glob("clmae-*.whl"))
    venv = root / "venv"
    run([sys.executable, "-m", "venv", venv], cwd=root, env=dict(os.environ))
    site = Path(
        subprocess.run(
            [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    )  # fmt: skip
    (site / "_clmae_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], cwd=root,
        env=dict(os.environ))  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # The development environment's DeepSpeed op cache and ninja: the same build, reused, not rebuilt.
    env.update(
        TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions")),
        PATH=os.pathsep.join([str(venv / "bin"), os.path.dirname(sys.executable), env.get("PATH", "")]),
        OMP_NUM_THREADS="1",
    )
    return venv / "bin", src, env


def test_wheel_ships_every_config_and_imports_outside_the_source_tree(installed, tmp_path):
    bin_dir, _, env = installed
    where = run([bin_dir / "python", "-c", "import clmae, data_prep; print(clmae.__file__, data_prep.__file__)"],
                cwd=tmp_path, env=env)  # fmt: skip
    assert str(bin_dir.parent) in where and str(REPO) not in where, where
    shipped = run(
        [bin_dir / "python", "-c",
         "from clmae.config import available_configs; from clmae.ds_engines import DS_CONFIG_DIR; "
         "print(sorted(available_configs())); print(sorted(p.stem for p in DS_CONFIG_DIR.glob('*.json')))"],
        cwd=tmp_path, env=env,
    )  # fmt: skip
    expected_configs = sorted(p.stem for p in (REPO / "clmae" / "configs").glob("*.yaml"))
    expected_ds = sorted(p.stem for p in (REPO / "ds_configs").glob("*.json"))
    assert shipped.splitlines() == [str(expected_configs), str(expected_ds)]
    printed = run([bin_dir / "clmae-pretrain", "--config", "tiny_digits", "--print-config"], cwd=tmp_path, env=env)
    assert "name: vit_tiny" in printed and "ds_config: zero2_fp32" in printed


def test_installed_package_trains_through_sbatch_exports_and_evaluates(installed, slurm_cluster, tmp_path):
    """From an empty directory: convert the digits to a relative path, pre-train on 2 ranks through
    slurm/pretrain_vitb.sh with PYTHON= the new environment (outputs to a relative path), export, evaluate."""
    bin_dir, src, env = installed
    work = tmp_path / "elsewhere"
    work.mkdir()
    run([bin_dir / "clmae-prep", "digits", "data/digits"], cwd=work, env=env)
    assert (work / "data" / "digits" / "train.beton").is_file()

    overrides = (
        "data.batch_size=32 train.stop_at_step=3 tracking.system_metrics=false tracking.mask_images_every_epochs=0"
    )
    job_env = {k: v for k, v in slurm_cluster.env.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    job_env.update(env)
    job_env.update(
        CLMAE_ROOT=str(src), PYTHON=str(bin_dir / "python"), CONFIG="tiny_digits", DATA_DIR="data/digits",
        OUTPUT_DIR="runs", RUN_NAME="installed", DS_CONFIG="zero2_fp32", OVERRIDES=overrides,
    )  # fmt: skip
    job = slurm_cluster.sbatch(
        src / "slurm" / "pretrain_vitb.sh", *SBATCH_FOR_CPU, "--time=20", "--output=job-%j.out", env=job_env, cwd=work
    )
    info = slurm_cluster.wait(job, timeout=600)
    log = (work / f"job-{job}.out").read_text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert "reached train.stop_at_step=3" in log and "training finished" in log
    run_dir = work / "runs" / "installed"
    assert find_latest(run_dir) is not None and (run_dir / "config.yaml").is_file()

    exported = run([bin_dir / "clmae-export", "runs/installed", "--out", "encoder.safetensors"], cwd=work, env=env)
    assert (work / "encoder.safetensors").is_file(), exported
    evaluated = run([bin_dir / "clmae-eval", "knn", "runs/installed"], cwd=work, env=env, timeout=600)
    assert "knn_l2_k5/acc1" in evaluated
    assert list((run_dir / "eval").rglob("knn*.json")), evaluated
