"""argparse definitions shared by tools/train.py and tools/test.py (OpenPCDet's flag names)."""
import argparse

from ..config import apply_set, load_config


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be >= 1, got {value}')
    return value


def add_common_args(parser):
    parser.add_argument('--cfg', '--cfg_file', dest='cfg_file', required=True,
                        help='model config (YAML), e.g. cfgs/focalsst_dsvt_demo.yaml')
    parser.add_argument('--batch_size', type=_positive_int, default=None,
                        help='batch size per process (default: OPTIMIZATION.BATCH_SIZE_PER_GPU)')
    parser.add_argument('--workers', type=int, default=2, help='dataloader workers per process')
    parser.add_argument('--extra_tag', default='default',
                        help='run name: output/<cfg stem>/<extra_tag>/')
    parser.add_argument('--launcher', choices=['none', 'pytorch'], default='none',
                        help='pytorch = started by torchrun (DDP)')
    parser.add_argument('--output_dir', default=None,
                        help='output root (default: <repo>/output, or ./output when installed)')
    parser.add_argument('--device', default=None, help='cpu, cuda or cuda:N (default: cuda if '
                        'available)')
    parser.add_argument('--backend', choices=['auto', 'pcdet', 'standalone'], default='auto',
                        help='build datasets/models with OpenPCDet (pcdet), with pcdet_focal '
                             'alone (standalone) or pcdet when importable (auto)')
    parser.add_argument('--no_progress', dest='progress', action='store_false',
                        help='no progress bars (logs only)')
    parser.add_argument('--set', dest='set_cfgs', default=None, nargs=argparse.REMAINDER,
                        help='override config keys: --set KEY.SUB VALUE ... (must come last)')
    return parser


def load_cfg(args):
    cfg = load_config(args.cfg_file)
    apply_set(cfg, args.set_cfgs or [])
    return cfg
