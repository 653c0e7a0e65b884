#!/usr/bin/env python
"""Which BEV mapping to use: an ablation on the synthetic scenes, every variant on one budget.

``python benchmarks/bev_ablation.py [--quick] [--out DIR] [--seeds 0 1 2] [--variants ...]
[--train_frames 180 --test_frames 60 --epochs 8 --threads N --bev_frames 1]``

Every variant is the demo detector (cfgs/focalsst_dsvt_demo.yaml: FocalSST -> DSVT -> map to
BEV -> BEV backbone -> CenterHead, 128 x 128 x 16 grid) with one thing changed, trained and
evaluated on the same synthetic frames for the same epochs with the same seeds:

- ``shc_max`` / ``shc_mean`` / ``shc_learned``: SparseHeightCompression modes after DSVT's
  input layer merged z by 4 (16 -> 4 height bins); ``shc_learned`` is the demo as shipped;
- ``dense_hc``: OpenPCDet's dense HeightCompression after the same z merge (4 bins: 4 x 32 =
  128 BEV channels, small enough to fit at this grid; ``users' geometry`` below says which z
  merge it needs at theirs);
- ``dsvt_zpool_pps3d``: no z merge at the input; DSVT pools z inside its stages (16 -> 4 -> 1,
  three one-block stages, attention pooling) and PointPillarScatter3d writes the BEV map, as
  the DSVT authors' Waymo config does;
- ``shc_learned_z1`` / ``shc_learned_z2``: learned SparseHeightCompression with DSVT's
  ``input_downsample`` z 1 and 2 (z 4 is ``shc_learned``); DSVT windows span the whole height.

Per variant it reports, side by side: Car / Pedestrian / Cyclist AP R40 (3D and BEV; Car at
IoU 0.5, the others at 0.25; mean +- sample std over the seeds), trainable parameters, the
median wall and process CPU time of one training step (forward, backward, clip, AdamW step) on
a fixed batch of real frames (CPU time is the robust figure when other jobs share the cores),
that step's peak live tensor memory on the CPU (weights included; PyTorch's allocator events,
pcdet_focal.memory.tracker), the estimator's CUDA peak for the same batch and the wall time of
each run (training + evaluation).
Then, at the users' geometry (cfgs/focalsst_dsvt.yaml, estimator only, batch 1), the peak of
dense HeightCompression against learned SparseHeightCompression per DSVT z merge.

Outputs in ``--out``: ``results.json`` (every run's APs and the aggregates, rewritten after
each run: a partial run is readable), ``table.md`` (the Markdown tables) and the runs
(``runs/focalsst_dsvt_demo/<variant>_s<seed>/``, OpenPCDet's run folder layout). Rerunning the
same command reuses every finished run (a crashed sweep continues). ``--quick`` exercises every
variant for a few steps on a few frames (CI); its numbers mean nothing. Wall-clock numbers are
for reading, never for gating CI.
"""
import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# OpenMP threads that wait passively: on a 2-core VM shared with other jobs, spinning threads
# made one training step 15-50 s instead of ~1 s (measured here; set before torch loads libgomp)
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import torch  # noqa: E402

from benchmarks.common import (bench, describe_machine, fmt_bytes, fmt_time,  # noqa: E402
                               peak_memory)
from pcdet_focal.builder import build_network  # noqa: E402
from pcdet_focal.config import load_config, to_plain  # noqa: E402
from pcdet_focal.data.dataset import build_dataset  # noqa: E402
from pcdet_focal.engine.optim import build_optimizer  # noqa: E402
from pcdet_focal.engine.trainer import TrainOptions, run_dir_for, train  # noqa: E402
from pcdet_focal.engine.utils import load_data_to_device, set_random_seed  # noqa: E402
from pcdet_focal.errors import PcdetFocalError, cli_main  # noqa: E402
from pcdet_focal.memory import estimate  # noqa: E402
from pcdet_focal.memory.cuda import Stack  # noqa: E402
from pcdet_focal.memory.verdict import fits_budget  # noqa: E402

BASE_CFG = ROOT / 'cfgs' / 'focalsst_dsvt_demo.yaml'
USERS_CFG = ROOT / 'cfgs' / 'focalsst_dsvt.yaml'
GIB = 2 ** 30
# (result key, column title): the loosest IoU of each class, where this small model scores
AP_KEYS = [('Car_3d_R40_0.50', 'Car 3D @0.5'), ('Pedestrian_3d_R40_0.25', 'Ped 3D @0.25'),
           ('Cyclist_3d_R40_0.25', 'Cyc 3D @0.25')]
BEV_KEYS = [('Car_bev_R40_0.50', 'Car BEV @0.5'), ('Pedestrian_bev_R40_0.25', 'Ped BEV @0.25'),
            ('Cyclist_bev_R40_0.25', 'Cyc BEV @0.25')]
# full: 360 steps of batch 4 per run (the demo: 640), 21 runs; --quick: 1 step per run
FULL = {'train_frames': 180, 'test_frames': 60, 'epochs': 8, 'timing_repeats': 5, 'workers': 1}
QUICK = {'train_frames': 2, 'test_frames': 1, 'epochs': 1, 'timing_repeats': 1, 'batch': 2,
         'workers': 0}


# ----------------------------------------------------------------------------- variants

def _dsvt(cfg):
    return cfg.MODEL.BACKBONE_3D.DSVT


def _shc(mode, z_stride):
    return {'NAME': 'SparseHeightCompression', 'MODE': mode, 'INPUT_FEATURES': 32,
            'NUM_BEV_FEATURES': 32, 'Z_STRIDE': z_stride}


def _z_merge(cfg, z):
    """DSVT input layer merges z by ``z``; its window spans the remaining height."""
    dsvt = _dsvt(cfg)
    height = math.ceil(dsvt.INPUT_LAYER.sparse_shape[2] / z)
    dsvt.INPUT_LAYER.input_downsample = [1, 1, z]
    dsvt.INPUT_LAYER.window_shape = [[8, 8, height]]
    return height


def _shc_variant(mode, z=4):
    def apply(cfg):
        _z_merge(cfg, z)
        cfg.MODEL.MAP_TO_BEV = _shc(mode, z)
    return apply


def _dense_hc(cfg):
    height = _z_merge(cfg, 4)
    cfg.MODEL.MAP_TO_BEV = {'NAME': 'HeightCompression', 'NUM_BEV_FEATURES': 32 * height}


def _dsvt_zpool_pps3d(cfg):
    """Three one-block stages at z 16, 4, 1 (pooling [1, 1, 4] twice), then PointPillarScatter3d
    of the last stage's single height bin."""
    dsvt = _dsvt(cfg)
    nx, ny, nz = dsvt.INPUT_LAYER.sparse_shape
    stages = 3
    layer = dsvt.INPUT_LAYER
    layer.input_downsample = [1, 1, 1]
    layer.downsample_stride = [[1, 1, 4], [1, 1, 4]]
    heights = [nz, math.ceil(nz / 4), math.ceil(nz / 16)]
    layer.window_shape = [[8, 8, h] for h in heights]
    for key in ('d_model', 'set_info', 'shifts_list'):
        layer[key] = [copy.deepcopy(layer[key][0]) for _ in range(stages)]
    for key in ('block_name', 'set_info', 'd_model', 'nhead', 'dim_feedforward'):
        dsvt[key] = [copy.deepcopy(dsvt[key][0]) for _ in range(stages)]
    cfg.MODEL.MAP_TO_BEV = {'NAME': 'PointPillarScatter3d', 'INPUT_SHAPE': [nx, ny, heights[-1]],
                            'NUM_BEV_FEATURES': dsvt.d_model[-1] * heights[-1]}


# name -> (what it is, config edit); shc_learned first: it is the demo as shipped
VARIANTS = {
    'shc_learned': ('SHC learned, DSVT z-merge 4 (the demo)', _shc_variant('learned')),
    'shc_max': ('SHC max, z-merge 4', _shc_variant('max')),
    'shc_mean': ('SHC mean, z-merge 4', _shc_variant('mean')),
    'dense_hc': ('dense HeightCompression, z-merge 4 (128 ch)', _dense_hc),
    'dsvt_zpool_pps3d': ('DSVT z-pooling 16->4->1 + PointPillarScatter3d', _dsvt_zpool_pps3d),
    'shc_learned_z1': ('SHC learned, no z-merge (16 bins)', _shc_variant('learned', 1)),
    'shc_learned_z2': ('SHC learned, z-merge 2 (8 bins)', _shc_variant('learned', 2)),
}


def variant_config(name, base, budget):
    """A copy of ``base`` with variant ``name`` applied and the shared budget (frames, epochs,
    batch) set."""
    cfg = copy.deepcopy(base)
    VARIANTS[name][1](cfg)
    cfg.DATA_CONFIG.NUM_FRAMES = {'train': budget['train_frames'],
                                  'test': budget['test_frames']}
    cfg.OPTIMIZATION.NUM_EPOCHS = budget['epochs']
    if budget.get('batch'):
        cfg.OPTIMIZATION.BATCH_SIZE_PER_GPU = budget['batch']
    return cfg


# ----------------------------------------------------------------------------- measuring

def measure_step(cfg, repeats, seed=0):
    """Parameters, median training-step time and peak memory of ``cfg`` on the first batch of
    its training set: {'params', 'step_s' (wall), 'step_cpu_s' (process CPU time: what the step
    costs when other jobs share the cores), 'peak_bytes', 'estimate_bytes'}."""
    set_random_seed(seed)
    batch_size = int(cfg.OPTIMIZATION.BATCH_SIZE_PER_GPU)
    train_set = build_dataset(cfg.DATA_CONFIG, cfg.CLASS_NAMES, True)
    batch = train_set.collate_batch([train_set[i] for i in range(batch_size)])
    load_data_to_device(batch, torch.device('cpu'))
    model = build_network(cfg.MODEL, len(cfg.CLASS_NAMES), train_set)
    model.train()
    optimizer = build_optimizer(model, cfg.OPTIMIZATION)
    clip = float(cfg.OPTIMIZATION.get('GRAD_NORM_CLIP', 10))

    cpu = []

    def step():
        start = time.process_time()
        ret, _, _ = model(dict(batch))  # the model adds keys: give it a fresh dict each time
        loss = ret['loss'].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        cpu.append(time.process_time() - start)
        return loss.detach()

    weights = sum(t.numel() * t.element_size()
                  for t in list(model.parameters()) + list(model.buffers()))
    # the first (tracked) step also allocates AdamW's state: weights + that peak = the step's peak
    if repeats > 1:
        result = bench(step, 'cpu', repeats=repeats, warmup=2)
        step_s, peak = result.time_s, result.peak_bytes
    else:  # --quick: the tracked step alone
        start = time.perf_counter()
        peak = peak_memory(step, 'cpu')
        step_s = time.perf_counter() - start
    voxels = torch.bincount(batch['voxel_coords'][:, 0].long(), minlength=batch_size)
    try:  # at this batch's largest voxel count, not MAX_NUMBER_OF_VOXELS
        est = estimate(cfg, batch_size=batch_size, voxels=int(voxels.max())).peak_bytes
    except PcdetFocalError as err:
        est = None
        print(f'  estimator: {err}', flush=True)
    return {'params': sum(p.numel() for p in model.parameters() if p.requires_grad),
            'step_s': step_s, 'step_cpu_s': statistics.median(cpu[-repeats:]),
            'peak_bytes': weights + peak, 'voxels_per_sample': int(voxels.max()),
            'estimate_bytes': est}


def _identity(cfg):
    """What makes two runs the same experiment (file paths aside)."""
    return to_plain({'MODEL': cfg.MODEL, 'OPTIMIZATION': cfg.OPTIMIZATION,
                     'NUM_FRAMES': cfg.DATA_CONFIG.NUM_FRAMES})


def train_run(cfg, name, seed, runs_dir, bev_frames, workers):
    """Train + evaluate one (variant, seed) run; a finished run's saved results are reused.
    Returns {'ap': {key: AP}, 'seconds': wall time (None when reused)}."""
    opts = TrainOptions(cfg_file=str(BASE_CFG), output_dir=str(runs_dir),
                        extra_tag=f'{name}_s{seed}', fix_random_seed=True, seed=seed,
                        workers=workers,
                        skip_mem_check=True, progress=False, backend='standalone',
                        bev_frames=bev_frames)
    run_dir = run_dir_for(cfg, opts)
    result_file = run_dir / 'eval' / f'epoch_{cfg.OPTIMIZATION.NUM_EPOCHS}' / 'result.json'
    saved = run_dir / BASE_CFG.name   # the trainer's copy of the run's merged config
    if saved.is_file() and _identity(load_config(saved)) != _identity(cfg):
        raise PcdetFocalError(f'{run_dir} holds a run of another configuration or budget; '
                              'give this sweep its own --out folder')
    if result_file.is_file():
        return {'ap': json.loads(result_file.read_text()), 'seconds': None}
    start = time.time()
    train(cfg, opts)
    if not result_file.is_file():
        raise PcdetFocalError(f'{name} seed {seed}: training ended without {result_file}')
    return {'ap': json.loads(result_file.read_text()), 'seconds': time.time() - start}


# ----------------------------------------------------------------------------- the users' scale

# the users' stack (the 75.10 GiB im2col report) and a current one whose cuDNN runs convolutions
# with more than 2^31 elements per sample (pcdet_focal.memory.cuda)
STACKS = {"torch 2.3 + cuDNN 8.9.2 (the users')": 'torch2.3.0+cudnn8.9.2',
          'torch 2.9 + cuDNN 9.10.2': 'torch2.9.0+cudnn9.10.2'}


def _users_cfg(base, z, kind):
    """The users' model with DSVT's input z merge ``z`` and ``kind`` = dense_hc | shc_learned."""
    cfg = copy.deepcopy(base)
    dsvt = _dsvt(cfg)
    height = math.ceil(dsvt.INPUT_LAYER.sparse_shape[2] / z)
    dsvt.INPUT_LAYER.input_downsample = [1, 1, z]
    dsvt.INPUT_LAYER.window_shape = [[w[0], w[1], height] for w in dsvt.INPUT_LAYER.window_shape]
    channels = dsvt.d_model[-1]
    if kind == 'dense_hc':
        cfg.MODEL.MAP_TO_BEV = {'NAME': 'HeightCompression', 'NUM_BEV_FEATURES': channels * height}
    else:
        cfg.MODEL.MAP_TO_BEV = {'NAME': 'SparseHeightCompression', 'MODE': 'learned',
                                'INPUT_FEATURES': channels, 'NUM_BEV_FEATURES': channels,
                                'Z_STRIDE': z}
    return cfg, height


Z_MERGES = (1, 2, 4, 8, 16, 35)   # 175 height bins -> 175, 88, 44, 22, 11, 5


def users_geometry_rows(z_merges=Z_MERGES, budgets=(24, 80)):
    """Estimated CUDA peak at the users' grid (500 x 200 x 175, 128 channels, batch 1) of dense
    HeightCompression (per CUDA stack) and learned SparseHeightCompression, per DSVT input z
    merge: [{'z_merge', 'height', 'bev_channels', 'cells': {column: {'peak_bytes', 'fits':
    {budget GiB: bool}}}}]."""
    base = load_config(USERS_CFG)
    rows = []
    for z in z_merges:
        cases = [(f'dense HC, {label}', 'dense_hc', stack) for label, stack in STACKS.items()]
        cases.append(('learned SHC', 'shc_learned', next(iter(STACKS.values()))))
        row = {'z_merge': z, 'cells': {}}
        for column, kind, stack in cases:
            cfg, row['height'] = _users_cfg(base, z, kind)
            e = estimate(cfg, batch_size=1, stack=Stack.parse(stack))
            if kind == 'dense_hc':
                row['bev_channels'] = e.flattened_bev_channels
            row['cells'][column] = {  # check_fits' own rule
                'peak_bytes': e.peak_bytes,
                'fits': {b: fits_budget(e, b * GIB) for b in budgets}}
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- report

def mean_std(values):
    """'mean +- std' in percent (sample std; '-' for one value)."""
    vals = [100 * v for v in values if v is not None]
    if not vals:
        return 'n/a'
    if len(vals) == 1:
        return f'{vals[0]:.1f}'
    return f'{statistics.mean(vals):.1f} +- {statistics.stdev(vals):.1f}'


def aggregate(results):
    """Per variant: the AP of each key over its seeds (list) and the mean run time."""
    out = {}
    for name, res in results['variants'].items():
        runs = res.get('runs', {})
        ap = {key: [r['ap'].get(key) for r in runs.values()] for key, _ in AP_KEYS + BEV_KEYS}
        secs = [r['seconds'] for r in runs.values() if r.get('seconds')]
        out[name] = {'seeds': sorted(int(s) for s in runs), 'ap': ap,
                     'run_s': statistics.mean(secs) if secs else None}
    return out


def table_lines(results):
    agg = aggregate(results)
    b = results['budget']
    lines = [f"Machine: {results['machine']}",
             f"Command: `{results['command']}`",
             f"Budget per run: {b['train_frames']} training frames x {b['epochs']} epochs "
             f"(batch {b['batch']}), evaluated on {b['test_frames']} val frames; seeds "
             f"{', '.join(map(str, results['seeds']))}. AP R40 in %, mean +- sample std over "
             'the seeds.', '']
    head = ['variant', 'seeds'] + [t for _, t in AP_KEYS] + \
        ['params', 'step wall / CPU', 'peak (CPU, measured)', 'peak (CUDA, estimated)',
         'run (train + eval)']
    lines += ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for name, res in results['variants'].items():
        m, a = res.get('step', {}), agg[name]
        lines.append('| ' + ' | '.join(
            [f'`{name}`: {VARIANTS[name][0]}', str(len(a['seeds']))] +
            [mean_std(a['ap'][k]) for k, _ in AP_KEYS] +
            [f"{m['params'] / 1e3:.1f} k" if m else '-',
             f"{fmt_time(m.get('step_s'))} / {fmt_time(m.get('step_cpu_s'))}" if m else '-',
             fmt_bytes(m.get('peak_bytes')) if m else '-',
             fmt_bytes(m.get('estimate_bytes')) if m else '-',
             fmt_time(a['run_s'])]) + ' |')
    lines += ['', '| variant | ' + ' | '.join(t for _, t in BEV_KEYS) + ' |',
              '|---|' + '---|' * len(BEV_KEYS)]
    for name in results['variants']:
        lines.append(f'| `{name}` | ' + ' | '.join(
            mean_std(agg[name]['ap'][k]) for k, _ in BEV_KEYS) + ' |')
    users = results.get('users_geometry')
    if users:
        columns = list(users[0]['cells'])
        lines += ['', "Users' geometry (cfgs/focalsst_dsvt.yaml: grid 500 x 200 x 175, 128 "
                  'channels), estimated CUDA peak at batch 1 per DSVT input z merge '
                  '(fits: with the estimator\'s margin, in a 24 / 80 GiB card):', '',
                  '| z merge | height bins | dense HC BEV channels | '
                  + ' | '.join(f'{c}: peak, fits 24 / 80 GiB' for c in columns) + ' |',
                  '|' + '---|' * (3 + len(columns))]
        for r in users:
            cells = []
            for c in columns:
                cell = r['cells'][c]
                fits = ' / '.join('yes' if v else 'no' for v in cell['fits'].values())
                peak = cell['peak_bytes']
                cells.append(f"{'-' if peak is None else f'{peak / GIB:.2f} GiB'}, {fits}")
            lines.append(f"| {r['z_merge']} | {r['height']} | {r['bev_channels']} | "
                         + ' | '.join(cells) + ' |')
    return lines


def save(results, out):
    (out / 'results.json').write_text(json.dumps(results, indent=1) + '\n')
    (out / 'table.md').write_text('\n'.join(table_lines(results)) + '\n')


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--quick', action='store_true',
                   help='every variant for a few steps on a few frames (CI smoke run)')
    p.add_argument('--out', default=str(ROOT / 'output' / 'bev_ablation'),
                   help='results folder (default output/bev_ablation)')
    p.add_argument('--seeds', type=int, nargs='+', default=None,
                   help='training seeds (default 0 1 2; --quick: 0)')
    p.add_argument('--variants', nargs='+', choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument('--train_frames', type=int, default=None)
    p.add_argument('--test_frames', type=int, default=None)
    p.add_argument('--epochs', type=int, default=None)
    p.add_argument('--bev_frames', type=int, default=1,
                   help='BEV pictures per run (first seed of each variant; default 1)')
    p.add_argument('--threads', type=int, default=None,
                   help='torch intra-op threads (default: torch\'s, one per core)')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    budget = dict(QUICK if args.quick else FULL)
    for key in ('train_frames', 'test_frames', 'epochs'):
        if getattr(args, key) is not None:
            budget[key] = getattr(args, key)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_config(BASE_CFG)
    budget.setdefault('batch', int(base.OPTIMIZATION.BATCH_SIZE_PER_GPU))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    old = out / 'results.json'
    results = json.loads(old.read_text()) if old.is_file() else {}
    if results.get('budget') != budget:
        results = {}  # another budget: start over (finished runs of this one are reused)
    command = 'python benchmarks/bev_ablation.py' + \
        (' ' + ' '.join(argv if argv is not None else sys.argv[1:])).rstrip()
    machine = f"{describe_machine('cpu')}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}"
    results.update({'machine': machine, 'command': command, 'budget': budget,
                    'seeds': seeds, 'started': results.get('started', time.ctime())})
    variants = results.setdefault('variants', {})
    configs = {name: variant_config(name, base, budget) for name in args.variants}
    print(results['machine'], flush=True)

    for name, cfg in configs.items():  # step time and memory first: minutes, not hours
        if 'step' not in variants.get(name, {}):
            print(f'[step] {name}', flush=True)
            variants.setdefault(name, {})['step'] = measure_step(cfg, budget['timing_repeats'])
            save(results, out)
    if 'users_geometry' not in results:
        results['users_geometry'] = users_geometry_rows((1,) if args.quick else Z_MERGES)
        save(results, out)
    for seed in seeds:  # seed-major: a sweep cut short still compares every variant
        for name, cfg in configs.items():
            runs = variants[name].setdefault('runs', {})
            if str(seed) in runs:
                continue
            print(f'[train] {name} seed {seed} ({time.strftime("%H:%M:%S")})', flush=True)
            runs[str(seed)] = train_run(cfg, name, seed, out / 'runs',
                                        args.bev_frames if seed == seeds[0] else 0,
                                        budget['workers'])
            save(results, out)
    results['finished'] = time.ctime()
    save(results, out)
    print('\n'.join(table_lines(results)))
    return 0


if __name__ == '__main__':
    cli_main(main)()  # errors and Ctrl-C as one line (a rerun resumes the sweep)
