#!/usr/bin/env python
"""Estimate peak training memory of a config and check it against VRAM, before launching.

``python tools/estimate_mem.py --cfg cfgs/focalsst_dsvt.yaml --vram 24``
Exit 0: FITS (or no budget: estimate only); 2: REJECT; 1: bad input. ``--help`` for options.
"""
import argparse

import _init_path  # noqa: F401  (pcdet_focal from this checkout)

from pcdet_focal.errors import ConfigError, cli_main


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one-line ConfigErrors (exit 1, not argparse's 2,
    which is this tool's REJECT code)."""

    def error(self, message):
        raise ConfigError(f'{message} (see --help)')


def parse_args(argv=None):
    p = _Parser(prog='estimate_mem.py',
                description='Estimate the peak training memory of a config, module by module, '
                            'and check it against a VRAM budget (FITS exit 0 / REJECT exit 2).')
    p.add_argument('--cfg', '--cfg_file', dest='cfg', required=True, help='model config (YAML)')
    p.add_argument('--batch_size', default=None,
                   help='batch size per device (default OPTIMIZATION.BATCH_SIZE_PER_GPU)')
    p.add_argument('--vram', default=None,
                   help='budget in GiB (default: the current CUDA device\'s total memory)')
    p.add_argument('--voxels', default=None,
                   help="voxels per sample (default MAX_NUMBER_OF_VOXELS['train'])")
    p.add_argument('--data', default=None, metavar='N',
                   help='load N frames of the configured training set and use their largest '
                        'voxel count (mean and max are reported)')
    p.add_argument('--focal-growth', dest='focal_growth', default=None, metavar='R',
                   help='new voxels per input voxel each focal block adds (default 1.0: each '
                        'block at most doubles its voxels; FocalSST has no cap of its own)')
    p.add_argument('--amp', action='store_true', help='estimate with fp16 autocast (AMP)')
    p.add_argument('--json', action='store_true', help='print JSON instead of the table')
    p.add_argument('--measure', action='store_true',
                   help='also build the model and run one real training step on a synthetic '
                        'batch on this machine; print the measured peak beside the estimate')
    p.add_argument('--target', choices=['cuda', 'cpu'], default=None,
                   help='whose kernels to model (default cuda; --measure on a CPU-only '
                        'machine uses cpu)')
    p.add_argument('--write-fixed', dest='write_fixed', default=None, metavar='OUT.yaml',
                   help='on REJECT, write the first suggestion that fits as a full config')
    p.add_argument('--set', dest='set_cfgs', default=None, nargs=argparse.REMAINDER,
                   help='override config keys: --set KEY.SUB VALUE ... (must come last)')
    return p.parse_args(argv)



@cli_main
def main(argv=None):
    args = parse_args(argv)
    from pcdet_focal.memory.cli import run
    return run(args)


if __name__ == '__main__':
    main()
