#!/usr/bin/env python
"""Estimator accuracy: estimate vs a measured training step for every config in cfgs/.

For each ``cfgs/*.yaml`` (and ``cfgs/openpcdet/*.yaml``) at batch 1 and 2 with a small voxel
count, runs :func:`pcdet_focal.memory.measure.measure_config` (two real training steps on a
synthetic batch on this machine: CUDA max_memory_allocated, or the CPU allocator tracker)
beside the estimate for the same device, and prints estimate / measured / error. "estimate"
is the memory model evaluated at the counts the measured step produced (new focal voxels,
DSVT voxels and sets, BEV columns); "as configured" is the plain estimate with its expected /
assumed counts. Acceptance: error within +15% and never below -5%.

``python benchmarks/estimator.py [--voxels 1500] [--batch 1 2] [--cfg ...] [--quick]``
(--quick: only configs whose estimate is under 2 GiB). Configs that cannot be measured here
(not modelled modules, modules that need OpenPCDet, estimates above the RAM) are listed with
the reason.
"""
import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pcdet_focal.config import load_config  # noqa: E402
from pcdet_focal.errors import PcdetFocalError  # noqa: E402
from pcdet_focal.memory import estimate  # noqa: E402
from pcdet_focal.memory.measure import measure_config, measure_device  # noqa: E402

LIMIT_OVER, LIMIT_UNDER = 0.15, -0.05


def configs(paths):
    if paths:
        return [Path(p) for p in paths]
    found = sorted((ROOT / 'cfgs').glob('*.yaml')) + sorted((ROOT / 'cfgs' / 'openpcdet')
                                                            .glob('*.yaml'))
    return found


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--cfg', nargs='*', default=None, help='configs (default: all in cfgs/)')
    ap.add_argument('--batch', nargs='*', type=int, default=[1, 2])
    ap.add_argument('--voxels', type=int, default=1500, help='voxels per sample')
    ap.add_argument('--quick', action='store_true', help='skip estimates above 2 GiB')
    args = ap.parse_args(argv)
    device = measure_device()
    target = device.type
    print(f'device: {device}; voxels per sample: {args.voxels}; '
          f'estimate modelled for {target.upper()} kernels')
    head = (f'{"config":34s} {"batch":>5s} {"estimate MiB":>13s} {"measured MiB":>13s} '
            f'{"error":>8s} {"ok":>4s} {"as configured MiB":>18s} {"time s":>7s}')
    print(head)
    print('-' * len(head))
    failures, skipped = 0, []
    for path in configs(args.cfg):
        name = str(path.resolve().relative_to(ROOT / 'cfgs')) \
            if ROOT / 'cfgs' in path.resolve().parents \
            else path.name
        try:
            cfg = load_config(path)
        except PcdetFocalError as err:
            skipped.append((name, str(err)))
            continue
        for b in args.batch:
            try:
                e = estimate(cfg, batch_size=b, voxels=args.voxels, target=target)
            except PcdetFocalError as err:
                skipped.append((f'{name} b{b}', str(err)))
                continue
            if args.quick and e.peak_bytes > 2 * 2 ** 30:
                skipped.append((f'{name} b{b}', f'estimate {e.peak_bytes / 2 ** 30:.2f} '
                                'GiB > 2 GiB (--quick)'))
                continue
            t0 = time.perf_counter()
            try:
                m = measure_config(cfg, e, device=device)
            except PcdetFocalError as err:
                skipped.append((f'{name} b{b}', str(err)))
                continue
            if m.refused:
                skipped.append((f'{name} b{b}', m.refused))
                continue
            err = m.error
            ok = LIMIT_UNDER <= err <= LIMIT_OVER
            failures += not ok
            print(f'{name:34s} {b:5d} {m.matched_bytes / 2 ** 20:13.1f} '
                  f'{m.peak_bytes / 2 ** 20:13.1f} {err:+8.1%} {"yes" if ok else "NO":>4s} '
                  f'{e.peak_bytes / 2 ** 20:18.1f} {time.perf_counter() - t0:7.1f}')
            sys.stdout.flush()
    for name, why in skipped:
        print(f'not measured: {name}: {why}')
    print(f'{failures} config(s) outside [{LIMIT_UNDER:+.0%}, {LIMIT_OVER:+.0%}]')
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
