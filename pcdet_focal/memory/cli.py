"""The one call behind ``tools/estimate_mem.py``: validate its arguments, estimate, judge,
suggest, optionally measure and write the fixed config, print table or JSON.

Exit codes: 0 FITS (or no budget given: estimate printed only), 2 REJECT, 1 bad input.
"""
import json
import sys

from ..config import apply_set, load_config
from ..errors import ConfigError

EXIT_FITS, EXIT_BAD_INPUT, EXIT_REJECT = 0, 1, 2


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


def run(args, out=None):
    """Run tools/estimate_mem.py's parsed ``args`` (an argparse Namespace); returns the exit
    code. Argument values are validated here (bad ones raise ConfigError, exit 1)."""
    from .measure import measure_config
    from .report import verdict_json, verdict_lines
    from .suggest import write_fixed
    from .verdict import check_fits
    from .voxels import count_dataset_voxels

    out = out or sys.stdout
    batch = _int(args.batch_size, '--batch_size')
    vram = _float(args.vram, '--vram')
    voxels = _int(args.voxels, '--voxels')
    frames = _int(args.data, '--data')
    growth = None
    if getattr(args, 'focal_growth', None) is not None:
        growth = _float(args.focal_growth, '--focal-growth', allow_zero=True)
    cfg = load_config(args.cfg)
    apply_set(cfg, args.set_cfgs or [])
    data_counts = count_dataset_voxels(cfg, frames) if frames else None
    target = args.target
    if target is None:
        target = 'cuda'
        if args.measure:
            from .measure import measure_device
            target = measure_device().type
    verdict = check_fits(cfg, batch_size=batch, vram_gib=vram, amp=args.amp, voxels=voxels,
                         target=target, data_counts=data_counts, focal_growth=growth)
    measured = measure_config(cfg, verdict.estimate) if args.measure else None
    written = None
    if args.write_fixed and verdict.has_budget and not verdict.fits:
        written = write_fixed(verdict, args.write_fixed)
    if args.json:
        doc = verdict_json(verdict)
        if measured is not None:
            doc['measure'] = measured.as_dict()
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
                         f'--write-fixed: nothing written (the config '
                         f'{"fits" if verdict.fits else "has no budget to check"})')
        print('\n'.join(lines), file=out)
    if verdict.has_budget and not verdict.fits:
        return EXIT_REJECT
    return EXIT_FITS
