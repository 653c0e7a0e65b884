"""Memory estimator v2: the model comes from the real builder (meta device), counts from real
frames, the CUDA stack decides the large-conv path, suggestions are re-estimated, and the
verdict never claims FITS for an incomplete or unbounded estimate.

References are independent: hand arithmetic (columns buffer, allocator segments), the real
CPU-built model's parameters, the frames' voxel counts read directly from the dataset.
"""
import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from easydict import EasyDict

from pcdet_focal.config import load_config, to_plain
from pcdet_focal.errors import ConfigError
from pcdet_focal.memory import check_fits, estimate, prepare, write_fixed
from pcdet_focal.memory import cuda
from pcdet_focal.memory.suggest import _batch, _dsvt_prefix, z_stride_changes
from pcdet_focal.memory.verdict import ALLOCATOR_SLACK, NCCL_BUFFERS, needed
from pcdet_focal.registry import BACKBONE_2D

from cfg_parts import separate_head_cfg

ROOT = Path(__file__).resolve().parents[1]
GIB = 2 ** 30
USERS = cuda.Stack.parse(cuda.USERS_STACK)


def _data_config(pcr, voxel, max_voxels=16000, max_points=5):
    return {
        'DATASET': 'SyntheticDataset',
        'POINT_CLOUD_RANGE': list(pcr),
        'NUM_FRAMES': {'train': 4, 'test': 2}, 'SEED': {'train': 0, 'test': 1},
        'SCENE': {'NUM_BEAMS': 16, 'NUM_AZIMUTH': 512},
        'POINT_FEATURE_ENCODING': {'encoding_type': 'absolute_coordinates_encoding',
                                   'used_feature_list': ['x', 'y', 'z', 'intensity'],
                                   'src_feature_list': ['x', 'y', 'z', 'intensity']},
        'DATA_PROCESSOR': [
            {'NAME': 'mask_points_and_boxes_outside_range', 'REMOVE_OUTSIDE_BOXES': True},
            {'NAME': 'transform_points_to_voxels', 'VOXEL_SIZE': list(voxel),
             'MAX_POINTS_PER_VOXEL': max_points,
             'MAX_NUMBER_OF_VOXELS': {'train': max_voxels, 'test': max_voxels}}],
    }


CENTER_HEAD = {
    'NAME': 'CenterHead', 'CLASS_AGNOSTIC': False,
    'CLASS_NAMES_EACH_HEAD': [['Car', 'Pedestrian', 'Cyclist']],
    'SHARED_CONV_CHANNEL': 64, 'USE_BIAS_BEFORE_NORM': True, 'NUM_HM_CONV': 2,
    'SEPARATE_HEAD_CFG': separate_head_cfg(),
    'TARGET_ASSIGNER_CONFIG': {'FEATURE_MAP_STRIDE': 1, 'NUM_MAX_OBJS': 500,
                               'GAUSSIAN_OVERLAP': 0.1, 'MIN_RADIUS': 2},
    'LOSS_CONFIG': {'LOSS_WEIGHTS': {'cls_weight': 1.0, 'loc_weight': 0.25,
                                     'code_weights': [1.0] * 8}},
}
OPTIMIZATION = {'BATCH_SIZE_PER_GPU': 1, 'NUM_EPOCHS': 1, 'OPTIMIZER': 'adam_onecycle',
                'LR': 0.003, 'WEIGHT_DECAY': 0.01, 'MOMS': [0.95, 0.85], 'GRAD_NORM_CLIP': 10}


def _cfg(model, data, opt=None, path='test.yaml'):
    cfg = EasyDict({'CLASS_NAMES': ['Car', 'Pedestrian', 'Cyclist'], 'DATA_CONFIG': data,
                    'MODEL': model, 'OPTIMIZATION': dict(opt or OPTIMIZATION)})
    cfg.CFG_FILE = path
    return cfg


def _write(tmp_path, name, cfg):
    path = tmp_path / name
    plain = {k: v for k, v in to_plain(cfg).items() if k not in ('CFG_FILE', 'CFG_SEARCH_DIRS')}
    path.write_text(yaml.safe_dump(plain, sort_keys=False))
    return path


def _shc_config(mode='max', nbf=64):
    """FocalSSTEncoder -> SparseHeightCompression -> BaseBEVBackbone -> CenterHead, small grid."""
    data = _data_config([0, -8, -3, 20, 8, 4], [0.2, 0.2, 0.2], max_voxels=3000)
    model = {
        'NAME': 'FocalCenterPoint', 'VFE': {'NAME': 'MeanVFE'},
        'BACKBONE_3D': {'NAME': 'FocalSSTEncoder', 'NUM_FILTERS': [16, 64]},
        'MAP_TO_BEV': {'NAME': 'SparseHeightCompression', 'MODE': mode,
                       'NUM_BEV_FEATURES': nbf, 'INPUT_FEATURES': 64},
        'BACKBONE_2D': {'NAME': 'BaseBEVBackbone', 'LAYER_NUMS': [1], 'LAYER_STRIDES': [1],
                        'NUM_FILTERS': [64], 'UPSAMPLE_STRIDES': [1],
                        'NUM_UPSAMPLE_FILTERS': [64]},
        'DENSE_HEAD': copy.deepcopy(CENTER_HEAD),
    }
    return _cfg(model, data)


def _shipped(name):
    return load_config(ROOT / 'cfgs' / name)


# ---------------------------------------------------------------------------- the model
def test_parameters_come_from_the_real_modules():
    """The meta build (shape-only spconv twins) has exactly the real CPU model's parameters."""
    from pcdet_focal.builder import build_network
    from pcdet_focal.memory.build import build_model, dataset_stub
    cfg = _shipped('focalsst_dsvt_demo.yaml')
    meta, _ = build_model(cfg)
    real = build_network(cfg.MODEL, 3, dataset_stub(cfg))
    shapes = {k: tuple(v.shape) for k, v in real.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in meta.state_dict().items()} == shapes
    assert all(p.is_meta for p in meta.parameters())
    e = estimate(cfg, frames=0)
    assert e.params == sum(p.numel() for p in real.parameters())
    rows = {r.name: r for r in e.rows}
    assert rows['BACKBONE_2D BaseBEVBackbone'].params == \
        sum(p.numel() for p in real.backbone_2d.parameters())


@BACKBONE_2D.register(name='_NoRuleBackbone')
class NoRule(torch.nn.Module):
    """A BEV backbone without a memory rule (the CLI test imports it via PCDET_FOCAL_PLUGINS)."""

    def __init__(self, model_cfg, input_channels, **kwargs):
        super().__init__()
        self.conv = torch.nn.Conv2d(input_channels, 8, 1)
        self.num_bev_features = 8


def test_a_module_without_a_rule_gives_no_estimate(tmp_path):
    cfg = _shc_config()
    cfg.MODEL.BACKBONE_2D = {'NAME': '_NoRuleBackbone'}
    e = estimate(cfg, frames=0)
    assert e.peak_bytes is None and e.not_modelled == ['BACKBONE_2D NoRule']
    v = check_fits(cfg, vram_gib=80, frames=0)
    assert v.word == 'NOT_MODELLED' and not v.fits and 'NoRule' in v.summary()
    # the CLI: exit 3, one line naming it, JSON estimate null
    path = _write(tmp_path, 'norule.yaml', cfg)
    code, out, _ = _run_tool(['--cfg', path, '--vram', 80, '--frames', 0, '--json'],
                             env={'PCDET_FOCAL_PLUGINS': 'test_estimator'})
    doc = yaml.safe_load(out)
    assert code == 3 and doc['estimate'] is None and doc['not_modelled'] == ['BACKBONE_2D NoRule']


def _run_tool(args, env=None, cwd=None):
    full = dict(os.environ, PYTHONPATH=str(ROOT / 'tests'), **(env or {}))
    proc = subprocess.run([sys.executable, str(ROOT / 'tools' / 'estimate_mem.py'),
                           *map(str, args)], capture_output=True, text=True, timeout=300,
                          env=full, cwd=cwd)
    return proc.returncode, proc.stdout, proc.stderr


# ---------------------------------------------------------------------------- counts
def test_counts_come_from_frames_of_the_configured_dataset():
    from pcdet_focal.data.dataset import build_dataset
    cfg = _shipped('focalsst_dsvt_demo.yaml')
    prep = prepare(cfg, frames=3)
    counts = prep.counts
    dataset = build_dataset(cfg.DATA_CONFIG, cfg.CLASS_NAMES, training=True)
    sizes = []
    for i in counts.indices:            # the reference: the dataset's own items, same seeds
        np.random.seed(i)
        sizes.append(len(dataset[i]['voxel_coords']))
    assert len(counts.frames) == 3 and counts.per_sample == max(sizes)
    assert counts.median == sorted(sizes)[1]
    assert 'densest of 3 frames' in counts.source
    e = estimate(cfg, prepared=prep)
    assert any('a frame denser than the densest of the 3 seen' in n for n in e.notes)
    capped = estimate(cfg, frames=0)
    assert capped.voxels.per_sample == 16000 and capped.peak_bytes > e.peak_bytes


def test_counts_from_real_kitti_frames(kitti_mini):
    cfg = _shipped('focalsst_dsvt.yaml')
    prep = prepare(cfg, frames=4)
    assert prep.counts.per_sample > 0      # (the synthetic default: switch to KITTI below)
    from pcdet_focal.config_schema import load_checked
    kitti = load_checked(ROOT / 'cfgs' / 'focalsst_dsvt.yaml',
                         ['DATA_CONFIG.DATASET', 'KittiDataset', 'DATA_CONFIG.DATA_PATH',
                          str(kitti_mini)])
    counts = prepare(kitti, frames=4).counts
    assert 'densest of 3 frames' in counts.source     # kitti_mini's train split: 3 frames
    assert 10_000 < counts.per_sample < 32_000        # real scans at this grid: ~20k voxels


def test_data_not_on_disk_falls_back_to_the_caps(tmp_path):
    from pcdet_focal.config_schema import load_checked
    cfg = load_checked(ROOT / 'cfgs' / 'focalsst_dsvt_demo.yaml',
                       ['DATA_CONFIG.DATASET', 'KittiDataset', 'DATA_CONFIG.DATA_PATH',
                        str(tmp_path / 'absent')])
    counts = prepare(cfg).counts
    assert counts.data_frames == [] and counts.per_sample == 16000
    assert "MAX_NUMBER_OF_VOXELS['train']" in counts.source and 'could not be read' in \
        counts.source
    assert counts.synthetic and 'synthetic street scan' in counts.describe()


def _columns_per_voxel(cells):
    return len(np.unique(cells[:, 1] * 100_000 + cells[:, 2])) / len(cells)


def test_without_frames_the_caps_sit_like_a_lidar_scan(kitti_mini):
    """The cap's voxels are laid out as a synthetic street scan: exactly the cap, distinct,
    inside the grid, and as clustered as real KITTI frames at the same grid (occupied BEV
    columns per voxel), far from voxels spread uniformly (which the estimator used to assume)."""
    from pcdet_focal.data.processor import voxel_geometry
    from pcdet_focal.memory.counts import _voxel_cells, from_caps
    geom = voxel_geometry(_shipped('focalsst_dsvt.yaml').DATA_CONFIG)
    counts = from_caps(geom)
    cells = counts.frames[0]
    assert counts.per_sample == len(cells) == 32_000 == len(np.unique(cells, axis=0))
    assert (cells >= 0).all() and (cells < np.array(geom.grid_size[::-1])).all()
    real = [_columns_per_voxel(_voxel_cells(
        np.fromfile(f, np.float32).reshape(-1, 4).astype(np.float64), geom))
        for f in sorted((kitti_mini / 'training' / 'velodyne').glob('*.bin'))]
    nx, ny, _ = geom.grid_size
    uniform = nx * ny * -np.expm1(32_000 * np.log1p(-1 / (nx * ny))) / 32_000
    assert 0.8 * min(real) <= _columns_per_voxel(cells) <= max(real) < uniform / 1.5


def test_an_unbounded_count_never_fits():
    cfg = _shipped('focalsst_dsvt_demo.yaml')
    cfg.MODEL.BACKBONE_3D.FOCAL_ENCODER.MAX_NEW_VOXELS_RATIO = None
    e = estimate(cfg, frames=2)
    assert not e.bounded and e.unbounded[0][0].endswith('FOCAL_ENCODER.MAX_NEW_VOXELS_RATIO')
    v = check_fits(cfg, vram_gib=1000, frames=2)
    assert v.word == 'UNBOUNDED' and not v.fits
    assert 'MAX_NEW_VOXELS_RATIO' in v.summary()


# ---------------------------------------------------------------------------- the CUDA stack
@pytest.mark.parametrize('stack, native', [
    ('torch2.3.0+cudnn8.9.2', True),     # the users' report
    ('torch2.4.1+cudnn9.3.0', True),     # torch <= 2.4 never asks cuDNN
    ('torch2.6.0', True),                # its wheel's cuDNN 9.1 < 9.3
    ('torch2.5.0+cudnn9.3.0', False),
    ('torch2.7.0', False),               # wheel cuDNN 9.5.1
])
def test_large_conv_path_follows_the_stack(stack, native):
    s = cuda.Stack.parse(stack)
    cols = s.conv_columns_bytes(22400, 9, 200, 500, 4, 22400 * 202 * 502, 128 * 200 * 500,
                                'cuda')
    assert cols == (22400 * 9 * 200 * 500 * 4 if native else 0)
    # below 2^31 elements per sample cuDNN always runs it
    assert s.conv_columns_bytes(128, 9, 200, 500, 4, 128 * 200 * 500, 128 * 200 * 500,
                                'cuda') == 0


def test_bad_stack_is_one_line():
    with pytest.raises(ConfigError, match='name a stack as torchX.Y.Z'):
        cuda.Stack.parse('pytorch-latest')


def test_seed_config_rejected_on_the_users_stack():
    cfg = _shipped('focalsst_dsvt_dense_hc.yaml')
    e = estimate(cfg, frames=2, stack=USERS)
    cols = 22400 * 9 * 200 * 500 * 4           # unfolded input of Conv2d(22400, 128, 3)
    assert e.flattened_bev_channels == 22400 and e.transient_bytes == cols
    assert f'{cols / GIB:.2f}' == '75.10' and 'BACKBONE_2D' in e.transient_module
    for vram in (24, 80):
        v = check_fits(cfg, vram_gib=vram, frames=2, stack=USERS)
        assert v.word == 'REJECT' and '75.10 GiB' in v.summary()
    # on a stack that runs it in cuDNN the columns disappear, the densified volume stays
    recent = estimate(cfg, frames=2, stack=cuda.Stack.parse('torch2.7.0'))
    assert recent.transient_bytes < cols and recent.peak_bytes < e.peak_bytes - 60 * GIB


def test_fixed_config_fits_24_gib():
    cfg = _shipped('focalsst_dsvt.yaml')
    v = check_fits(cfg, vram_gib=24, frames=2)
    assert v.word == 'FITS' and v.max_batch_size >= 1
    nxt = check_fits(cfg, batch_size=v.max_batch_size + 1, vram_gib=24, frames=2,
                     suggest=False)
    assert not nxt.fits       # the search is exact on the estimate


def test_allocator_simulation_by_hand():
    mib = 2 ** 20
    events = [('alloc', 'a', 3 * mib),     # 1-10 MiB: a new 20 MiB segment
              ('alloc', 'b', 5 * mib),     # split from its free 17 MiB: 12 MiB stay free
              ('alloc', 'c', 14 * mib),    # no free block fits: its own 14 MiB segment
              ('free', 'c'), ('alloc', 'd', 13 * mib),   # best fit: c's block, 34 MiB stay
              ('alloc', 'e', 12 * mib)]    # the 12 MiB left of the first segment
    assert cuda.reserved_peak(events) == (34 * mib, True)
    assert cuda.reserved_peak(events, capacity=25 * mib) == (34 * mib, False)
    # cached empty segments are released before an allocation fails (as PyTorch does)
    events = [('alloc', 'a', 12 * mib), ('free', 'a'), ('alloc', 'b', 14 * mib)]
    assert cuda.reserved_peak(events, capacity=20 * mib) == (14 * mib, True)
    assert cuda.round_block(1) == 512 and cuda.round_block(513) == 1024


# ---------------------------------------------------------------------------- suggestions
def test_every_suggestion_is_reestimated_and_fits(tmp_path):
    cfg = _shipped('focalsst_dsvt_dense_hc.yaml')
    v = check_fits(cfg, vram_gib=24, frames=2, stack=USERS)
    assert v.word == 'REJECT' and v.suggestions
    for s in v.suggestions:
        again = estimate(s.cfg, batch_size=s.batch_size, amp=s.amp, frames=2, stack=USERS)
        assert again.peak_bytes == s.peak_bytes and s.required_bytes <= 24 * GIB
    kinds = {s.kind for s in v.suggestions}
    assert 'map_to_bev' in kinds and 'dsvt_z_stride' in kinds
    titles = ' '.join(s.title for s in v.suggestions)
    assert '128 BEV channels instead of 22400' in titles


def test_no_accumulation_or_input_downsample_suggested_where_the_host_ignores_them():
    cfg = _shipped('focalsst_dsvt.yaml')
    prep = prepare(cfg, frames=0)
    e = estimate(cfg, batch_size=8, prepared=prep)
    calls = []

    def trial(kind, title, changes, batch_size=None, amp=None):
        calls.append(changes)
    prep.host = 'pcdet'
    _batch(trial, e, 2, prep.host)
    assert calls == [{'OPTIMIZATION.BATCH_SIZE_PER_GPU': 2}]
    prep.host = 'standalone'
    _batch(trial, e, 2, prep.host)
    assert calls[-1]['OPTIMIZATION.ACCUMULATION_STEPS'] == 4
    # input_downsample only for our DSVT (OpenPCDet's ignores the key)
    assert _dsvt_prefix(prep.model) == 'MODEL.BACKBONE_3D.DSVT'
    prep.model.backbone_3d.dsvt = torch.nn.Identity()
    assert _dsvt_prefix(prep.model) is None


def test_z_stride_changes_keep_the_config_consistent():
    cfg = _shipped('focalsst_dsvt_dense_hc.yaml')
    changes, d_old, d_new = z_stride_changes(cfg, 'MODEL.BACKBONE_3D.DSVT', 4)
    assert (d_old, d_new) == (175, 44)              # ceil(175 / 4)
    il = changes['MODEL.BACKBONE_3D.DSVT.INPUT_LAYER']
    assert il['input_downsample'] == [1, 1, 4] and il['window_shape'][0][2] == 44
    assert changes['MODEL.MAP_TO_BEV.NUM_BEV_FEATURES'] == 128 * 44


def test_write_fixed_is_a_small_config_over_the_original(tmp_path):
    cfg = _shipped('focalsst_dsvt_dense_hc.yaml')
    v = check_fits(cfg, vram_gib=24, frames=0, stack=USERS)
    out = tmp_path / 'sub' / 'fixed.yaml'
    out.parent.mkdir()
    s = write_fixed(v, out)
    text = out.read_text()
    doc = yaml.safe_load(text)
    assert not os.path.isabs(doc['_BASE_CONFIG_']) and 'CFG_SEARCH_DIRS' not in text
    assert 'CFG_FILE' not in text and 'DATA_PATH' not in text
    # loads from any folder (the base resolves against the file), and fits
    code, out_text, _ = _run_tool(['--cfg', out, '--vram', 24, '--frames', 0,
                                   '--target', cuda.USERS_STACK], cwd='/')
    assert code == 0, out_text
    fixed = load_config(out)
    assert fixed.MODEL.MAP_TO_BEV.NAME == s.cfg.MODEL.MAP_TO_BEV.NAME


# ---------------------------------------------------------------------------- the rest
def test_peak_grows_with_batch_and_amp_and_ddp_add_up():
    cfg = _shipped('focalsst_dsvt.yaml')
    prep = prepare(cfg, frames=0)
    p1, p2 = (estimate(cfg, batch_size=b, prepared=prep).peak_bytes for b in (1, 2))
    # activations double, parameters / gradients / optimizer state do not
    assert p1 < p2 < 2 * p1
    assert estimate(cfg, batch_size=1, amp=True, prepared=prep).peak_bytes < p1
    ddp = estimate(cfg, batch_size=1, world_size=4, prepared=prep)
    assert ddp.ddp_bytes == ddp.param_bytes and ddp.peak_bytes == p1 + ddp.param_bytes
    # NCCL's buffers live outside the allocator: added to what the card must hold, not the peak
    single = estimate(cfg, batch_size=1, prepared=prep)
    extra = needed(ddp) - needed(single)
    assert abs(extra - (ddp.param_bytes * (1 + ALLOCATOR_SLACK) + NCCL_BUFFERS)) <= 2


@pytest.mark.parametrize('batch', [0, -1, 1.5, True])
def test_bad_batch_size(batch):
    with pytest.raises(ConfigError, match='batch size must be a positive integer'):
        estimate(_shc_config(), batch_size=batch, frames=0)


def test_invalid_module_config_names_both_fields():
    with pytest.raises(ConfigError) as err:
        estimate(_shc_config('max', nbf=32), frames=0)
    msg = str(err.value)
    assert 'NUM_BEV_FEATURES=32' in msg and 'MODE=max' in msg and 'C=64' in msg
    estimate(_shc_config('learned', nbf=32), frames=0)   # learned may change the width


def test_height_compression_channel_mismatch():
    cfg = _shc_config()
    cfg.MODEL.MAP_TO_BEV = EasyDict({'NAME': 'HeightCompression', 'NUM_BEV_FEATURES': 64})
    # 7 m / 0.2 = 35 height bins x 64 channels
    with pytest.raises(ConfigError, match=r'C\*D = 64\*35 = 2240'):
        estimate(cfg, frames=0)


def test_amp_measure_on_cpu_is_refused(tmp_path):
    if torch.cuda.is_available():
        pytest.skip('a CUDA device measures AMP for real')
    path = _write(tmp_path, 'small.yaml', _shc_config())
    code, _, err = _run_tool(['--cfg', path, '--amp', '--measure'])
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and '--amp --measure needs a CUDA device' in lines[0]


def test_trained_focal_growth_from_a_checkpoint(tmp_path):
    """--ckpt: growth measured with the checkpoint's importance head. A head that marks
    nothing important adds no voxel; one that marks everything adds what the cap allows (the
    reference: distinct empty in-grid neighbour cells, counted with numpy)."""
    from pcdet_focal.builder import build_network
    from pcdet_focal.data.dataset import build_dataset
    from pcdet_focal.engine.checkpoint import build_checkpoint, save_checkpoint
    from pcdet_focal.memory.build import dataset_stub
    from pcdet_focal.memory.counts import trained_focal_growth
    cfg = _shipped('focalsst_dsvt_demo.yaml')
    prep = prepare(cfg, frames=2)

    def ds(data_cfg, names):
        return build_dataset(data_cfg, names, training=True)

    def growth(bias):
        model = build_network(cfg.MODEL, 3, dataset_stub(cfg))
        for blk in model.backbone_3d.focal_encoder.blocks:
            blk.conv_imp.weight.data.zero_()
            blk.imp_bias.data.fill_(bias)
        path = tmp_path / f'bias{bias}.pth'
        save_checkpoint(build_checkpoint(model), path)
        return trained_focal_growth(cfg, prep.counts, path, 'standalone', ds)

    quiet = growth(-20.0)
    assert [[(m, s) for _, m, s in frames] for frames in quiet] == [[(0, 0), (0, 0)]]
    busy = growth(20.0)
    d, h, w = 16, 128, 128
    for frame, (union, m, s) in zip(prep.counts.frames, busy[0]):
        cells = {tuple(v) for v in frame.tolist()}
        empty = set()
        for z, y, x in cells:
            for dz in (-1, 0, 1):
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        c = (z + dz, y + dy, x + dx)
                        if 0 <= c[0] < d and 0 <= c[1] < h and 0 <= c[2] < w and c not in cells:
                            empty.add(c)
        assert m == min(len(frame), len(empty))       # MAX_NEW_VOXELS_RATIO 1.0
        assert len(union) == len(frame) + m
    worst = estimate(cfg, prepared=prep)
    none = estimate(cfg, prepared=prep, observed={'focal_frames': quiet})
    assert none.peak_bytes < worst.peak_bytes
    assert any('trained importance head' in line for line in none.geometry)


def test_counts_cached_across_replays_follow_size_and_grid_without_frames():
    """The cache of data-dependent counts is shared by the replays of one config (suggestions
    change the grid, batch sizes the voxel count): without frames its key must follow them."""
    from pcdet_focal.memory.flow import Flow, Sparse
    shared = {}
    small = Sparse(t=None, n=2000, c=16, spatial=(40, 400, 400))
    dense = Sparse(t=None, n=20000, c=16, spatial=(10, 50, 50))
    first = Flow(batch_size=1, counts=None, target='cpu', cache=shared)
    fresh = Flow(batch_size=1, counts=None, target='cpu')
    assert first.hot_pairs(small, 3) == fresh.hot_pairs(small, 3)
    again = Flow(batch_size=1, counts=None, target='cpu', cache=shared)
    assert again.hot_pairs(dense, 3) == Flow(batch_size=1, counts=None,
                                             target='cpu').hot_pairs(dense, 3) > 1000
