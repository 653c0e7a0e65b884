#!/usr/bin/env bash
# Evaluation on a slurm cluster, one task per GPU (OpenPCDet's slurm_test_mgpu.sh arguments):
#   bash tools/scripts/slurm_test.sh PARTITION NGPUS --cfg_file CFG --ckpt CKPT [test.py flags ...]
# JOB_NAME (eval), GPUS_PER_NODE, SRUN_ARGS, PORT: see _srun.sh.
PARTITION=$1
shift
exec bash "$(dirname "$0")/_srun.sh" test.py "$PARTITION" "${JOB_NAME:-eval}" "$@"
