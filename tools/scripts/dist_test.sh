#!/usr/bin/env bash
# Multi-GPU evaluation with torchrun, OpenPCDet's arguments:
#   bash tools/scripts/dist_test.sh NGPUS --cfg_file CFG --ckpt CKPT [test.py flags ...]
# Several nodes: NNODES, MASTER_ADDR, PORT (see _torchrun.sh).
exec bash "$(dirname "$0")/_torchrun.sh" test.py "$@"
