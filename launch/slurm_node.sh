#!/bin/bash
# One node's part of launch/slurm_train.sbatch: `accelerate launch` for this node's processes.
set -uo pipefail
NODE_RANK=${SLURM_NODEID:?run me through srun}
if [ -z "${PROCS_PER_NODE:-}" ]; then
    PROCS_PER_NODE=${SLURM_GPUS_ON_NODE:-0}
    if [ "$PROCS_PER_NODE" = 0 ] && command -v nvidia-smi >/dev/null; then
        PROCS_PER_NODE=$(nvidia-smi -L 2>/dev/null | wc -l)
    fi
    [ "$PROCS_PER_NODE" -gt 0 ] 2>/dev/null || PROCS_PER_NODE=1
fi
ROOT=${DIST_TRAIN_ROOT:-$(dirname "$(dirname "$(readlink -f "$0")")")}
JOIN_TIMEOUT_S=${JOIN_TIMEOUT_S:-600}
echo "dist_train: node $(hostname) is machine $NODE_RANK of $NUM_MACHINES, $PROCS_PER_NODE process(es)"
LOG=$(mktemp)
# The launcher's error output goes through `tee` (kept for the join-timeout message below), which ignores SIGTERM:
# when SLURM ends the step (a machine lost, --kill-on-bad-exit), the training processes still report why they stop.
# SLURM delivers its signals to this task's whole process group: the launcher must not die of USR1 (an
# ignored signal stays ignored in the child; the training processes install their own handler).
trap '' USR1
# rdzv timeout: how long the machines wait for each other before the job fails (instead of hanging)
${ACCELERATE:-accelerate} launch --config_file "$ROOT/accelerate_config.yaml" \
    --num_machines "$NUM_MACHINES" --machine_rank "$NODE_RANK" \
    --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT" \
    --num_processes $((NUM_MACHINES * PROCS_PER_NODE)) --rdzv_conf "timeout=$JOIN_TIMEOUT_S" \
    "$ROOT/train.py" "$@" 2> >(trap '' TERM; tee "$LOG" >&2) &
LAUNCHER=$!
# SLURM's warning (USR1, or TERM) goes to the training processes themselves -- the launcher's children --
# which save at the next step boundary; the launcher would die of USR1, and on TERM gives them only 30 s.
trap 'pkill -USR1 -P $LAUNCHER' USR1 TERM
while true; do
    wait $LAUNCHER; STATUS=$?
    kill -0 $LAUNCHER 2>/dev/null || break
done
if [ "$STATUS" != 0 ] && grep -qE "waiting for clients|DistNetworkError|failed to connect" "$LOG"; then
    JOINED=$(grep -oE "[0-9]+/[0-9]+ clients joined" "$LOG" | tail -n 1)
    echo "error: dist_train: not every machine joined within JOIN_TIMEOUT_S=$JOIN_TIMEOUT_S s${JOINED:+ ($JOINED)};" \
         "this is machine $NODE_RANK of $NUM_MACHINES, waiting at $MAIN_ADDR:$MAIN_PORT. Check that every node" \
         "started (sacct -j ${SLURM_JOB_ID:-?}) and can reach that address and port" >&2
fi
rm -f "$LOG"
exit $STATUS
