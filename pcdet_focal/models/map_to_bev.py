"""MAP_TO_BEV modules: sparse 3D voxel features -> ``spatial_features`` (B, C_bev, H, W).

- ``SparseHeightCompression`` (ours): max / mean over each BEV column's occupied voxels, or a
  learned projection equal to "dense flatten + bias-free 1x1 conv", all computed on the
  occupied voxels only (never a [B, C, D, H, W] or [B, C*D, H, W] tensor).
- ``HeightCompression``: OpenPCDet's dense behaviour (``.dense()`` then fold D into channels).
- ``PointPillarScatter3d``: OpenPCDet's behaviour, but the batch size comes from
  ``batch_dict['batch_size']`` (OpenPCDet uses coords.max()+1 and drops a trailing empty sample).

The last two keep OpenPCDet's names, so inside an OpenPCDet checkout OpenPCDet's own classes
stay in charge (register_into_pcdet never replaces them); ours serve the standalone host.

Config keys: each class's ``CONFIG`` declaration (README "Module configuration keys").

The height bins D of the learned projection come from what the 3D backbone really outputs
(:func:`backbone_output_shape`): our detector passes it as ``input_shape``; under OpenPCDet's
builder, which hands MAP_TO_BEV only ``grid_size``, it is read from the backbone that builder
has just built. ``NUM_HEIGHT_BINS`` / ``Z_STRIDE`` state it by hand; a contradiction, or no way
to know it, is a one-line ConfigError giving the value to set.
"""
import inspect
import math

import torch
from torch import nn

from ..errors import ConfigError, InputError
from ..ops import bev_scatter
from ..ops.sparse import check_coords, to_int_coords
from ..registry import MAP_TO_BEV
from ..schema import REQUIRED, Bool, Choice, Int, Key, Schema, Triple
from .leaf import Parameters, saved_as
from .map_to_bev_memory import height_compression_memory, scatter3d_memory, shc_memory

_PREFIX = 'MODEL.MAP_TO_BEV'
_FEATURE_STRIDE = Key('FEATURE_STRIDE', Int(lo=1), 1,
                      'BEV stride written as spatial_features_stride when the 3D backbone does '
                      'not give encoded_spconv_tensor_stride')


def _grid_xyz(grid_size):
    """grid_size (x, y, z) as a list of ints, or None."""
    if grid_size is None:
        return None
    dims = [int(v) for v in (grid_size.tolist() if hasattr(grid_size, 'tolist') else grid_size)]
    if len(dims) != 3:
        raise ConfigError(f'grid_size={dims} must have three entries (x, y, z)')
    return dims


def _conv_out(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def backbone_output_shape(backbone):
    """[x, y, z] of the sparse volume a built 3D backbone hands on, or None when unknown.

    Read from the module itself: ``output_sparse_shape`` (pcdet_focal's backbones),
    ``input_layer.sparse_shape_list[-1]`` (OpenPCDet's DSVT), or OpenPCDet's spconv backbones'
    ``sparse_shape`` [z, y, x] pushed through their strided sparse convs in build order.
    """
    shape = getattr(backbone, 'output_sparse_shape', None)
    if shape is not None:
        return [int(v) for v in shape]
    stages = getattr(getattr(backbone, 'input_layer', None), 'sparse_shape_list', None)
    if stages:
        return [int(v) for v in stages[-1]]
    zyx = getattr(backbone, 'sparse_shape', None)
    if zyx is None or len(zyx) != 3:
        return None
    zyx = [int(v) for v in zyx]
    for m in backbone.modules():
        if hasattr(m, 'subm') and hasattr(m, 'stride') and not m.subm \
                and not getattr(m, 'inverse', False):
            zyx = [_conv_out(n, k, s, p, d) for n, k, s, p, d in
                   zip(zyx, m.kernel_size, m.stride, m.padding, m.dilation)]
    return zyx[::-1]


def _pcdet_builder_backbone():
    """The 3D backbone OpenPCDet's Detector3DTemplate built just before calling us (its
    ``build_map_to_bev_module`` passes only grid_size; ``model_info_dict`` holds the modules
    built so far). None when we are not constructed by that builder."""
    frame = inspect.currentframe()
    try:
        for _ in range(6):
            frame = frame.f_back
            if frame is None:
                return None
            info = frame.f_locals.get('model_info_dict')
            if isinstance(info, dict) and isinstance(info.get('module_list'), list):
                built = info['module_list']
                return built[-1] if built else False
        return None
    finally:
        del frame


def _batch_size(batch_dict, module, fallback=None):
    if 'batch_size' in batch_dict:
        return int(batch_dict['batch_size'])
    if fallback is not None:
        return int(fallback)
    raise InputError(f"{module}: batch_dict['batch_size'] is missing; the data loader's "
                     'collate must set it (the batch size cannot be read from voxel_coords: '
                     'a trailing sample may have no voxels)')


def _feature_stride(batch_dict, cfg):
    """encoded_spconv_tensor_stride when the backbone wrote it, else FEATURE_STRIDE."""
    stride = batch_dict.get('encoded_spconv_tensor_stride')
    return cfg.FEATURE_STRIDE if stride is None else stride


def _is_sparse_tensor(obj):
    return hasattr(obj, 'features') and hasattr(obj, 'indices') and hasattr(obj, 'spatial_shape')


@MAP_TO_BEV.register()
class SparseHeightCompression(nn.Module):
    """Sparse map-to-BEV: (N, C) voxels [b, z, y, x] -> ``spatial_features`` (B, F, H, W).

    Reads ``encoded_spconv_tensor`` (+ ``encoded_spconv_tensor_stride``) when present, else
    ``voxel_features`` (N, C) + ``voxel_coords`` (N, 4) [b, z, y, x] on the INPUT_SHAPE grid.
    Writes ``spatial_features`` (B, NUM_BEV_FEATURES, H, W) contiguous and
    ``spatial_features_stride``.

    ``input_shape`` [x, y, z]: the grid the 3D backbone outputs, or 'unknown' when that
    backbone does not say (our detector passes it; see the module docstring for OpenPCDet's
    builder).
    """

    CONFIG = Schema('SparseHeightCompression', [
        Key('MODE', Choice('max', 'mean', 'learned', lower=True), 'max',
            '`max` / `mean` over the occupied voxels of each BEV column, or `learned`: a '
            'per-height linear projection C x D -> F (dense flatten + 1x1 conv) computed from '
            'the occupied voxels only'),
        Key('NUM_BEV_FEATURES', Int(lo=1), None,
            'output channels; `max` / `mean` keep the input channels C (give C or omit); '
            '`learned`: F, required'),
        Key('INPUT_FEATURES', Int(lo=1), None,
            'input channels C: required for `learned`, a check for `max` / `mean`'),
        Key('NUM_HEIGHT_BINS', Int(lo=1), None,
            '`learned`: height bins D of the input; default: what the 3D backbone outputs'),
        Key('Z_STRIDE', Int(lo=1), None,
            '`learned` without a known 3D backbone: D = ceil(grid z / Z_STRIDE)'),
        Key('USE_NORM', Bool(), True, '`learned`: BatchNorm2d + ReLU after the projection'),
        Key('INPUT_SHAPE', Triple(1, '[nx, ny, nz]'), None,
            'grid of voxel_coords for voxel_features input (default: the 3D backbone output)'),
        _FEATURE_STRIDE,
    ])
    memory = shc_memory

    def __init__(self, model_cfg, grid_size=None, input_shape=None, **kwargs):
        super().__init__()
        self.model_cfg = model_cfg
        cfg = self.cfg = self.CONFIG.parse(model_cfg, _PREFIX)
        self.mode = cfg.MODE
        grid = _grid_xyz(grid_size)
        upstream = self._upstream_shape(input_shape, grid)   # [x, y, z], None, or 'unknown'
        if self.mode in ('max', 'mean'):
            if cfg.NUM_BEV_FEATURES is None and cfg.INPUT_FEATURES is None:
                raise ConfigError(f'{_PREFIX}.NUM_BEV_FEATURES is required: MODE={self.mode} '
                                  "keeps the input's C channels, set NUM_BEV_FEATURES: C")
            if None not in (cfg.NUM_BEV_FEATURES, cfg.INPUT_FEATURES) and \
                    cfg.NUM_BEV_FEATURES != cfg.INPUT_FEATURES:
                raise ConfigError(f'{_PREFIX}.NUM_BEV_FEATURES={cfg.NUM_BEV_FEATURES} but MODE='
                                  f"{self.mode} keeps the input's C={cfg.INPUT_FEATURES} "
                                  f'channels (INPUT_FEATURES); set NUM_BEV_FEATURES: '
                                  f'{cfg.INPUT_FEATURES} or MODE: learned')
            self.in_channels = cfg.INPUT_FEATURES or cfg.NUM_BEV_FEATURES
            self.num_bev_features = self.in_channels
            self.num_height_bins = None
            depth = None
        else:
            # learned: weight (F, C*D, 1, 1) laid out like Conv2d(C*D, F, 1).weight (c*D + z)
            for key, what in (('NUM_BEV_FEATURES', 'output channels F'),
                              ('INPUT_FEATURES', "the 3D backbone's output channels C")):
                if cfg[key] is None:
                    raise ConfigError(f'{_PREFIX}.{key} is required for MODE=learned ({what})')
            depth = self._height_bins(upstream, grid)
            num_bev, in_c = cfg.NUM_BEV_FEATURES, cfg.INPUT_FEATURES
            self.in_channels, self.num_height_bins, self.num_bev_features = in_c, depth, num_bev
            # on a leaf module: OpenPCDet's adam_onecycle trains leaf modules' parameters only
            self.proj = Parameters(weight=nn.Parameter(torch.empty(num_bev, in_c * depth, 1, 1)))
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # Conv2d's default init
            saved_as(self, {'weight': 'proj.weight'})
            # OpenPCDet's BEV BatchNorm settings (eps 1e-3, momentum 0.01)
            self.norm = nn.Sequential(nn.BatchNorm2d(num_bev, eps=1e-3, momentum=0.01),
                                      nn.ReLU()) if cfg.USE_NORM else None
        self.input_shape = self._input_grid(upstream, grid, depth)

    @property
    def weight(self):
        """MODE learned: the (F, C*D, 1, 1) projection."""
        return self.proj.weight

    @staticmethod
    def _upstream_shape(input_shape, grid):
        """[x, y, z] reaching this module: given, or read from the backbone OpenPCDet's builder
        just built ('unknown' when that backbone does not say; the grid itself after a VFE
        only); None when built outside any builder."""
        if input_shape == 'unknown':
            return input_shape
        if input_shape is not None:
            return [int(v) for v in input_shape]
        backbone = _pcdet_builder_backbone()
        if backbone is None:
            return None
        if backbone is False or type(backbone).__name__.endswith('VFE'):
            return grid
        return backbone_output_shape(backbone) or 'unknown'

    def _input_grid(self, upstream, grid, depth):
        """[nx, ny, nz] of voxel_coords input: INPUT_SHAPE, the backbone's output, else the
        grid (z divided by Z_STRIDE); ``depth``: the learned height bins, when fixed."""
        cfg = self.cfg
        if cfg.INPUT_SHAPE is not None:
            return list(cfg.INPUT_SHAPE)
        if isinstance(upstream, list):
            return list(upstream)
        if grid is None:
            return None
        return [grid[0], grid[1], depth or math.ceil(grid[2] / (cfg.Z_STRIDE or 1))]

    def _height_bins(self, upstream, grid):
        """D of the learned projection (see the module docstring)."""
        cfg, p = self.cfg, _PREFIX
        given = cfg.NUM_HEIGHT_BINS
        if cfg.INPUT_SHAPE is not None:
            if given is not None and given != cfg.INPUT_SHAPE[2]:
                raise ConfigError(f'{p}.INPUT_SHAPE nz={cfg.INPUT_SHAPE[2]} but NUM_HEIGHT_BINS='
                                  f'{given}; they must agree (height bins D)')
            given = cfg.INPUT_SHAPE[2]
        from_stride = None
        if cfg.Z_STRIDE is not None and grid is not None:
            from_stride = math.ceil(grid[2] / cfg.Z_STRIDE)
        if isinstance(upstream, list):
            d = upstream[2]
            for key, value in (('NUM_HEIGHT_BINS', given), ('Z_STRIDE', from_stride)):
                if value is not None and value != d:
                    shown = cfg.NUM_HEIGHT_BINS if key == 'NUM_HEIGHT_BINS' else cfg.Z_STRIDE
                    raise ConfigError(f'{p}.{key}={shown} gives {value} height bins but the 3D '
                                      f'backbone outputs {d} (its grid {upstream}, x y z); set '
                                      f'NUM_HEIGHT_BINS: {d} or remove {key}')
            return d
        if given is not None:
            return given
        if from_stride is not None:
            return from_stride
        if upstream is None and grid is not None:
            return grid[2]     # built outside a detector: grid_size is the input's grid
        raise ConfigError(f'{p}.NUM_HEIGHT_BINS is required for MODE=learned here: the 3D '
                          "backbone does not tell its output height at build time; set "
                          'NUM_HEIGHT_BINS: D (the z size of its encoded_spconv_tensor)')

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
                    if self.cfg[k] is not None]
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
        batch_dict['spatial_features_stride'] = _feature_stride(batch_dict, self.cfg)
        return batch_dict


@MAP_TO_BEV.register()
class HeightCompression(nn.Module):
    """OpenPCDet's dense map-to-BEV: ``encoded_spconv_tensor.dense()`` -> (B, C*D, H, W).

    Channel ``c * D + z`` (the ``.view`` of the channel-first volume). NUM_BEV_FEATURES must
    equal C*D; checked against the input before anything is densified. Memory: spconv's
    ``.dense()`` holds two [B, C, D, H, W]-sized buffers at its peak.
    """

    CONFIG = Schema('HeightCompression', [
        Key('NUM_BEV_FEATURES', Int(lo=1), REQUIRED,
            'C x D: channels times height bins of the 3D backbone output'),
        _FEATURE_STRIDE,
    ])
    memory = height_compression_memory

    def __init__(self, model_cfg, grid_size=None, **kwargs):
        super().__init__()
        self.model_cfg = model_cfg
        self.cfg = self.CONFIG.parse(model_cfg, _PREFIX)
        self.num_bev_features = self.cfg.NUM_BEV_FEATURES

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
        batch_dict['spatial_features_stride'] = _feature_stride(batch_dict, self.cfg)
        return batch_dict


@MAP_TO_BEV.register()
class PointPillarScatter3d(nn.Module):
    """OpenPCDet's PointPillarScatter3d: ``pillar_features`` (N, C) at ``voxel_coords``
    [b, z, y, x] -> ``spatial_features`` (B, C*nz, ny, nx), channel ``c * nz + z``.

    The batch size is ``batch_dict['batch_size']`` (a trailing sample without voxels gets its
    zero map).
    """

    CONFIG = Schema('PointPillarScatter3d', [
        Key('INPUT_SHAPE', Triple(1, '[nx, ny, nz]'), REQUIRED,
            'the voxel grid it scatters, x y z'),
        Key('NUM_BEV_FEATURES', Int(lo=1), REQUIRED, 'C x nz: channels times height cells'),
        _FEATURE_STRIDE,
    ])
    memory = scatter3d_memory

    def __init__(self, model_cfg, grid_size=None, **kwargs):
        super().__init__()
        self.model_cfg = model_cfg
        self.cfg = self.CONFIG.parse(model_cfg, _PREFIX)
        self.nx, self.ny, self.nz = self.cfg.INPUT_SHAPE
        self.num_bev_features = self.cfg.NUM_BEV_FEATURES
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
        batch_dict['spatial_features_stride'] = _feature_stride(batch_dict, self.cfg)
        return batch_dict
