"""VFE ``MeanVFE``: each voxel's feature is the mean of its real points.

Config keys: none besides ``NAME``. Inside OpenPCDet its own MeanVFE (same name, same
behaviour) is used; this one serves the standalone host.
"""
import torch
from torch import nn

from ..errors import InputError
from ..registry import VFE
from ..schema import Schema


@VFE.register()
class MeanVFE(nn.Module):
    """voxels (N, P, C) + voxel_num_points (N,) -> voxel_features (N, C).

    Unlike OpenPCDet's, the padding slots of a voxel are masked by ``voxel_num_points`` instead
    of assumed to be zero, so any voxel generator's padding gives the same mean.
    """

    CONFIG = Schema('MeanVFE', [])

    def __init__(self, model_cfg, num_point_features, point_cloud_range=None, voxel_size=None,
                 grid_size=None, **kwargs):
        super().__init__()
        self.model_cfg = model_cfg
        self.CONFIG.parse(model_cfg, 'MODEL.VFE')
        self.num_point_features = int(num_point_features)

    def get_output_feature_dim(self):
        return self.num_point_features

    def memory(self, tape, flow):
        """Memory rule of the forward below (no parameters, no grad): slot mask, the masked
        (N, P, C) product and its sum, the normaliser and the mean."""
        src = flow.sparse                     # the collated voxels (N, P, C)
        n, c = src.n, self.num_point_features
        p = src.t.numel // max(1, n * c)
        count = tape.index(n, 'MeanVFE count.long()')
        mask = tape.index(n * p, 'MeanVFE slot mask', tape.BOOL)
        real = tape.tensor(n * p, 'MeanVFE real (N, P)')
        tape.drop(mask)
        prod = tape.tensor(n * p * c, 'MeanVFE voxels * real')
        total = tape.tensor(n * c, 'MeanVFE sum over points')
        tape.drop(prod, real)
        clamp = tape.index(n, 'MeanVFE clamp_min(count)')
        denom = tape.tensor(n, 'MeanVFE normaliser')
        tape.drop(clamp)
        mean = tape.tensor(n * c, 'voxel_features (N, C)')
        tape.drop(total, denom, count)
        tape.set_batch('voxel_features', mean)
        flow.sparse = src.like(mean, c)
        tape.drop(mean)

    def forward(self, batch_dict, **kwargs):
        """Reads ``voxels`` (N, P, C) float and ``voxel_num_points`` (N,) int; writes
        ``voxel_features`` (N, C) float, contiguous."""
        for key in ('voxels', 'voxel_num_points'):
            if key not in batch_dict:
                raise InputError(f'MeanVFE needs batch_dict[{key!r}] (from the dataset\'s '
                                 'transform_points_to_voxels step); it is missing')
        voxels, num_points = batch_dict['voxels'], batch_dict['voxel_num_points']
        if voxels.dim() != 3 or voxels.shape[2] != self.num_point_features:
            raise InputError(f'voxels is {tuple(voxels.shape)} but MeanVFE was built for '
                             f'(N, max_points, C) with C = the dataset\'s '
                             f'num_point_features={self.num_point_features}; check '
                             'DATA_CONFIG.POINT_FEATURE_ENCODING')
        if num_points.shape != voxels.shape[:1]:
            raise InputError(f'voxel_num_points must be ({voxels.shape[0]},) like voxels\' '
                             f'first dimension, got {tuple(num_points.shape)}')
        count = num_points.to(voxels.device).long().clamp(0, voxels.shape[1])
        slots = torch.arange(voxels.shape[1], device=voxels.device)
        real = (slots[None, :] < count[:, None]).to(voxels.dtype)  # (N, P)
        total = (voxels * real[..., None]).sum(dim=1)
        mean = total / torch.clamp_min(count, 1).to(voxels.dtype)[:, None]
        batch_dict['voxel_features'] = mean.contiguous()
        return batch_dict
