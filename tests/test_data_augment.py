"""World augmentation: points inside a box stay inside the augmented box; config handling."""
import logging
import math

import numpy as np
import pytest
from easydict import EasyDict

from pcdet_focal.data import augment
from pcdet_focal.data.augment import DataAugmentor
from pcdet_focal.errors import ConfigError


def inside_counts(points, boxes, margin=1e-4):
    """Numpy reference: points (P, 3+) inside each (M, 7) box, by rotating into the box frame."""
    counts = []
    for b in boxes:
        d = points[:, :3].astype(np.float64) - b[:3]
        c, s = math.cos(-b[6]), math.sin(-b[6])
        local = np.stack([c * d[:, 0] - s * d[:, 1], s * d[:, 0] + c * d[:, 1], d[:, 2]], 1)
        counts.append(int(np.all(np.abs(local) <= b[3:6] / 2 + margin, axis=1).sum()))
    return np.array(counts)


def make_scene(rng):
    boxes = np.array([[10, 3, -0.8, 4.2, 1.7, 1.5, 0.4],
                      [-6, -8, -0.9, 0.8, 0.6, 1.8, -2.5],
                      [20, -4, -0.7, 1.8, 0.6, 1.7, 3.0]], np.float32)
    pts = []
    for b in boxes:  # points filling each box, plus background
        local = rng.uniform(-0.45, 0.45, (200, 3)) * b[3:6]
        c, s = math.cos(b[6]), math.sin(b[6])
        pts.append(np.stack([c * local[:, 0] - s * local[:, 1] + b[0],
                             s * local[:, 0] + c * local[:, 1] + b[1], local[:, 2] + b[2]], 1))
    pts.append(rng.uniform(-30, 30, (500, 3)))
    pts = np.concatenate(pts)
    points = np.concatenate([pts, rng.uniform(0, 1, (len(pts), 1))], 1).astype(np.float32)
    return boxes, points


def cfg(*items, disable=()):
    return EasyDict({'DISABLE_AUG_LIST': list(disable), 'AUG_CONFIG_LIST': list(items)})


FLIP_XY = {'NAME': 'random_world_flip', 'ALONG_AXIS_LIST': ['x', 'y']}
ROT = {'NAME': 'random_world_rotation', 'WORLD_ROT_ANGLE': [-3.0, 3.0]}
SCALE = {'NAME': 'random_world_scaling', 'WORLD_SCALE_RANGE': [0.8, 1.2]}


def test_points_stay_inside_their_boxes():
    rng = np.random.default_rng(0)
    boxes, points = make_scene(rng)
    before = inside_counts(points, boxes)
    assert (before >= 200).all()
    aug = DataAugmentor(cfg(FLIP_XY, ROT, SCALE))
    assert aug.names == ['random_world_flip', 'random_world_rotation', 'random_world_scaling']
    np.random.seed(3)
    headings = set()
    for _ in range(20):
        out = aug.forward({'gt_boxes': boxes.copy(), 'points': points.copy()})
        np.testing.assert_array_equal(inside_counts(out['points'], out['gt_boxes']), before)
        assert np.all(out['gt_boxes'][:, 6] >= -math.pi) and np.all(out['gt_boxes'][:, 6] < math.pi)
        np.testing.assert_array_equal(out['points'][:, 3], points[:, 3])  # intensity untouched
        headings.add(round(float(out['gt_boxes'][0, 6]), 3))
    assert len(headings) > 10  # the draws vary


def test_each_transform_exactly():
    boxes = np.array([[2.0, 1.0, 0.5, 4, 2, 1.5, 0.3]], np.float32)
    points = np.array([[2.0, 1.0, 0.5, 0.7]], np.float32)
    b, p = augment.flip_along_x(boxes, points)
    np.testing.assert_allclose(b[0], [2, -1, 0.5, 4, 2, 1.5, -0.3], atol=1e-6)
    np.testing.assert_allclose(p[0], [2, -1, 0.5, 0.7])
    b, p = augment.flip_along_y(boxes, points)
    np.testing.assert_allclose(b[0, :6], [-2, 1, 0.5, 4, 2, 1.5])
    assert math.isclose(math.cos(b[0, 6]), -math.cos(0.3), abs_tol=1e-6)
    assert math.isclose(math.sin(b[0, 6]), math.sin(0.3), abs_tol=1e-6)
    b, p = augment.rotate_world(boxes, points, math.pi / 2)
    np.testing.assert_allclose(b[0], [-1, 2, 0.5, 4, 2, 1.5, 0.3 + math.pi / 2], atol=1e-6)
    np.testing.assert_allclose(p[0, :3], [-1, 2, 0.5], atol=1e-6)
    b, p = augment.scale_world(boxes, points, 2.0)
    np.testing.assert_allclose(b[0], [4, 2, 1, 8, 4, 3, 0.3])
    np.testing.assert_allclose(p[0], [4, 2, 1, 0.7])


def test_unknown_names_warned_once_and_disable_list(caplog):
    augment._warned.discard('gt_sampling')
    gt_sampling = {'NAME': 'gt_sampling', 'DB_INFO_PATH': ['x.pkl']}
    with caplog.at_level(logging.WARNING, logger='pcdet_focal'):
        a = DataAugmentor(cfg(gt_sampling, FLIP_XY))
        DataAugmentor(cfg(gt_sampling, FLIP_XY))
    warnings = [r for r in caplog.records if 'gt_sampling' in r.getMessage()]
    assert len(warnings) == 1 and 'skipped' in warnings[0].getMessage()
    assert a.names == ['random_world_flip']
    assert DataAugmentor(cfg(FLIP_XY, ROT, disable=['random_world_rotation'])).names == \
        ['random_world_flip']


def test_empty_boxes_and_bad_configs():
    aug = DataAugmentor(cfg(FLIP_XY, ROT, SCALE))
    out = aug.forward({'gt_boxes': np.zeros((0, 7), np.float32),
                       'points': np.zeros((0, 4), np.float32)})
    assert out['gt_boxes'].shape == (0, 7) and out['points'].shape == (0, 4)
    with pytest.raises(ConfigError, match=r"ALONG_AXIS_LIST\[0\]='z' is not one of x, y"):
        DataAugmentor(cfg({'NAME': 'random_world_flip', 'ALONG_AXIS_LIST': ['z']}))
    with pytest.raises(ConfigError, match='WORLD_SCALE_RANGE'):
        DataAugmentor(cfg({'NAME': 'random_world_scaling', 'WORLD_SCALE_RANGE': [1.2, 0.8]}))
    with pytest.raises(ConfigError, match='needs a NAME'):
        DataAugmentor(cfg({'WORLD_ROT_ANGLE': 1}))
    # a scalar rotation angle means [-a, a] (OpenPCDet)
    assert DataAugmentor(cfg({'NAME': 'random_world_rotation', 'WORLD_ROT_ANGLE': 0.5})).names
