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
(--quick: only configs whose estimate is under 2 GiB). A config whose estimate exceeds the
RAM here (the users' dense HeightCompression config needs ~100 GiB) is measured once more with
its BEV extent cropped to ``--crop`` voxels (x, y): the height bins, channels and modules stay,
so the dense volume, the C*D flattened BEV channels and the wide first BEV conv are still
exercised; that row is labelled ``[BEV x*y]``. Configs that cannot be measured at all (not
modelled modules, modules that need OpenPCDet) are listed with the reason.
"""
import argparse
import copy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pcdet_focal.config import load_config  # noqa: E402
from pcdet_focal.errors import PcdetFocalError  # noqa: E402
from pcdet_focal.memory import estimate  # noqa: E402
from pcdet_focal.memory.geometry import geometry_from_config  # noqa: E402
from pcdet_focal.memory.measure import measure_config, measure_device  # noqa: E402

LIMIT_OVER, LIMIT_UNDER = 0.15, -0.05


def crop_bev(cfg, nx, ny):
    """A copy of ``cfg`` whose grid is ``nx`` x ``ny`` voxels in x, y (z and the model kept).

    Moves POINT_CLOUD_RANGE's x_max / y_max and the BEV shapes a config spells out (DSVT's
    ``sparse_shape`` [x, y, z] and ``output_shape`` [y, x]).
    """
    geom = geometry_from_config(cfg)
    out = copy.deepcopy(cfg)
    pcr = list(geom.point_cloud_range)
    pcr[3] = pcr[0] + nx * geom.voxel_size[0]
    pcr[4] = pcr[1] + ny * geom.voxel_size[1]
    out.DATA_CONFIG.POINT_CLOUD_RANGE = pcr

    def visit(node):
        if isinstance(node, dict):
            if isinstance(node.get('sparse_shape'), list) and len(node['sparse_shape']) == 3:
                node['sparse_shape'] = [nx, ny, node['sparse_shape'][2]]
            if isinstance(node.get('output_shape'), list) and len(node['output_shape']) == 2:
                node['output_shape'] = [ny, nx]
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)
    visit(out.MODEL)
    return out


def measure_row(name, cfg, batch, args, device, skipped, may_crop=True):
    """Estimate + measure one (config, batch); prints the row. Returns ok, or None if skipped.

    When only the memory here stands in the way (and ``may_crop``), measures the BEV-cropped
    config instead.
    """
    try:
        e = estimate(cfg, batch_size=batch, voxels=args.voxels, target=device.type)
    except PcdetFocalError as err:
        skipped.append((f'{name} b{batch}', str(err)))
        return None
    if args.quick and e.peak_bytes > 2 * 2 ** 30:
        skipped.append((f'{name} b{batch}', f'estimate {e.peak_bytes / 2 ** 30:.2f} '
                        'GiB > 2 GiB (--quick)'))
        return None
    t0 = time.perf_counter()
    try:
        m = measure_config(cfg, e, device=device)
    except PcdetFocalError as err:
        skipped.append((f'{name} b{batch}', str(err)))
        return None
    if m.refused:
        cropped = crop_bev(cfg, *args.crop) if may_crop and not e.lower_bound else None
        skipped.append((f'{name} b{batch}', m.refused + (
            f'; measured with the BEV cropped to {args.crop[0]}x{args.crop[1]} instead'
            if cropped is not None else '')))
        if cropped is None:
            return None
        return measure_row(f'{name} [BEV {args.crop[0]}x{args.crop[1]}]', cropped, batch,
                           args, device, skipped, may_crop=False)
    ok = LIMIT_UNDER <= m.error <= LIMIT_OVER
    print(f'{name:44s} {batch:5d} {m.matched_bytes / 2 ** 20:13.1f} '
          f'{m.peak_bytes / 2 ** 20:13.1f} {m.error:+8.1%} {"yes" if ok else "NO":>4s} '
          f'{e.peak_bytes / 2 ** 20:18.1f} {e.peak_bytes / m.peak_bytes - 1:+9.1%} '
          f'{time.perf_counter() - t0:7.1f}')
    sys.stdout.flush()
    return ok


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
    ap.add_argument('--crop', nargs=2, type=int, default=[80, 40], metavar=('NX', 'NY'),
                    help='BEV extent (voxels) for configs too large for this machine\'s RAM')
    args = ap.parse_args(argv)
    device = measure_device()
    print(f'device: {device}; voxels per sample: {args.voxels}; '
          f'estimate modelled for {device.type.upper()} kernels')
    head = (f'{"config":44s} {"batch":>5s} {"estimate MiB":>13s} {"measured MiB":>13s} '
            f'{"error":>8s} {"ok":>4s} {"as configured MiB":>18s} {"its error":>9s} '
            f'{"time s":>7s}')
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
            ok = measure_row(name, cfg, b, args, device, skipped)
            failures += ok is False
    for name, why in skipped:
        print(f'not measured: {name}: {why}')
    print(f'{failures} config(s) outside [{LIMIT_UNDER:+.0%}, {LIMIT_OVER:+.0%}]')
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
