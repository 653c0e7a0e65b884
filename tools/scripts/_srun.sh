#!/usr/bin/env bash
# srun, one task per GPU, behind slurm_train.sh and slurm_test.sh:
#   bash tools/scripts/_srun.sh train.py|test.py PARTITION JOB_NAME NGPUS [flags ...]
# Each task runs the script with --launcher slurm: rank, world size and local rank from
# SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, the master host from SLURM_NODELIST.
# Optional: GPUS_PER_NODE (8), CPUS_PER_TASK (5), SRUN_ARGS (extra srun flags), PORT (default:
# a port free on this host, picked as OpenPCDet's scripts do), PYTHON (python).
set -euo pipefail
ENTRY=$1
PARTITION=$2
JOB_NAME=$3
GPUS=$4
shift 4
HERE="$(cd "$(dirname "$0")" && pwd)"
PYTHON=${PYTHON:-python}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
SRUN_ARGS=${SRUN_ARGS:-""}
if [ "$GPUS" -lt "$GPUS_PER_NODE" ]; then GPUS_PER_NODE=$GPUS; fi
PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}

set -x
# shellcheck disable=SC2086  # SRUN_ARGS holds several flags
srun -p "$PARTITION" --job-name="$JOB_NAME" --gres=gpu:"$GPUS_PER_NODE" --ntasks="$GPUS" \
    --ntasks-per-node="$GPUS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=1 \
    $SRUN_ARGS "$PYTHON" -u "$HERE/../$ENTRY" --launcher slurm --tcp_port "$PORT" "$@"
