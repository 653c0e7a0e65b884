"""The memory estimator on OpenPCDet's own model zoo (pcdet host) and against published GPUs.

Always: the strided sparse conv counts of pcdet_focal.memory.pcdet_rules against a dense
reference (a convolution of the occupancy grid written here) and against a Monte-Carlo draw.

With PCDET_ROOT (an OpenPCDet 8caccce source tree; its compiled ops are not needed:
tests/pcdet_cpu_ops stands in), one subprocess per suite imports OpenPCDet once:

- zoo: every model config of tools/cfgs goes through ``tools/estimate_mem.py --backend pcdet
  --frames 0 --json`` (its ``memory.cli.run``) and ends in a full estimate or in exit 3 naming
  the modules without a rule; zero tracebacks. The table (full / not modelled / time) is printed.
- published GPUs: configs whose authors published the GPU they trained on, estimated at the
  config's batch size, with the caps (the data is not on disk; the estimator lays them out as a
  synthetic street scan, memory.counts.scan_layout), must need no more than that GPU's memory
  (margin included: verdict.required_bytes).

OpenPCDet 8caccce calls ``np.int`` (removed in numpy 1.24) in its BEV backbones; the subprocess
restores the numpy 1.23 aliases it was written for. Run: ``PCDET_ROOT=/path/to/OpenPCDet
python -m pytest tests/test_estimator_zoo.py -s`` in an environment where OpenPCDet imports
(SharedArray, tensorboardX, ...).
"""
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pcdet_focal.memory.pcdet_rules import conv_output_sites, expected_conv_sites

REPO = Path(__file__).resolve().parents[1]
CPU_OPS = REPO / 'tests' / 'pcdet_cpu_ops'
PCDET_ROOT = os.environ.get('PCDET_ROOT')
GIB = 2 ** 30


# ============================================================================ counts (always)
def _dense_active(frame, spatial, kernel, stride, padding):
    """Reference: output o is active when the k-window of the zero-padded occupancy grid at
    o * s holds a voxel (a dense convolution of the occupancy with a ones kernel)."""
    occ = np.zeros(spatial, bool)
    occ[tuple(frame.T)] = True
    occ = np.pad(occ, [(p, p) for p in padding])
    out = [(sz + 2 * p - k) // s + 1 for sz, k, s, p in zip(spatial, kernel, stride, padding)]
    active = np.zeros(out, bool)
    for o in itertools.product(*(range(n) for n in out)):
        window = tuple(slice(i * s, i * s + k) for i, s, k in zip(o, stride, kernel))
        active[o] = occ[window].any()
    return np.argwhere(active)


@pytest.mark.parametrize('kernel, stride, padding', [
    ((3, 3, 3), (2, 2, 2), (1, 1, 1)),      # VoxelBackBone8x conv2 / conv3
    ((3, 3, 3), (2, 2, 2), (0, 1, 1)),      # conv4
    ((3, 1, 1), (2, 1, 1), (0, 0, 0)),      # conv_out
    ((3, 3, 3), (1, 1, 1), (1, 1, 1)),      # a regular stride-1 conv (dilates)
])
def test_conv_output_sites_match_a_dense_convolution(kernel, stride, padding):
    rng = np.random.default_rng(0)
    spatial = (9, 14, 11)
    frame = np.unique(rng.integers(0, spatial, size=(60, 3)), axis=0)
    got = conv_output_sites(frame, spatial, kernel, stride, padding, (1, 1, 1))
    ref = _dense_active(frame, spatial, kernel, stride, padding)
    assert sorted(map(tuple, got)) == sorted(map(tuple, ref))


def test_conv_output_sites_2d():
    frame = np.array([[0, 0], [0, 1], [5, 7]])
    got = conv_output_sites(frame, (6, 8), (3, 3), (1, 1), (1, 1), (1, 1))
    ref = _dense_active(frame, (6, 8), (3, 3), (1, 1), (1, 1))
    assert sorted(map(tuple, got)) == sorted(map(tuple, ref))


def test_expected_conv_sites_match_random_voxels():
    """The no-frame assumption (voxels uniformly at random) against the mean of real draws."""
    rng = np.random.default_rng(1)
    spatial, n = (11, 40, 36), 700
    args = ((3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1))
    flat = [rng.choice(np.prod(spatial), n, replace=False) for _ in range(30)]
    draws = [len(conv_output_sites(np.stack(np.unravel_index(f, spatial), 1), spatial, *args))
             for f in flat]
    assert expected_conv_sites(n, spatial, *args) == pytest.approx(np.mean(draws), rel=0.01)


# ============================================================================ the driver
def _numpy_aliases():
    """The aliases OpenPCDet 8caccce uses (np.int in backbones_2d) that numpy 1.24 removed."""
    for name, kind in (('int', int), ('float', float), ('bool', bool)):
        if name not in np.__dict__:
            setattr(np, name, kind)


def drive_zoo(tools, cfgs):
    """One JSON line per config: tools/estimate_mem.py's run() (--backend pcdet --frames 0
    --json): exit code, the JSON, a one-line error, or the traceback."""
    import io
    import traceback
    from pcdet_focal.errors import PcdetFocalError
    from pcdet_focal.memory.cli import run
    sys.path.insert(0, str(REPO / 'tools'))
    from estimate_mem import parse_args
    for cfg in cfgs:
        out, t0 = io.StringIO(), time.perf_counter()
        row = {'cfg': cfg}
        try:
            row['code'] = run(parse_args(['--cfg', cfg, '--backend', 'pcdet', '--frames', '0',
                                          '--json']), out=out)
            doc = json.loads(out.getvalue())
            row['not_modelled'] = doc['not_modelled']
            row['peak_bytes'] = (doc['estimate'] or {}).get('peak_bytes')
        except PcdetFocalError as err:
            row['code'], row['error'] = err.exit_code, str(err).splitlines()[0]
        except Exception:     # noqa: BLE001 - a traceback is what this suite counts
            row['traceback'] = traceback.format_exc()[-2000:]
        row['seconds'] = time.perf_counter() - t0
        print(json.dumps(row), flush=True)


def drive_published(tools, rows):
    """One JSON line per (config, batch, target stack): the estimate with the caps laid out as a
    synthetic scan, and the bytes it needs with the margin."""
    from pcdet_focal.config_schema import load_checked
    from pcdet_focal.memory import cuda
    from pcdet_focal.memory.estimator import estimate, prepare
    from pcdet_focal.memory.verdict import needed
    for cfg_file, batch, stack in rows:
        row, t0 = {'cfg': cfg_file, 'batch': batch}, time.perf_counter()
        try:
            cfg = load_checked(cfg_file, [], training=True)
            prep = prepare(cfg, 'pcdet', frames=0)
            e = estimate(cfg, batch_size=batch, prepared=prep, target='cuda',
                         stack=cuda.Stack.parse(stack))
            row.update(peak_bytes=e.peak_bytes, required_bytes=needed(e),
                       not_modelled=e.not_modelled, peak_where=f'{e.peak_phase} of '
                       f'{e.peak_module}', counts=e.voxels.describe())
        except Exception as err:  # noqa: BLE001 - reported per row, judged by the test
            row['error'] = f'{type(err).__name__}: {str(err).splitlines()[0]}'
        row['seconds'] = time.perf_counter() - t0
        print(json.dumps(row), flush=True)


def _driver_main(argv):
    _numpy_aliases()
    mode, tools, spec = argv[0], argv[1], json.loads(argv[2])
    os.chdir(tools)           # OpenPCDet's _BASE_CONFIG_ paths are relative to tools/
    from pcdet_focal.backend import resolve_backend
    from pcdet_focal.registry import register_into_pcdet
    resolve_backend('pcdet')
    register_into_pcdet(verbose=False)
    (drive_zoo if mode == 'zoo' else drive_published)(tools, spec)


def _run_driver(mode, spec, timeout=1500):
    if not PCDET_ROOT:
        pytest.skip('set PCDET_ROOT to an OpenPCDet source tree (commit 8caccce) to run it')
    root = Path(PCDET_ROOT).resolve()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(CPU_OPS), str(root), str(REPO)]))
    probe = subprocess.run([sys.executable, '-c', 'import pcdet.models, pcdet.datasets'],
                           env=env, capture_output=True, text=True, timeout=600)
    if probe.returncode != 0:
        cause = (probe.stderr.strip().splitlines() or ['no output'])[-1]
        pytest.skip(f'OpenPCDet at {root} cannot be imported here: {cause}')
    res = subprocess.run([sys.executable, __file__, mode, str(root / 'tools'), json.dumps(spec)],
                         env=env, capture_output=True, text=True, timeout=timeout)
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith('{')]
    assert res.returncode == 0 and len(rows) == len(spec), res.stderr[-3000:]
    return rows


# ============================================================================ zoo
# Configs that do not end in a full estimate or exit 3 today, each for a reason outside the
# memory rules (see the README's zoo table); the test fails when one of them changes, so the
# list is kept true.
KNOWN_OTHER_ENDINGS = {
    # exit 1, one line each: OpenPCDet's constructors need what an estimate does not have
    # (memory.build turns their exceptions into one ConfigError line)
    'kitti_models/CaDDN.yaml': 'error',          # creates a checkpoints folder beside cwd
    'kitti_models/voxel_rcnn_car_focal_multimodal.yaml': 'error',   # downloads deeplabv3
    'nuscenes_models/bevfusion.yaml': 'error',   # Tensor.item() on a meta tensor
}


def _model_configs(root):
    return sorted(str(p.relative_to(root / 'tools')) for p in
                  (root / 'tools' / 'cfgs').glob('*_models/*.yaml'))


def _ending(row):
    if 'traceback' in row:
        return 'traceback'
    if 'error' in row:
        return 'error'
    if row['code'] == 3 and row['not_modelled'] and row['peak_bytes'] is None:
        return 'not modelled'
    if row['code'] in (0, 2) and row['peak_bytes'] and not row['not_modelled']:
        return 'full'
    return f'exit {row["code"]}'


@pytest.fixture(scope='module')
def zoo():
    root = Path(PCDET_ROOT or '.').resolve()
    return _run_driver('zoo', _model_configs(root) if PCDET_ROOT else [])


def test_zoo_every_config_ends_in_an_estimate_or_names_its_unmodelled_modules(zoo):
    lines = ['| config | ending | peak GiB / modules without a rule | s |', '|---|---|---|---|']
    endings = {}
    for row in zoo:
        name = row['cfg'].replace('cfgs/', '')
        endings[name] = _ending(row)
        what = f'{row["peak_bytes"] / GIB:.2f}' if endings[name] == 'full' else \
            '; '.join(row.get('not_modelled') or []) or row.get('error') or \
            (row.get('traceback') or '').strip().splitlines()[-1]
        lines.append(f'| {name} | {endings[name]} | {what} | {row["seconds"]:.2f} |')
    counts = {k: list(endings.values()).count(k) for k in sorted(set(endings.values()))}
    print('\n'.join(lines) + f'\n{len(zoo)} configs: {counts}')
    assert len(zoo) == 58
    assert {n: e for n, e in endings.items() if e not in ('full', 'not modelled')} == \
        KNOWN_OTHER_ENDINGS
    for row in zoo:
        if _ending(row) == 'not modelled':     # one line naming 'SLOT Class' per module
            assert all(len(m.split(' ', 1)) == 2 for m in row['not_modelled']), row


# ============================================================================ published GPUs
# (config, BATCH_SIZE_PER_GPU, GPU, its memory in GiB, the stack modelled, source). Sources
# and quotes: /work/notes/published_gpus.md (rows 1-24). 11 GiB for the GTX 1080 Ti: OpenPCDet
# issue #3 (sshaoshuai: "1080Ti with 11GB GPU memory ... could support PartA2 with batch_size 4
# for training"). Stacks: OpenPCDet's README times its KITTI models with PyTorch 1.5; torch 1.8 is
# assumed for DSVT. The stack only matters for a conv over 2^31 elements, which none of these
# configs has.
OPENPCDET_KITTI = ('OpenPCDet README.md l.146 @8caccce: "All LiDAR-based models are trained '
                   'with 8 GTX 1080Ti GPUs"')
OPENPCDET_WAYMO = ('OpenPCDet README.md l.168 @8caccce (20% Waymo table): "By default, all models '
                   'are trained with a single frame of 20% data ... on 8 GTX 1080Ti GPUs"')
DSVT = ('Haiyang-W/DSVT README.md l.204 @8cfc2a6: "These results are trained on 8 NVIDIA A100 '
        'GPUs (40GB)." (its table: batch size 3)')
T15, T18 = 'torch1.5.0+cudnn7.6.5', 'torch1.8.0+cudnn8.0.5'
PUBLISHED = [
    ('kitti_models/pointpillar.yaml', 4, 'GTX 1080 Ti', 11, T15, OPENPCDET_KITTI),
    ('kitti_models/second.yaml', 4, 'GTX 1080 Ti', 11, T15, OPENPCDET_KITTI),
    ('kitti_models/second_iou.yaml', 4, 'GTX 1080 Ti', 11, T15, OPENPCDET_KITTI),
    ('kitti_models/pointrcnn.yaml', 2, 'GTX 1080 Ti', 11, T15, OPENPCDET_KITTI),
    ('kitti_models/pointrcnn_iou.yaml', 3, 'GTX 1080 Ti', 11, T15, OPENPCDET_KITTI),
    ('kitti_models/PartA2_free.yaml', 4, 'GTX 1080 Ti', 11, T15, OPENPCDET_KITTI),
    ('kitti_models/PartA2.yaml', 4, 'GTX 1080 Ti', 11, T15, OPENPCDET_KITTI),
    ('kitti_models/pv_rcnn.yaml', 2, 'GTX 1080 Ti', 11, T15, OPENPCDET_KITTI),
    ('kitti_models/voxel_rcnn_car.yaml', 2, 'GTX 1080 Ti', 11, T15, OPENPCDET_KITTI),
    ('waymo_models/second.yaml', 4, 'GTX 1080 Ti', 11, T15, OPENPCDET_WAYMO),
    ('waymo_models/pointpillar_1x.yaml', 2, 'GTX 1080 Ti', 11, T15, OPENPCDET_WAYMO),
    ('waymo_models/centerpoint_dyn_pillar_1x.yaml', 2, 'GTX 1080 Ti', 11, T15, OPENPCDET_WAYMO),
    ('waymo_models/centerpoint_without_resnet.yaml', 4, 'GTX 1080 Ti', 11, T15,
     OPENPCDET_WAYMO),
    ('waymo_models/centerpoint.yaml', 4, 'GTX 1080 Ti', 11, T15, OPENPCDET_WAYMO),
    ('waymo_models/PartA2.yaml', 2, 'GTX 1080 Ti', 11, T15, OPENPCDET_WAYMO),
    ('waymo_models/pv_rcnn.yaml', 2, 'GTX 1080 Ti', 11, T15, OPENPCDET_WAYMO),
    ('waymo_models/pv_rcnn_with_centerhead_rpn.yaml', 2, 'GTX 1080 Ti', 11, T15,
     OPENPCDET_WAYMO),
    ('waymo_models/voxel_rcnn_with_centerhead_dyn_voxel.yaml', 4, 'GTX 1080 Ti', 11, T15,
     OPENPCDET_WAYMO),
    ('waymo_models/pv_rcnn_plusplus.yaml', 2, 'GTX 1080 Ti', 11, T15, OPENPCDET_WAYMO),
    ('waymo_models/pv_rcnn_plusplus_resnet.yaml', 2, 'GTX 1080 Ti', 11, T15, OPENPCDET_WAYMO),
    ('waymo_models/dsvt_voxel.yaml', 3, 'A100 40GB', 40, T18, DSVT),
    ('waymo_models/dsvt_pillar.yaml', 3, 'A100 40GB', 40, T18, DSVT),
]
# Rows without an estimate today (no rule for a module / no voxel grid to build on)
NO_ESTIMATE = {'kitti_models/pointrcnn.yaml', 'kitti_models/pointrcnn_iou.yaml',
               'kitti_models/pv_rcnn.yaml', 'waymo_models/pv_rcnn.yaml',
               'waymo_models/pv_rcnn_with_centerhead_rpn.yaml',
               'waymo_models/pv_rcnn_plusplus.yaml', 'waymo_models/pv_rcnn_plusplus_resnet.yaml'}
# Rows estimated above the GPU they trained on, and why (README: published-GPU table)
OVER = {
    # the cap, 150,000 pillars x 20 point slots per sample, is ~4x what a Waymo frame fills
    'waymo_models/pointpillar_1x.yaml',
}


@pytest.fixture(scope='module')
def published():
    rows = _run_driver('published', [[f'cfgs/{c}', b, s] for c, b, _, _, s, _ in PUBLISHED]
                       if PCDET_ROOT else [])
    return {r['cfg'].replace('cfgs/', ''): r for r in rows}


def test_published_gpu_table(published):
    lines = ['| config | batch/GPU | GPU (GiB) | estimated peak | needed (margin) | fits | '
             'source |', '|---|---|---|---|---|---|---|']
    over, missing = set(), set()
    for cfg, batch, gpu, gib, _, source in PUBLISHED:
        row = published[cfg]
        if row.get('required_bytes') is None:
            missing.add(cfg)
            why = row.get('error') or 'not modelled: ' + '; '.join(row.get('not_modelled', []))
            lines.append(f'| {cfg} | {batch} | {gpu} ({gib}) | - | {why} | - | {source} |')
            continue
        fits = row['required_bytes'] <= gib * GIB
        if not fits:
            over.add(cfg)
        lines.append(f'| {cfg} | {batch} | {gpu} ({gib}) | {row["peak_bytes"] / GIB:.2f} GiB | '
                     f'{row["required_bytes"] / GIB:.2f} GiB | {"yes" if fits else "NO"} | '
                     f'{source} |')
    print('\n'.join(lines))
    assert missing == NO_ESTIMATE
    assert over == OVER


if __name__ == '__main__':
    _driver_main(sys.argv[1:])
