"""MAP_TO_BEV modules against dense references built here (python loops over the voxels)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from easydict import EasyDict

from pcdet_focal.errors import ConfigError, InputError
from pcdet_focal.memory.tracker import PeakMemory
from pcdet_focal.models.map_to_bev import (HeightCompression, PointPillarScatter3d,
                                           SparseHeightCompression)
from pcdet_focal.ops.sparse import sparse_tensor
from pcdet_focal.registry import MAP_TO_BEV


# ---------------------------------------------------------------- inputs and dense references

def make_voxels(counts, C, D, H, W, device='cpu', seed=0):
    """Random unique voxels, ``counts[b]`` in sample b, rows shuffled (not sorted by anything).

    Returns features (N, C) (normal: about half negative) and coords (N, 4) int32 [b, z, y, x].
    """
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for b, n in enumerate(counts):
        cells = torch.randperm(D * H * W, generator=gen)[:n]
        z, rem = cells // (H * W), cells % (H * W)
        rows.append(torch.stack([torch.full_like(z, b), z, rem // W, rem % W], 1))
    coords = torch.cat(rows) if rows else torch.zeros(0, 4, dtype=torch.long)
    coords = coords[torch.randperm(coords.shape[0], generator=gen)]
    features = torch.randn(coords.shape[0], C, generator=gen)
    return features.to(device), coords.to(torch.int32).to(device)


def dense_volume(features, coords, B, D, H, W):
    """(B, C, D, H, W) volume (differentiable w.r.t. features) and (B, D, H, W) occupancy."""
    C = features.shape[1]
    vol = features.new_zeros(B, C, D, H, W)
    occ = torch.zeros(B, D, H, W, dtype=torch.bool, device=features.device)
    for i, (b, z, y, x) in enumerate(coords.tolist()):
        vol[b, :, z, y, x] = features[i]
        occ[b, z, y, x] = True
    return vol, occ


def ref_max(vol, occ):
    masked = vol.masked_fill(~occ[:, None], float('-inf'))
    return torch.where(occ.any(1)[:, None], masked.amax(2), torch.zeros_like(vol[:, :, 0]))


def ref_mean_sequential(vol, occ):
    """Textbook mean: sum the D levels one after the other (z ascending), divide by count."""
    acc = vol[:, :, 0]
    for z in range(1, vol.shape[2]):
        acc = acc + vol[:, :, z]
    count = occ.sum(1).clamp(min=1).to(vol.dtype)[:, None]
    return acc / count


def ref_learned(vol, weight):
    B, C, D, H, W = vol.shape
    return F.conv2d(vol.reshape(B, C * D, H, W), weight)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def batch_for(form, features, coords, B, D, H, W):
    if form == 'spconv':
        return {'encoded_spconv_tensor': sparse_tensor(features, coords, [D, H, W], B),
                'encoded_spconv_tensor_stride': 8, 'batch_size': B}
    if form == 'float_coords':
        return {'voxel_features': features, 'voxel_coords': coords.float(), 'batch_size': B}
    return {'voxel_features': features, 'voxel_coords': coords, 'batch_size': B}


def shc(mode, C, D, H, W, F_out=None, **extra):
    cfg = EasyDict(NAME='SparseHeightCompression', MODE=mode, INPUT_SHAPE=[W, H, D], **extra)
    if mode == 'learned':
        cfg.update(INPUT_FEATURES=C, NUM_BEV_FEATURES=F_out, NUM_HEIGHT_BINS=D)
    else:
        cfg.NUM_BEV_FEATURES = C
    return SparseHeightCompression(cfg)


@pytest.fixture(autouse=True)
def _no_tf32(monkeypatch):
    """Full float32 in the CUDA references (cuDNN convs default to TF32 on Ampere and newer;
    matmuls already default to full precision)."""
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)


# counts per sample: batch of 3 with different occupancy and an empty last sample
CASES = [
    pytest.param((30, 9, 0), 5, 4, 6, id='B3-empty-last-D5'),
    pytest.param((25, 12, 3), 1, 5, 7, id='B3-D1'),
    pytest.param((60,), 8, 6, 5, id='B1-D8'),
]
FORMS = ['spconv', 'voxel', 'float_coords']


# ---------------------------------------------------------------- max / mean

@pytest.mark.parametrize('counts,D,H,W', CASES)
@pytest.mark.parametrize('form', FORMS)
@pytest.mark.parametrize('mode', ['max', 'mean'])
def test_reduce_modes_match_dense_reference(mode, form, counts, D, H, W, device):
    C, B = 6, len(counts)
    features, coords = make_voxels(counts, C, D, H, W, device)
    out = shc(mode, C, D, H, W)(batch_for(form, features, coords, B, D, H, W))
    vol, occ = dense_volume(features, coords, B, D, H, W)
    ref = ref_max(vol, occ) if mode == 'max' else ref_mean_sequential(vol, occ)
    bev = out['spatial_features']
    assert bev.shape == (B, C, H, W) and bev.is_contiguous()
    # same float ops (max; z-ordered sums then one division): bit-identical
    assert torch.equal(bev, ref)
    if mode == 'mean':  # and close to torch's own (differently ordered) dense sum
        torch.testing.assert_close(bev, vol.sum(2) / occ.sum(1).clamp(min=1)[:, None],
                                   rtol=1e-6, atol=1e-6)
    assert not bev[-1].any() if counts[-1] == 0 else bev[-1].any()
    assert (bev < 0).any()  # negative features survive (max over occupied voxels only)
    assert out['spatial_features_stride'] == (8 if form == 'spconv' else 1)


def test_max_of_negative_column_is_negative():
    # one column holds two voxels, both negative: max is the larger negative, not the empty 0
    coords = torch.tensor([[0, 0, 1, 1], [0, 2, 1, 1]], dtype=torch.int32)
    features = torch.tensor([[-3.0], [-2.0]])
    out = shc('max', 1, 3, 2, 2)({'voxel_features': features, 'voxel_coords': coords,
                                  'batch_size': 1})['spatial_features']
    assert torch.equal(out, torch.tensor([[[[0.0, 0.0], [0.0, -2.0]]]]))
    out = shc('mean', 1, 3, 2, 2)({'voxel_features': features, 'voxel_coords': coords,
                                   'batch_size': 1})['spatial_features']
    assert out[0, 0, 1, 1].item() == -2.5 and out.abs().sum().item() == 2.5


@pytest.mark.parametrize('mode', ['max', 'mean'])
def test_reduce_gradients_match_dense_autograd(mode):
    B, C, D, H, W = 3, 4, 5, 4, 6
    features, coords = make_voxels((40, 11, 0), C, D, H, W)
    grad_out = torch.randn(B, C, H, W)

    f1 = features.clone().requires_grad_(True)
    out = shc(mode, C, D, H, W)({'voxel_features': f1, 'voxel_coords': coords, 'batch_size': B})
    (out['spatial_features'] * grad_out).sum().backward()

    f2 = features.clone().requires_grad_(True)
    vol, occ = dense_volume(f2, coords, B, D, H, W)
    ref = ref_max(vol, occ) if mode == 'max' else ref_mean_sequential(vol, occ)
    (ref * grad_out).sum().backward()
    torch.testing.assert_close(f1.grad, f2.grad, rtol=1e-4, atol=1e-6)
    assert f1.grad.abs().sum() > 0


# ---------------------------------------------------------------- learned

@pytest.mark.parametrize('counts,D,H,W', CASES)
@pytest.mark.parametrize('form', FORMS)
def test_learned_matches_dense_flatten_conv1x1(form, counts, D, H, W, device):
    C, F_out, B = 5, 7, len(counts)
    features, coords = make_voxels(counts, C, D, H, W, device)
    module = shc('learned', C, D, H, W, F_out, USE_NORM=False).to(device)
    bev = module(batch_for(form, features, coords, B, D, H, W))['spatial_features']
    vol, _ = dense_volume(features, coords, B, D, H, W)
    ref = ref_learned(vol, module.weight)
    assert bev.shape == (B, F_out, H, W) and bev.is_contiguous()
    assert rel_err(bev, ref) < 1e-4
    assert not bev[-1].any() if counts[-1] == 0 else bev[-1].any()


def test_learned_gradients_match_dense_autograd():
    B, C, D, H, W, F_out = 3, 4, 6, 5, 4, 3
    features, coords = make_voxels((35, 14, 0), C, D, H, W)
    grad_out = torch.randn(B, F_out, H, W)

    module = shc('learned', C, D, H, W, F_out, USE_NORM=False)
    f1 = features.clone().requires_grad_(True)
    out = module({'voxel_features': f1, 'voxel_coords': coords, 'batch_size': B})
    (out['spatial_features'] * grad_out).sum().backward()

    f2 = features.clone().requires_grad_(True)
    w2 = module.weight.detach().clone().requires_grad_(True)
    vol, _ = dense_volume(f2, coords, B, D, H, W)
    (ref_learned(vol, w2) * grad_out).sum().backward()
    assert rel_err(f1.grad, f2.grad) < 1e-4
    assert rel_err(module.weight.grad, w2.grad) < 1e-4


def test_learned_with_norm_equals_dense_conv_then_same_norm():
    B, C, D, H, W, F_out = 2, 3, 4, 5, 6, 4
    features, coords = make_voxels((30, 20), C, D, H, W)
    module = shc('learned', C, D, H, W, F_out)  # USE_NORM defaults to True
    assert isinstance(module.norm[0], torch.nn.BatchNorm2d)
    norm_ref = copy.deepcopy(module.norm)
    for train in (True, False):
        module.train(train)
        norm_ref.train(train)
        bev = module({'voxel_features': features, 'voxel_coords': coords,
                      'batch_size': B})['spatial_features']
        vol, _ = dense_volume(features, coords, B, D, H, W)
        ref = norm_ref(ref_learned(vol, module.weight))
        assert rel_err(bev, ref) < 1e-4
        assert (bev >= 0).all()  # ReLU


def test_learned_height_bins_default_from_grid_and_z_stride():
    cfg = EasyDict(MODE='learned', INPUT_FEATURES=8, NUM_BEV_FEATURES=16, Z_STRIDE=4)
    module = SparseHeightCompression(cfg, grid_size=[500, 200, 175])
    assert module.num_height_bins == 44 and module.num_bev_features == 16
    assert module.input_shape == [500, 200, 44]
    assert module.weight.shape == (16, 8 * 44, 1, 1)
    # with the stride a grid whose z divides evenly
    assert SparseHeightCompression(EasyDict(MODE='learned', INPUT_FEATURES=2, NUM_BEV_FEATURES=3),
                                   grid_size=[4, 4, 10]).num_height_bins == 10


def test_no_dense_volume_is_allocated():
    # dense [B, C, D, H, W] would be 16 MB; the BEV output is 256 KB
    B, C, D, H, W = 1, 16, 64, 64, 64
    features, coords = make_voxels((3000,), C, D, H, W)
    dense_bytes = B * C * D * H * W * 4
    for mode in ('max', 'mean', 'learned'):
        module = shc(mode, C, D, H, W, 16, USE_NORM=False)
        batch = {'voxel_features': features, 'voxel_coords': coords, 'batch_size': B}
        with torch.no_grad(), PeakMemory('cpu') as pm:
            module(batch)
        # learned holds a (D, C, F) copy of its weight (256 KB) besides the tables
        assert pm.peak_bytes < dense_bytes / 8, (mode, pm.peak_bytes)


def test_registered_under_map_to_bev():
    assert MAP_TO_BEV.get('SparseHeightCompression') is SparseHeightCompression
    assert MAP_TO_BEV.get('HeightCompression') is HeightCompression
    assert MAP_TO_BEV.get('PointPillarScatter3d') is PointPillarScatter3d


# ---------------------------------------------------------------- HeightCompression / scatter3d

def test_height_compression_matches_dense_view():
    B, C, D, H, W = 3, 4, 3, 5, 6
    features, coords = make_voxels((20, 9, 0), C, D, H, W)
    module = HeightCompression(EasyDict(NUM_BEV_FEATURES=C * D))
    batch = {'encoded_spconv_tensor': sparse_tensor(features, coords, [D, H, W], B),
             'encoded_spconv_tensor_stride': 2, 'batch_size': B}
    out = module(batch)
    vol, _ = dense_volume(features, coords, B, D, H, W)
    assert torch.equal(out['spatial_features'], vol.reshape(B, C * D, H, W))
    assert out['spatial_features_stride'] == 2 and module.num_bev_features == C * D


@pytest.mark.parametrize('float_coords', [False, True])
def test_pointpillar_scatter3d_matches_dense_and_keeps_empty_last_sample(float_coords, device):
    B, C, nz, ny, nx = 3, 4, 2, 5, 7
    features, coords = make_voxels((15, 6, 0), C, nz, ny, nx, device)
    module = PointPillarScatter3d(EasyDict(INPUT_SHAPE=[nx, ny, nz], NUM_BEV_FEATURES=C * nz))
    f = features.clone().requires_grad_(True)
    out = module({'pillar_features': f, 'batch_size': B,
                  'voxel_coords': coords.float() if float_coords else coords})
    vol, _ = dense_volume(features, coords, B, nz, ny, nx)
    bev = out['spatial_features']
    assert bev.shape == (B, C * nz, ny, nx)  # coords.max()+1 would give 2 samples
    assert torch.equal(bev, vol.reshape(B, C * nz, ny, nx))
    g = torch.randn_like(bev)
    (bev * g).sum().backward()
    expected = torch.stack([g.view(B, C, nz, ny, nx)[b, :, z, y, x]
                            for b, z, y, x in coords.tolist()])
    assert torch.equal(f.grad, expected)


# ---------------------------------------------------------------- config errors

@pytest.mark.parametrize('cfg,grid,words', [
    (dict(MODE='sum', NUM_BEV_FEATURES=8), None, ['MODE', "'sum'", 'max, mean, learned']),
    (dict(MODE='max', NUM_BEV_FEATURES=256, INPUT_FEATURES=128), None,
     ['NUM_BEV_FEATURES=256', 'C=128', 'MODE: learned']),
    (dict(MODE='mean'), None, ['NUM_BEV_FEATURES', 'required']),
    (dict(MODE='learned', NUM_BEV_FEATURES=8), [4, 4, 4], ['INPUT_FEATURES', 'required']),
    (dict(MODE='learned', INPUT_FEATURES=8), [4, 4, 4], ['NUM_BEV_FEATURES', 'required']),
    (dict(MODE='learned', INPUT_FEATURES=8, NUM_BEV_FEATURES=8), None, ['NUM_HEIGHT_BINS']),
    (dict(MODE='learned', INPUT_FEATURES=8, NUM_BEV_FEATURES=8, NUM_HEIGHT_BINS=4,
          INPUT_SHAPE=[4, 4, 5]), None, ['INPUT_SHAPE', 'nz=5', 'NUM_HEIGHT_BINS=4']),
    (dict(MODE='max', NUM_BEV_FEATURES=-3), None, ['NUM_BEV_FEATURES=-3', '>= 1']),
    (dict(MODE='max', NUM_BEV_FEATURES=8, Z_STRIDE=0), None, ['Z_STRIDE=0']),
    (dict(MODE='max', NUM_BEV_FEATURES=8, INPUT_SHAPE=[4, 4]), None, ['INPUT_SHAPE', 'nx, ny, nz']),
    (dict(MODE='learned', INPUT_FEATURES=8, NUM_BEV_FEATURES=8, USE_NORM='yes'), [4, 4, 4],
     ['USE_NORM']),
])
def test_shc_config_errors_name_the_field(cfg, grid, words):
    with pytest.raises(ConfigError) as err:
        SparseHeightCompression(EasyDict(cfg), grid_size=grid)
    msg = str(err.value)
    assert '\n' not in msg and msg.startswith('MODEL.MAP_TO_BEV.')
    for word in words:
        assert word in msg, (word, msg)


def test_other_modules_config_errors():
    with pytest.raises(ConfigError, match='NUM_BEV_FEATURES is required'):
        HeightCompression(EasyDict())
    with pytest.raises(ConfigError, match='INPUT_SHAPE is required'):
        PointPillarScatter3d(EasyDict(NUM_BEV_FEATURES=8))
    with pytest.raises(ConfigError, match='NUM_BEV_FEATURES=10 must be C x nz.*nz=4'):
        PointPillarScatter3d(EasyDict(NUM_BEV_FEATURES=10, INPUT_SHAPE=[8, 8, 4]))


# ---------------------------------------------------------------- runtime input errors

def _voxel_batch(C=4, D=3, H=4, W=5, B=2):
    features, coords = make_voxels((6, 5), C, D, H, W)
    return {'voxel_features': features, 'voxel_coords': coords, 'batch_size': B}


@pytest.mark.parametrize('mode', ['max', 'learned'])
def test_channel_mismatch_names_the_field(mode):
    module = shc(mode, 8, 3, 4, 5, 6)
    with pytest.raises(InputError) as err:
        module(_voxel_batch(C=4))
    msg = str(err.value)
    key = 'INPUT_FEATURES=8' if mode == 'learned' else 'NUM_BEV_FEATURES=8'
    assert key in msg and 'C=4' in msg and '\n' not in msg


def test_height_mismatch_learned():
    module = shc('learned', 4, 6, 4, 5, 3)  # NUM_HEIGHT_BINS=6
    features, coords = make_voxels((6,), 4, 3, 4, 5)
    batch = {'encoded_spconv_tensor': sparse_tensor(features, coords, [3, 4, 5], 1),
             'batch_size': 1}
    with pytest.raises(InputError, match=r'NUM_HEIGHT_BINS=6 but the input has D=3'):
        module(batch)


def test_wrong_coords_width_and_out_of_grid_and_non_integer():
    module = shc('max', 4, 3, 4, 5)
    batch = _voxel_batch()
    with pytest.raises(InputError, match=r'voxel_coords must have shape \(N, 4\)'):
        module({**batch, 'voxel_coords': batch['voxel_coords'][:, 1:]})
    bad = batch['voxel_coords'].clone()
    bad[0, 3] = 5  # x == W
    with pytest.raises(InputError, match=r'voxel_coords\[:, 3\] \(x\) spans .*\[3, 4, 5\]'):
        module({**batch, 'voxel_coords': bad})
    bad = batch['voxel_coords'].clone()
    bad[0, 0] = 2  # batch index == batch_size
    with pytest.raises(InputError, match='batch_size'):
        module({**batch, 'voxel_coords': bad})
    with pytest.raises(InputError, match='non-integer'):
        module({**batch, 'voxel_coords': batch['voxel_coords'].float() + 0.5})


def test_missing_keys_are_named():
    module = shc('max', 4, 3, 4, 5)
    with pytest.raises(InputError) as err:
        module({'voxel_features': torch.zeros(1, 4), 'batch_size': 1})
    msg = str(err.value)
    assert 'encoded_spconv_tensor' in msg and 'voxel_coords' in msg and 'voxel_features' in msg
    batch = _voxel_batch()
    del batch['batch_size']
    with pytest.raises(InputError, match="batch_dict\\['batch_size'\\]"):
        module(batch)
    with pytest.raises(InputError, match='encoded_spconv_tensor'):
        HeightCompression(EasyDict(NUM_BEV_FEATURES=12))({'voxel_features': torch.zeros(1, 4)})
    with pytest.raises(InputError, match='missing: pillar_features'):
        PointPillarScatter3d(EasyDict(NUM_BEV_FEATURES=8, INPUT_SHAPE=[5, 4, 2]))(
            {'voxel_coords': torch.zeros(1, 4), 'batch_size': 1})


def test_voxel_input_without_grid_is_an_error():
    module = SparseHeightCompression(EasyDict(MODE='max', NUM_BEV_FEATURES=4))
    with pytest.raises(InputError, match='INPUT_SHAPE'):
        module(_voxel_batch())


def test_dense_modules_check_channels_before_densifying():
    features, coords = make_voxels((5,), 4, 3, 4, 5)
    batch = {'encoded_spconv_tensor': sparse_tensor(features, coords, [3, 4, 5], 1),
             'batch_size': 1}
    with pytest.raises(InputError, match=r'NUM_BEV_FEATURES=16 but HeightCompression flattens '
                                         r'C\*D = 4\*3 = 12'):
        HeightCompression(EasyDict(NUM_BEV_FEATURES=16))(batch)
    with pytest.raises(InputError, match='expects C=3 but pillar_features have C=4; set '
                                         'NUM_BEV_FEATURES: 12'):
        PointPillarScatter3d(EasyDict(NUM_BEV_FEATURES=9, INPUT_SHAPE=[5, 4, 3]))(
            {'pillar_features': features, 'voxel_coords': coords, 'batch_size': 1})


def test_num_bev_features_attribute():
    assert shc('max', 32, 4, 4, 4).num_bev_features == 32
    assert shc('learned', 32, 4, 4, 4, 64).num_bev_features == 64
    cfg = EasyDict(MODE='mean', INPUT_FEATURES=16)
    assert SparseHeightCompression(cfg).num_bev_features == 16
    assert math.isclose(PointPillarScatter3d(EasyDict(
        NUM_BEV_FEATURES=64, INPUT_SHAPE=[4, 4, 2])).num_bev_features_before_compression, 32)
