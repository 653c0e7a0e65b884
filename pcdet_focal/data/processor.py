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
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, DataError
from ..schema import (REQUIRED, AnyValue, Bool, Choice, Float, Int, Key, ListOf, PerSplit, Schema,
                      Steps, Str)
from .voxelize import grid_size_from_range, points_to_voxels

ENCODING_CONFIG = Schema('POINT_FEATURE_ENCODING', [
    Key('encoding_type', Choice('absolute_coordinates_encoding'),
        'absolute_coordinates_encoding', 'x, y, z, then the used features'),
    Key('src_feature_list', ListOf(Str(), min_len=3), ['x', 'y', 'z', 'intensity'],
        "the raw file's point columns (x, y, z first)"),
    Key('used_feature_list', ListOf(Str(), min_len=3), None,
        'columns the model sees (default: all of src_feature_list)'),
])

_VOXEL_STEP = Schema('transform_points_to_voxels', [
    Key('VOXEL_SIZE', ListOf(Float(lo=0, lo_open=True), length=3), REQUIRED, 'metres, x y z'),
    Key('MAX_POINTS_PER_VOXEL', Int(lo=1), REQUIRED, 'points kept per voxel'),
    Key('MAX_NUMBER_OF_VOXELS', PerSplit(Int(lo=1)), REQUIRED, 'voxels kept per frame'),
    Key('DOUBLE_FLIP', AnyValue(), None, "OpenPCDet's test-time flip (unused)"),
])
# OpenPCDet's dynamic voxelisation (voxels built in the model): no caps. Read for the voxel
# grid only (the memory estimator); our datasets refuse it.
_DYNAMIC_VOXEL_STEP = Schema('transform_points_to_voxels_placeholder', [
    Key('VOXEL_SIZE', ListOf(Float(lo=0, lo_open=True), length=3), REQUIRED, 'metres, x y z'),
])


@dataclass
class VoxelGeometry:
    """The voxel grid of a DATA_CONFIG (x, y, z order throughout)."""

    point_cloud_range: list        # 6 floats
    voxel_size: list               # 3 floats
    grid_size: list                # 3 ints
    num_point_features: int
    max_points_per_voxel: object   # int; None for dynamic voxelisation
    max_voxels: object             # {train, test} ints; None: no cap (dynamic)
    step: str                      # the DATA_PROCESSOR step that voxelises


def voxel_geometry(data_cfg, field='DATA_CONFIG', required=True):
    """:class:`VoxelGeometry` of any dataset's DATA_CONFIG (OpenPCDet's too): its range, point
    encoding and voxelisation step, read with their declarations. Without a voxelisation step
    (a point-based model): an error, or with ``required=False`` a geometry whose voxel fields
    are None."""
    if not isinstance(data_cfg, dict):
        raise ConfigError(f'{field} is missing')
    pcr = ListOf(Float(), length=6).check(data_cfg.get('POINT_CLOUD_RANGE'),
                                          f'{field}.POINT_CLOUD_RANGE')
    encoder = PointFeatureEncoder(data_cfg.get('POINT_FEATURE_ENCODING'),
                                  f'{field}.POINT_FEATURE_ENCODING')
    steps = data_cfg.get('DATA_PROCESSOR') or []
    for i, step in enumerate(steps if isinstance(steps, (list, tuple)) else []):
        name = step.get('NAME') if isinstance(step, dict) else None
        schema = {_VOXEL_STEP.name: _VOXEL_STEP,
                  _DYNAMIC_VOXEL_STEP.name: _DYNAMIC_VOXEL_STEP}.get(name)
        if schema is None:
            continue
        where = f'{field}.DATA_PROCESSOR[{i}]'
        cfg = schema.parse(step, where)
        grid = grid_size_from_range(pcr, cfg.VOXEL_SIZE, f'{field}.POINT_CLOUD_RANGE',
                                    f'{where}.VOXEL_SIZE')
        return VoxelGeometry(pcr, cfg.VOXEL_SIZE, [int(g) for g in grid],
                             encoder.num_point_features, cfg.get('MAX_POINTS_PER_VOXEL'),
                             cfg.get('MAX_NUMBER_OF_VOXELS'), name)
    if not required:
        return VoxelGeometry(pcr, None, None, encoder.num_point_features, None, None, None)
    raise ConfigError(f'{field}.DATA_PROCESSOR needs a transform_points_to_voxels step '
                      '(VOXEL_SIZE, MAX_POINTS_PER_VOXEL, MAX_NUMBER_OF_VOXELS): the model is '
                      'built from its grid')


PROCESSOR_STEPS = Steps({
    'mask_points_and_boxes_outside_range': Schema('mask_points_and_boxes_outside_range', [
        Key('REMOVE_OUTSIDE_BOXES', Bool(), True, 'training: drop boxes centred outside'),
        Key('USE_CENTER_TO_FILTER', AnyValue(), None, "OpenPCDet's key (unused)"),
        Key('STRICT_MASK', AnyValue(), None, "OpenPCDet's key (unused)"),
    ]),
    'shuffle_points': Schema('shuffle_points', [
        Key('SHUFFLE_ENABLED', PerSplit(Bool(), allow_scalar=True),
            {'train': True, 'test': False}, 'shuffle the points of a frame'),
    ]),
    'transform_points_to_voxels': _VOXEL_STEP,
}, 'DATA_PROCESSOR')


class PointFeatureEncoder:
    """Selects the point columns the model sees; ``num_point_features`` = their count."""

    def __init__(self, cfg, field='DATA_CONFIG.POINT_FEATURE_ENCODING'):
        cfg = ENCODING_CONFIG.parse(cfg, field)
        self.encoding_type = cfg.encoding_type
        self.src_feature_list = list(cfg.src_feature_list)
        self.used_feature_list = list(cfg.used_feature_list or self.src_feature_list)
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

    def __init__(self, processor_cfgs, point_cloud_range, training,
                 field='DATA_CONFIG.DATA_PROCESSOR', range_field='DATA_CONFIG.POINT_CLOUD_RANGE'):
        self.point_cloud_range = np.asarray(point_cloud_range, dtype=np.float32)
        self.training = training
        self.mode = 'train' if training else 'test'
        self.queue = []
        self.voxel_cfg = None
        for i, cfg in enumerate(PROCESSOR_STEPS.check(processor_cfgs, field)):
            self.queue.append((cfg.NAME, cfg))
            if cfg.NAME == 'transform_points_to_voxels':
                self._parse_voxel_cfg(cfg, f'{field}[{i}]', range_field)
        if self.voxel_cfg is None:
            raise ConfigError(f'{field} needs a transform_points_to_voxels step (VOXEL_SIZE, '
                              'MAX_POINTS_PER_VOXEL, MAX_NUMBER_OF_VOXELS): the model is built '
                              'from its grid')

    def _parse_voxel_cfg(self, cfg, where, range_field):
        self.voxel_size = np.asarray(cfg.VOXEL_SIZE, dtype=np.float32)
        self.grid_size = grid_size_from_range(self.point_cloud_range, cfg.VOXEL_SIZE,
                                              range_field, f'{where}.VOXEL_SIZE')
        self.voxel_cfg = {'max_points': cfg.MAX_POINTS_PER_VOXEL,
                          'max_voxels': cfg.MAX_NUMBER_OF_VOXELS[self.mode]}

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
        if boxes is not None and self.training and cfg.REMOVE_OUTSIDE_BOXES:
            lo, hi = self.point_cloud_range[:3], self.point_cloud_range[3:]
            keep = np.all((boxes[:, :3] >= lo) & (boxes[:, :3] <= hi), axis=1)
            data_dict['gt_boxes'] = boxes[keep]
            if 'gt_names' in data_dict:
                data_dict['gt_names'] = data_dict['gt_names'][keep]
        return data_dict

    def shuffle_points(self, data_dict, cfg):
        if cfg.SHUFFLE_ENABLED[self.mode]:
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
