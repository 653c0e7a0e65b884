#!/usr/bin/env python
"""Estimate peak training memory of a config and check it against VRAM, before launching.

``python tools/estimate_mem.py --cfg cfgs/focalsst_dsvt.yaml --vram 24``
Exit 0: FITS (or no budget: estimate only); 2: REJECT; 3: a module has no memory rule; 1: bad
input. ``--help`` for options.
"""
import argparse

import _init_path  # noqa: F401  (pcdet_focal from this checkout)

from pcdet_focal.engine.cli_args import add_backend_arg, add_config_args
from pcdet_focal.errors import ConfigError, cli_main


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one-line ConfigErrors (exit 1, not argparse's 2,
    which is this tool's REJECT code)."""

    def error(self, message):
        raise ConfigError(f'{message} (see --help)')


def parse_args(argv=None):
    p = _Parser(prog='estimate_mem.py',
                description='Estimate the peak training memory of a config, module by module, '
                            'and check it against a VRAM budget (FITS exit 0, REJECT exit 2, '
                            'a module without a memory rule exit 3).')
    p.add_argument('--cfg', '--cfg_file', dest='cfg', required=True, help='model config (YAML)')
    p.add_argument('--batch_size', default=None,
                   help='batch size per device (default OPTIMIZATION.BATCH_SIZE_PER_GPU)')
    p.add_argument('--vram', default=None,
                   help='budget in GiB (default: the current CUDA device\'s total memory)')
    p.add_argument('--voxels', default=None,
                   help='voxels per sample instead of counting frames')
    p.add_argument('--frames', default='8', metavar='K',
                   help='count voxels, DSVT sets and BEV columns on K frames of the configured '
                        "training split (default 8; 0: the config's caps only)")
    p.add_argument('--amp', action='store_true', help='estimate with fp16 autocast (AMP)')
    p.add_argument('--json', action='store_true', help='print JSON instead of the table')
    p.add_argument('--measure', action='store_true',
                   help='also build the model and run two real training steps on frames of '
                        'the configured data on this machine; print the measured peak beside '
                        'the estimate')
    p.add_argument('--target', default=None, metavar='cuda|cpu|torchX.Y.Z+cudnnA.B.C',
                   help='whose kernels to model: cuda (the installed torch / cuDNN), cpu, or a '
                        'named CUDA stack, e.g. torch2.3.0+cudnn8.9.2 (default cuda; --measure '
                        'on a CPU-only machine uses cpu)')
    add_backend_arg(p)
    p.add_argument('--ckpt', default=None, metavar='PATH',
                   help="measure focal dilation's growth on the counted frames with this "
                        "checkpoint's trained importance head, instead of the worst case the "
                        'caps allow')
    p.add_argument('--gpus', default='1', metavar='N',
                   help='processes of a DDP run (adds its gradient buckets per GPU)')
    p.add_argument('--write-fixed', dest='write_fixed', default=None, metavar='OUT.yaml',
                   help='on REJECT, write the first suggestion that fits as a full config')
    p.add_argument('--plot', default=None, metavar='FILE.png',
                   help='also draw the live memory over one training step (peak, budget, '
                        "largest allocations) as a PNG (needs pip install -e '.[plot]')")
    add_config_args(p)
    return p.parse_args(argv)



@cli_main
def main(argv=None):
    args = parse_args(argv)
    from pcdet_focal.memory.cli import run
    return run(args)


if __name__ == '__main__':
    main()
