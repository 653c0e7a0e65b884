"""Memory estimator: geometry, acceptance on the shipped configs, OpenPCDet-style configs,
suggestions and the library API. No torch / GPU needed (the estimate path never imports them).

References are computed independently in the tests (shape arithmetic, parameter formulas).
"""
import copy
import time
from pathlib import Path

import pytest
import yaml
from easydict import EasyDict

from pcdet_focal.config import load_config, to_plain
from pcdet_focal.errors import ConfigError
from pcdet_focal.memory import check_fits, estimate, write_fixed
from pcdet_focal.memory.dsvt_geometry import dsvt_stages
from pcdet_focal.memory.suggest import z_stride_changes

from cfg_parts import separate_head_cfg

ROOT = Path(__file__).resolve().parents[1]
GIB = 2 ** 30


def _data_config(pcr, voxel, max_voxels=16000, max_points=5):
    return {
        'DATASET': 'SyntheticDataset',
        'POINT_CLOUD_RANGE': list(pcr),
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


# ---------------------------------------------------------------------------- geometry
def test_grid_and_dsvt_stage_shapes():
    data = _data_config([0, -40, -3, 70.4, 40, 1], [0.05, 0.05, 0.1])
    model = {'NAME': 'SECONDNet', 'VFE': {'NAME': 'MeanVFE'}}
    e = estimate(_cfg(model, data), batch_size=1, voxels=100)
    # 70.4 / 0.05 = 1408, 80 / 0.05 = 1600, 4 / 0.1 = 40
    assert 'voxel grid 1408 x 1600 x 40' in e.geometry[0]
    # DSVT: ceil division at every stage, x, y, z order
    st = dsvt_stages({'INPUT_LAYER': {'sparse_shape': [500, 200, 175], 'input_downsample':
                                      [1, 1, 4], 'downsample_stride': [[2, 2, 3]],
                                      'd_model': [8, 8]}})
    assert st['shapes'] == [[500, 200, 44], [250, 100, 15]]
    assert st['strides'] == [[1, 1, 4], [2, 2, 12]]


@pytest.mark.parametrize('mutate, needle', [
    (lambda c: c.DATA_CONFIG.pop('POINT_CLOUD_RANGE'), 'POINT_CLOUD_RANGE is missing'),
    (lambda c: c.DATA_CONFIG.DATA_PROCESSOR[1].pop('VOXEL_SIZE'), 'VOXEL_SIZE is missing'),
    (lambda c: c.DATA_CONFIG.DATA_PROCESSOR[1].__setitem__('VOXEL_SIZE', [0.3, 0.2, 0.2]),
     'does not divide evenly along x'),
    (lambda c: c.DATA_CONFIG.__setitem__('POINT_CLOUD_RANGE', [0, 0, 0, 10, 10]),
     'POINT_CLOUD_RANGE must be a list of 6 numbers'),
])
def test_geometry_errors_name_the_field(mutate, needle):
    cfg = _cfg({'NAME': 'X', 'VFE': {'NAME': 'MeanVFE'}},
               EasyDict(_data_config([0, -10, -2, 20, 10, 2], [0.2, 0.2, 0.2])))
    mutate(cfg)
    with pytest.raises(ConfigError, match=needle):
        estimate(cfg)


@pytest.mark.parametrize('batch', [0, -1, 1.5, True])
def test_bad_batch_size(batch):
    cfg = _cfg({'NAME': 'X', 'VFE': {'NAME': 'MeanVFE'}},
               _data_config([0, -10, -2, 20, 10, 2], [0.2, 0.2, 0.2]))
    with pytest.raises(ConfigError, match='batch size must be a positive integer'):
        estimate(cfg, batch_size=batch)


# ---------------------------------------------------------------------------- acceptance
def test_dense_hc_config_is_rejected_with_the_im2col_transient():
    cfg = load_config(ROOT / 'cfgs' / 'focalsst_dsvt_dense_hc.yaml')
    e = estimate(cfg)
    c, d, h, w = 128, 175, 200, 500              # users' numbers (problem.md)
    assert e.flattened_bev_channels == c * d == 22400
    cols = 22400 * 9 * h * w * 4                 # unfolded input of Conv2d(22400, 128, 3)
    assert e.transient_bytes == cols
    assert f'{cols / GIB:.2f}' == '75.10'
    assert '22400' in e.transient_label and 'BACKBONE_2D' in e.transient_module
    assert any('22400 flattened BEV channels' in line for line in e.geometry)
    for vram in (24, 80):
        v = check_fits(cfg, vram_gib=vram)
        assert not v.fits and v.has_budget
        assert 'REJECT' in v.summary()
    v = check_fits(cfg, vram_gib=24)
    shc = [s for s in v.suggestions if s.kind == 'map_to_bev']
    assert {s.cfg.MODEL.MAP_TO_BEV.MODE for s in shc} == {'max', 'mean', 'learned'}
    fitting = [s for s in shc if s.fits]
    assert fitting and all(s.peak_bytes < 24 * GIB for s in fitting)
    assert v.top_suggestion is not None and v.top_suggestion.fits


def test_fixed_config_fits_24_gib_with_max_batch():
    cfg = load_config(ROOT / 'cfgs' / 'focalsst_dsvt.yaml')
    v = check_fits(cfg, batch_size=1, vram_gib=24)
    assert v.fits
    assert v.max_batch_size >= 1
    assert f'largest batch that fits: {v.max_batch_size}' in v.summary()
    # the batch after the largest must not fit (the search is exact on the estimate)
    nxt = check_fits(cfg, batch_size=v.max_batch_size + 1, vram_gib=24, suggest=False)
    assert not nxt.fits


def _model_configs():
    files = sorted((ROOT / 'cfgs').glob('*.yaml')) + sorted((ROOT / 'cfgs' / 'openpcdet')
                                                            .glob('*.yaml'))
    return [f for f in files if 'MODEL' in (yaml.safe_load(f.read_text()) or {})]


@pytest.mark.parametrize('path', _model_configs(), ids=lambda p: p.name)
def test_every_shipped_config_estimates_fast(path):
    cfg = load_config(path)
    t0 = time.perf_counter()
    e = estimate(cfg)
    assert time.perf_counter() - t0 < 2.0
    assert e.peak_bytes > e.param_bytes > 0
    assert not e.not_modelled, e.not_modelled


# ---------------------------------------------------------------------------- OpenPCDet
def _second_like():
    data = _data_config([0, -40, -3, 70.4, 40, 1], [0.05, 0.05, 0.1])
    model = {
        'NAME': 'SECONDNet', 'VFE': {'NAME': 'MeanVFE'},
        'BACKBONE_3D': {'NAME': 'VoxelBackBone8x'},
        'MAP_TO_BEV': {'NAME': 'HeightCompression', 'NUM_BEV_FEATURES': 256},
        'BACKBONE_2D': {'NAME': 'BaseBEVBackbone', 'LAYER_NUMS': [5, 5], 'LAYER_STRIDES': [1, 2],
                        'NUM_FILTERS': [128, 256], 'UPSAMPLE_STRIDES': [1, 2],
                        'NUM_UPSAMPLE_FILTERS': [256, 256]},
        'DENSE_HEAD': {
            'NAME': 'AnchorHeadSingle', 'CLASS_AGNOSTIC': False, 'USE_DIRECTION_CLASSIFIER': True,
            'DIR_OFFSET': 0.78539, 'DIR_LIMIT_OFFSET': 0.0, 'NUM_DIR_BINS': 2,
            'ANCHOR_GENERATOR_CONFIG': [
                {'class_name': n, 'anchor_sizes': [s], 'anchor_rotations': [0, 1.57],
                 'anchor_bottom_heights': [-1.0], 'align_center': False,
                 'feature_map_stride': 8, 'matched_threshold': 0.6, 'unmatched_threshold': 0.45}
                for n, s in (('Car', [3.9, 1.6, 1.56]), ('Pedestrian', [0.8, 0.6, 1.73]),
                             ('Cyclist', [1.76, 0.6, 1.73]))],
            'TARGET_ASSIGNER_CONFIG': {'NAME': 'AxisAlignedTargetAssigner', 'POS_FRACTION': -1.0,
                                       'SAMPLE_SIZE': 512, 'NORM_BY_NUM_EXAMPLES': False,
                                       'MATCH_HEIGHT': False, 'BOX_CODER': 'ResidualCoder'},
            'LOSS_CONFIG': {'LOSS_WEIGHTS': {'cls_weight': 1.0, 'loc_weight': 2.0,
                                             'dir_weight': 0.2, 'code_weights': [1.0] * 7}}},
        'POST_PROCESSING': {'RECALL_THRESH_LIST': [0.3, 0.5, 0.7], 'EVAL_METRIC': 'kitti'},
    }
    return _cfg(model, data, dict(OPTIMIZATION, BATCH_SIZE_PER_GPU=4))


def test_second_like_openpcdet_config(tmp_path):
    cfg = load_config(_write(tmp_path, 'second.yaml', _second_like()))
    e = estimate(cfg)
    assert not e.lower_bound
    # VoxelBackBone8x parameters, counted by hand from OpenPCDet's layer list
    k = 27

    def block(cin, cout, kv=k):
        return kv * cin * cout + 2 * cout          # conv (no bias) + BN weight/bias

    spconv_params = (block(4, 16) + block(16, 16) + block(16, 32) + 2 * block(32, 32)
                     + block(32, 64) + 2 * block(64, 64) + block(64, 64) + 2 * block(64, 64)
                     + block(64, 128, kv=3))
    rows = {r.name: r for r in e.rows}
    assert rows['BACKBONE_3D VoxelBackBone8x'].params == spconv_params
    # BaseBEVBackbone: 3x3 convs + BNs + deconvs (k = stride) + BNs
    bev = (9 * 256 * 128 + 2 * 128 + 5 * (9 * 128 * 128 + 2 * 128)
           + 9 * 128 * 256 + 2 * 256 + 5 * (9 * 256 * 256 + 2 * 256)
           + 1 * 128 * 256 + 2 * 256 + 4 * 256 * 256 + 2 * 256)
    assert rows['BACKBONE_2D BaseBEVBackbone'].params == bev
    # spconv sparse shape grid[::-1] + [1, 0, 0]; output z = (41 - 3) // 2 + 1... after 3
    # stride-2 convs: 41 -> 21 -> 11 -> 5 (no z padding in conv4) -> conv_out (3, s2) -> 2
    assert e.flattened_bev_channels == 128 * 2
    assert any('[2, 200, 176]' in line for line in e.geometry)


def test_unmodelled_modules_give_a_lower_bound_not_a_traceback(tmp_path):
    """OpenPCDet's DSVT pillar config: DynamicPillarVFE is not modelled."""
    data = _data_config([-74.88, -74.88, -2, 74.88, 74.88, 4.0], [0.32, 0.32, 6])
    data['DATA_PROCESSOR'][1] = {'NAME': 'transform_points_to_voxels_placeholder',
                                 'VOXEL_SIZE': [0.32, 0.32, 6]}
    head = copy.deepcopy(CENTER_HEAD)
    head['SEPARATE_HEAD_CFG']['HEAD_DICT']['iou'] = {'out_channels': 1, 'num_conv': 2}
    model = {
        'NAME': 'CenterPoint',
        'VFE': {'NAME': 'DynamicPillarVFE3D', 'NUM_FILTERS': [192, 192]},
        'BACKBONE_3D': {
            'NAME': 'DSVT',
            'INPUT_LAYER': {'sparse_shape': [468, 468, 1], 'downsample_stride': [],
                            'd_model': [192], 'set_info': [[36, 4]],
                            'window_shape': [[12, 12, 1]], 'hybrid_factor': [2, 2, 1],
                            'shifts_list': [[[0, 0, 0], [6, 6, 0]]], 'normalize_pos': False},
            'block_name': ['DSVTBlock'], 'set_info': [[36, 4]], 'd_model': [192],
            'nhead': [8], 'dim_feedforward': [384], 'dropout': 0.0, 'activation': 'gelu',
            'output_shape': [468, 468], 'conv_out_channel': 192, 'USE_CHECKPOINT': True},
        'MAP_TO_BEV': {'NAME': 'PointPillarScatter3d', 'INPUT_SHAPE': [468, 468, 1],
                       'NUM_BEV_FEATURES': 192},
        'BACKBONE_2D': {'NAME': 'BaseBEVResBackbone', 'LAYER_NUMS': [1, 2, 2],
                        'LAYER_STRIDES': [1, 2, 2], 'NUM_FILTERS': [128, 128, 256],
                        'UPSAMPLE_STRIDES': [1, 2, 4], 'NUM_UPSAMPLE_FILTERS': [128, 128, 128]},
        'DENSE_HEAD': head,
    }
    cfg = load_config(_write(tmp_path, 'dsvt_pillar.yaml', _cfg(model, data)))
    e = estimate(cfg)
    assert e.lower_bound and e.not_modelled == ['VFE DynamicPillarVFE3D']
    assert any('DSVT' in r.name and r.modelled and r.params > 0 for r in e.rows)
    assert e.flattened_bev_channels == 192
    v = check_fits(cfg, vram_gib=80)
    assert 'lower bound' in v.summary()


def test_unknown_module_names_in_every_slot(tmp_path):
    data = _data_config([0, -10, -2, 20, 10, 2], [0.1, 0.1, 0.2])
    model = {'NAME': 'Mystery', 'VFE': {'NAME': 'PillarVFE', 'NUM_FILTERS': [64]},
             'BACKBONE_3D': {'NAME': 'Whatever3D'},
             'MAP_TO_BEV': {'NAME': 'PointPillarScatter', 'NUM_BEV_FEATURES': 64},
             'BACKBONE_2D': {'NAME': 'Fancy2D', 'NUM_FILTERS': [64, 128]},
             'DENSE_HEAD': {'NAME': 'FancyHead'}}
    e = estimate(_cfg(model, data), batch_size=2)
    names = ' '.join(e.not_modelled)
    for n in ('PillarVFE', 'Whatever3D', 'Fancy2D', 'FancyHead'):
        assert n in names
    assert e.peak_bytes > 0


# ---------------------------------------------------------------------------- configs
def _shc_config(mode='max', nbf=64):
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


def test_invalid_module_config_names_both_fields():
    with pytest.raises(ConfigError) as err:
        estimate(_shc_config('max', nbf=32))
    msg = str(err.value)
    assert 'NUM_BEV_FEATURES=32' in msg and 'MODE=max' in msg and 'C=64' in msg
    estimate(_shc_config('learned', nbf=32))   # learned may change the width


def test_height_compression_channel_mismatch():
    cfg = _shc_config()
    cfg.MODEL.MAP_TO_BEV = EasyDict({'NAME': 'HeightCompression', 'NUM_BEV_FEATURES': 64})
    # 7 m / 0.2 = 35 height bins x 64 channels
    with pytest.raises(ConfigError, match='C\\*D = 64\\*35 = 2240'):
        estimate(cfg)


def test_im2col_cliff_starts_at_2_pow_31_elements():
    """A BEV conv input of C*H*W elements per sample: no columns buffer below 2^31."""
    def conv_transient(h, w, c=128, d=175):
        cfg = _shc_config()
        cfg.DATA_CONFIG.POINT_CLOUD_RANGE = [0, 0, 0, w * 0.2, h * 0.2, d * 0.04]
        cfg.DATA_CONFIG.DATA_PROCESSOR[1].VOXEL_SIZE = [0.2, 0.2, 0.04]
        cfg.MODEL.BACKBONE_3D.NUM_FILTERS = [16, c]
        cfg.MODEL.MAP_TO_BEV = EasyDict({'NAME': 'HeightCompression', 'NUM_BEV_FEATURES': c * d})
        e = estimate(cfg, voxels=1000)
        return e, [r for r in e.rows if r.name.startswith('BACKBONE_2D')][0]

    # the conv reads the ZeroPad2d(1) output: 22400 * 202 * (470 + 2) = 2,135,705,600 < 2^31 - 1
    # but 22400 * 202 * (480 + 2) = 2,180,953,600 > 2^31 - 1
    _, below = conv_transient(200, 470)
    assert 'im2col' not in below.transient_label
    _, above = conv_transient(200, 480)
    assert above.transient == 22400 * 9 * 200 * 480 * 4


# ---------------------------------------------------------------------------- suggestions
def test_z_stride_changes_keep_the_config_consistent():
    cfg = load_config(ROOT / 'cfgs' / 'focalsst_dsvt_dense_hc.yaml')
    changes, d_old, d_new = z_stride_changes(cfg, 4)
    assert (d_old, d_new) == (175, 44)              # ceil(175 / 4)
    il = changes['MODEL.BACKBONE_3D.DSVT.INPUT_LAYER']
    assert il['input_downsample'] == [1, 1, 4]
    assert il['window_shape'][0][2] == 44           # the whole-height window follows
    assert changes['MODEL.MAP_TO_BEV.NUM_BEV_FEATURES'] == 128 * 44


def test_write_fixed_config_loads_and_fits(tmp_path):
    cfg = load_config(ROOT / 'cfgs' / 'focalsst_dsvt_dense_hc.yaml')
    v = check_fits(cfg, vram_gib=24)
    out = tmp_path / 'fixed.yaml'
    s = write_fixed(v, out)
    fixed = load_config(out)
    assert '_BASE_CONFIG_' not in out.read_text()
    assert fixed.MODEL.MAP_TO_BEV.NAME == s.cfg.MODEL.MAP_TO_BEV.NAME
    assert check_fits(fixed, vram_gib=24).fits


def test_batch_suggestion_keeps_the_effective_batch():
    cfg = load_config(ROOT / 'cfgs' / 'focalsst_dsvt.yaml')
    one = estimate(cfg, batch_size=1).peak_bytes
    v = check_fits(cfg, batch_size=8, vram_gib=one * 3.2 / GIB)
    assert not v.fits
    s = [x for x in v.suggestions if x.kind == 'batch_size'][0]
    b = s.changes['OPTIMIZATION.BATCH_SIZE_PER_GPU']
    assert s.fits and 1 <= b < 8 and b == v.max_batch_size
    assert b * s.changes['OPTIMIZATION.ACCUMULATION_STEPS'] >= 8


def test_no_budget_means_estimate_only():
    v = check_fits(_shc_config(), vram_gib=None, target='cuda')
    if v.has_budget:      # a CUDA machine: judged against its card
        pytest.skip('a CUDA device is present')
    assert v.fits and v.max_batch_size is None
    assert v.summary().startswith('ESTIMATE ONLY')


def test_peak_grows_with_batch_and_amp_saves_memory():
    cfg = load_config(ROOT / 'cfgs' / 'focalsst_dsvt.yaml')
    p1, p2 = (estimate(cfg, batch_size=b).peak_bytes for b in (1, 2))
    # activations double, parameters / gradients / optimizer state do not
    assert p1 < p2 < 2 * p1
    assert estimate(cfg, batch_size=1, amp=True).peak_bytes < p1


def test_data_counts_from_the_configured_dataset():
    """--data N: the estimate takes the largest voxel count of N real frames."""
    from pcdet_focal.memory.voxels import count_dataset_voxels
    cfg = load_config(ROOT / 'cfgs' / 'focalsst_dsvt_demo.yaml')
    stats = count_dataset_voxels(cfg, 2)
    cap = cfg.DATA_CONFIG.DATA_PROCESSOR[-1].MAX_NUMBER_OF_VOXELS['train']
    assert stats['frames'] == 2 and 0 < stats['mean'] <= stats['max'] <= cap
    e = estimate(cfg, batch_size=1, data_counts=stats)
    assert e.voxels.per_sample == stats['max'] and '--data' in e.voxels.source
    assert e.peak_bytes < estimate(cfg, batch_size=1, voxels=cap).peak_bytes
