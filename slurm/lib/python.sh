# shellcheck shell=bash
# Which Python runs clmae, shared by the sbatch scripts; sourced, not submitted by itself.
#
# clmae works from the checkout's .venv (`make setup`) or from any environment it was installed into
# (`pip install .` into a conda env or a venv). SETUP_CMD runs first, because that is where a cluster's
# `module load` / `conda activate` puts the right python3 on PATH:
#   PYTHON=/shared/envs/clmae/bin/python sbatch slurm/pretrain_vitb.sh
#   SETUP_CMD="module load anaconda3 && conda activate clmae" sbatch slurm/pretrain_vitb.sh
#
# PYTHON: an interpreter path or a command name. Unset: the checkout's .venv if it has one, else the
# python3 on PATH after SETUP_CMD. Sets PYTHON to an absolute path (srun's tasks may get another PATH),
# or returns 2 with a one-line error naming what is missing.
clmae_setup_python() {
    if [[ -n ${SETUP_CMD:-} ]]; then
        echo "[$(date '+%F %T')] setup: $SETUP_CMD"
        eval "$SETUP_CMD"
    fi
    local candidate=${PYTHON:-}
    if [[ -z $candidate ]]; then
        candidate=python3
        [[ -x $CLMAE_ROOT/.venv/bin/python ]] && candidate=$CLMAE_ROOT/.venv/bin/python
    fi
    local resolved
    if ! resolved=$(command -v "$candidate"); then
        echo "error: no Python interpreter '$candidate' (set PYTHON, run 'make setup' in $CLMAE_ROOT, or load" \
            "your environment with SETUP_CMD)" >&2
        return 2
    fi
    if ! "$resolved" -c 'import clmae, data_prep' 2>/dev/null; then
        echo "error: $resolved cannot import clmae: install it into that environment ('pip install $CLMAE_ROOT')" \
            "or point PYTHON at one that has it" >&2
        return 2
    fi
    PYTHON=$resolved
}
