#!/usr/bin/env bash
# torchrun (DDP) behind dist_train.sh and dist_test.sh:
#   bash tools/scripts/_torchrun.sh train.py|test.py NGPUS [flags of that script ...]
# One node: nothing else to set (--standalone: c10d rendezvous on a free local port).
# Several nodes: run the same command on every node with the same NNODES, MASTER_ADDR (a host
# all nodes reach, e.g. the first one) and PORT (default 29500):
#   NNODES=2 MASTER_ADDR=node01 PORT=29500 bash tools/scripts/dist_train.sh 8 --cfg_file CFG
# torchrun's c10d rendezvous numbers the nodes (no NODE_RANK needed). Optional: RDZV_ID (job id
# shared by the nodes, default pcdet_focal), LOCAL_ADDR (this node's address as the others
# reach it, default its host name), PYTHON (default python).
set -euo pipefail
ENTRY=$1
NGPUS=$2
shift 2
HERE="$(cd "$(dirname "$0")" && pwd)"
PYTHON=${PYTHON:-python}
NNODES=${NNODES:-1}

if [ "$NNODES" = 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
    RDZV=(--standalone)
else
    RDZV=(--nnodes="$NNODES" --rdzv-backend=c10d
          --rdzv-endpoint="${MASTER_ADDR:?set MASTER_ADDR to a host all nodes reach}:${PORT:-29500}"
          --rdzv-id="${RDZV_ID:-pcdet_focal}")
    if [ -n "${LOCAL_ADDR:-}" ]; then RDZV+=(--local-addr="$LOCAL_ADDR"); fi
fi

set -x
exec "$PYTHON" -m torch.distributed.run "${RDZV[@]}" --nproc-per-node="$NGPUS" \
    "$HERE/../$ENTRY" --launcher pytorch "$@"
