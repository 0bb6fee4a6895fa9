#!/bin/bash
# Evaluate a pre-training run on its newest complete checkpoint: k-NN, few-shot and linear probes (and
# fine-tuning if asked), one srun step per protocol, one task per GPU. Results go to
# RUN_DIR/eval/<step>/<protocol>.json and to new MLflow runs tagged with the pre-training run's id.
#
#   RUN_DIR=runs/clmae_vith sbatch slurm/eval.sh
#   RUN_DIR=runs/clmae_vitb PROTOCOLS="linprobe finetune" sbatch --partition=gpu slurm/eval.sh
#
# Environment (exported by sbatch):
#   RUN_DIR      the pre-training run directory (required), or a checkpoints/step_* directory
#   PROTOCOLS    space-separated, from `clmae-eval --help`: knn knn_reference fewshot linprobe finetune   (default: "knn fewshot linprobe")
#   DATA_DIR     folder with train.beton / val.beton (default: the paths in the run's config)
#   OVERRIDES    extra section.key=value overrides for every protocol
#   CLMAE_ROOT, PYTHON, SETUP_CMD   as in slurm/pretrain_vith.sh
#
#SBATCH --job-name=clmae-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --time=12:00:00
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

set -euo pipefail

CLMAE_ROOT=${CLMAE_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
RUN_DIR=${RUN_DIR:?set RUN_DIR to the pre-training run directory, e.g. RUN_DIR=runs/clmae_vith sbatch slurm/eval.sh}
PROTOCOLS=${PROTOCOLS:-knn fewshot linprobe}
DATA_DIR=${DATA_DIR:-}
OVERRIDES=${OVERRIDES:-}

# shellcheck source=slurm/lib/python.sh
source "$CLMAE_ROOT/slurm/lib/python.sh"
clmae_setup_python
read -r -a override_args <<<"$OVERRIDES"
if [[ -n $DATA_DIR ]]; then
    override_args+=("data.train_path=$DATA_DIR/train.beton" "data.val_path=$DATA_DIR/val.beton")
fi
for protocol in $PROTOCOLS; do
    echo "[$(date '+%F %T')] clmae-eval $protocol $RUN_DIR"
    srun --wait=120 --cpu-bind=none "$PYTHON" -m clmae.evaluate "$protocol" "$RUN_DIR" "${override_args[@]}"
done
