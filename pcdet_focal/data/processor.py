"""OpenPCDet's POINT_FEATURE_ENCODING and DATA_PROCESSOR steps, config-validated.

Point feature encoding: ``absolute_coordinates_encoding`` keeps x, y, z and then the
``used_feature_list`` columns picked from ``src_feature_list`` (the raw file's columns).

Data processor steps, run in config order:
- ``mask_points_and_boxes_outside_range``: drops points outside POINT_CLOUD_RANGE (x, y and z,
  half-open like the voxel grid, so ``points`` and ``voxels`` describe the same cloud); in
  training with ``REMOVE_OUTSIDE_BOXES`` drops boxes whose centre is outside the range.
- ``shuffle_points``: random permutation when ``SHUFFLE_ENABLED[mode]``.
- ``transform_points_to_voxels``: ``VOXEL_SIZE``, ``MAX_POINTS_PER_VOXEL``,
  ``MAX_NUMBER_OF_VOXELS {train, test}`` (see voxelize.py).
"""
import numpy as np

from ..errors import ConfigError, DataError
from .voxelize import grid_size_from_range, points_to_voxels


class PointFeatureEncoder:
    """Selects the point columns the model sees; ``num_point_features`` = their count."""

    def __init__(self, cfg, field='DATA_CONFIG.POINT_FEATURE_ENCODING'):
        cfg = cfg or {}
        self.encoding_type = cfg.get('encoding_type', 'absolute_coordinates_encoding')
        if self.encoding_type != 'absolute_coordinates_encoding':
            raise ConfigError(f'{field}.encoding_type={self.encoding_type!r} is not supported; '
                              'use absolute_coordinates_encoding')
        self.src_feature_list = list(cfg.get('src_feature_list', ['x', 'y', 'z', 'intensity']))
        self.used_feature_list = list(cfg.get('used_feature_list', self.src_feature_list))
        if self.src_feature_list[:3] != ['x', 'y', 'z']:
            raise ConfigError(f"{field}.src_feature_list must start with ['x', 'y', 'z'], got "
                              f'{self.src_feature_list}')
        extra = [f for f in self.used_feature_list if f not in ('x', 'y', 'z')]
        missing = [f for f in extra if f not in self.src_feature_list]
        if missing:
            raise ConfigError(f'{field}.used_feature_list names {missing} which are not in '
                              f'src_feature_list {self.src_feature_list}')
        self.columns = [0, 1, 2] + [self.src_feature_list.index(f) for f in extra]

    @property
    def num_point_features(self):
        return len(self.columns)

    def forward(self, data_dict):
        points = data_dict['points']
        if points.shape[1] != len(self.src_feature_list):
            raise DataError(f'frame {data_dict.get("frame_id")}: points have {points.shape[1]} '
                            f'columns but POINT_FEATURE_ENCODING.src_feature_list names '
                            f'{len(self.src_feature_list)} ({self.src_feature_list})')
        data_dict['points'] = np.ascontiguousarray(points[:, self.columns])
        data_dict['use_lead_xyz'] = True
        return data_dict


class DataProcessor:
    """The DATA_PROCESSOR queue. ``grid_size`` (3,) int64 x y z and ``voxel_size`` (3,)
    float32 come from the ``transform_points_to_voxels`` step (required)."""

    STEPS = ('mask_points_and_boxes_outside_range', 'shuffle_points',
             'transform_points_to_voxels')

    def __init__(self, processor_cfgs, point_cloud_range, training,
                 field='DATA_CONFIG.DATA_PROCESSOR', range_field='DATA_CONFIG.POINT_CLOUD_RANGE'):
        self.point_cloud_range = np.asarray(point_cloud_range, dtype=np.float32)
        self.training = training
        self.mode = 'train' if training else 'test'
        self.queue = []
        self.voxel_cfg = None
        for i, cfg in enumerate(processor_cfgs or []):
            where = f'{field}[{i}]'
            name = cfg.get('NAME') if isinstance(cfg, dict) else None
            if name not in self.STEPS:
                raise ConfigError(f'{where}.NAME={name!r} is not a supported processing step; '
                                  f'known: {", ".join(self.STEPS)}')
            self.queue.append((name, cfg))
            if name == 'transform_points_to_voxels':
                self._parse_voxel_cfg(cfg, where, range_field)
        if self.voxel_cfg is None:
            raise ConfigError(f'{field} needs a transform_points_to_voxels step (VOXEL_SIZE, '
                              'MAX_POINTS_PER_VOXEL, MAX_NUMBER_OF_VOXELS): the model is built '
                              'from its grid')

    def _parse_voxel_cfg(self, cfg, where, range_field):
        self.voxel_size = np.asarray(cfg.get('VOXEL_SIZE', []), dtype=np.float32)
        self.grid_size = grid_size_from_range(self.point_cloud_range, cfg.get('VOXEL_SIZE'),
                                              range_field, f'{where}.VOXEL_SIZE')
        max_pts = cfg.get('MAX_POINTS_PER_VOXEL')
        max_vox = cfg.get('MAX_NUMBER_OF_VOXELS')
        if isinstance(max_vox, dict):
            if self.mode not in max_vox:
                raise ConfigError(f"{where}.MAX_NUMBER_OF_VOXELS needs a '{self.mode}' entry, "
                                  f'got {dict(max_vox)}')
            max_vox = max_vox[self.mode]
        if not isinstance(max_pts, int) or isinstance(max_pts, bool) or max_pts < 1:
            raise ConfigError(f'{where}.MAX_POINTS_PER_VOXEL must be an int >= 1, got {max_pts!r}')
        if not isinstance(max_vox, int) or isinstance(max_vox, bool) or max_vox < 1:
            raise ConfigError(f'{where}.MAX_NUMBER_OF_VOXELS[{self.mode}] must be an int >= 1, '
                              f'got {max_vox!r}')
        self.voxel_cfg = {'max_points': max_pts, 'max_voxels': max_vox}

    def points_in_range_mask(self, points):
        """(P,) bool: the point's voxel index lies inside the grid on x, y and z."""
        idx = np.floor((points[:, :3].astype(np.float32) - self.point_cloud_range[:3])
                       / self.voxel_size)
        return np.all((idx >= 0) & (idx < self.grid_size), axis=1)

    def forward(self, data_dict):
        for name, cfg in self.queue:
            data_dict = getattr(self, name)(data_dict, cfg)
        return data_dict

    def mask_points_and_boxes_outside_range(self, data_dict, cfg):
        data_dict['points'] = data_dict['points'][self.points_in_range_mask(data_dict['points'])]
        boxes = data_dict.get('gt_boxes')
        if boxes is not None and self.training and cfg.get('REMOVE_OUTSIDE_BOXES', True):
            lo, hi = self.point_cloud_range[:3], self.point_cloud_range[3:]
            keep = np.all((boxes[:, :3] >= lo) & (boxes[:, :3] <= hi), axis=1)
            data_dict['gt_boxes'] = boxes[keep]
            if 'gt_names' in data_dict:
                data_dict['gt_names'] = data_dict['gt_names'][keep]
        return data_dict

    def shuffle_points(self, data_dict, cfg):
        enabled = cfg.get('SHUFFLE_ENABLED', {'train': True, 'test': False})
        if isinstance(enabled, dict):
            enabled = enabled.get(self.mode, False)
        if enabled:
            data_dict['points'] = data_dict['points'][np.random.permutation(
                len(data_dict['points']))]
        return data_dict

    def transform_points_to_voxels(self, data_dict, cfg):
        voxels, coords, num_points = points_to_voxels(
            data_dict['points'], self.voxel_size, self.point_cloud_range,
            self.voxel_cfg['max_points'], self.voxel_cfg['max_voxels'])
        if not data_dict.get('use_lead_xyz', True):
            voxels = voxels[..., 3:]
        data_dict['voxels'] = voxels
        data_dict['voxel_coords'] = coords
        data_dict['voxel_num_points'] = num_points
        return data_dict
