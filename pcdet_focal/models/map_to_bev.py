"""MAP_TO_BEV modules: sparse 3D voxel features -> ``spatial_features`` (B, C_bev, H, W).

- ``SparseHeightCompression`` (ours): max / mean over each BEV column's occupied voxels, or a
  learned projection equal to "dense flatten + bias-free 1x1 conv", all computed on the
  occupied voxels only (never a [B, C, D, H, W] or [B, C*D, H, W] tensor).
- ``HeightCompression``: OpenPCDet's dense behaviour (``.dense()`` then fold D into channels).
- ``PointPillarScatter3d``: OpenPCDet's behaviour, but the batch size comes from
  ``batch_dict['batch_size']`` (OpenPCDet uses coords.max()+1 and drops a trailing empty sample).

The last two keep OpenPCDet's names, so inside an OpenPCDet checkout OpenPCDet's own classes
stay in charge (register_into_pcdet never replaces them); ours serve the standalone host.

Config keys (MODEL.MAP_TO_BEV) of SparseHeightCompression:
    MODE              max | mean | learned (default max)
    NUM_BEV_FEATURES  output channels; max/mean: must equal the input's C; learned: F
    INPUT_FEATURES    input channels C (required for learned; optional check for max/mean)
    NUM_HEIGHT_BINS   learned: D (default ceil(grid_size z / Z_STRIDE))
    Z_STRIDE          z downsampling before this module (default 1), for the defaults above
    USE_NORM          learned: BatchNorm2d + ReLU after the projection (default True)
    INPUT_SHAPE       [nx, ny, nz] grid of voxel_coords (voxel_features input only; default
                      grid_size with z = ceil(z / Z_STRIDE))
    FEATURE_STRIDE    spatial_features_stride when encoded_spconv_tensor_stride is absent (1)
"""
import math

import torch
from torch import nn

from ..errors import ConfigError, InputError
from ..ops import bev_scatter
from ..ops.sparse import check_coords, to_int_coords
from ..registry import MAP_TO_BEV

_PREFIX = 'MAP_TO_BEV'


def _get(cfg, key, default=None):
    return cfg.get(key, default) if cfg is not None else default


def _pos_int(cfg, key, default=None, required=False, why=''):
    """A positive int config value (bools refused), ``default`` when absent."""
    value = _get(cfg, key)
    if value is None:
        if required:
            raise ConfigError(f'{_PREFIX}.{key} is required{why}')
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) \
            or int(value) <= 0:
        raise ConfigError(f'{_PREFIX}.{key}={value!r} must be a positive integer')
    return int(value)


def _shape3(cfg, key):
    """[nx, ny, nz] of positive ints from the config, or None when absent."""
    value = _get(cfg, key)
    if value is None:
        return None
    try:
        dims = [int(v) for v in value]
        ok = len(dims) == 3 and all(d > 0 and d == v for d, v in zip(dims, value))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f'{_PREFIX}.{key}={value!r} must be three positive integers '
                          '[nx, ny, nz] (x, y, z order)')
    return dims


def _grid_xyz(grid_size):
    """grid_size (x, y, z) as a list of ints, or None."""
    if grid_size is None:
        return None
    dims = [int(v) for v in (grid_size.tolist() if hasattr(grid_size, 'tolist') else grid_size)]
    if len(dims) != 3:
        raise ConfigError(f'grid_size={dims} must have three entries (x, y, z)')
    return dims


def _batch_size(batch_dict, module, fallback=None):
    if 'batch_size' in batch_dict:
        return int(batch_dict['batch_size'])
    if fallback is not None:
        return int(fallback)
    raise InputError(f"{module}: batch_dict['batch_size'] is missing; the data loader's "
                     'collate must set it (the batch size cannot be read from voxel_coords: '
                     'a trailing sample may have no voxels)')


def _feature_stride(batch_dict, cfg):
    stride = batch_dict.get('encoded_spconv_tensor_stride')
    if stride is None:
        stride = _pos_int(cfg, 'FEATURE_STRIDE', default=1)
    return stride


def _is_sparse_tensor(obj):
    return hasattr(obj, 'features') and hasattr(obj, 'indices') and hasattr(obj, 'spatial_shape')


@MAP_TO_BEV.register()
class SparseHeightCompression(nn.Module):
    """Sparse map-to-BEV: (N, C) voxels [b, z, y, x] -> ``spatial_features`` (B, F, H, W).

    Reads ``encoded_spconv_tensor`` (+ ``encoded_spconv_tensor_stride``) when present, else
    ``voxel_features`` (N, C) + ``voxel_coords`` (N, 4) [b, z, y, x] on the INPUT_SHAPE grid.
    Writes ``spatial_features`` (B, NUM_BEV_FEATURES, H, W) contiguous and
    ``spatial_features_stride``. Config keys: see the module docstring.
    """

    MODES = ('max', 'mean', 'learned')

    def __init__(self, model_cfg, grid_size=None, **kwargs):
        super().__init__()
        self.model_cfg = model_cfg
        mode = str(_get(model_cfg, 'MODE', 'max')).lower()
        if mode not in self.MODES:
            raise ConfigError(f'{_PREFIX}.MODE={_get(model_cfg, "MODE")!r} is unknown; valid '
                              f'modes: {", ".join(self.MODES)}')
        self.mode = mode
        z_stride = _pos_int(model_cfg, 'Z_STRIDE', default=1)
        grid = _grid_xyz(grid_size)
        num_bev = _pos_int(model_cfg, 'NUM_BEV_FEATURES')
        in_c = _pos_int(model_cfg, 'INPUT_FEATURES')

        self.input_shape = _shape3(model_cfg, 'INPUT_SHAPE')  # [nx, ny, nz]
        if self.input_shape is None and grid is not None:
            self.input_shape = [grid[0], grid[1], math.ceil(grid[2] / z_stride)]

        if mode in ('max', 'mean'):
            if num_bev is None and in_c is None:
                raise ConfigError(f'{_PREFIX}.NUM_BEV_FEATURES is required: MODE={mode} keeps '
                                  'the input\'s C channels, set NUM_BEV_FEATURES: C')
            if num_bev is not None and in_c is not None and num_bev != in_c:
                raise ConfigError(f'{_PREFIX}.NUM_BEV_FEATURES={num_bev} but MODE={mode} keeps '
                                  f'the input\'s C={in_c} channels (INPUT_FEATURES); set '
                                  f'NUM_BEV_FEATURES: {in_c} or MODE: learned')
            self.in_channels = in_c or num_bev
            self.num_bev_features = self.in_channels
            self.num_height_bins = None
            return

        # learned: weight (F, C*D, 1, 1) laid out like Conv2d(C*D, F, 1).weight (channel c*D + z)
        num_bev = _pos_int(model_cfg, 'NUM_BEV_FEATURES', required=True,
                           why=' for MODE=learned (output channels F)')
        in_c = _pos_int(model_cfg, 'INPUT_FEATURES', required=True,
                        why=' for MODE=learned (the 3D backbone\'s output channels C)')
        bins = _pos_int(model_cfg, 'NUM_HEIGHT_BINS')
        if bins is None:
            if grid is None:
                raise ConfigError(f'{_PREFIX}.NUM_HEIGHT_BINS is required for MODE=learned when '
                                  'no grid_size is given (height bins D of the input)')
            bins = math.ceil(grid[2] / z_stride)
        if _get(model_cfg, 'INPUT_SHAPE') is not None and self.input_shape[2] != bins:
            raise ConfigError(f'{_PREFIX}.INPUT_SHAPE nz={self.input_shape[2]} but '
                              f'NUM_HEIGHT_BINS={bins}; they must agree (height bins D)')
        if self.input_shape is not None:
            self.input_shape[2] = bins
        self.in_channels, self.num_height_bins, self.num_bev_features = in_c, bins, num_bev
        self.weight = nn.Parameter(torch.empty(num_bev, in_c * bins, 1, 1))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # Conv2d's default init
        use_norm = _get(model_cfg, 'USE_NORM', True)
        if not isinstance(use_norm, bool):
            raise ConfigError(f'{_PREFIX}.USE_NORM={use_norm!r} must be true or false')
        # OpenPCDet's BEV BatchNorm settings (eps 1e-3, momentum 0.01)
        self.norm = nn.Sequential(nn.BatchNorm2d(num_bev, eps=1e-3, momentum=0.01),
                                  nn.ReLU()) if use_norm else None

    def _read_input(self, batch_dict):
        """-> features (N, C), coords (N, 4) int32 [b, z, y, x], (D, H, W), batch_size."""
        sp = batch_dict.get('encoded_spconv_tensor')
        if sp is not None:
            if not _is_sparse_tensor(sp):
                raise InputError("SparseHeightCompression: batch_dict['encoded_spconv_tensor'] "
                                 f'must be a spconv SparseConvTensor, got {type(sp).__name__}')
            features, field = sp.features, 'encoded_spconv_tensor.indices'
            coords = to_int_coords(sp.indices, field)
            shape = [int(s) for s in sp.spatial_shape]
            if len(shape) != 3:
                raise InputError(f'SparseHeightCompression: encoded_spconv_tensor.spatial_shape='
                                 f'{shape} must be 3D [D, H, W]')
            batch_size = _batch_size(batch_dict, 'SparseHeightCompression', sp.batch_size)
        elif 'voxel_features' in batch_dict and 'voxel_coords' in batch_dict:
            features, field = batch_dict['voxel_features'], 'voxel_coords'
            coords = to_int_coords(batch_dict['voxel_coords'], field)
            if self.input_shape is None:
                raise InputError(f'SparseHeightCompression: voxel_coords input needs the grid: '
                                 f'set {_PREFIX}.INPUT_SHAPE [nx, ny, nz] (or pass grid_size)')
            nx, ny, nz = self.input_shape
            shape = [nz, ny, nx]
            batch_size = _batch_size(batch_dict, 'SparseHeightCompression')
        else:
            raise InputError('SparseHeightCompression: batch_dict has neither '
                             "'encoded_spconv_tensor' nor 'voxel_features' + 'voxel_coords' "
                             f'(keys: {", ".join(sorted(map(str, batch_dict)))})')
        if not torch.is_tensor(features) or features.dim() != 2 \
                or not features.is_floating_point():
            raise InputError(f'SparseHeightCompression: voxel features must be a float (N, C) '
                             f'tensor, got {getattr(features, "shape", type(features))}')
        if features.shape[0] != coords.shape[0]:
            raise InputError(f'SparseHeightCompression: {features.shape[0]} feature rows but '
                             f'{coords.shape[0]} rows in {field}')
        check_coords(coords, shape, batch_size, field)
        return features, coords, shape, batch_size

    def forward(self, batch_dict):
        features, coords, (D, H, W), batch_size = self._read_input(batch_dict)
        C = features.shape[1]
        if C != self.in_channels:
            if self.mode == 'learned':
                raise InputError(f'{_PREFIX}.INPUT_FEATURES={self.in_channels} but the input voxel '
                                 f'features have C={C} channels; set INPUT_FEATURES: {C}')
            keys = [k for k in ('NUM_BEV_FEATURES', 'INPUT_FEATURES')
                    if _get(self.model_cfg, k) is not None]
            raise InputError(f'{_PREFIX}.{keys[0]}={self.in_channels} but the input voxel '
                             f'features have C={C} channels and MODE={self.mode} keeps C; set '
                             + ' and '.join(f'{k}: {C}' for k in keys))
        if self.mode == 'max':
            bev = bev_scatter.bev_max(features, coords, batch_size, H, W)
        elif self.mode == 'mean':
            bev = bev_scatter.bev_mean(features, coords, batch_size, H, W)
        else:
            if D != self.num_height_bins:
                raise InputError(f'{_PREFIX}.NUM_HEIGHT_BINS={self.num_height_bins} but the '
                                 f'input has D={D} height bins (spatial shape [D, H, W]='
                                 f'{[D, H, W]}); set NUM_HEIGHT_BINS: {D} (or Z_STRIDE to match)')
            bev = bev_scatter.bev_learned(features, coords, self.weight, batch_size, H, W)
            if self.norm is not None:
                bev = self.norm(bev)
        batch_dict['spatial_features'] = bev.contiguous()
        batch_dict['spatial_features_stride'] = _feature_stride(batch_dict, self.model_cfg)
        return batch_dict


@MAP_TO_BEV.register()
class HeightCompression(nn.Module):
    """OpenPCDet's dense map-to-BEV: ``encoded_spconv_tensor.dense()`` -> (B, C*D, H, W).

    Channel ``c * D + z`` (the ``.view`` of the channel-first volume). NUM_BEV_FEATURES must
    equal C*D; checked against the input before anything is densified. Memory: spconv's
    ``.dense()`` holds two [B, C, D, H, W]-sized buffers at its peak.
    Config keys: NUM_BEV_FEATURES (required), FEATURE_STRIDE (default 1, used when
    ``encoded_spconv_tensor_stride`` is absent).
    """

    def __init__(self, model_cfg, grid_size=None, **kwargs):
        super().__init__()
        self.model_cfg = model_cfg
        self.num_bev_features = _pos_int(model_cfg, 'NUM_BEV_FEATURES', required=True,
                                         why=' (= C x D of the 3D backbone output)')

    def forward(self, batch_dict):
        sp = batch_dict.get('encoded_spconv_tensor')
        if sp is None or not _is_sparse_tensor(sp):
            raise InputError("HeightCompression needs batch_dict['encoded_spconv_tensor'] (a "
                             'spconv SparseConvTensor); for voxel_features + voxel_coords use '
                             'SparseHeightCompression or PointPillarScatter3d (keys: '
                             f'{", ".join(sorted(map(str, batch_dict)))})')
        C = sp.features.shape[1]
        D, H, W = (int(s) for s in sp.spatial_shape)
        if C * D != self.num_bev_features:
            raise InputError(f'{_PREFIX}.NUM_BEV_FEATURES={self.num_bev_features} but '
                             f'HeightCompression flattens C*D = {C}*{D} = {C * D} channels; set '
                             f'NUM_BEV_FEATURES: {C * D} (or use SparseHeightCompression)')
        if 'batch_size' in batch_dict and int(batch_dict['batch_size']) != int(sp.batch_size):
            raise InputError(f"HeightCompression: batch_dict['batch_size']="
                             f'{int(batch_dict["batch_size"])} but encoded_spconv_tensor.'
                             f'batch_size={sp.batch_size}; build the sparse tensor with the '
                             'batch size of the batch')
        dense = sp.dense()  # (B, C, D, H, W)
        B = dense.shape[0]
        batch_dict['spatial_features'] = dense.view(B, C * D, H, W)
        batch_dict['spatial_features_stride'] = _feature_stride(batch_dict, self.model_cfg)
        return batch_dict


@MAP_TO_BEV.register()
class PointPillarScatter3d(nn.Module):
    """OpenPCDet's PointPillarScatter3d: ``pillar_features`` (N, C) at ``voxel_coords``
    [b, z, y, x] -> ``spatial_features`` (B, C*nz, ny, nx), channel ``c * nz + z``.

    The batch size is ``batch_dict['batch_size']`` (a trailing sample without voxels gets its
    zero map). Config keys: INPUT_SHAPE [nx, ny, nz] (required), NUM_BEV_FEATURES (= C*nz,
    required), FEATURE_STRIDE (default 1, written as ``spatial_features_stride`` when
    ``encoded_spconv_tensor_stride`` is absent).
    """

    def __init__(self, model_cfg, grid_size=None, **kwargs):
        super().__init__()
        self.model_cfg = model_cfg
        shape = _shape3(model_cfg, 'INPUT_SHAPE')
        if shape is None:
            raise ConfigError(f'{_PREFIX}.INPUT_SHAPE is required for PointPillarScatter3d: '
                              '[nx, ny, nz] of the voxel grid it scatters')
        self.nx, self.ny, self.nz = shape
        self.num_bev_features = _pos_int(model_cfg, 'NUM_BEV_FEATURES', required=True,
                                         why=' (= C x nz)')
        if self.num_bev_features % self.nz:
            raise ConfigError(f'{_PREFIX}.NUM_BEV_FEATURES={self.num_bev_features} must be C x '
                              f'nz but is not a multiple of INPUT_SHAPE nz={self.nz}')
        self.num_bev_features_before_compression = self.num_bev_features // self.nz

    def forward(self, batch_dict):
        missing = [k for k in ('pillar_features', 'voxel_coords') if k not in batch_dict]
        if missing:
            raise InputError(f'PointPillarScatter3d needs batch_dict keys pillar_features and '
                             f'voxel_coords; missing: {", ".join(missing)}')
        features = batch_dict['pillar_features']
        coords = to_int_coords(batch_dict['voxel_coords'], 'voxel_coords')
        C = self.num_bev_features_before_compression
        if not torch.is_tensor(features) or features.dim() != 2:
            raise InputError('PointPillarScatter3d: pillar_features must be an (N, C) tensor, '
                             f'got {getattr(features, "shape", type(features).__name__)}')
        if features.shape[1] != C:
            raise InputError(f'{_PREFIX}.NUM_BEV_FEATURES={self.num_bev_features} = C x nz '
                             f'(nz={self.nz}) expects C={C} but pillar_features have '
                             f'C={features.shape[1]}; set NUM_BEV_FEATURES: '
                             f'{features.shape[1] * self.nz}')
        if features.shape[0] != coords.shape[0]:
            raise InputError(f'PointPillarScatter3d: {features.shape[0]} pillar_features rows '
                             f'but {coords.shape[0]} voxel_coords rows')
        batch_size = _batch_size(batch_dict, 'PointPillarScatter3d')
        check_coords(coords, [self.nz, self.ny, self.nx], batch_size, 'voxel_coords')
        batch_dict['spatial_features'] = bev_scatter.scatter_height_to_channels(
            features, coords, batch_size, self.nz, self.ny, self.nx)
        batch_dict['spatial_features_stride'] = _feature_stride(batch_dict, self.model_cfg)
        return batch_dict
