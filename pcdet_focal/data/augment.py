"""World augmentation in OpenPCDet's DATA_AUGMENTOR format, applied to points and boxes alike.

Config (OpenPCDet's keys)::

    DATA_AUGMENTOR:
        DISABLE_AUG_LIST: ['placeholder']      # names listed here are skipped
        AUG_CONFIG_LIST:
            - NAME: random_world_flip
              ALONG_AXIS_LIST: ['x']           # 'x': y -> -y, 'y': x -> -x, each with p = 0.5
            - NAME: random_world_rotation
              WORLD_ROT_ANGLE: [-0.785, 0.785] # radians, uniform (a scalar a means [-a, a])
            - NAME: random_world_scaling
              WORLD_SCALE_RANGE: [0.95, 1.05]  # uniform

Other names (``gt_sampling`` needs a ground-truth database we do not build, image
augmentations need images) are warned about once per process and skipped, so OpenPCDet's own
dataset configs load unchanged. Random draws come from numpy's global RNG, which the engine
seeds and saves in checkpoints (a resumed run draws the same augmentations).

Boxes are (M, 7+) ``(x, y, z, dx, dy, dz, heading, ...)`` LiDAR frame; points (P, 3+C).
"""
import logging
import math

import numpy as np

from ..schema import Choice, Key, ListOf, Range, Schema, Steps, Str
from ..ops.box_utils import limit_period, rotate_points_along_z

_warned = set()  # augmentation names already warned about in this process


def flip_along_x(boxes, points):
    """Mirror across the x axis (y -> -y); heading -> -heading. Returns new arrays."""
    boxes, points = boxes.copy(), points.copy()
    boxes[:, 1] = -boxes[:, 1]
    boxes[:, 6] = -boxes[:, 6]
    points[:, 1] = -points[:, 1]
    return boxes, points


def flip_along_y(boxes, points):
    """Mirror across the y axis (x -> -x); heading -> pi - heading. Returns new arrays."""
    boxes, points = boxes.copy(), points.copy()
    boxes[:, 0] = -boxes[:, 0]
    boxes[:, 6] = math.pi - boxes[:, 6]
    points[:, 0] = -points[:, 0]
    return boxes, points


def rotate_world(boxes, points, angle):
    """Rotate the scene by ``angle`` radians around +z (counter-clockwise seen from above)."""
    boxes = boxes.copy()
    points = rotate_points_along_z(points, angle).astype(points.dtype, copy=False)
    boxes[:, :3] = rotate_points_along_z(boxes[:, :3], angle)
    boxes[:, 6] = boxes[:, 6] + angle
    return boxes, points


def scale_world(boxes, points, scale):
    """Scale positions and box sizes by ``scale`` around the sensor (heading unchanged)."""
    boxes, points = boxes.copy(), points.copy()
    points[:, :3] *= scale
    boxes[:, :6] *= scale
    return boxes, points


_SUPPORTED = {
    'random_world_flip': Schema('random_world_flip', [
        Key('ALONG_AXIS_LIST', ListOf(Choice('x', 'y')), ['x'], 'flip along x and / or y'),
    ]),
    'random_world_rotation': Schema('random_world_rotation', [
        Key('WORLD_ROT_ANGLE', Range(symmetric_scalar=True), [-math.pi / 4, math.pi / 4],
            'rotation around z, radians'),
    ]),
    'random_world_scaling': Schema('random_world_scaling', [
        Key('WORLD_SCALE_RANGE', Range(lo=0), [0.95, 1.05], 'scale factor'),
    ]),
}

# other names (OpenPCDet's gt_sampling, local augmentations, ...) pass the check as written and
# are skipped with one warning each
AUGMENTOR_CONFIG = Schema('DATA_AUGMENTOR', [
    Key('DISABLE_AUG_LIST', ListOf(Str()), [], 'names in AUG_CONFIG_LIST to skip'),
    Key('AUG_CONFIG_LIST', Steps(_SUPPORTED, 'augmentation', others_ok=True), [],
        'training augmentations in order: ' + ', '.join(_SUPPORTED)),
])


class DataAugmentor:
    """Applies the configured world augmentations to ``data_dict['points'/'gt_boxes']``."""

    SUPPORTED = tuple(_SUPPORTED)

    def __init__(self, augmentor_cfg, logger=None, field='DATA_CONFIG.DATA_AUGMENTOR'):
        self.logger = logger or logging.getLogger('pcdet_focal')
        self.queue = []  # (name, callable(boxes, points) -> (boxes, points))
        if not augmentor_cfg:
            return
        augmentor_cfg = AUGMENTOR_CONFIG.parse(augmentor_cfg, field)
        disabled = set(augmentor_cfg.DISABLE_AUG_LIST)
        for i, cfg in enumerate(augmentor_cfg.AUG_CONFIG_LIST):
            where = f'{field}.AUG_CONFIG_LIST[{i}]'
            name = cfg.NAME
            if name in disabled:
                continue
            if name not in self.SUPPORTED:
                if name not in _warned:
                    _warned.add(name)
                    self.logger.warning('%s: augmentation %r is not supported here and is '
                                        'skipped (supported: %s)', where, name,
                                        ', '.join(self.SUPPORTED))
                continue
            self.queue.append((name, getattr(self, '_build_' + name)(cfg, where)))

    @staticmethod
    def _build_random_world_flip(cfg, where):
        axes = cfg.ALONG_AXIS_LIST

        def apply(boxes, points):
            for axis in axes:
                if np.random.rand() < 0.5:
                    boxes, points = (flip_along_x if axis == 'x' else flip_along_y)(boxes, points)
            return boxes, points
        return apply

    @staticmethod
    def _build_random_world_rotation(cfg, where):
        lo, hi = cfg.WORLD_ROT_ANGLE

        def apply(boxes, points):
            return rotate_world(boxes, points, np.random.uniform(lo, hi))
        return apply

    @staticmethod
    def _build_random_world_scaling(cfg, where):
        lo, hi = cfg.WORLD_SCALE_RANGE

        def apply(boxes, points):
            return scale_world(boxes, points, np.random.uniform(lo, hi))
        return apply

    @property
    def names(self):
        return [name for name, _ in self.queue]

    def forward(self, data_dict):
        """data_dict: ``points`` (P, 3+C), ``gt_boxes`` (M, 7+). Returns it updated."""
        boxes = data_dict['gt_boxes']
        points = data_dict['points']
        for _, apply in self.queue:
            boxes, points = apply(boxes, points)
        if len(boxes):
            boxes[:, 6] = limit_period(boxes[:, 6], 0.5, 2 * math.pi)
        data_dict['gt_boxes'] = boxes
        data_dict['points'] = points
        return data_dict
