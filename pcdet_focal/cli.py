"""The ``pcdet-focal`` console command.

    pcdet-focal run SCRIPT.py [ARGS ...]   run an OpenPCDet script with our modules registered
    pcdet-focal doctor [--scan PATH ...]   check this environment (exit 0 ok, 1 warn, 2 blocking)
"""
import argparse
import sys

from . import __version__
from .errors import cli_main


def build_parser():
    parser = argparse.ArgumentParser(
        prog='pcdet-focal', description='pcdet-focal: sparse 3D detection plugin for OpenPCDet')
    parser.add_argument('--version', action='version', version=f'pcdet-focal {__version__}')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    # `run` is dispatched before argparse (its arguments belong to the script); listed for help.
    sub.add_parser('run', help='run an OpenPCDet script (train.py, test.py, demo.py) with '
                   "pcdet_focal's modules registered: pcdet-focal run SCRIPT.py [ARGS ...]")
    from .doctor import add_arguments
    add_arguments(sub.add_parser('doctor', help='check versions, known-bad combinations, '
                                 'cuDNN/temp-dir problems and run smoke tests on each device'))
    return parser


def cli(argv=None):
    """The command without the exit wrapper (returns the exit code)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == 'run':
        from .run import run_main
        return run_main(argv[1:])  # everything after `run SCRIPT` is the script's, untouched
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == 'doctor':
        from .doctor import run_doctor
        return run_doctor(args)
    parser.print_help(sys.stderr)
    return 2


main = cli_main(cli)

if __name__ == '__main__':
    main()
