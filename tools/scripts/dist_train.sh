#!/usr/bin/env bash
# Multi-GPU training with torchrun (DDP), OpenPCDet's arguments:
#   bash tools/scripts/dist_train.sh NGPUS --cfg_file CFG [train.py flags ...]
# Several nodes: NNODES, MASTER_ADDR, PORT (see _torchrun.sh). --batch_size is the total.
exec bash "$(dirname "$0")/_torchrun.sh" train.py "$@"
