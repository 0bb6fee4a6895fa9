"""Shared pytest fixtures."""

import os
import subprocess
import sys

import pytest

from tests.slurm_cluster import LocalSlurmCluster, missing_binaries

# --------------------------------------------------------------------------------------------------
# Parallel runs (`make test TEST_WORKERS=N`: pytest-xdist): each test file is one unit of work, so that a
# module-scoped fixture is built once; files that share a session fixture form one unit, so that it is built on
# one worker only. The longest units are queued first (their durations on 2 cores).
# --------------------------------------------------------------------------------------------------

SHARED_FIXTURE_GROUPS = {
    "test_slurm_scripts": "slurm",  # slurm_cluster: one private SLURM cluster
    "test_dist_slurm": "slurm",
    "test_install": "slurm",
    "test_evaluate": "pretrained",  # pretrained_runs: two 2-rank pre-training runs
    "test_export": "pretrained",
    "test_viz": "pretrained",
}
LONGEST_FIRST = ("slurm", "test_train", "pretrained", "test_elastic")  # about 18, 17, 9 and 6 min


def work_unit(nodeid: str) -> str:
    module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")
    return SHARED_FIXTURE_GROUPS.get(module, module)


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        unit = work_unit(item.nodeid)
        return LONGEST_FIRST.index(unit) if unit in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: collection order within a rank


def pytest_xdist_make_scheduler(config, log):
    """xdist's scope scheduling with `work_unit` as the scope. (Its own `--dist loadgroup` marks groups by
    rewriting node ids, which pytest 9 no longer allows.)"""
    from xdist.scheduler import LoadScopeScheduling

    class WorkUnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    config.option.loadscopereorder = False  # keep the order above, longest first
    return WorkUnitScheduling(config, log)


@pytest.fixture(autouse=True)
def _restore_mlflow_tracking_uri():
    """mlflow.set_tracking_uri() also exports MLFLOW_TRACKING_URI; a training run started by a later test
    would inherit it and log to an earlier test's store instead of its own run directory."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


# --------------------------------------------------------------------------------------------------
# SLURM: one private single-node cluster (own munged, slurmctld, slurmd) for the whole test session.
# Tests that use it carry @pytest.mark.slurm. See tests/slurm_cluster.py.
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def slurm_cluster():
    """A started LocalSlurmCluster, stopped after the last test. Fails (never skips) when the SLURM or
    munge commands are missing: a skipped scheduler test would pass silently on a machine that cannot run it."""
    missing = missing_binaries()
    if missing:
        pytest.fail(
            f"SLURM test cluster: commands not found: {', '.join(missing)}. "
            "Run `make setup` (installs slurmctld, slurmd, slurm-client, munge).",
            pytrace=False,
        )
    with LocalSlurmCluster() as cluster:
        yield cluster


# --------------------------------------------------------------------------------------------------
# The embedded digits dataset, converted once per session through the real converter.
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """A directory with train.beton and val.beton of scikit-learn's digits (`clmae-prep digits`)."""
    out = tmp_path_factory.mktemp("digits")
    result = subprocess.run(
        [sys.executable, "-m", "data_prep", "digits", str(out), "--overwrite"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


# --------------------------------------------------------------------------------------------------
# Pre-trained checkpoints for the evaluation, export and picture tests: real 2-rank runs, started once.
# --------------------------------------------------------------------------------------------------

# The digits are 8 x 8 pixels: at 16 px (4 x 4 patches of 4 px) the runs cost a quarter of the recipe's 32 px
# and still learn; a size other than the model's native 32 also proves that export and evaluation carry it.
PRETRAIN_IMG_SIZE = 16
# 10 epochs (230 optimiser steps of 2 x 32 images) of the tiny_digits recipe: about the shortest run whose
# features beat a random encoder's (tests/test_evaluate.py; at 40 or 92 steps they do not). About 4 minutes
# on 2 idle cores.
PRETRAIN_ZERO2 = ["train.ds_config=zero2_fp32", "train.stop_at_step=230"]
# ZeRO-3 shards every parameter: a few steps are enough to prove that export consolidates it.
PRETRAIN_ZERO3 = ["train.ds_config=zero3_fp32", "train.stop_at_step=3"]


@pytest.fixture(scope="session")
def pretrained_runs(tmp_path_factory, digits):
    """{"zero2": run_dir, "zero3": run_dir}: two CL-MAE runs of clmae-pretrain on 2 torchrun ranks, started
    together (their imports overlap), each with its checkpoints and MLflow store in its run directory."""
    import os

    root = tmp_path_factory.mktemp("pretrained")
    runs, procs = {"zero2": PRETRAIN_ZERO2, "zero3": PRETRAIN_ZERO3}, {}
    for name, overrides in runs.items():
        args = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "clmae.train", "--config", "tiny_digits",
            f"run.output_dir={root}", f"run.name={name}",
            f"data.train_path={digits / 'train.beton'}", f"data.val_path={digits / 'val.beton'}",
            "data.batch_size=32", "tracking.system_metrics=false", "tracking.mask_images_every_epochs=0",
            f"model.img_size={PRETRAIN_IMG_SIZE}", *overrides,
        ]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS="1")
        log = open(root / f"{name}.log", "w")  # closed below, once the process has ended
        procs[name] = (subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env), log)
    for name, (proc, log) in procs.items():
        code = proc.wait(timeout=1200)  # 4 minutes on 2 idle cores; CI machines vary
        log.close()
        assert code == 0, f"pre-training {name} failed:\n{(root / f'{name}.log').read_text()[-3000:]}"
    return {name: root / name for name in runs}
