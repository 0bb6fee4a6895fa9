#!/bin/bash
# For clusters without requeue: submit N jobs of SCRIPT chained with --dependency=afterany, so each
# starts when the previous one ends (time limit, preemption, or done) and resumes from the newest
# complete checkpoint. Jobs after the one that finishes the run exit at once.
#
#   slurm/submit_chain.sh 10 slurm/pretrain_vith.sh
#   slurm/submit_chain.sh 4 slurm/pretrain_vitb.sh --partition=gpu --account=myproj
#
# Every job gets the same job name, so all write to the same run directory (RUN_NAME defaults to it).
# Prints the job ids, one per line.
set -euo pipefail

if [[ $# -lt 2 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 N SCRIPT [sbatch options...]   (N >= 1 jobs)" >&2
    exit 2
fi
count=$1
script=$2
shift 2
if [[ ! -f $script ]]; then
    echo "error: no such script: $script" >&2
    exit 2
fi

previous=
for ((i = 1; i <= count; i++)); do
    dependency=()
    [[ -n $previous ]] && dependency=(--dependency="afterany:$previous")
    # REQUEUE=0: a signalled job checkpoints and ends; the next job of the chain continues it.
    previous=$(REQUEUE=0 sbatch --parsable --no-requeue "${dependency[@]}" "$@" "$script")
    previous=${previous%%;*}
    echo "$previous"
done
