#!/usr/bin/env python
"""Train a detector: ``python tools/train.py --cfg cfgs/focalsst_dsvt_demo.yaml``.

OpenPCDet's flags (--cfg_file, --batch_size, --epochs, --workers, --extra_tag, --ckpt,
--pretrained_model, --launcher, --sync_bn, --fix_random_seed, --set ...) plus the pre-launch
memory check (--skip_mem_check), --max_steps, --device and --backend. Many GPUs or machines:
``bash tools/scripts/dist_train.sh 4 --cfg ...`` (torchrun) or ``slurm_train.sh`` (srun);
README.md, "Many GPUs, many machines". ``--batch_size`` is the total over all processes.
"""
import argparse
import dataclasses

import _init_path  # noqa: F401  (pcdet_focal from this checkout)

from pcdet_focal.engine.cli_args import (_non_negative_int, _positive_int, add_common_args,
                                         load_cfg)
from pcdet_focal.errors import cli_main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument('--epochs', type=_positive_int, default=None,
                        help='epochs (default: OPTIMIZATION.NUM_EPOCHS)')
    parser.add_argument('--ckpt', default=None, help='checkpoint to resume from (default: the '
                        'newest one in the run folder, if any)')
    parser.add_argument('--pretrained_model', default=None,
                        help='initialise from these weights (matching tensors only)')
    parser.add_argument('--sync_bn', action='store_true', help='SyncBatchNorm under DDP')
    parser.add_argument('--fix_random_seed', action='store_true',
                        help='seed everything (reproducible runs and resumes)')
    parser.add_argument('--seed', type=_non_negative_int, default=666, help='seed for --fix_random_seed')
    parser.add_argument('--ckpt_save_interval', type=_positive_int, default=1)
    parser.add_argument('--max_ckpt_save_num', type=_positive_int, default=30)
    parser.add_argument('--use_amp', action='store_true', help='mixed precision (CUDA)')
    parser.add_argument('--skip_mem_check', action='store_true',
                        help='start even if the memory estimator rejects the config')
    parser.add_argument('--max_steps', type=_positive_int, default=None,
                        help='stop after this many optimizer steps (smoke tests)')
    parser.add_argument('--no_eval', action='store_true', help='skip the final evaluation')
    parser.add_argument('--logger_iter_interval', type=_positive_int, default=50)
    return parser.parse_args(argv)


@cli_main
def main(argv=None):
    args = parse_args(argv)
    cfg = load_cfg(args)
    from pcdet_focal.engine.trainer import TrainOptions, train
    fields = {f.name for f in dataclasses.fields(TrainOptions)}
    train(cfg, TrainOptions(**{k: v for k, v in vars(args).items() if k in fields}))
    return 0


if __name__ == '__main__':
    main()
