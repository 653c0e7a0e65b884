"""Estimator vs a real training step on the CPU (pcdet_focal.memory.measure).

Two small configs, each estimated and then trained for two steps on a synthetic batch with
the same batch size and voxel count; the peak of live tensor bytes (PyTorch's CPU allocator
events + parameters and buffers) is the independent reference. The estimate is redone with
the counts the step really produced (new focal voxels, DSVT voxels and sets, BEV columns),
so the comparison tests the memory model itself. The issue's bound for CI: within 25%.
benchmarks/estimator.py runs the full table (15% / -5%) on every config in cfgs/.
"""
import copy

import pytest

from pcdet_focal.memory import estimate
from pcdet_focal.memory.measure import measure_config
from test_estimator import _shc_config

pytest.importorskip('spconv')

DSVT = {
    'INPUT_LAYER': {'sparse_shape': [100, 80, 35], 'input_downsample': [1, 1, 4],
                    'input_reduction': 'max', 'downsample_stride': [], 'd_model': [32],
                    'set_info': [[16, 1]], 'window_shape': [[10, 10, 9]],
                    'hybrid_factor': [2, 2, 1], 'shifts_list': [[[0, 0, 0], [5, 5, 0]]],
                    'normalize_pos': False},
    'block_name': ['DSVTBlock'], 'set_info': [[16, 1]], 'd_model': [32], 'nhead': [4],
    'dim_feedforward': [64], 'dropout': 0.0, 'activation': 'gelu',
    'reduction_type': 'attention', 'output_shape': [80, 100], 'conv_out_channel': 32}


def focal_dsvt_config():
    """The users' model shape, scaled down: FocalSST -> DSVT (z merge 4) -> SHC learned."""
    cfg = _shc_config('learned', nbf=32)
    cfg.MODEL.BACKBONE_3D = {'NAME': 'FocalSSTDSVT',
                             'FOCAL_ENCODER': {'NUM_FILTERS': [16, 32]},
                             'DSVT': copy.deepcopy(DSVT)}
    cfg.MODEL.MAP_TO_BEV.update({'INPUT_FEATURES': 32, 'Z_STRIDE': 4})
    cfg.MODEL.BACKBONE_2D.update({'LAYER_NUMS': [1, 1], 'LAYER_STRIDES': [1, 2],
                                  'NUM_FILTERS': [32, 64], 'UPSAMPLE_STRIDES': [1, 2],
                                  'NUM_UPSAMPLE_FILTERS': [32, 32]})
    cfg.MODEL.DENSE_HEAD.SHARED_CONV_CHANNEL = 32
    return cfg


def focal_mean_config():
    """FocalSSTEncoder -> SparseHeightCompression mean -> BEV backbone -> CenterHead."""
    cfg = _shc_config('mean', nbf=32)
    cfg.MODEL.BACKBONE_3D.NUM_FILTERS = [16, 32]
    cfg.MODEL.MAP_TO_BEV.INPUT_FEATURES = 32
    cfg.MODEL.BACKBONE_2D.update({'NUM_FILTERS': [32], 'NUM_UPSAMPLE_FILTERS': [32]})
    cfg.MODEL.DENSE_HEAD.SHARED_CONV_CHANNEL = 32
    return cfg


@pytest.mark.parametrize('make, batch, voxels', [(focal_dsvt_config, 1, 600),
                                                 (focal_mean_config, 2, 400)],
                         ids=['focal_dsvt_b1', 'focal_mean_b2'])
def test_estimate_matches_a_measured_cpu_step(make, batch, voxels):
    cfg = make()
    est = estimate(cfg, batch_size=batch, voxels=voxels, target='cpu')
    m = measure_config(cfg, est, device='cpu')
    assert not m.refused
    assert m.peak_bytes > est.param_bytes * 3      # parameters + Adam state at least
    assert -0.25 <= m.error <= 0.25, m.lines()


def test_measure_refuses_what_the_machine_cannot_hold():
    cfg = focal_mean_config()
    est = estimate(cfg, batch_size=1, voxels=100, target='cpu')
    est.peak_bytes = 10 ** 15                       # a petabyte: more than any machine's RAM
    m = measure_config(cfg, est, device='cpu')
    assert m.refused and 'exceeds' in m.refused and m.peak_bytes is None


def test_benchmark_bev_crop_keeps_the_dense_height_compression():
    """benchmarks/estimator.py measures the ~100 GiB users' config on a cropped BEV: the crop
    must keep its 175 height bins, 128 channels and 22400 flattened channels, and shrink only
    the x / y extent (so the estimate is measurable here)."""
    import importlib.util
    from pathlib import Path

    from pcdet_focal.config import load_config
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location('bench_estimator',
                                                  root / 'benchmarks' / 'estimator.py')
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = load_config(root / 'cfgs' / 'focalsst_dsvt_dense_hc.yaml')
    full = estimate(cfg, batch_size=1, voxels=1500, target='cpu')
    cropped = bench.crop_bev(cfg, 80, 40)
    small = estimate(cropped, batch_size=1, voxels=1500, target='cpu')
    assert full.map_to_bev_input == (128, 175, 200, 500)
    assert small.map_to_bev_input == (128, 175, 40, 80)
    assert full.flattened_bev_channels == small.flattened_bev_channels == 22400
    assert cropped.MODEL.BACKBONE_3D.DSVT.INPUT_LAYER.sparse_shape == [80, 40, 175]
    assert cropped.MODEL.BACKBONE_3D.DSVT.output_shape == [40, 80]
    assert cfg.DATA_CONFIG.POINT_CLOUD_RANGE == [0, -20, -3, 100, 20, 4]   # original untouched
    assert small.peak_bytes < full.peak_bytes / 20
