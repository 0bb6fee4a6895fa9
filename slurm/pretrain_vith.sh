#!/bin/bash
# CL-MAE ViT-H/14 pre-training on ImageNet-1k (config clmae/configs/vith.yaml), 8 GPUs per node, one task per
# GPU. Submit from the repository root; the job requeues itself at its time limit and on preemption
# and resumes from the newest complete checkpoint until the last epoch is done:
#
#   sbatch slurm/pretrain_vith.sh
#   sbatch --partition=gpu --account=myproj --nodes=4 slurm/pretrain_vith.sh
#   DATA_DIR=/scratch/imagenet OVERRIDES="train.epochs=800" sbatch slurm/pretrain_vith.sh
#
# Everything site-specific is an environment variable (exported by sbatch) or an sbatch option:
#   --partition / --account / --nodes / --time   sbatch options (command line beats the headers below)
#   CLMAE_ROOT   repository checkout                     (default: the submit directory)
#   PYTHON       interpreter with clmae installed        (default: $CLMAE_ROOT/.venv/bin/python, else python3 after SETUP_CMD)
#   DATA_DIR     directory with train.beton and val.beton (default: $CLMAE_ROOT/data/imagenet)
#   OUTPUT_DIR   where run directories go               (default: $CLMAE_ROOT/runs)
#   RUN_NAME     run directory name = resume key         (default: the job name, clmae-vith)
#   CONFIG       config name or path                     (default: vith)
#   DS_CONFIG    ds_configs/ name or path                (default: zero2_bf16; zero3_bf16 saves memory)
#   OVERRIDES    extra section.key=value overrides, space-separated
#   SETUP_CMD    shell run first on the batch node, e.g. "module load cuda/12.4" or a container setup
#   MAX_CRASH_RETRIES  requeues after a crash before giving up (default: 2)
#   MLFLOW_TRACKING_URI  an MLflow server (default: SQLite store inside the run directory)
#
#SBATCH --job-name=clmae-vith
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

CONFIG=${CONFIG:-vith}
# shellcheck source=slurm/lib/pretrain.sh
source "${CLMAE_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/lib/pretrain.sh"
