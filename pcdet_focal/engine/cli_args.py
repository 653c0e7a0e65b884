"""argparse definitions shared by tools/train.py and tools/test.py (OpenPCDet's flag names)."""
import argparse

from ..backend import activate_backend
from ..config_schema import load_checked
from ..schema import allow_unknown_keys
from ..viz import DEFAULT_BEV_FRAMES


def _int_at_least(minimum):
    """An argparse ``type``: an integer >= ``minimum``, else a one-line usage error."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f'must be >= {minimum}, got {value}')
        return value
    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def add_common_args(parser):
    parser.add_argument('--cfg', '--cfg_file', dest='cfg_file', required=True,
                        help='model config (YAML), e.g. cfgs/focalsst_dsvt_demo.yaml')
    parser.add_argument('--batch_size', type=_positive_int, default=None,
                        help='total batch size, split over the processes of a distributed run '
                             'as in OpenPCDet (default: OPTIMIZATION.BATCH_SIZE_PER_GPU per '
                             'process)')
    parser.add_argument('--workers', type=_non_negative_int, default=2, help='dataloader workers per process')
    parser.add_argument('--extra_tag', default='default',
                        help='run name: output/<cfg stem>/<extra_tag>/')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'], default='none',
                        help='pytorch = started by torchrun, slurm = started by srun (DDP); '
                             'see tools/scripts/')
    parser.add_argument('--tcp_port', type=int, default=None,
                        help='--launcher slurm: port of the rank-0 process (default: '
                             '$MASTER_PORT, else 18888)')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=None,
                        help=argparse.SUPPRESS)  # passed by torch.distributed.launch; unused
    parser.add_argument('--output_dir', default=None,
                        help='output root (default: <repo>/output, or ./output when installed)')
    parser.add_argument('--device', default=None, help='cpu, cuda or cuda:N (default: cuda if '
                        'available)')
    add_backend_arg(parser)
    parser.add_argument('--no_progress', dest='progress', action='store_false',
                        help='no progress bars (logs only)')
    parser.add_argument('--bev_frames', type=_non_negative_int, default=DEFAULT_BEV_FRAMES,
                        help='bird\'s-eye-view PNGs of the first N evaluated frames, written '
                             f'next to result.txt (default {DEFAULT_BEV_FRAMES}; 0: none; needs '
                             'matplotlib)')
    add_config_args(parser)
    return parser


def add_backend_arg(parser):
    parser.add_argument('--backend', choices=['auto', 'pcdet', 'standalone'], default='auto',
                        help='build datasets/models with OpenPCDet (pcdet), with pcdet_focal '
                             'alone (standalone) or pcdet when importable (auto)')


def add_config_args(parser):
    """--allow-unknown-keys and --set (last): every CLI that reads a config has them."""
    parser.add_argument('--allow-unknown-keys', '--allow_unknown_keys',
                        dest='allow_unknown_keys', action='store_true',
                        help='config keys no declaration knows are warnings, not errors')
    parser.add_argument('--set', dest='set_cfgs', default=None, nargs=argparse.REMAINDER,
                        help='override config keys: --set KEY.SUB VALUE ... (must come last); '
                             'any key a module declares may be set')
    return parser


def load_cfg(args, training=True):
    """Load ``args.cfg_file`` with ``--set`` and check it against the declarations of the
    classes the chosen ``--backend`` builds."""
    if getattr(args, 'allow_unknown_keys', False):
        allow_unknown_keys(True)
    if getattr(args, 'backend', None) is not None:
        activate_backend(args.backend)
    return load_checked(args.cfg_file, args.set_cfgs or [], training=training)
