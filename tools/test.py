#!/usr/bin/env python
"""Evaluate a checkpoint: ``python tools/test.py --cfg CFG --ckpt PATH [--save_to_file]``.

Prints the AP table (BEV / 3D per class and difficulty, R40) and writes it to
``output/<cfg stem>/<extra_tag>/eval/<checkpoint name>/``; ``--save_to_file`` also writes the
predictions in KITTI result format there.
"""
import argparse

import _init_path  # noqa: F401  (pcdet_focal from this checkout)

from pcdet_focal.engine.cli_args import add_common_args, load_cfg
from pcdet_focal.errors import cli_main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument('--ckpt', required=True, help='checkpoint to evaluate')
    parser.add_argument('--save_to_file', action='store_true',
                        help='write predictions in KITTI result format')
    return parser.parse_args(argv)


@cli_main
def main(argv=None):
    args = parse_args(argv)
    cfg = load_cfg(args, training=False)
    from pcdet_focal.engine.tester import test
    test(cfg, args)
    return 0


if __name__ == '__main__':
    main()
