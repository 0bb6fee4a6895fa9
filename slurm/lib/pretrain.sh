# shellcheck shell=bash
# Shared body of slurm/pretrain_*.sh: launch one task per GPU, forward the time-limit / preemption
# signal, requeue until the run is finished. Sourced by the per-model scripts (their #SBATCH headers
# differ); not submitted by itself.
#
# Exit protocol of clmae-pretrain: 0 finished (or stop_at_step reached), 75 checkpointed after a
# signal (requeue me), 124 stopped by the hang watchdog (a crash, with every rank's stacks in the log),
# anything else a failure; failures are requeued at most MAX_CRASH_RETRIES times.

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
STAGE_DATA=${STAGE_DATA:-0}  # 1: copy the .beton files to node-local $TMPDIR first; a path: there instead
STAGE_RESERVE_MB=${STAGE_RESERVE_MB:-1024}  # free space to leave on the local disk; less: use DATA_DIR
# Seconds the other tasks may live after the first one ended. A preempted run's ranks exit 75 moments apart
# (after one shared checkpoint), so this is only reached when ranks died or hang: with a node lost, its
# peers stop on a broken connection at once, or get SIGTERM here and exit within dist.signal_grace_s.
TASK_EXIT_WAIT=${TASK_EXIT_WAIT:-30}
EXIT_REQUEUE=75
EXIT_HUNG=124

RUN_DIR=$OUTPUT_DIR/$RUN_NAME
CRASH_COUNT_FILE=$RUN_DIR/.slurm_crash_count
mkdir -p "$RUN_DIR"


# shellcheck source=slurm/lib/python.sh
source "$CLMAE_ROOT/slurm/lib/python.sh"
clmae_setup_python || exit 2


# Launcher variables inherited from the submitting shell would override SLURM's in clmae.dist.
unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE MASTER_PORT
# The master (rank 0's node, the first of the allocation), resolved once here rather than by every
# rank: SLURM's NodeAddr, which exists even where node names are not in DNS. The port follows from the
# job and step ids (clmae.dist.slurm_master_port), so that jobs sharing a node do not collide.
master_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_ADDR=$(scontrol show node -o "$master_node" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
export MASTER_ADDR=${MASTER_ADDR:-$master_node}
log "nodes $SLURM_JOB_NODELIST (${SLURM_JOB_NUM_NODES:-1}); master $master_node at $MASTER_ADDR"

# Node-local staging: FFCV reads the .beton files at random, which a shared file system serves slowly
# to many nodes at once. One task per node copies them, checks size and sha256 (slurm/lib/stage_data.sh),
# and replaces a copy only once it is verified. Any node that cannot (too little space, a bad copy)
# sends every node back to the shared DATA_DIR: the ranks must read the same files.
stage_dir=
unstage() {
    [[ -n $stage_dir ]] || return 0
    # --overlap: the training step's resources may not be released yet, and this must not wait for them.
    srun --nodes="${SLURM_JOB_NUM_NODES:-1}" --ntasks="${SLURM_JOB_NUM_NODES:-1}" --ntasks-per-node=1 \
        --overlap --cpu-bind=none rm -rf "$stage_dir" || log "warning: could not remove the staged copies in $stage_dir"
}
if [[ $STAGE_DATA != 0 ]]; then
    stage_root=$STAGE_DATA
    [[ $STAGE_DATA == 1 ]] && stage_root=${TMPDIR:-/tmp}
    stage_dir=$stage_root/clmae-data-${SLURM_JOB_ID:-$$}
    log "staging $DATA_DIR/{train,val}.beton to $stage_dir on every node"
    if srun --nodes="${SLURM_JOB_NUM_NODES:-1}" --ntasks="${SLURM_JOB_NUM_NODES:-1}" --ntasks-per-node=1 \
        --overlap --cpu-bind=none bash "$CLMAE_ROOT/slurm/lib/stage_data.sh" "$DATA_DIR" "$stage_dir" "$STAGE_RESERVE_MB"; then
        DATA_DIR=$stage_dir
        log "data staged: reading $DATA_DIR on every node"
    else
        log "warning: staging failed on at least one node (see above); reading the shared $DATA_DIR instead"
        unstage  # the copies that did succeed on other nodes
        stage_dir=
    fi
fi

read -r -a override_args <<<"$OVERRIDES"
log "run directory $RUN_DIR; config $CONFIG; ds_config $DS_CONFIG; overrides: ${OVERRIDES:-none}"
# A bash trap runs only when the foreground command returns, so srun goes to the background and the
# shell waits for it (again after each interrupting signal).
# --wait instead of --kill-on-bad-exit: a preempted run's ranks all exit 75, a few moments apart, and
# kill-on-bad-exit would kill the slower ones mid-teardown (75 is "bad"). --wait ends the others
# TASK_EXIT_WAIT s after the first task ends, so a crashed rank or a lost node never leaves its peers
# waiting for the collective timeout.
srun --wait="$TASK_EXIT_WAIT" --kill-on-bad-exit=0 --cpu-bind=none \
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
unstage

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

if [[ $rc -eq $EXIT_HUNG ]]; then
    log "training hung: the watchdog stopped it (every rank's stacks are above); counted as a crash"
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
