# shellcheck shell=bash
# Shared body of slurm/pretrain_*.sh: launch one task per GPU, forward the time-limit / preemption
# signal, requeue until the run is finished. Sourced by the per-model scripts (their #SBATCH headers
# differ); not submitted by itself.
#
# Exit protocol of clmae-pretrain: 0 finished (or stop_at_step reached), 75 checkpointed after a
# signal (requeue me), anything else a failure (requeued at most MAX_CRASH_RETRIES times).

set -uo pipefail

log() { printf '[%s] [slurm job %s restart %s] %s\n' "$(date '+%F %T')" "${SLURM_JOB_ID:-?}" "${SLURM_RESTART_COUNT:-0}" "$*"; }

# The signal (USR1 from --signal=B:USR1@120, or `scancel --signal=USR1 --batch`) reaches this shell
# only; pass it on to every task of the step, which checkpoint at their next step boundary and exit 75.
# Installed first: bash's default for USR1 is to die. A signal that comes before the step exists is
# kept and passed on once the tasks have had time to install their own handler.
signalled=0
srun_pid=
# shellcheck disable=SC2317  # invoked by the trap below
forward_signal() {
    signalled=1
    if [[ -z $srun_pid ]]; then
        log "signal received before the training step started; passing it on once it runs"
        return
    fi
    log "signal received: asking the training tasks to checkpoint and stop"
    scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null || kill -USR1 "$srun_pid" 2>/dev/null || true
}
trap forward_signal USR1 TERM

CLMAE_ROOT=${CLMAE_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
OUTPUT_DIR=${OUTPUT_DIR:-$CLMAE_ROOT/runs}
RUN_NAME=${RUN_NAME:-${SLURM_JOB_NAME:-clmae}}
DATA_DIR=${DATA_DIR:-$CLMAE_ROOT/data/imagenet}
DS_CONFIG=${DS_CONFIG:-zero2_bf16}
OVERRIDES=${OVERRIDES:-}
MAX_CRASH_RETRIES=${MAX_CRASH_RETRIES:-2}
REQUEUE=${REQUEUE:-1}  # 0: never requeue (slurm/submit_chain.sh chains jobs instead)
EXIT_REQUEUE=75

RUN_DIR=$OUTPUT_DIR/$RUN_NAME
CRASH_COUNT_FILE=$RUN_DIR/.slurm_crash_count
mkdir -p "$RUN_DIR"


# shellcheck source=slurm/lib/python.sh
source "$CLMAE_ROOT/slurm/lib/python.sh"
clmae_setup_python || exit 2


read -r -a override_args <<<"$OVERRIDES"
log "run directory $RUN_DIR; config $CONFIG; ds_config $DS_CONFIG; overrides: ${OVERRIDES:-none}"
# A bash trap runs only when the foreground command returns, so srun goes to the background and the
# shell waits for it (again after each interrupting signal).
# --wait instead of --kill-on-bad-exit: a preempted run's ranks all exit 75, a few moments apart, and
# kill-on-bad-exit would kill the slower ones mid-teardown (75 is "bad"). --wait ends the others two
# minutes after the first task ends, so a crashed rank never leaves its peers hanging in a collective.
srun --wait=120 --kill-on-bad-exit=0 --cpu-bind=none \
    "$PYTHON" -m clmae.train --config "$CONFIG" \
    "run.output_dir=$OUTPUT_DIR" "run.name=$RUN_NAME" "train.ds_config=$DS_CONFIG" \
    "data.train_path=$DATA_DIR/train.beton" "data.val_path=$DATA_DIR/val.beton" \
    "${override_args[@]}" &
srun_pid=$!
if [[ $signalled == 1 ]]; then
    sleep "${EARLY_SIGNAL_DELAY:-20}"  # the tasks install their handler within seconds of starting
    forward_signal
fi
rc=0
while true; do
    wait "$srun_pid"
    rc=$?
    kill -0 "$srun_pid" 2>/dev/null || break
done

if [[ $rc -eq 0 ]]; then
    log "training finished"
    rm -f "$CRASH_COUNT_FILE"
    exit 0
elif [[ $rc -eq $EXIT_REQUEUE ]]; then
    rm -f "$CRASH_COUNT_FILE"
    if [[ $REQUEUE == 0 ]]; then
        log "checkpoint written; not requeueing (REQUEUE=0): the next job of the chain resumes"
        exit 0
    fi
    log "checkpoint written; requeueing (signal seen by this shell: $signalled)"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi

crashes=$(( $(cat "$CRASH_COUNT_FILE" 2>/dev/null || echo 0) + 1 ))
echo "$crashes" >"$CRASH_COUNT_FILE"
if [[ $REQUEUE != 0 && $crashes -le $MAX_CRASH_RETRIES ]]; then
    log "training failed with exit code $rc (crash $crashes of at most $MAX_CRASH_RETRIES retries); requeueing"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
log "error: training failed with exit code $rc after $MAX_CRASH_RETRIES retries; not requeueing. See the log above."
exit "$rc"
