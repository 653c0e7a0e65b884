"""Run an OpenPCDet script unchanged with pcdet_focal's modules in its registries.

    cd OpenPCDet/tools
    python -m pcdet_focal.run train.py --cfg_file cfgs/kitti_models/focalsst_dsvt.yaml
    pcdet-focal run test.py --cfg_file ... --ckpt ...          # same thing, console script
    torchrun --nproc_per_node=4 -m pcdet_focal.run train.py --launcher pytorch --cfg_file ...

Steps: :func:`pcdet_focal.registry.register_into_pcdet` (OpenPCDet absent or its CUDA ops not
built -> one line saying so and how to fix it, exit code 2), then the script runs as
``__main__`` (``runpy.run_path``) with ``sys.argv = [script, *args]``, the script's folder as the
working directory and first on ``sys.path`` - exactly what ``cd tools && python train.py ...``
gives it, so relative paths in its arguments are relative to the script's folder.
"""
import os
import runpy
import sys
from pathlib import Path

from .errors import ConfigError, cli_main
from .backend import check_pcdet_importable
from .registry import register_into_pcdet

USAGE = ('usage: pcdet-focal run SCRIPT.py [SCRIPT ARGS ...]\n'
         '       python -m pcdet_focal.run SCRIPT.py [SCRIPT ARGS ...]\n'
         "Registers pcdet_focal's modules into OpenPCDet, then runs SCRIPT.py (e.g. OpenPCDet's "
         'tools/train.py, test.py, demo.py) as __main__ from its own folder.')


def run_script(script, args=()):
    """Register into OpenPCDet, then run ``script`` as ``__main__`` with ``args``.

    Returns the script's globals. The script's own ``sys.exit(code)`` propagates as SystemExit.
    ``sys.argv``, the working directory and ``sys.path`` are restored afterwards, so a caller
    (a test, a notebook) keeps its state.
    """
    path = Path(os.path.expanduser(str(script)))
    if not path.is_file():
        raise ConfigError(f'{script}: script not found (give the path of an OpenPCDet script, '
                          'e.g. tools/train.py)')
    path = path.resolve()
    check_pcdet_importable()  # fail fast (before importing our models) when OpenPCDet is absent
    added = register_into_pcdet(verbose=False)
    summary = '; '.join(f'{slot}: {", ".join(names)}' for slot, names in added.items())
    print(f'pcdet_focal: registered into OpenPCDet: {summary or "(already registered)"}',
          file=sys.stderr)
    saved = (list(sys.argv), os.getcwd(), list(sys.path))
    sys.argv = [str(path), *[str(a) for a in args]]
    os.chdir(path.parent)
    sys.path.insert(0, str(path.parent))  # its sibling modules (_init_path, ...) import
    try:
        return runpy.run_path(str(path), run_name='__main__')
    finally:
        sys.argv, cwd, sys.path[:] = saved[0], saved[1], saved[2]
        os.chdir(cwd)


def run_main(argv=None):
    """``run`` subcommand: argv = [SCRIPT, *ARGS] (everything after SCRIPT goes to it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    run_script(argv[0], argv[1:])
    return 0


main = cli_main(run_main)

if __name__ == '__main__':
    main()
