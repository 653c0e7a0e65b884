"""The one call behind ``tools/estimate_mem.py``: validate its arguments, estimate, judge,
suggest, optionally measure and write the fixed config, print table or JSON.

Exit codes: 0 FITS (or no budget given: estimate printed only), 2 REJECT (or UNBOUNDED: a
count without a bound never FITS), 3 NOT MODELLED (a module without a memory rule: no partial
estimate is given), 1 bad input.
"""
import json
import sys

from ..config_schema import load_checked
from ..schema import allow_unknown_keys
from ..errors import ConfigError

EXIT_FITS, EXIT_BAD_INPUT, EXIT_REJECT, EXIT_NOT_MODELLED = 0, 1, 2, 3
EXIT_CODES = {'FITS': EXIT_FITS, 'ESTIMATE': EXIT_FITS, 'REJECT': EXIT_REJECT,
              'UNBOUNDED': EXIT_REJECT, 'NOT_MODELLED': EXIT_NOT_MODELLED}


def _int(text, flag, minimum=1):
    if text is None:
        return None
    try:
        value = int(str(text))
    except ValueError:
        raise ConfigError(f'{flag} must be an integer, got {text!r}') from None
    if value < minimum:
        raise ConfigError(f'{flag} must be >= {minimum}, got {value}')
    return value


def _float(text, flag, allow_zero=False):
    if text is None:
        return None
    try:
        value = float(str(text))
    except ValueError:
        raise ConfigError(f'{flag} must be a number, got {text!r}') from None
    if value != value or value in (float('inf'), float('-inf')) or value < 0 or \
            (value == 0 and not allow_zero):
        raise ConfigError(f'{flag} must be a {"" if allow_zero else "positive "}finite number'
                          f'{" >= 0" if allow_zero else ""}, got {text}')
    return value


def _plot(cfg, verdict, path, **assume):
    """--plot: the same estimate with its timeline, drawn with the verdict's budget."""
    from ..viz.memory import draw_memory
    from .estimator import estimate
    if not str(path).lower().endswith('.png'):
        raise ConfigError(f'--plot writes a PNG: give a file name ending in .png, got {path!r}')
    if verdict.estimate.peak_bytes is None:
        return None
    timed = estimate(cfg, batch_size=verdict.estimate.batch_size, timeline=True, **assume)
    return draw_memory(timed, path, verdict.budget_bytes, verdict.word)


def _target(text, measure):
    """--target -> (kernel target, CUDA stack)."""
    from . import cuda
    if text in (None, 'cuda'):
        if text is None and measure:
            from .measure import measure_device
            kind = measure_device().type
        else:
            kind = 'cuda'
        return kind, cuda.Stack.installed()
    if text == 'cpu':
        return 'cpu', cuda.Stack.installed()
    return 'cuda', cuda.Stack.parse(text)


def _host(choice):
    from ..backend import activate_backend
    return activate_backend(choice or 'auto')


def run(args, out=None):
    """Run tools/estimate_mem.py's parsed ``args`` (an argparse Namespace); returns the exit
    code. Argument values are validated here (bad ones raise ConfigError, exit 1)."""
    from .estimator import prepare
    from .measure import measure_config
    from .report import verdict_json, verdict_lines
    from .suggest import write_fixed
    from .verdict import check_fits

    out = out or sys.stdout
    batch = _int(args.batch_size, '--batch_size')
    vram = _float(args.vram, '--vram')
    voxels = _int(args.voxels, '--voxels')
    frames = _int(args.frames, '--frames', minimum=0)
    gpus = _int(args.gpus, '--gpus')
    target, stack = _target(args.target, args.measure)
    if args.measure and args.amp and target == 'cpu':
        raise ConfigError('--amp --measure needs a CUDA device: on the CPU the step would run '
                          'in fp32 (spconv has no CPU autocast), so it could not check an AMP '
                          'estimate; drop --amp, or measure on a GPU')
    if getattr(args, 'allow_unknown_keys', False):
        allow_unknown_keys(True)
    host = _host(args.backend)     # first: on the pcdet host its classes check the config
    cfg = load_checked(args.cfg, args.set_cfgs or [], training=True)
    prepared = prepare(cfg, host, voxels=voxels, frames=frames)
    assume = dict(target=target, stack=stack, world_size=gpus)
    if getattr(args, 'ckpt', None):
        from .. import backend
        from .counts import trained_focal_growth

        def build_dataset(data_cfg, class_names):
            return backend.build_dataset(data_cfg, class_names, True, host)
        assume['observed'] = {'focal_frames': trained_focal_growth(
            cfg, prepared.counts, args.ckpt, host, build_dataset)}
    verdict = check_fits(cfg, batch_size=batch, vram_gib=vram, amp=args.amp, prepared=prepared,
                         **assume)
    plotted = _plot(cfg, verdict, args.plot, amp=args.amp, prepared=prepared, **assume) \
        if getattr(args, 'plot', None) else None
    measured = measure_config(cfg, verdict.estimate, prepared) \
        if args.measure and verdict.estimate.peak_bytes is not None else None
    written = None
    if args.write_fixed and verdict.word in ('REJECT', 'UNBOUNDED'):
        written = write_fixed(verdict, args.write_fixed)
    if args.json:
        doc = verdict_json(verdict)
        if measured is not None:
            doc['measure'] = measured.as_dict()
        if getattr(args, 'plot', None):
            doc['plot'] = str(plotted) if plotted else None
        if args.write_fixed:
            doc['written'] = ({'path': args.write_fixed, 'suggestion': written.title}
                              if written else None)
        print(json.dumps(doc, indent=2), file=out)
    else:
        lines = verdict_lines(verdict)
        if measured is not None:
            lines += [''] + measured.lines()
        if args.write_fixed:
            lines.append(f'wrote {args.write_fixed}: {written.title}' if written else
                         '--write-fixed: nothing written (the config '
                         f'{"fits" if verdict.fits else "has no fitting suggestion"})')
        if plotted:
            lines.append(f'wrote {plotted}')
        print('\n'.join(lines), file=out)
    return EXIT_CODES[verdict.word]
