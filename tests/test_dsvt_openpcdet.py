"""DSVTDownsample vs OpenPCDet's own DSVT on the same weights and voxels.

Runs only when PCDET_ROOT points at an OpenPCDet source tree (its compiled ops are not needed):
OpenPCDet's ``dsvt_utils.py`` and ``backbones_3d/dsvt.py`` are loaded in isolation, with its
CUDA op ``ingroup_inds`` replaced by our pure-torch ``rank_in_group`` (the op only has to give
each voxel a distinct rank inside its window; any order works for DSVT's partition).
"""
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from easydict import EasyDict

from pcdet_focal.models.dsvt import DSVTDownsample
from pcdet_focal.ops.dsvt_sets import rank_in_group

PCDET_ROOT = os.environ.get('PCDET_ROOT')
pytestmark = pytest.mark.skipif(not PCDET_ROOT, reason='set PCDET_ROOT to an OpenPCDet checkout')


def _load_file(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def openpcdet_dsvt(monkeypatch):
    """OpenPCDet's dsvt module, imported without pcdet.models (which needs every CUDA op)."""
    root = Path(PCDET_ROOT)
    for pkg in ('pcdet', 'pcdet.ops', 'pcdet.ops.ingroup_inds', 'pcdet.models',
                'pcdet.models.model_utils', 'pcdet.models.backbones_3d'):
        monkeypatch.setitem(sys.modules, pkg, types.ModuleType(pkg))
    op = types.ModuleType('pcdet.ops.ingroup_inds.ingroup_inds_op')
    op.ingroup_inds = rank_in_group
    monkeypatch.setitem(sys.modules, op.__name__, op)
    for name in ('pcdet.models.model_utils.dsvt_utils', 'pcdet.models.backbones_3d.dsvt'):
        monkeypatch.delitem(sys.modules, name, raising=False)
    _load_file('pcdet.models.model_utils.dsvt_utils',
               root / 'pcdet' / 'models' / 'model_utils' / 'dsvt_utils.py')
    module = _load_file('pcdet.models.backbones_3d.dsvt',
                        root / 'pcdet' / 'models' / 'backbones_3d' / 'dsvt.py')
    # OpenPCDet passes an all-zero *int* key_padding_mask to its stage-reduction attention,
    # which torch >= 2.0 rejects; all-zero means "mask nothing", i.e. no mask.
    original = nn.MultiheadAttention.forward

    def forward(self, query, key, value, key_padding_mask=None, *args, **kwargs):
        if key_padding_mask is not None and not key_padding_mask.is_floating_point() \
                and key_padding_mask.dtype != torch.bool:
            key_padding_mask = key_padding_mask != 0
        return original(self, query, key, value, key_padding_mask, *args, **kwargs)

    monkeypatch.setattr(nn.MultiheadAttention, 'forward', forward)
    return module


def _voxel_cfg(reduction_type, normalize_pos=False):
    # Waymo dsvt_voxel geometry (sparse_shape [468, 468, 32], three z downsamplings) with a
    # narrower d_model for speed.
    c, n = 32, 4
    return EasyDict(dict(
        INPUT_LAYER=dict(sparse_shape=[468, 468, 32],
                         downsample_stride=[[1, 1, 4], [1, 1, 4], [1, 1, 2]],
                         d_model=[c] * n, set_info=[[16, 1], [16, 2], [16, 1], [16, 1]],
                         window_shape=[[12, 12, 32], [12, 12, 8], [12, 12, 2], [12, 12, 1]],
                         hybrid_factor=[2, 2, 1], shifts_list=[[[0, 0, 0], [6, 6, 0]]] * n,
                         normalize_pos=normalize_pos),
        block_name=['DSVTBlock'] * n, set_info=[[16, 1], [16, 2], [16, 1], [16, 1]],
        d_model=[c] * n, nhead=[4] * n, dim_feedforward=[64] * n, dropout=0.0,
        activation='gelu', reduction_type=reduction_type, output_shape=[468, 468],
        conv_out_channel=c))


def _pillar_cfg():
    return EasyDict(dict(
        INPUT_LAYER=dict(sparse_shape=[468, 468, 1], downsample_stride=[], d_model=[32],
                         set_info=[[36, 3]], window_shape=[[12, 12, 1]], hybrid_factor=[2, 2, 1],
                         shifts_list=[[[0, 0, 0], [6, 6, 0]]], normalize_pos=True),
        block_name=['DSVTBlock'], set_info=[[36, 3]], d_model=[32], nhead=[8],
        dim_feedforward=[64], dropout=0.0, activation='gelu', output_shape=[468, 468],
        conv_out_channel=32))


def _voxels(n, shape_xyz, batch_size, channels, gen):
    """Unique voxels in a 60 x 60 corner (dense enough for multi-set windows), any order."""
    x, y, z = shape_xyz
    span = [min(60, x), min(60, y), z]
    total = batch_size * span[2] * span[1] * span[0]
    lin = torch.randperm(total, generator=gen)[:n]
    cx = lin % span[0]
    cy = (lin // span[0]) % span[1]
    cz = (lin // (span[0] * span[1])) % span[2]
    b = lin // (span[0] * span[1] * span[2])
    coords = torch.stack((b, cz, cy, cx), dim=1).int()
    return torch.randn(n, channels, generator=gen), coords


def _by_coords(feats, coords):
    key = ((coords[:, 0].long() * 64 + coords[:, 1]) * 1024 + coords[:, 2]) * 1024 + coords[:, 3]
    order = torch.argsort(key)
    return feats[order], coords[order].long()


@pytest.mark.parametrize('make_cfg', [lambda: _voxel_cfg('attention'),
                                      lambda: _voxel_cfg('maxpool'),
                                      lambda: _voxel_cfg('linear', normalize_pos=True),
                                      _pillar_cfg],
                         ids=['voxel-attention', 'voxel-maxpool', 'voxel-linear', 'pillar'])
@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
def test_same_weights_same_outputs(openpcdet_dsvt, make_cfg, train):
    cfg = make_cfg()
    theirs = openpcdet_dsvt.DSVT(cfg)
    ours = DSVTDownsample(cfg, input_channels=32)
    # every name and shape must match: strict load both ways
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    theirs.train(train)
    ours.train(train)
    gen = torch.Generator().manual_seed(3)
    feats, coords = _voxels(1000, cfg.INPUT_LAYER.sparse_shape, 2, 32, gen)

    f_theirs = feats.clone().requires_grad_(True)
    f_ours = feats.clone().requires_grad_(True)
    out_t = theirs({'voxel_features': f_theirs, 'voxel_coords': coords.clone(), 'batch_size': 2})
    out_o = ours({'voxel_features': f_ours, 'voxel_coords': coords.clone(), 'batch_size': 2})
    pt, ct = _by_coords(out_t['pillar_features'], out_t['voxel_coords'])
    po, co = _by_coords(out_o['pillar_features'], out_o['voxel_coords'])
    assert torch.equal(ct, co)
    diff = (pt - po).abs().max().item()
    print(f'max |ours - OpenPCDet| = {diff:.3e}')
    assert diff < 1e-4
    if train:
        weight = torch.randn(pt.shape, generator=gen)
        (pt * weight).sum().backward()
        (po * weight).sum().backward()
        assert (f_theirs.grad - f_ours.grad).abs().max().item() < 1e-4
        # by checkpoint key (ours keeps each attention's in_proj on a leaf module, saved under
        # torch's in_proj_weight / in_proj_bias)
        grads_t = theirs.state_dict(keep_vars=True)
        for name, p in ours.state_dict(keep_vars=True).items():
            if p.requires_grad:
                assert torch.allclose(p.grad, grads_t[name].grad, atol=1e-4), name
