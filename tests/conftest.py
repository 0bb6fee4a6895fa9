"""Shared pytest fixtures."""

import subprocess
import sys

import pytest

from tests.slurm_cluster import LocalSlurmCluster, missing_binaries

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
