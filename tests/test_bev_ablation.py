"""benchmarks/bev_ablation.py: the variants are what they claim, on one budget, and --quick
runs every one of them end to end (build, a training step, evaluation, the report)."""
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import bev_ablation as ab  # noqa: E402
from pcdet_focal.config import load_config  # noqa: E402


def flat(node, prefix=''):
    """Nested config -> {'A.B.C': value} (lists kept whole)."""
    if isinstance(node, dict):
        out = {}
        for key, val in node.items():
            out.update(flat(val, f'{prefix}{key}.'))
        return out
    return {prefix[:-1]: node}


def changed(name):
    base = load_config(ab.BASE_CFG)
    a, b = flat(ab.variant_config('shc_learned', base, ab.FULL)), \
        flat(ab.variant_config(name, base, ab.FULL))
    return {k for k in set(a) | set(b) if a.get(k) != b.get(k)}


DSVT = 'MODEL.BACKBONE_3D.DSVT.'


def test_variants_change_only_their_bev_mapping():
    base = load_config(ab.BASE_CFG)
    # the demo as shipped is the reference: at most the budget differs from it
    budget_keys = {'DATA_CONFIG.NUM_FRAMES.train', 'DATA_CONFIG.NUM_FRAMES.test',
                   'OPTIMIZATION.NUM_EPOCHS', 'OPTIMIZATION.BATCH_SIZE_PER_GPU'}
    for budget in (ab.FULL, ab.QUICK):
        demo = flat(ab.variant_config('shc_learned', base, budget))
        assert {k for k, v in demo.items() if flat(base).get(k) != v} <= budget_keys
    assert changed('shc_max') == changed('shc_mean') == {'MODEL.MAP_TO_BEV.MODE'}
    assert changed('dense_hc') == {'MODEL.MAP_TO_BEV.NAME', 'MODEL.MAP_TO_BEV.MODE',
                                   'MODEL.MAP_TO_BEV.INPUT_FEATURES', 'MODEL.MAP_TO_BEV.Z_STRIDE',
                                   'MODEL.MAP_TO_BEV.NUM_BEV_FEATURES'}
    for z in ('z1', 'z2'):
        assert changed(f'shc_learned_{z}') == {DSVT + 'INPUT_LAYER.input_downsample',
                                               DSVT + 'INPUT_LAYER.window_shape',
                                               'MODEL.MAP_TO_BEV.Z_STRIDE'}
    # every variant: same data, epochs, optimizer, head, BEV backbone
    for name in ab.VARIANTS:
        assert not {k for k in changed(name)
                    if k.startswith(('DATA_CONFIG', 'OPTIMIZATION', 'MODEL.DENSE_HEAD',
                                     'MODEL.BACKBONE_2D', 'MODEL.VFE', 'CLASS_NAMES'))}, name


def test_dsvt_zpool_variant_pools_height_inside_dsvt():
    cfg = ab.variant_config('dsvt_zpool_pps3d', load_config(ab.BASE_CFG), ab.FULL)
    layer = cfg.MODEL.BACKBONE_3D.DSVT.INPUT_LAYER
    assert layer.input_downsample == [1, 1, 1]
    # 16 height bins -> 4 -> 1 (the demo grid is 128 x 128 x 16)
    assert [w[2] for w in layer.window_shape] == [16, 4, 1]
    assert layer.downsample_stride == [[1, 1, 4], [1, 1, 4]]
    assert len(cfg.MODEL.BACKBONE_3D.DSVT.d_model) == 3
    assert cfg.MODEL.MAP_TO_BEV == {'NAME': 'PointPillarScatter3d', 'INPUT_SHAPE': [128, 128, 1],
                                    'NUM_BEV_FEATURES': 32}
    dense = ab.variant_config('dense_hc', load_config(ab.BASE_CFG), ab.FULL)
    assert dense.MODEL.MAP_TO_BEV.NUM_BEV_FEATURES == 32 * math.ceil(16 / 4)


def test_mean_std_in_percent():
    assert ab.mean_std([0.5, 0.7]) == '60.0 +- 14.1'   # sample std: sqrt(2 * 0.1^2 / 1)
    assert ab.mean_std([0.25]) == '25.0'
    assert ab.mean_std([None]) == 'n/a'


@pytest.fixture(scope='module')
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp('bev_ablation')
    assert ab.main(['--quick', '--out', str(out)]) == 0
    return out, json.loads((out / 'results.json').read_text())


def test_quick_runs_every_variant(quick):
    out, res = quick
    assert list(res['variants']) == list(ab.VARIANTS)
    for name, v in res['variants'].items():
        step = v['step']
        assert step['params'] > 0 and step['step_s'] > 0 and step['step_cpu_s'] > 0, name
        assert step['peak_bytes'] > 4 * step['params'], name   # fp32 weights are inside it
        assert step['estimate_bytes'] and step['voxels_per_sample'] > 0, name
        run_dir = out / 'runs' / 'focalsst_dsvt_demo' / f'{name}_s0'
        assert (run_dir / 'eval' / 'epoch_1' / 'result.json').is_file(), name
        assert v['runs']['0']['seconds'] > 0
    table = (out / 'table.md').read_text()
    assert all(f'`{name}`' in table for name in ab.VARIANTS)
    assert res['command'].startswith('python benchmarks/bev_ablation.py --quick')


def test_quick_parameter_counts_match_hand_count(quick):
    """Parameter differences between variants, counted by hand from the demo config
    (C = 32 channels into the BEV mapping, F = 32 BEV features, D height bins; the BEV
    backbone's first conv is 3x3, bias-free, 32 filters)."""
    p = {n: v['step']['params'] for n, v in quick[1]['variants'].items()}
    C, F = 32, 32
    assert p['shc_mean'] == p['shc_max']                          # no weights in max / mean
    assert p['shc_learned'] - p['shc_max'] == C * 4 * F + 2 * F   # C x D -> F, BatchNorm
    assert p['shc_learned_z2'] - p['shc_learned'] == C * (8 - 4) * F
    assert p['shc_learned_z1'] - p['shc_learned'] == C * (16 - 4) * F
    assert p['dense_hc'] - p['shc_max'] == (C * 4 - C) * 32 * 3 * 3  # 128 instead of 32 in


def test_quick_users_geometry_rows(quick):
    rows = {r['z_merge']: r for r in quick[1]['users_geometry']}
    full = rows[1]
    assert full['height'] == 175 and full['bev_channels'] == 22400
    users_stack = full['cells']["dense HC, torch 2.3 + cuDNN 8.9.2 (the users')"]
    assert users_stack['peak_bytes'] > 22400 * 9 * 200 * 500 * 4   # the 75.10 GiB im2col
    assert not users_stack['fits']['80']
    assert full['cells']['learned SHC']['fits']['24']
