"""Rotated-box IoU (eval/iou.py) against hand-computed areas and a Monte-Carlo estimate.

Boxes: (x, y, z, dx, dy, dz, heading), z = box centre. No shapely: every expected value is
worked out here by hand (comments give the geometry) or by sampling points.
"""
import math

import numpy as np
import pytest
import torch

from pcdet_focal.errors import InputError
from pcdet_focal.eval.iou import boxes_iou_3d, boxes_iou_bev


def box(x=0.0, y=0.0, z=0.0, dx=2.0, dy=2.0, dz=2.0, h=0.0):
    return [x, y, z, dx, dy, dz, h]


def iou_bev(a, b):
    return boxes_iou_bev(np.array([a]), np.array([b]))[0, 0]


def iou_3d(a, b):
    return boxes_iou_3d(np.array([a]), np.array([b]))[0, 0]


@pytest.mark.parametrize('a', [box(), box(70.3, -31.7, -1.2, 4.1, 1.7, 1.5, 2.9),
                               box(1e4, 1e4, 3.0, 0.4, 0.6, 1.7, -1.1)])
def test_identical_boxes_iou_one(a):
    assert iou_bev(a, a) == pytest.approx(1.0, abs=1e-9)
    assert iou_3d(a, a) == pytest.approx(1.0, abs=1e-9)


def test_disjoint_boxes_iou_zero():
    assert iou_bev(box(), box(x=5.0)) == 0.0
    assert iou_3d(box(), box(x=5.0)) == 0.0
    # bounding circles overlap but the rectangles do not: real clipping must return 0
    a = box(dx=4.0, dy=0.5)
    b = box(y=1.0, dx=4.0, dy=0.5)
    assert iou_bev(a, b) == pytest.approx(0.0, abs=1e-12)
    # same BEV footprint, z intervals [-1, 1] and [2, 4]: BEV IoU 1, 3D IoU 0
    assert iou_bev(box(), box(z=3.0)) == pytest.approx(1.0)
    assert iou_3d(box(), box(z=3.0)) == 0.0


def test_rotated_45_degrees_octagon():
    # square [-1, 1]^2 vs the same square rotated 45 deg: the rotated one is |x| + |y| <= sqrt2,
    # it cuts from each corner of the first a right isosceles triangle with legs 2 - sqrt2, so
    # the intersection is a regular octagon of area 4 - 4 * (2 - sqrt2)^2 / 2 = 8 sqrt2 - 8.
    octagon = 4.0 - 4.0 * (2.0 - math.sqrt(2.0)) ** 2 / 2.0
    assert octagon == pytest.approx(8 * math.sqrt(2) - 8)
    expected = octagon / (4.0 + 4.0 - octagon)
    assert iou_bev(box(), box(h=math.pi / 4)) == pytest.approx(expected, rel=1e-9)
    # 3D: same z extent, so the volume ratio equals the area ratio
    assert iou_3d(box(), box(h=math.pi / 4)) == pytest.approx(expected, rel=1e-9)
    # also away from the origin and with both boxes turned by the same extra angle
    a = box(x=40.0, y=-12.0, h=0.3)
    b = box(x=40.0, y=-12.0, h=0.3 + math.pi / 4)
    assert iou_bev(a, b) == pytest.approx(expected, rel=1e-9)


def test_rectangle_crossing_itself_at_90_degrees():
    # 4 x 2 rectangle and the same turned 90 deg: overlap is the central 2 x 2 square
    a = box(dx=4.0, dy=2.0)
    assert iou_bev(a, box(dx=4.0, dy=2.0, h=math.pi / 2)) == pytest.approx(4 / (8 + 8 - 4))
    # heading convention: a 4 x 2 box at heading 90 deg is the 2 x 4 box at heading 0
    assert iou_bev(box(dx=4.0, dy=2.0, h=math.pi / 2), box(dx=2.0, dy=4.0)) == pytest.approx(1.0)
    # heading is periodic in pi for the footprint
    for turn in (math.pi, -math.pi, 2 * math.pi):
        assert iou_bev(a, box(dx=4.0, dy=2.0, h=turn)) == pytest.approx(1.0)


def test_heading_direction_follows_box_utils():
    # a 10 x 0.2 stick at heading 0.5 rad and a 0.2 x 0.2 square centred 4 m along the stick,
    # placed with box_utils' rotation (counter-clockwise from +x): fully inside the stick, so
    # IoU = 0.04 / 2.0; mirrored heading (-0.5) would miss it entirely
    from pcdet_focal.ops.box_utils import boxes_to_corners_bev, rotate_points_along_z
    centre = rotate_points_along_z(np.array([[4.0, 0.0, 0.0]]), 0.5)[0]
    stick = box(dx=10.0, dy=0.2, h=0.5)
    square = box(x=centre[0], y=centre[1], dx=0.2, dy=0.2, h=0.5)
    assert iou_bev(stick, square) == pytest.approx(0.04 / 2.0, rel=1e-9)
    assert iou_bev(box(dx=10.0, dy=0.2, h=-0.5), square) == 0.0
    # a square centred on one of box_utils' corners of a box overlaps it by a quarter
    b = box(x=3.0, y=-2.0, dx=4.0, dy=2.0, h=1.1)
    for corner in boxes_to_corners_bev(np.array([b]))[0]:
        cap = box(x=corner[0], y=corner[1], dx=0.5, dy=0.5, h=1.1)
        assert iou_bev(b, cap) == pytest.approx(0.0625 / (8.0 + 0.25 - 0.0625), rel=1e-9)


def test_contained_box():
    big = box(dx=4.0, dy=4.0, dz=4.0)
    small = box(x=0.5, y=-0.5, dx=1.0, dy=2.0, dz=1.0, h=0.7)  # stays inside the 4x4 square
    assert iou_bev(big, small) == pytest.approx(2.0 / 16.0)
    assert iou_3d(big, small) == pytest.approx(2.0 / 64.0)
    assert iou_bev(small, big) == pytest.approx(2.0 / 16.0)


def test_half_overlapping():
    # shifted by half its length: intersection = half a box -> IoU = 0.5 / 1.5
    assert iou_bev(box(dx=4.0), box(x=2.0, dx=4.0)) == pytest.approx(1 / 3)
    assert iou_bev(box(), box(y=1.0)) == pytest.approx(1 / 3)


def test_long_boxes_with_far_centres():
    # 10 x 1 boxes end to end overlapping by 0.5 m: centres 9.5 m apart, near the
    # bounding-circle limit 2 * sqrt(10^2 + 1^2) / 2 = 10.05 m; overlap 0.5 x 1
    a = box(dx=10.0, dy=1.0)
    assert iou_bev(a, box(x=9.5, dx=10.0, dy=1.0)) == pytest.approx(0.5 / 19.5, rel=1e-9)
    # an L corner: the other box turned 90 deg spans x in [4.5, 5.5], y in [0, 10]
    # -> overlap x in [4.5, 5] x y in [0, 0.5] = 0.25; centres sqrt(5^2 + 5^2) = 7.07 m apart
    b = box(x=5.0, y=5.0, dx=10.0, dy=1.0, h=math.pi / 2)
    assert iou_bev(a, b) == pytest.approx(0.25 / 19.75, rel=1e-9)


def test_3d_different_heights():
    # same 2 x 2 footprint; z intervals [0, 2] and [1, 3]: overlap 4 * 1, union 8 + 8 - 4
    a, b = box(z=1.0), box(z=2.0)
    assert iou_bev(a, b) == pytest.approx(1.0)
    assert iou_3d(a, b) == pytest.approx(4 / 12)
    # different heights, one z range inside the other: [0, 4] vs [1, 2]
    a, b = box(z=2.0, dz=4.0), box(z=1.5, dz=1.0)
    assert iou_3d(a, b) == pytest.approx(4 / 16)
    # BEV half overlap and z half overlap: 2 * 1 / (8 + 8 - 2)
    a, b = box(z=1.0), box(x=1.0, z=2.0)
    assert iou_3d(a, b) == pytest.approx(2 / 14)


def test_touching_and_collinear_edges():
    # sharing a full edge, a corner, or an edge after rotation: zero area, no NaN
    assert iou_bev(box(), box(x=2.0)) == pytest.approx(0.0, abs=1e-12)
    assert iou_bev(box(), box(x=2.0, y=2.0)) == pytest.approx(0.0, abs=1e-12)
    d = 2 * math.sqrt(2)  # two 45-deg diamonds of half-diagonal sqrt2 touching at a vertex
    assert iou_bev(box(h=math.pi / 4), box(x=d, h=math.pi / 4)) == pytest.approx(0.0, abs=1e-12)
    s = math.sqrt(2)  # ... and sharing an edge
    assert iou_bev(box(h=math.pi / 4), box(x=s, y=s, h=math.pi / 4)) == pytest.approx(0.0,
                                                                                     abs=1e-12)
    # collinear edges with real overlap: [-1,1]^2 vs x in [0,2], y in [0,1] (shares y = 1)
    assert iou_bev(box(), box(x=1.0, y=0.5, dx=2.0, dy=1.0)) == pytest.approx(1 / (4 + 2 - 1))
    # sharing both side edges: [-1,1]^2 vs x in [-1,1], y in [0,3] -> 2 / (4 + 6 - 2)
    assert iou_bev(box(), box(y=1.5, dx=2.0, dy=3.0)) == pytest.approx(2 / 8)


def test_degenerate_boxes_give_zero_not_nan():
    flat = box(dx=0.0)
    point = box(dx=0.0, dy=0.0, dz=0.0)
    for a, b in [(flat, box()), (point, box()), (point, point), (flat, flat)]:
        for first, second in [(a, b), (b, a)]:
            assert iou_bev(first, second) == 0.0
            assert iou_3d(first, second) == 0.0
    # zero height: the footprint still matches, the volume overlap is empty
    assert iou_bev(box(dz=0.0), box()) == pytest.approx(1.0)
    assert iou_3d(box(dz=0.0), box()) == 0.0
    assert iou_3d(box(dz=0.0), box(dz=0.0)) == 0.0


def _mc_intersection(a, b, n, rng):
    """Monte-Carlo BEV intersection area: sample n points in a, count those inside b."""
    u = rng.uniform(-0.5, 0.5, size=(n, 2)) * np.array([a[3], a[4]])
    c, s = math.cos(a[6]), math.sin(a[6])
    px = a[0] + u[:, 0] * c - u[:, 1] * s
    py = a[1] + u[:, 0] * s + u[:, 1] * c
    c, s = math.cos(b[6]), math.sin(b[6])
    lx = (px - b[0]) * c + (py - b[1]) * s      # into b's frame: rotate by -heading
    ly = -(px - b[0]) * s + (py - b[1]) * c
    inside = (np.abs(lx) <= b[3] / 2) & (np.abs(ly) <= b[4] / 2)
    return a[3] * a[4] * inside.mean()


def test_random_pairs_against_monte_carlo():
    rng = np.random.default_rng(1)
    n_samples = 200_000
    a_boxes, b_boxes = [], []
    for _ in range(24):
        a = box(*rng.uniform(-2, 2, 3), *rng.uniform(0.3, 4.0, 3), rng.uniform(-4, 4))
        b = box(a[0] + rng.uniform(-2, 2), a[1] + rng.uniform(-2, 2), a[2] + rng.uniform(-1, 1),
                *rng.uniform(0.3, 4.0, 3), rng.uniform(-4, 4))
        a_boxes.append(a)
        b_boxes.append(b)
    bev = boxes_iou_bev(np.array(a_boxes), np.array(b_boxes))
    d3 = boxes_iou_3d(np.array(a_boxes), np.array(b_boxes))
    overlapping = 0
    for i, (a, b) in enumerate(zip(a_boxes, b_boxes)):
        inter = _mc_intersection(a, b, n_samples, rng)
        area_a, area_b = a[3] * a[4], b[3] * b[4]
        expected = inter / (area_a + area_b - inter)
        # sampling error of the area fraction is <= 0.5 / sqrt(n) ~ 0.0011 of area_a
        assert bev[i, i] == pytest.approx(expected, abs=0.01)
        h = max(0.0, min(a[2] + a[5] / 2, b[2] + b[5] / 2) - max(a[2] - a[5] / 2, b[2] - b[5] / 2))
        v = inter * h
        assert d3[i, i] == pytest.approx(v / (area_a * a[5] + area_b * b[5] - v), abs=0.01)
        overlapping += expected > 0.05
    assert overlapping >= 8  # the random cases really exercise the clipping


def test_matrix_shape_symmetry_and_inputs():
    rng = np.random.default_rng(2)
    a = np.concatenate([rng.uniform(-3, 3, (6, 3)), rng.uniform(0.5, 3, (6, 3)),
                        rng.uniform(-3, 3, (6, 1))], 1)
    b = a[::-1].copy() + rng.normal(0, 0.3, a.shape)
    m = boxes_iou_bev(a, b)
    assert m.shape == (6, 6) and m.dtype == np.float64
    np.testing.assert_allclose(m, boxes_iou_bev(b, a).T, atol=1e-12)
    np.testing.assert_allclose(boxes_iou_3d(a, b), boxes_iou_3d(b, a).T, atol=1e-12)
    assert ((m >= 0) & (m <= 1 + 1e-12)).all()
    # float32, torch CPU tensors and extra columns (e.g. a class id) give the same numbers
    extra = np.concatenate([a, np.ones((6, 2))], 1).astype(np.float32)
    np.testing.assert_allclose(boxes_iou_bev(torch.from_numpy(extra), b), m, atol=1e-5)
    assert boxes_iou_bev(np.zeros((0, 7)), b).shape == (0, 6)
    assert boxes_iou_3d(a, np.zeros((0, 7))).shape == (6, 0)
    with pytest.raises(InputError, match=r'boxes_b has shape \(6, 6\)'):
        boxes_iou_bev(a, b[:, :6])
