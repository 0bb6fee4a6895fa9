#!/bin/bash
# Convert ImageNet-1k to FFCV once, on one node (CPU only; hours for the full set, most of it JPEG
# decoding, so it scales with --cpus-per-task). Writes OUT_DIR/train.beton, OUT_DIR/val.beton and
# OUT_DIR/classes.json; each .beton is written under a temporary name and renamed when complete, so a
# job killed half-way leaves nothing that looks finished (resubmit with OVERWRITE=1).
#
#   sbatch slurm/convert_imagenet.sh
#   IMAGENET_ROOT=/datasets/imagenet OUT_DIR=/scratch/$USER/imagenet sbatch --partition=cpu slurm/convert_imagenet.sh
#
# Environment (exported by sbatch):
#   CLMAE_ROOT     repository checkout                (default: the submit directory)
#   PYTHON         interpreter with clmae installed   (default: $CLMAE_ROOT/.venv/bin/python, else python3)
#   IMAGENET_ROOT  folder with train/ and val/ (synset folders, or val/ flat + LOC_val_solution.csv)
#                  (default: $CLMAE_ROOT/data/imagenet-raw)
#   OUT_DIR        output folder                      (default: $CLMAE_ROOT/data/imagenet)
#   PREP_ARGS      extra clmae-prep options, e.g. "--max-resolution 512 --write-mode jpg"
#   OVERWRITE      1 replaces existing outputs        (default: 0)
#   SETUP_CMD      shell run first, e.g. "module load python/3.11"
#
#SBATCH --job-name=clmae-convert
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --mem=64G
#SBATCH --time=12:00:00
#SBATCH --output=logs/%x-%j.out

set -euo pipefail

CLMAE_ROOT=${CLMAE_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
IMAGENET_ROOT=${IMAGENET_ROOT:-$CLMAE_ROOT/data/imagenet-raw}
OUT_DIR=${OUT_DIR:-$CLMAE_ROOT/data/imagenet}
PREP_ARGS=${PREP_ARGS:-}
OVERWRITE=${OVERWRITE:-0}

# shellcheck source=slurm/lib/python.sh
source "$CLMAE_ROOT/slurm/lib/python.sh"
clmae_setup_python
read -r -a extra <<<"$PREP_ARGS"
[[ $OVERWRITE == 1 ]] && extra+=(--overwrite)

echo "[$(date '+%F %T')] converting $IMAGENET_ROOT -> $OUT_DIR with ${SLURM_CPUS_PER_TASK:-$(nproc)} workers"
"$PYTHON" -m data_prep imagenet "$IMAGENET_ROOT" "$OUT_DIR" --workers "${SLURM_CPUS_PER_TASK:-$(nproc)}" "${extra[@]}"
"$PYTHON" -m data_prep verify "$OUT_DIR/train.beton"
"$PYTHON" -m data_prep verify "$OUT_DIR/val.beton"
echo "[$(date '+%F %T')] done: $OUT_DIR"
