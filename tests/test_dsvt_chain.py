"""Acceptance: DSVTDownsample (input_downsample [1, 1, 4]) -> SparseHeightCompression on the
users' geometry (sparse_shape [500, 200, 175], 128 channels, ~25k voxels) trains on the CPU
within 24 GiB; the dense HeightCompression route would need a 22400-channel BEV map instead."""
import math

import pytest
import torch
from easydict import EasyDict

from pcdet_focal.memory.tracker import PeakMemory
from pcdet_focal.models.dsvt import DSVTDownsample


def _users_dsvt():
    # BACKBONE_3D.DSVT of cfgs/focalsst_dsvt.yaml
    return EasyDict(dict(
        INPUT_LAYER=dict(sparse_shape=[500, 200, 175], input_downsample=[1, 1, 4],
                         input_reduction='max', downsample_stride=[], d_model=[128],
                         set_info=[[36, 2]], window_shape=[[12, 12, 44]], hybrid_factor=[2, 2, 1],
                         shifts_list=[[[0, 0, 0], [6, 6, 0]]], normalize_pos=False),
        block_name=['DSVTBlock'], set_info=[[36, 2]], d_model=[128], nhead=[8],
        dim_feedforward=[256], dropout=0.0, activation='gelu', reduction_type='attention',
        output_shape=[200, 500], conv_out_channel=128, USE_CHECKPOINT=False))


def _scan(n, gen):
    """~n unique voxels: columns denser near the sensor, each a short vertical run."""
    cols = n // 3
    r = torch.rand(cols, generator=gen) * 490 + 10
    theta = (torch.rand(cols, generator=gen) - 0.5) * (math.pi / 2)
    x = (r * torch.cos(theta)).long().clamp(0, 499)
    y = (100 + r * torch.sin(theta)).long().clamp(0, 199)
    z0 = (30 + torch.randn(cols, generator=gen).abs() * 20).long().clamp(0, 170)
    coords = torch.cat([torch.stack((torch.zeros_like(x), z0 + k, y, x), 1) for k in range(3)])
    return torch.unique(coords, dim=0).int()


def test_users_geometry_chain_fits():
    map_to_bev = pytest.importorskip('pcdet_focal.models.map_to_bev')
    shc_cls = getattr(map_to_bev, 'SparseHeightCompression', None)
    if shc_cls is None:
        pytest.skip('SparseHeightCompression not written yet')
    gen = torch.Generator().manual_seed(0)
    coords = _scan(25000, gen)
    feats = torch.randn(coords.shape[0], 128, generator=gen)
    dsvt = DSVTDownsample(_users_dsvt(), input_channels=128, grid_size=[500, 200, 175])
    shc = shc_cls(EasyDict(NAME='SparseHeightCompression', MODE='learned', INPUT_FEATURES=128,
                           NUM_BEV_FEATURES=128, Z_STRIDE=4), grid_size=[500, 200, 175])
    with PeakMemory('cpu') as pm:
        batch = shc(dsvt({'voxel_features': feats, 'voxel_coords': coords, 'batch_size': 1}))
        bev = batch['spatial_features']
        bev.square().mean().backward()
    assert batch['encoded_spconv_tensor'].spatial_shape == [44, 200, 500]
    assert bev.shape == (1, 128, 200, 500)
    assert all(p.grad is not None for p in dsvt.parameters())
    print(f'{coords.shape[0]} voxels: peak {pm.peak_bytes / 2**30:.2f} GiB')
    assert pm.peak_bytes < 24 * 2**30
