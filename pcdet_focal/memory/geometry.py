"""Voxel grid geometry read from a config, and the shape arithmetic of the stages after it.

Orders: ``grid`` / ``voxel_size`` / ``point_cloud_range`` are x, y, z (OpenPCDet's configs);
``spatial`` shapes handed between memory models are [D, H, W] = z, y, x (spconv's order).
"""
from dataclasses import dataclass

from ..config import cfg_get
from ..errors import ConfigError

VOXELIZERS = ('transform_points_to_voxels', 'transform_points_to_voxels_placeholder')


@dataclass
class Geometry:
    point_cloud_range: tuple      # x_min, y_min, z_min, x_max, y_max, z_max (m)
    voxel_size: tuple             # x, y, z (m)
    grid: tuple                   # nx, ny, nz voxels
    num_point_features: int       # per point, e.g. 4 = x, y, z, intensity
    max_points_per_voxel: int
    max_voxels_train: object      # int, or None for dynamic voxelisation
    voxelizer: str

    @property
    def spatial(self):
        """The voxel grid as [D, H, W] (z, y, x)."""
        nx, ny, nz = self.grid
        return (nz, ny, nx)

    def describe(self):
        nx, ny, nz = self.grid
        vs = ', '.join(f'{v:g}' for v in self.voxel_size)
        return f'voxel grid {nx} x {ny} x {nz} (x, y, z) at voxel size [{vs}] m'


def ceil_div(a, b):
    return -(-int(a) // int(b))


def conv_out(size, k, s=1, p=0, d=1):
    """Output length of a convolution along one axis (floor, as PyTorch and spconv)."""
    return (int(size) + 2 * int(p) - int(d) * (int(k) - 1) - 1) // int(s) + 1


def _number_list(value, n, field, cfg_file):
    if not isinstance(value, (list, tuple)) or len(value) != n or \
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise ConfigError(f'{cfg_file}: {field} must be a list of {n} numbers, got {value!r}')
    return tuple(float(v) for v in value)


def _voxelizer(cfg):
    procs = cfg_get(cfg, 'DATA_CONFIG.DATA_PROCESSOR', None) or []
    if not isinstance(procs, (list, tuple)):
        return None
    for proc in procs:
        if isinstance(proc, dict) and proc.get('NAME') in VOXELIZERS:
            return proc
    return None


def _num_point_features(cfg):
    used = cfg_get(cfg, 'DATA_CONFIG.POINT_FEATURE_ENCODING.used_feature_list', None)
    if isinstance(used, (list, tuple)) and used:
        return len(used)
    return 4  # x, y, z, intensity: OpenPCDet's default encoding


def geometry_from_config(cfg):
    """:class:`Geometry` of ``cfg`` (an OpenPCDet-style config); ConfigError on bad fields."""
    cfg_file = cfg.get('CFG_FILE', 'config')
    if not isinstance(cfg.get('DATA_CONFIG'), dict):
        raise ConfigError(f'{cfg_file}: DATA_CONFIG is missing; the estimator needs its '
                          'POINT_CLOUD_RANGE and DATA_PROCESSOR (transform_points_to_voxels)')
    pcr = cfg_get(cfg, 'DATA_CONFIG.POINT_CLOUD_RANGE', None)
    if pcr is None:
        raise ConfigError(f'{cfg_file}: DATA_CONFIG.POINT_CLOUD_RANGE is missing; give '
                          '[x_min, y_min, z_min, x_max, y_max, z_max] in metres')
    pcr = _number_list(pcr, 6, 'DATA_CONFIG.POINT_CLOUD_RANGE', cfg_file)
    proc = _voxelizer(cfg)
    field = 'DATA_CONFIG.DATA_PROCESSOR[transform_points_to_voxels].VOXEL_SIZE'
    if proc is None or proc.get('VOXEL_SIZE') is None:
        raise ConfigError(f'{cfg_file}: {field} is missing; add a DATA_PROCESSOR entry '
                          '{NAME: transform_points_to_voxels, VOXEL_SIZE: [x, y, z], '
                          'MAX_POINTS_PER_VOXEL: 5, MAX_NUMBER_OF_VOXELS: {train: .., test: ..}}')
    vs = _number_list(proc['VOXEL_SIZE'], 3, field, cfg_file)
    grid = []
    for axis, name in enumerate('xyz'):
        lo, hi, v = pcr[axis], pcr[axis + 3], vs[axis]
        if v <= 0:
            raise ConfigError(f'{cfg_file}: {field} {name}={v:g} must be > 0')
        if hi <= lo:
            raise ConfigError(f'{cfg_file}: DATA_CONFIG.POINT_CLOUD_RANGE {name}_max={hi:g} '
                              f'must be greater than {name}_min={lo:g}')
        n = (hi - lo) / v
        if abs(n - round(n)) > 1e-4 * max(1.0, n):
            raise ConfigError(
                f'{cfg_file}: the grid does not divide evenly along {name}: '
                f'DATA_CONFIG.POINT_CLOUD_RANGE {name} extent {hi - lo:g} m / VOXEL_SIZE '
                f'{name} {v:g} m = {n:.4f} voxels; change the range or the voxel size so '
                'every axis gives a whole number of voxels')
        grid.append(int(round(n)))
    max_voxels = proc.get('MAX_NUMBER_OF_VOXELS')
    if isinstance(max_voxels, dict):
        max_voxels = max_voxels.get('train', max_voxels.get('test'))
    if max_voxels is not None:
        if isinstance(max_voxels, bool) or not isinstance(max_voxels, int) or max_voxels <= 0:
            raise ConfigError(f'{cfg_file}: DATA_CONFIG.DATA_PROCESSOR[transform_points_to_'
                              f'voxels].MAX_NUMBER_OF_VOXELS.train must be a positive '
                              f'integer, got {max_voxels!r}')
    max_pts = proc.get('MAX_POINTS_PER_VOXEL', 32)
    if isinstance(max_pts, bool) or not isinstance(max_pts, int) or max_pts <= 0:
        raise ConfigError(f'{cfg_file}: DATA_CONFIG.DATA_PROCESSOR[transform_points_to_voxels]'
                          f'.MAX_POINTS_PER_VOXEL must be a positive integer, got {max_pts!r}')
    return Geometry(point_cloud_range=pcr, voxel_size=vs, grid=tuple(grid),
                    num_point_features=_num_point_features(cfg), max_points_per_voxel=max_pts,
                    max_voxels_train=max_voxels, voxelizer=proc['NAME'])
