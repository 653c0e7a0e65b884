"""The ``pcdet-focal`` console command.

    pcdet-focal run SCRIPT.py [ARGS ...]   run an OpenPCDet script with our modules registered
    pcdet-focal doctor [--scan PATH ...]   check this environment (exit 0 ok, 1 warn, 2 blocking)
    pcdet-focal config CFG [--set ...]     the merged config, defaults filled in, each value's
                                           origin (file:line, _BASE_CONFIG_, --set, default)
    pcdet-focal config --keys [--update-readme README.md]
                                           the module key tables, made from the declarations
"""
import argparse
import sys
from pathlib import Path

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
    cfg = sub.add_parser('config', help='print a merged config with defaults and where each '
                         'value came from, or the module key tables (--keys)')
    cfg.add_argument('cfg', nargs='?', help='config file (YAML)')
    cfg.add_argument('--keys', action='store_true',
                     help='print every module\'s key table (markdown) instead')
    cfg.add_argument('--update-readme', dest='update_readme', metavar='README.md',
                     help='with --keys: rewrite the <!-- keys: ... --> blocks of this file')
    cfg.add_argument('--eval', dest='training', action='store_false',
                     help='check as tools/test.py does (OPTIMIZATION not required)')
    from .engine.cli_args import add_config_args
    add_config_args(cfg)
    return parser


def config_command(args, out=None):
    """``pcdet-focal config``: see the module docstring."""
    out = out or sys.stdout
    from .config import REPO_ROOT, Provenance
    from .config_schema import describe, key_tables, load_checked, readme_with_tables
    from .errors import ConfigError
    from .schema import allow_unknown_keys
    if args.keys:
        if args.update_readme:
            path = Path(args.update_readme)
            try:
                text = path.read_text(encoding='utf-8')
            except OSError as err:
                raise ConfigError(f'--update-readme {path}: cannot read it ({err.strerror})') \
                    from None
            new = readme_with_tables(text)
            try:
                path.write_text(new, encoding='utf-8')
            except OSError as err:
                raise ConfigError(f'--update-readme {path}: cannot write it ({err.strerror})') \
                    from None
            print(f'{path}: key tables {"updated" if new != text else "already current"}',
                  file=out)
            return 0
        for title, table in key_tables().items():
            print(f'### {title}\n\n{table}\n', file=out)
        return 0
    if not args.cfg:
        raise ConfigError('pcdet-focal config needs a config file (or --keys)')
    if args.allow_unknown_keys:
        allow_unknown_keys(True)
    prov = Provenance()
    cfg = load_checked(args.cfg, args.set_cfgs or [], training=args.training, provenance=prov)
    print('\n'.join(describe(cfg, prov, root=REPO_ROOT)), file=out)
    return 0


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
    if args.command == 'config':
        return config_command(args)
    parser.print_help(sys.stderr)
    return 2


main = cli_main(cli)

if __name__ == '__main__':
    main()
