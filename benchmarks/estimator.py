#!/usr/bin/env python
"""Estimator accuracy on held-out configs: a seeded sweep of random valid configs of our module
family, each estimated and measured on this machine's CPU.

Every config is drawn at random (``--seed``) from the family the README documents: FocalSST
encoder widths, blocks, kernel, threshold, top-k and cap (with or without DSVT after it), DSVT
width, heads, feed-forward, set size, windows, stages, z-merge, input reduction, pooling and
checkpointing, every MAP_TO_BEV mode, BEV backbones with and without deblocks, CenterHead with
one or two heads, grid and voxel size, batch 1-4 and the optimizer. None of them was used to
tune a memory rule (tests/test_memory_contract.py holds those).

Each config goes through ``tools/estimate_mem.py --measure --json`` (in-process: the CLI's
code path and its JSON keys): the estimate counts voxels, DSVT sets and BEV columns on 8 frames
of the configured synthetic dataset, and the measurement trains two real steps on the densest
of them, batch_size times (PyTorch's CPU allocator events). Columns:

- plain error: ``estimate.peak_bytes / measure.measured_bytes - 1``: the number the trainer
  gates on, with the worst case the config allows for focal growth and 100 gt boxes a sample;
- error at measured counts: ``measure.estimate_at_measured_counts_bytes`` against the
  measurement: the memory model itself;
- cause: what the plain over-estimate comes from, by re-estimating with the measured counts
  (focal growth, and the DSVT sets / BEV columns of the grown voxels) and with the measured
  box count (the larger share is named).

The learning rate of every config is 1e-6 so both measured steps see the same focal counts
(memory does not depend on its value). Targets: at measured counts within +-5% on every config,
the plain estimate never more than 5% under the measured peak.

``python benchmarks/estimator.py [--configs 24] [--seed 0] [--json OUT] [--markdown OUT]``
"""
import argparse
import copy
import io
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / 'tools'):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import yaml  # noqa: E402

from benchmarks.common import describe_machine, print_table  # noqa: E402
from pcdet_focal.errors import PcdetFocalError  # noqa: E402

AT_COUNTS_LIMIT, PLAIN_UNDER_LIMIT = 0.05, -0.05
# benchmarks/gpu_suite.py step 6 measures the shipped configs with these: the error at
# measured counts within [LIMIT_UNDER, LIMIT_OVER]; configs too large for the machine are
# measured with their BEV cropped to CROP (x, y voxels)
LIMIT_UNDER, LIMIT_OVER = -AT_COUNTS_LIMIT, AT_COUNTS_LIMIT
CROP = (80, 40)
MAX_ESTIMATE = 1.5 * 2 ** 30     # redraw configs whose plain estimate exceeds this (CPU time)
CLASSES = ['Car', 'Pedestrian', 'Cyclist']


# ----------------------------------------------------------------------------- the family
def _data(rng, nx, ny, nz, vxy):
    """The shipped synthetic dataset config (augmentations included), front view, on an
    nx x ny x nz grid of vxy x vxy x 4/nz m voxels."""
    from pcdet_focal.config import load_config, to_plain
    data = to_plain(load_config(ROOT / 'cfgs' / 'dataset_configs' / 'synthetic_dataset.yaml'))
    for key in ('CFG_FILE', 'CFG_SEARCH_DIRS'):
        data.pop(key, None)
    half = ny * vxy / 2
    data.update(POINT_CLOUD_RANGE=[0, -half, -3, round(nx * vxy, 4), half, 1],
                NUM_FRAMES={'train': 16, 'test': 2},
                SEED={'train': rng.randrange(1000), 'test': 1001})
    data['SCENE'].update(NUM_BEAMS=rng.choice([32, 64]), NUM_AZIMUTH=rng.choice([512, 1024]),
                         HORIZONTAL_FOV=[-90, 90])
    data['DATA_PROCESSOR'][-1].update(
        VOXEL_SIZE=[vxy, vxy, 4 / nz],
        MAX_NUMBER_OF_VOXELS={'train': rng.choice([8000, 16000, 30000]), 'test': 30000})
    return data


def _focal(rng, last=None):
    """FOCAL_CONFIG keys: stem + 0-2 blocks (``last``: the output width DSVT needs)."""
    blocks = rng.choice([0, 1, 1, 2]) if last is None else rng.choice([0, 1])
    kernel = 5 if rng.random() < 0.15 else 3
    widths = [rng.choice([8, 16] if kernel == 5 else [16, 32])]
    widths += [rng.choice([16, 32, 48]) for _ in range(blocks)]
    if last is not None:
        widths[-1] = last
    keys = {'NUM_FILTERS': widths, 'KERNEL_SIZE': kernel}
    mode = rng.choice(['default', 'threshold0', 'topk'])
    if mode == 'threshold0':
        keys['IMPORTANCE_THRESHOLD'] = 0.0
    elif mode == 'topk':
        keys.update(IMPORTANCE_THRESHOLD=0.0, TOPK_RATIO=rng.choice([0.25, 0.5]))
    keys['MAX_NEW_VOXELS_RATIO'] = rng.choice([0.25, 0.5, 1.0, 1.0, None]) \
        if kernel == 3 else rng.choice([0.25, 0.5])
    return keys


def _dsvt(rng, nx, ny, nz):
    """(DSVT config, output [x, y, z] grid, total x/y stride)."""
    width = rng.choice([32, 48, 64])
    heads = rng.choice([h for h in (2, 4, 8) if width % h == 0])
    stages = rng.choice([1, 1, 2])
    dz = rng.choice([1, 2, 4, nz])
    shape = [nx, ny, -(-nz // dz)]
    reduction = rng.choice(['attention', 'maxpool', 'linear'])
    widths = [width] * stages
    if stages == 2 and reduction == 'linear':
        widths[1] = rng.choice([32, 64, 96])
    windows, shapes = [], [shape]
    for s in range(stages - 1):
        shapes.append([-(-shapes[-1][0] // 2), -(-shapes[-1][1] // 2), shapes[-1][2]])
    for st in shapes:
        w = rng.choice([8, 12, 16])
        windows.append([min(w, st[0]), min(w, st[1]), st[2]])
    set_size = rng.choice([16, 36, 48])
    layer = {'sparse_shape': [nx, ny, nz], 'input_downsample': [1, 1, dz],
             'input_reduction': rng.choice(['max', 'mean', 'learned']),
             'downsample_stride': [[2, 2, 1]] * (stages - 1), 'd_model': widths,
             'set_info': [[set_size, 1]] * stages, 'window_shape': windows,
             'hybrid_factor': [2, 2, 1], 'normalize_pos': False}
    cfg = {'INPUT_LAYER': layer, 'block_name': ['DSVTBlock'] * stages,
           'set_info': [[set_size, 1]] * stages, 'd_model': widths,
           'nhead': [heads] * stages, 'dim_feedforward': [rng.choice([64, 128, 256])] * stages,
           'dropout': 0.0, 'activation': rng.choice(['gelu', 'relu']),
           'reduction_type': reduction, 'USE_CHECKPOINT': rng.random() < 0.3}
    return cfg, shapes[-1], 2 ** (stages - 1)


def _map_to_bev(rng, channels, grid, dsvt):
    """A MAP_TO_BEV config for ``channels`` x ``grid`` [x, y, z] voxels."""
    modes = ['max', 'mean', 'learned', 'learned_no_norm']
    flat = channels * grid[2] <= 512             # a dense C*D BEV input the CPU can train
    modes += ['pillar_scatter' if dsvt else 'height_compression'] * flat
    mode = rng.choice(modes)
    if mode == 'pillar_scatter':
        return {'NAME': 'PointPillarScatter3d', 'INPUT_SHAPE': list(grid),
                'NUM_BEV_FEATURES': channels * grid[2]}
    if mode == 'height_compression':
        return {'NAME': 'HeightCompression', 'NUM_BEV_FEATURES': channels * grid[2]}
    if mode in ('max', 'mean'):
        return {'NAME': 'SparseHeightCompression', 'MODE': mode, 'INPUT_FEATURES': channels,
                'NUM_BEV_FEATURES': channels}
    return {'NAME': 'SparseHeightCompression', 'MODE': 'learned', 'INPUT_FEATURES': channels,
            'NUM_BEV_FEATURES': rng.choice([32, 64]), 'USE_NORM': mode == 'learned'}


def _bev(rng):
    """(BaseBEVBackbone config, its output stride)."""
    kind = rng.choice(['one', 'two_deblocks', 'two_down', 'no_deblocks'])
    filters = [rng.choice([32, 64]), rng.choice([64, 128])]
    if kind == 'one':
        s = rng.choice([1, 2])
        return {'NAME': 'BaseBEVBackbone', 'LAYER_NUMS': [rng.choice([1, 2])],
                'LAYER_STRIDES': [s], 'NUM_FILTERS': filters[:1], 'UPSAMPLE_STRIDES': [1],
                'NUM_UPSAMPLE_FILTERS': [filters[0]]}, s
    if kind == 'no_deblocks':
        return {'NAME': 'BaseBEVBackbone', 'LAYER_NUMS': [1, 1], 'LAYER_STRIDES': [1, 2],
                'NUM_FILTERS': filters}, 2
    if kind == 'two_down':     # a stride < 1: the first block is downsampled to the second
        return {'NAME': 'BaseBEVBackbone', 'LAYER_NUMS': [1, 1], 'LAYER_STRIDES': [1, 2],
                'NUM_FILTERS': filters, 'UPSAMPLE_STRIDES': [0.5, 1],
                'NUM_UPSAMPLE_FILTERS': [32, 32]}, 2
    return {'NAME': 'BaseBEVBackbone', 'LAYER_NUMS': [1, 2], 'LAYER_STRIDES': [1, 2],
            'NUM_FILTERS': filters, 'UPSAMPLE_STRIDES': [1, 2], 'NUM_UPSAMPLE_FILTERS': [32, 32],
            'USE_CONV_FOR_NO_STRIDE': rng.random() < 0.5}, 1


def _head(rng, stride):
    """The demo config's CenterHead with random heads, width and the real map stride."""
    from pcdet_focal.config import load_config, to_plain
    head = to_plain(load_config(ROOT / 'cfgs' / 'focalsst_dsvt_demo.yaml').MODEL.DENSE_HEAD)
    head.update(CLASS_NAMES_EACH_HEAD=rng.choice([[CLASSES], [['Car'], ['Pedestrian',
                                                                          'Cyclist']]]),
                SHARED_CONV_CHANNEL=rng.choice([16, 32, 64]))
    head['TARGET_ASSIGNER_CONFIG']['FEATURE_MAP_STRIDE'] = stride
    head.pop('POST_PROCESSING', None)
    return head


def draw_config(rng):
    """(plain config dict, batch size, one-line summary) of a random member of the family."""
    nx, ny = rng.choice([64, 96, 128, 160]), rng.choice([64, 96, 128])
    nz, vxy = rng.choice([8, 16, 20]), rng.choice([0.2, 0.32, 0.4])
    data = _data(rng, nx, ny, nz, vxy)
    if rng.random() < 0.5:
        dsvt, grid, stride = _dsvt(rng, nx, ny, nz)
        backbone = {'NAME': 'FocalSSTDSVT', 'FOCAL_ENCODER': _focal(rng, dsvt['d_model'][0]),
                    'DSVT': dsvt}
        channels, focal = dsvt['d_model'][-1], backbone['FOCAL_ENCODER']
    else:
        backbone = {'NAME': 'FocalSSTEncoder', **_focal(rng)}
        grid, stride, channels, focal = [nx, ny, nz], 1, backbone['NUM_FILTERS'][-1], backbone
    to_bev = _map_to_bev(rng, channels, grid, backbone['NAME'] == 'FocalSSTDSVT')
    bev, bev_stride = _bev(rng)
    batch = rng.choice([1, 2, 3, 4])
    optimizer = rng.choice(['adam_onecycle', 'adam', 'adamw', 'sgd'])
    cfg = {'CLASS_NAMES': CLASSES, 'DATA_CONFIG': data,
           'MODEL': {'NAME': 'FocalCenterPoint', 'VFE': {'NAME': 'MeanVFE'},
                     'BACKBONE_3D': backbone, 'MAP_TO_BEV': to_bev, 'BACKBONE_2D': bev,
                     'DENSE_HEAD': _head(rng, stride * bev_stride)},
           'OPTIMIZATION': {'BATCH_SIZE_PER_GPU': batch, 'NUM_EPOCHS': 1,
                            'OPTIMIZER': optimizer, 'LR': 1e-6, 'WEIGHT_DECAY': 0.01,
                            'MOMENTUM': 0.9, 'MOMS': [0.95, 0.85], 'GRAD_NORM_CLIP': 10}}
    return cfg, batch, _summary(cfg, [nx, ny, nz], focal)


def _summary(cfg, grid, focal):
    m = cfg['MODEL']
    b3 = m['BACKBONE_3D']
    f = (f"focal {'/'.join(map(str, focal['NUM_FILTERS']))} k{focal['KERNEL_SIZE']}"
         f" thr{focal.get('IMPORTANCE_THRESHOLD', 0.5):g}"
         + (f" top{focal['TOPK_RATIO']:g}" if focal.get('TOPK_RATIO') else '')
         + f" cap{focal['MAX_NEW_VOXELS_RATIO']}")
    parts = [f"{cfg['DATA_CONFIG']['DATA_PROCESSOR'][-1]['VOXEL_SIZE'][0]:g}m "
             f"{'x'.join(map(str, grid))}", f]
    if b3['NAME'] == 'FocalSSTDSVT':
        d = b3['DSVT']
        il = d['INPUT_LAYER']
        parts.append(f"dsvt {'/'.join(map(str, d['d_model']))} h{d['nhead'][0]} "
                     f"ff{d['dim_feedforward'][0]} set{d['set_info'][0][0]} "
                     f"z/{il['input_downsample'][2]} {il['input_reduction']} "
                     f"{d['reduction_type'] if len(d['d_model']) > 1 else '1st'}"
                     + (' ckpt' if d['USE_CHECKPOINT'] else ''))
    to_bev = m['MAP_TO_BEV']
    parts.append({'SparseHeightCompression': f"shc {to_bev.get('MODE')}"
                  + ('' if to_bev.get('USE_NORM', True) else ' nonorm'),
                  'HeightCompression': 'hc',
                  'PointPillarScatter3d': 'pps3d'}[to_bev['NAME']])
    bev = m['BACKBONE_2D']
    parts.append(f"bev s{'/'.join(map(str, bev['LAYER_STRIDES']))}"
                 + (f" up{'/'.join(f'{u:g}' for u in bev['UPSAMPLE_STRIDES'])}"
                    if bev.get('UPSAMPLE_STRIDES') else ' no-deblock'))
    parts.append(f"{len(m['DENSE_HEAD']['CLASS_NAMES_EACH_HEAD'])} head(s) "
                 f"c{m['DENSE_HEAD']['SHARED_CONV_CHANNEL']}")
    parts.append(cfg['OPTIMIZATION']['OPTIMIZER'])
    return ', '.join(parts)


# ----------------------------------------------------------------------------- one config
def _valid(cfg, path, batch):
    """The loaded config when it builds and its plain CPU estimate fits the sweep, else None."""
    from pcdet_focal.config_schema import load_checked
    from pcdet_focal.memory import estimate, prepare
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    try:
        loaded = load_checked(str(path), [], training=True)
        prep = prepare(loaded)
        est = estimate(loaded, batch_size=batch, target='cpu', prepared=prep)
    except PcdetFocalError:
        return None
    return (loaded, prep) if est.peak_bytes and est.peak_bytes <= MAX_ESTIMATE else None


def measure_via_cli(path, batch):
    """``tools/estimate_mem.py --cfg path --batch_size B --target cpu --measure --json``, run
    in-process; returns its JSON document."""
    from estimate_mem import parse_args
    from pcdet_focal.memory.cli import run
    out = io.StringIO()
    run(parse_args(['--cfg', str(path), '--batch_size', str(batch), '--target', 'cpu',
                    '--measure', '--json']), out=out)
    return json.loads(out.getvalue())


def over_estimate_cause(loaded, prep, batch, doc):
    """Shares of the plain over-estimate removed by the measured counts (focal growth and
    what depends on it downstream: DSVT voxels and sets, BEV columns of the grown voxels; the
    frames are the same) and by the measured box count: (cause, {cause: bytes})."""
    from pcdet_focal.memory import estimate
    observed = doc['measure']['observed_counts'] or {}
    plain = doc['estimate']['peak_bytes']
    focal = estimate(loaded, batch_size=batch, target='cpu', prepared=prep, observed=observed)
    boxes = estimate(loaded, batch_size=batch, target='cpu', prepared=prep,
                     gt_boxes=_boxes(loaded, prep))
    shares = {'worst-case focal growth at the cap': plain - focal.peak_bytes,
              '100 gt boxes per sample assumed': plain - boxes.peak_bytes}
    cause = max(shares, key=shares.get)
    if shares[cause] <= 0.01 * plain:
        cause = 'none (as measured)'
    return cause, shares


def _boxes(loaded, prep):
    """Boxes per sample of the measured batch (the densest counted frame)."""
    from pcdet_focal import backend
    from pcdet_focal.memory.measure import frame_batch
    dataset = backend.build_dataset(loaded.DATA_CONFIG, list(loaded.CLASS_NAMES), True,
                                    prep.host)
    return int(frame_batch(dataset, prep.counts.densest, 1)['gt_boxes'].shape[1])


def configs(paths=None):
    """``paths`` as Paths, else every shipped config (cfgs/*.yaml, cfgs/openpcdet/*.yaml)."""
    if paths:
        return [Path(p) for p in paths]
    return sorted((ROOT / 'cfgs').glob('*.yaml')) + sorted((ROOT / 'cfgs' / 'openpcdet')
                                                           .glob('*.yaml'))


# ----------------------------------------------------------------------------- the sweep
def sweep(n_configs, seed, log=print):
    rng = random.Random(seed)
    rows, redrawn = [], 0
    with tempfile.TemporaryDirectory(prefix='estimator_sweep_') as tmp:
        while len(rows) < n_configs:
            cfg, batch, summary = draw_config(rng)
            path = Path(tmp) / f'sweep_{len(rows):02d}.yaml'
            valid = _valid(copy.deepcopy(cfg), path, batch)
            if valid is None:
                redrawn += 1
                continue
            loaded, prep = valid
            t0 = time.perf_counter()
            doc = measure_via_cli(path, batch)
            measured = doc['measure']['measured_bytes']
            at_counts = doc['measure']['estimate_at_measured_counts_bytes']
            plain = doc['estimate']['peak_bytes']
            cause, _ = over_estimate_cause(loaded, prep, batch, doc)
            row = {'index': len(rows), 'summary': summary, 'batch': batch,
                   'voxels': prep.counts.per_sample, 'plain_bytes': plain,
                   'measured_bytes': measured, 'at_counts_bytes': at_counts,
                   'plain_error': plain / measured - 1,
                   'at_counts_error': at_counts / measured - 1, 'cause': cause,
                   'seconds': round(time.perf_counter() - t0, 1), 'config': cfg}
            rows.append(row)
            log(f"[{row['index']:2d}] {row['plain_error']:+7.1%} plain, "
                f"{row['at_counts_error']:+6.2%} at measured counts, {row['seconds']:.0f} s: "
                f'{summary}, batch {batch}')
    return rows, redrawn


def report(rows, redrawn, seed, seconds, file=None):
    mib = 2 ** 20
    print_table(['#', 'config', 'batch', 'voxels / sample', 'plain estimate MiB',
                 'measured MiB', 'at measured counts MiB', 'plain error',
                 'error at measured counts', 'over-estimate from'],
                [[r['index'], r['summary'], r['batch'], f"{r['voxels']:,}",
                  f"{r['plain_bytes'] / mib:,.1f}", f"{r['measured_bytes'] / mib:,.1f}",
                  f"{r['at_counts_bytes'] / mib:,.1f}", f"{r['plain_error']:+.1%}",
                  f"{r['at_counts_error']:+.2%}", r['cause']] for r in rows], file=file)
    at_counts = [r['at_counts_error'] for r in rows]
    plain = [r['plain_error'] for r in rows]
    over = [r for r in rows if r['plain_error'] > 0]
    causes = {}
    for r in over:
        causes[r['cause']] = causes.get(r['cause'], 0) + r['plain_bytes'] - r['measured_bytes']
    main = max(causes, key=causes.get) if causes else 'none'
    over_median = statistics.median([r['plain_error'] for r in over]) if over else 0.0
    at_ok = max(map(abs, at_counts)) <= AT_COUNTS_LIMIT
    plain_ok = min(plain) >= PLAIN_UNDER_LIMIT
    lines = [
        f'{len(rows)} configs (seed {seed}; {redrawn} draws redrawn: invalid or a plain '
        f'estimate over {MAX_ESTIMATE / 2 ** 30:.1f} GiB), {seconds / 60:.1f} min',
        f'error at measured counts: {min(at_counts):+.2%} .. {max(at_counts):+.2%} '
        f"(target within +-{AT_COUNTS_LIMIT:.0%}: {'holds' if at_ok else 'FAILS'})",
        f'plain estimate: {min(plain):+.1%} .. {max(plain):+.1%}, median '
        f'{statistics.median(plain):+.1%} (target never under by more than '
        f"{-PLAIN_UNDER_LIMIT:.0%}: {'holds' if plain_ok else 'FAILS'})",
        f'median over-estimate {over_median:+.1%} over the {len(over)} configs the plain '
        f'estimate over-estimates; main cause (bytes): {main}',
    ]
    for line in lines:
        print(line, file=file)
    return at_ok and plain_ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--configs', type=int, default=24, help='random configs to measure')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--json', default=None, help='write every row (config included) here')
    ap.add_argument('--markdown', default=None, help='also write the table here')
    args = ap.parse_args(argv)
    print(describe_machine('cpu'))
    t0 = time.perf_counter()
    rows, redrawn = sweep(args.configs, args.seed)
    seconds = time.perf_counter() - t0
    ok = report(rows, redrawn, args.seed, seconds)
    if args.markdown:
        with open(args.markdown, 'w', encoding='utf-8') as fh:
            print(f'Machine: {describe_machine("cpu")}', file=fh)
            print(f'Command: python benchmarks/estimator.py --configs {args.configs} '
                  f'--seed {args.seed}\n', file=fh)
            report(rows, redrawn, args.seed, seconds, file=fh)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
