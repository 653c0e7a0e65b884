"""DSVTDownsample: behaviour, input downsampling, OpenPCDet's Waymo configs, config errors."""
import copy
import math

import pytest
import torch
import torch.nn as nn
from easydict import EasyDict

from pcdet_focal.errors import ConfigError, InputError
from pcdet_focal.models.dsvt import DSVTDownsample, SetAttention
from pcdet_focal.registry import lookup


# ----------------------------------------------------------------------------- helpers

def _cfg(sparse_shape=(40, 40, 8), strides=((1, 1, 4), (1, 1, 2)), c=16, set_size=8, blocks=1,
         windows=None, reduction='attention', **layer_extra):
    n = len(strides) + 1
    if windows is None:  # 6 x 6 windows spanning each stage's full height
        z = math.ceil(sparse_shape[2] / layer_extra.get('input_downsample', [1, 1, 1])[2])
        windows = []
        for s in range(n):
            windows.append((6, 6, z))
            z = math.ceil(z / strides[s][2]) if s < len(strides) else z
    layer = dict(sparse_shape=list(sparse_shape), downsample_stride=[list(s) for s in strides],
                 d_model=[c] * n, set_info=[[set_size, blocks]] * n,
                 window_shape=[list(w) for w in windows[:n]], hybrid_factor=[2, 2, 1],
                 shifts_list=[[[0, 0, 0], [3, 3, 0]]] * n, normalize_pos=False)
    layer.update(layer_extra)
    return EasyDict(dict(INPUT_LAYER=layer, block_name=['DSVTBlock'] * n,
                         set_info=[[set_size, blocks]] * n, d_model=[c] * n, nhead=[2] * n,
                         dim_feedforward=[2 * c] * n, dropout=0.0, activation='gelu',
                         reduction_type=reduction, output_shape=list(sparse_shape[1::-1]),
                         conv_out_channel=c))


def _voxels(n, shape_xyz, batch_size, c, seed=0, span=None):
    """n unique voxels in the corner ``span`` [x, y, z] of the grid (dense -> multi-set windows)."""
    gen = torch.Generator().manual_seed(seed)
    sx, sy, sz = span or shape_xyz
    lin = torch.randperm(batch_size * sx * sy * sz, generator=gen)[:n]
    coords = torch.stack((lin // (sx * sy * sz), (lin // (sx * sy)) % sz,
                          (lin // sx) % sy, lin % sx), 1).int()
    return torch.randn(n, c, generator=gen), coords


def _run(model, feats, coords, batch_size):
    return model({'voxel_features': feats, 'voxel_coords': coords, 'batch_size': batch_size})


def _sorted(out):
    """(features, coords) sorted by [b, z, y, x] so outputs of two runs can be compared."""
    c = out['voxel_coords'].long()
    key = ((c[:, 0] * 4096 + c[:, 1]) * 4096 + c[:, 2]) * 4096 + c[:, 3]
    order = torch.argsort(key)
    return out['pillar_features'][order], c[order]


# ----------------------------------------------------------------------------- outputs

def test_registered_under_both_names():
    assert lookup('BACKBONE_3D', 'DSVTDownsample') is DSVTDownsample
    assert lookup('BACKBONE_3D', 'DSVT') is DSVTDownsample


def test_outputs_contract(device):
    cfg = _cfg(input_downsample=[2, 2, 1])
    model = DSVTDownsample(cfg, input_channels=16).to(device)
    feats, coords = _voxels(400, [40, 40, 8], 2, 16, span=[20, 20, 8])
    out = _run(model, feats.to(device), coords.to(device), 2)
    # stage shapes: [40,40,8] /[2,2,1] -> [20,20,8] /[1,1,4] -> [20,20,2] /[1,1,2] -> [20,20,1]
    sp = out['encoded_spconv_tensor']
    assert sp.spatial_shape == [1, 20, 20] and sp.batch_size == 2
    assert out['encoded_spconv_tensor_stride'] == 2
    assert model.num_point_features == 16
    f, c = out['pillar_features'], out['voxel_coords']
    assert out['voxel_features'] is f and sp.features is f and torch.equal(sp.indices, c)
    assert c.dtype == torch.int32 and f.shape == (c.shape[0], 16) and f.device.type == device.type
    # one output voxel per occupied coarse cell
    ref = torch.unique(torch.stack((coords[:, 0], coords[:, 1] // 8, coords[:, 2] // 2,
                                    coords[:, 3] // 2), 1), dim=0)
    assert torch.equal(_sorted(out)[1].cpu(), ref.long())


def test_batch_independence():
    model = DSVTDownsample(_cfg(), input_channels=16).eval()
    f0, c0 = _voxels(250, [40, 40, 8], 1, 16, seed=1, span=[24, 24, 8])
    f1, c1 = _voxels(180, [40, 40, 8], 1, 16, seed=2, span=[24, 24, 8])
    c1b = c1.clone()
    c1b[:, 0] = 1
    with torch.no_grad():
        both = _sorted(_run(model, torch.cat((f0, f1)), torch.cat((c0, c1b)), 2))
        one = _sorted(_run(model, f0, c0, 1))
        two = _sorted(_run(model, f1, c1, 1))
    n0 = one[0].shape[0]
    assert torch.allclose(both[0][:n0], one[0], atol=1e-5)
    assert torch.allclose(both[0][n0:], two[0], atol=1e-5)
    assert torch.equal(both[1][n0:, 1:], two[1][:, 1:])


@pytest.mark.parametrize('train', [False, True])
def test_permutation_invariance(train):
    model = DSVTDownsample(_cfg(blocks=2, input_downsample=[1, 1, 2],
                                input_reduction='learned'), input_channels=16).train(train)
    feats, coords = _voxels(300, [40, 40, 8], 2, 16, seed=3, span=[24, 24, 8])
    perm = torch.randperm(300)
    with torch.no_grad():
        a = _sorted(_run(model, feats, coords, 2))
        b = _sorted(_run(model, feats[perm], coords[perm], 2))
    assert torch.equal(a[1], b[1])
    assert torch.allclose(a[0], b[0], atol=1e-5)


def test_single_stage_keeps_input_order():
    # one stage without input_downsample: output row i is input voxel i (OpenPCDet contract)
    cfg = _cfg(sparse_shape=(30, 30, 1), strides=(), windows=((6, 6, 1),))
    model = DSVTDownsample(cfg, input_channels=16).eval()
    feats, coords = _voxels(120, [30, 30, 1], 2, 16, seed=4)
    out = _run(model, feats, coords.clone(), 2)
    assert torch.equal(out['voxel_coords'], coords)


@pytest.mark.parametrize('reduction,input_reduction', [
    ('attention', 'learned'), ('maxpool', 'max'), ('linear', 'mean')])
def test_gradients_reach_all_parameters(reduction, input_reduction):
    cfg = _cfg(reduction=reduction, blocks=2, input_downsample=[1, 1, 2],
               input_reduction=input_reduction)
    model = DSVTDownsample(cfg, input_channels=16)
    # dense corner: every sub-voxel slot of every pooling cell occurs somewhere
    feats, coords = _voxels(500, [40, 40, 8], 2, 16, seed=5, span=[12, 12, 8])
    feats.requires_grad_(True)
    out = _run(model, feats, coords, 2)
    (out['pillar_features'] * torch.randn_like(out['pillar_features'])).sum().backward()
    missing = [n for n, p in model.named_parameters()
               if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert not missing
    assert feats.grad.abs().sum() > 0


def test_use_checkpoint_same_outputs_and_grads():
    cfg = _cfg(blocks=2)
    plain = DSVTDownsample(cfg, input_channels=16)
    cfg_ckpt = copy.deepcopy(cfg)
    cfg_ckpt.USE_CHECKPOINT = True
    ckpt = DSVTDownsample(cfg_ckpt, input_channels=16)
    ckpt.load_state_dict(plain.state_dict())
    feats, coords = _voxels(300, [40, 40, 8], 2, 16, seed=6, span=[20, 20, 8])
    outs = []
    for model in (plain, ckpt):
        out = _run(model, feats, coords, 2)['pillar_features']
        out.square().sum().backward()
        outs.append((out, {n: p.grad for n, p in model.named_parameters()}))
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-6)
    for name, grad in outs[0][1].items():
        assert torch.allclose(grad, outs[1][1][name], atol=1e-5), name


# ----------------------------------------------------------------------------- edge cases

@pytest.mark.parametrize('train', [False, True])
def test_zero_voxel_sample_and_empty_batch(train):
    model = DSVTDownsample(_cfg(input_downsample=[1, 1, 2]), input_channels=16).train(train)
    feats, coords = _voxels(200, [40, 40, 8], 1, 16, seed=7, span=[20, 20, 8])
    # sample 1 of 2 has no voxels
    out = _run(model, feats, coords, 2)
    assert out['encoded_spconv_tensor'].batch_size == 2
    assert (out['voxel_coords'][:, 0] == 0).all()
    out['pillar_features'].sum().backward()
    # no voxels at all
    empty = torch.zeros((0, 16), requires_grad=True)
    out = _run(model, empty, torch.zeros((0, 4), dtype=torch.int32), 2)
    assert out['pillar_features'].shape == (0, 16)
    assert out['encoded_spconv_tensor'].dense().shape == (2, 16, 1, 40, 40)
    out['pillar_features'].sum().backward()


def test_padding_is_masked_in_small_windows():
    # 5 voxels, set size 12: the set repeats voxels; with the repeats masked the attention
    # equals plain attention over the 5 distinct voxels.
    torch.manual_seed(0)
    layer = SetAttention(8, 2, 0.0, 16, 'relu').eval()
    src, pos = torch.randn(5, 8), torch.randn(5, 8)
    slots = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4]])
    mask = torch.zeros_like(slots, dtype=torch.bool)
    mask[:, 1:] = slots[:, 1:] == slots[:, :-1]
    first = torch.tensor([0, 3, 5, 8, 10])
    with torch.no_grad():
        ours = layer(src, pos, mask, slots, first)
        qk = (src + pos)[None]
        attn = layer.self_attn(qk, qk, src[None])[0][0]
        x = layer.norm1(src + attn)
        ref = layer.norm2(x + layer.linear2(torch.relu(layer.linear1(x))))
    assert torch.allclose(ours, ref, atol=1e-5)


def test_rejects_bad_inputs():
    model = DSVTDownsample(_cfg(), input_channels=16)
    feats, coords = _voxels(10, [40, 40, 8], 1, 16)
    with pytest.raises(InputError, match='voxel_features'):
        _run(model, feats[:, :8], coords, 1)
    bad = coords.clone()
    bad[0, 3] = 40
    with pytest.raises(InputError, match=r'\(x\)'):
        _run(model, feats, bad, 1)
    with pytest.raises(InputError, match='batch_size'):
        model({'voxel_features': feats, 'voxel_coords': coords})


# ----------------------------------------------------------------------------- input downsample

def _dense_pool_reference(feats, coords, shape_xyz, stride, batch_size, mode):
    """Scatter into a dense (B, C, Z, Y, X) grid, pad to whole cells, reduce each cell."""
    c = feats.shape[1]
    x, y, z = shape_xyz
    sx, sy, sz = stride
    zc, yc, xc = math.ceil(z / sz), math.ceil(y / sy), math.ceil(x / sx)
    grid = torch.zeros(batch_size, c, zc * sz, yc * sy, xc * sx)
    occ = torch.zeros(batch_size, 1, zc * sz, yc * sy, xc * sx)
    b, cz, cy, cx = coords.long().unbind(1)
    grid[b, :, cz, cy, cx] = feats
    occ[b, 0, cz, cy, cx] = 1
    cells = grid.view(batch_size, c, zc, sz, yc, sy, xc, sx)
    occ_cells = occ.view(batch_size, 1, zc, sz, yc, sy, xc, sx)
    count = occ_cells.sum(dim=(3, 5, 7))
    if mode == 'max':
        red = cells.masked_fill(occ_cells == 0, float('-inf')).amax(dim=(3, 5, 7))
    else:
        red = cells.sum(dim=(3, 5, 7)) / count.clamp_min(1)
    nz = (count[:, 0] > 0).nonzero()            # [b, z, y, x] of occupied cells
    return red.permute(0, 2, 3, 4, 1)[nz[:, 0], nz[:, 1], nz[:, 2], nz[:, 3]], nz


@pytest.mark.parametrize('mode', ['max', 'mean'])
@pytest.mark.parametrize('stride', [[1, 1, 4], [2, 2, 3]])
def test_input_downsample_matches_dense_pooling(mode, stride):
    shape = [15, 13, 9]  # not multiples of the strides: ceil cells at the far edges
    model = DSVTDownsample(_cfg(sparse_shape=shape, strides=(), windows=((4, 4, 3),),
                               input_downsample=stride, input_reduction=mode),
                           input_channels=16)
    feats, coords = _voxels(500, shape, 2, 16, seed=8)
    ours, ours_coords = model.input_layer.downsample_input(feats, coords.long())
    ref, ref_coords = _dense_pool_reference(feats, coords, shape, stride, 2, mode)
    assert torch.equal(ours_coords, ref_coords)    # both in [b, z, y, x] lexicographic order
    assert torch.allclose(ours, ref, atol=1e-6)
    assert model.input_layer.stage_shapes[0] == [math.ceil(s / t) for s, t in zip(shape, stride)]


def test_learned_input_reduction_matches_padded_attention():
    shape, stride = [12, 12, 8], [2, 2, 2]
    model = DSVTDownsample(_cfg(sparse_shape=shape, strides=(), windows=((4, 4, 2),), c=16,
                                input_downsample=stride, input_reduction='learned'),
                           input_channels=16)
    pool_mod = model.input_layer.input_reduction
    feats, coords = _voxels(300, shape, 2, 16, seed=9)
    ours, cells = model.input_layer.downsample_input(feats, coords.long())
    # reference: per cell, a (volume, C) padded set with a key mask for empty slots
    volume = 8
    c = coords.long()
    cell_key = {tuple(v): i for i, v in enumerate(cells.tolist())}
    padded = torch.zeros(cells.shape[0], volume, 16)
    empty = torch.ones(cells.shape[0], volume, dtype=torch.bool)
    for i, (b, z, y, x) in enumerate(c.tolist()):
        row = cell_key[(b, z // 2, y // 2, x // 2)]
        slot = ((x % 2) * 2 + y % 2) * 2 + z % 2   # x-major slot order
        padded[row, slot] = feats[i]
        empty[row, slot] = False
    query = padded.masked_fill(empty[..., None], float('-inf')).amax(1, keepdim=True)
    with torch.no_grad():
        attn = pool_mod.self_attn(query, padded + pool_mod.pos_embedding, padded,
                                  key_padding_mask=empty)[0]
        ref = pool_mod.norm(attn + query).squeeze(1)
    assert torch.allclose(ours, ref, atol=1e-5)


# ----------------------------------------------------------------------------- OpenPCDet configs

# BACKBONE_3D of OpenPCDet's tools/cfgs/waymo_models/dsvt_voxel.yaml and dsvt_pillar.yaml,
# geometry unchanged; `width` shrinks d_model / dim_feedforward for a fast CPU test.
def _waymo_voxel(width=192):
    return EasyDict(dict(
        NAME='DSVT',
        INPUT_LAYER=dict(sparse_shape=[468, 468, 32],
                         downsample_stride=[[1, 1, 4], [1, 1, 4], [1, 1, 2]],
                         d_model=[width] * 4, set_info=[[48, 1]] * 4,
                         window_shape=[[12, 12, 32], [12, 12, 8], [12, 12, 2], [12, 12, 1]],
                         hybrid_factor=[2, 2, 1],
                         shifts_list=[[[0, 0, 0], [6, 6, 0]]] * 4, normalize_pos=False),
        block_name=['DSVTBlock'] * 4, set_info=[[48, 1]] * 4, d_model=[width] * 4,
        nhead=[8] * 4, dim_feedforward=[2 * width] * 4, dropout=0.0, activation='gelu',
        reduction_type='attention', output_shape=[468, 468], conv_out_channel=width))


def _waymo_pillar(width=192):
    return EasyDict(dict(
        NAME='DSVT',
        INPUT_LAYER=dict(sparse_shape=[468, 468, 1], downsample_stride=[], d_model=[width],
                         set_info=[[36, 4]], window_shape=[[12, 12, 1]], hybrid_factor=[2, 2, 1],
                         shifts_list=[[[0, 0, 0], [6, 6, 0]]], normalize_pos=False),
        block_name=['DSVTBlock'], set_info=[[36, 4]], d_model=[width], nhead=[8],
        dim_feedforward=[2 * width], dropout=0.0, activation='gelu', output_shape=[468, 468],
        conv_out_channel=width, USE_CHECKPOINT=True))


def test_waymo_configs_build_at_full_width():
    for make, grid in ((_waymo_voxel, [468, 468, 32]), (_waymo_pillar, [468, 468, 1])):
        model = lookup('BACKBONE_3D', 'DSVT')(make(), input_channels=192, grid_size=grid,
                                              voxel_size=[0.32, 0.32, 0.1875],
                                              point_cloud_range=[-74.88, -74.88, -2, 74.88,
                                                                 74.88, 4.0])
        assert model.num_point_features == 192
    # 4 stages x 1 block x 2 shifts of position MLPs, 3-D while the stage has height (z 32,
    # 8, 2), 2-D on the last (z 1); reductions between stages only, as OpenPCDet's
    params = dict(_waymo_voxel_model().named_parameters())
    for stage, in_dim in enumerate((3, 3, 3, 2)):
        for shift in range(2):
            key = f'input_layer.posembed_layers.{stage}.0.{shift}.position_embedding_head.0.weight'
            assert params[key].shape == (32, in_dim)
    assert 'stage_2_reduction.pos_embedding' in params
    assert not any(k.startswith('stage_3_reduction') for k in params)


def test_learned_reduction_adds_keys_only_when_merging():
    plain = DSVTDownsample(_cfg(), input_channels=16).state_dict().keys()
    same = DSVTDownsample(_cfg(input_reduction='learned'), input_channels=16).state_dict().keys()
    merged = DSVTDownsample(_cfg(input_downsample=[1, 1, 2], input_reduction='learned'),
                            input_channels=16).state_dict().keys()
    assert list(plain) == list(same)
    assert sorted(set(merged) - set(plain)) == [
        'input_layer.input_reduction.norm.bias', 'input_layer.input_reduction.norm.weight',
        'input_layer.input_reduction.pos_embedding',
        'input_layer.input_reduction.self_attn.in_proj_bias',
        'input_layer.input_reduction.self_attn.in_proj_weight',
        'input_layer.input_reduction.self_attn.out_proj.bias',
        'input_layer.input_reduction.self_attn.out_proj.weight']


def _waymo_voxel_model():
    return DSVTDownsample(_waymo_voxel(32), input_channels=32)


@pytest.mark.parametrize('make,out_shape', [(_waymo_voxel, [1, 468, 468]),
                                            (_waymo_pillar, [1, 468, 468])])
def test_waymo_configs_forward_backward(make, out_shape):
    model = DSVTDownsample(make(32), input_channels=32)
    z = make().INPUT_LAYER.sparse_shape[2]
    feats, coords = _voxels(1200, [468, 468, z], 2, 32, seed=10, span=[80, 80, z])
    feats.requires_grad_(True)
    out = _run(model, feats, coords, 2)
    assert out['encoded_spconv_tensor'].spatial_shape == out_shape
    assert (out['voxel_coords'][:, 1] == 0).all()
    out['pillar_features'].sum().backward()
    assert feats.grad is not None and torch.isfinite(feats.grad).all()


# ----------------------------------------------------------------------------- config errors

def _with(path, value, base=None):
    cfg = copy.deepcopy(base or _cfg())
    node = cfg
    keys = path.split('.')
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    return cfg


@pytest.mark.parametrize('path,value,field', [
    ('INPUT_LAYER.input_downsample', [1, 0, 4], 'INPUT_LAYER.input_downsample'),
    ('INPUT_LAYER.input_downsample', [2, 2], 'INPUT_LAYER.input_downsample'),
    ('INPUT_LAYER.input_reduction', 'sum', 'INPUT_LAYER.input_reduction'),
    ('INPUT_LAYER.window_shape', [[6, 6, 32], [6, 6, 2], [6, 6, 1]], 'INPUT_LAYER.window_shape'),
    ('INPUT_LAYER.window_shape', [[6, 6, 8], [6, 6, 1], [6, 6, 1]], 'INPUT_LAYER.window_shape'),
    ('INPUT_LAYER.downsample_stride', [[1, 1, 4]], 'INPUT_LAYER.downsample_stride'),
    ('INPUT_LAYER.downsample_stride', [[1, 1, 4], [1, 1, 0]], 'INPUT_LAYER.downsample_stride'),
    ('INPUT_LAYER.set_info', [[8, 1], [8, 1]], 'INPUT_LAYER.set_info'),
    ('INPUT_LAYER.d_model', [16, 16, 32], 'd_model'),
    ('nhead', [2, 2], 'BACKBONE_3D.nhead'),
    ('nhead', [3, 2, 2], 'BACKBONE_3D.nhead'),
    ('set_info', [[8, 2], [8, 1], [8, 1]], 'BACKBONE_3D.set_info'),
    ('reduction_type', 'mean', 'BACKBONE_3D.reduction_type'),
    ('activation', 'tanh', 'BACKBONE_3D.activation'),
    ('block_name', ['DSVTBlock', 'Other', 'DSVTBlock'], 'BACKBONE_3D.block_name'),
    ('conv_out_channel', 64, 'BACKBONE_3D.conv_out_channel'),
])
def test_config_errors_name_the_field(path, value, field):
    with pytest.raises(ConfigError, match=field.replace('.', r'\.')):
        DSVTDownsample(_with(path, value), input_channels=16)


def test_config_errors_for_widths_strides_and_grid():
    with pytest.raises(ConfigError, match=r'INPUT_LAYER\.d_model\[0\]=16 but the incoming'):
        DSVTDownsample(_cfg(), input_channels=4)
    with pytest.raises(ConfigError, match='total x stride 2 != total y stride 1'):
        DSVTDownsample(_with('INPUT_LAYER.input_downsample', [2, 1, 1]), input_channels=16)
    with pytest.raises(ConfigError, match=r'INPUT_LAYER\.sparse_shape'):
        DSVTDownsample(_cfg(), input_channels=16, grid_size=[41, 40, 8])
    # nested use names its own location
    with pytest.raises(ConfigError, match=r'BACKBONE_3D\.DSVT\.INPUT_LAYER\.input_reduction'):
        DSVTDownsample(_with('INPUT_LAYER.input_reduction', 'x'), field_prefix='BACKBONE_3D.DSVT')


# ----------------------------------------------------------------------------- chain to BEV

def test_chain_into_sparse_height_compression():
    map_to_bev = pytest.importorskip('pcdet_focal.models.map_to_bev')
    shc_cls = getattr(map_to_bev, 'SparseHeightCompression', None)
    if shc_cls is None:
        pytest.skip('SparseHeightCompression not written yet')
    shape = [50, 20, 18]
    cfg = _cfg(sparse_shape=shape, strides=(), windows=((6, 6, 5),), input_downsample=[1, 1, 4])
    dsvt = DSVTDownsample(cfg, input_channels=16)
    shc = shc_cls(EasyDict(NAME='SparseHeightCompression', MODE='max', NUM_BEV_FEATURES=16),
                  grid_size=shape)
    feats, coords = _voxels(300, shape, 2, 16, seed=11)
    batch = shc(_run(dsvt, feats, coords, 2))
    bev = batch['spatial_features']
    assert bev.shape == (2, 16, 20, 50)
    # max over height of DSVT's own output, scattered by hand
    f, c = batch['pillar_features'], batch['voxel_coords'].long()
    ref = torch.full((2, 20, 50, 16), float('-inf'))
    for i in range(c.shape[0]):
        b, _, y, x = c[i].tolist()
        ref[b, y, x] = torch.maximum(ref[b, y, x], f[i])
    ref = torch.where(torch.isinf(ref), torch.zeros_like(ref), ref).permute(0, 3, 1, 2)
    assert torch.allclose(bev, ref, atol=1e-6)
    bev.sum().backward()
