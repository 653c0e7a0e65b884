#!/usr/bin/env bash
# Training on a slurm cluster, one task per GPU (OpenPCDet's script and arguments):
#   bash tools/scripts/slurm_train.sh PARTITION JOB_NAME NGPUS --cfg_file CFG [train.py flags ...]
# GPUS_PER_NODE (8), CPUS_PER_TASK, SRUN_ARGS, PORT: see _srun.sh. --batch_size is the total.
exec bash "$(dirname "$0")/_srun.sh" train.py "$@"
