"""ops.points_in_boxes against a numpy reference written here (float64, one point-box pair at a
time through an explicit rotation matrix)."""
import math

import numpy as np
import pytest
import torch

from pcdet_focal.errors import InputError
from pcdet_focal.ops.points_in_boxes import points_in_boxes, points_in_boxes_mask


def reference_mask(points, boxes):
    """(P, 3+) and (M, 7+) numpy -> (P, M) bool: closed boxes, degenerate boxes empty."""
    out = np.zeros((len(points), len(boxes)), dtype=bool)
    for m, box in enumerate(boxes.astype(np.float64)):
        cx, cy, cz, dx, dy, dz, yaw = box[:7]
        if min(dx, dy, dz) <= 0:
            continue
        # world -> box frame: rotate by -yaw (transpose of the box's rotation)
        rot_t = np.array([[math.cos(yaw), math.sin(yaw)], [-math.sin(yaw), math.cos(yaw)]])
        for p, pt in enumerate(points.astype(np.float64)):
            lx, ly = rot_t @ np.array([pt[0] - cx, pt[1] - cy])
            out[p, m] = abs(lx) <= dx / 2 and abs(ly) <= dy / 2 and abs(pt[2] - cz) <= dz / 2
    return out


def reference_index(mask):
    return np.array([np.flatnonzero(row)[0] if row.any() else -1 for row in mask], dtype=np.int64)


def face_distance(points, boxes):
    """(P, M) distance of each point to the nearest face plane of each box (float64)."""
    out = np.full((len(points), len(boxes)), np.inf)
    for m, (cx, cy, cz, dx, dy, dz, yaw) in enumerate(boxes[:, :7].astype(np.float64)):
        for p, pt in enumerate(points.astype(np.float64)):
            c, s = math.cos(yaw), math.sin(yaw)
            lx = (pt[0] - cx) * c + (pt[1] - cy) * s
            ly = -(pt[0] - cx) * s + (pt[1] - cy) * c
            out[p, m] = min(abs(abs(lx) - dx / 2), abs(abs(ly) - dy / 2),
                            abs(abs(pt[2] - cz) - dz / 2))
    return out


def random_boxes(rng, m):
    centre = rng.uniform([-20, -20, -2], [20, 20, 1], size=(m, 3))
    size = rng.uniform([0.5, 0.5, 0.5], [5, 3, 2], size=(m, 3))
    yaw = rng.uniform(-math.pi, math.pi, size=(m, 1))
    return np.concatenate([centre, size, yaw], 1).astype(np.float32)


def points_around(rng, boxes, per_box, spread):
    """Points in each box's frame at uniform fractions in [-spread, spread] of its half size."""
    pts = []
    for cx, cy, cz, dx, dy, dz, yaw in boxes.astype(np.float64):
        local = rng.uniform(-spread, spread, size=(per_box, 3)) * np.array([dx, dy, dz]) / 2
        c, s = math.cos(yaw), math.sin(yaw)
        pts.append(np.stack([cx + local[:, 0] * c - local[:, 1] * s,
                             cy + local[:, 0] * s + local[:, 1] * c, cz + local[:, 2]], 1))
    return np.concatenate(pts).astype(np.float32)


def test_random_rotated_boxes_match_reference(device):
    rng = np.random.default_rng(1)
    boxes = random_boxes(rng, 12)
    scattered = rng.uniform([-25, -25, -3], [25, 25, 2], size=(100, 3))
    pts = np.concatenate([points_around(rng, boxes, 30, 1.4), scattered]).astype(np.float32)
    ref = reference_mask(pts, boxes)
    # float32 vs float64 may disagree within rounding of a face: compare away from faces only
    clear = (face_distance(pts, boxes) > 1e-4).all(axis=1)
    assert clear.sum() > 400 and 50 < ref[clear].sum() < clear.sum()
    pts_t, boxes_t = torch.from_numpy(pts).to(device), torch.from_numpy(boxes).to(device)
    mask = points_in_boxes_mask(pts_t, boxes_t)
    assert mask.dtype == torch.bool and mask.shape == (len(pts), len(boxes))
    np.testing.assert_array_equal(mask.cpu().numpy()[clear], ref[clear])
    idx = points_in_boxes(pts_t, boxes_t)
    assert idx.dtype == torch.long and idx.device.type == device.type
    np.testing.assert_array_equal(idx.cpu().numpy()[clear], reference_index(ref)[clear])


@pytest.mark.parametrize('eps, inside', [(-1e-3, True), (1e-3, False)])
def test_points_just_inside_and_outside_each_face(eps, inside):
    rng = np.random.default_rng(2)
    boxes = random_boxes(rng, 5)
    pts = []
    for cx, cy, cz, dx, dy, dz, yaw in boxes.astype(np.float64):
        c, s = math.cos(yaw), math.sin(yaw)
        for axis in range(3):
            for sign in (-1, 1):
                local = np.zeros(3)
                local[axis] = sign * ([dx, dy, dz][axis] / 2 + eps)
                pts.append([cx + local[0] * c - local[1] * s, cy + local[0] * s + local[1] * c,
                            cz + local[2]])
    pts = np.asarray(pts, dtype=np.float32)
    own = np.repeat(np.arange(len(boxes)), 6)
    ref = reference_mask(pts, boxes)
    assert (ref[np.arange(len(pts)), own] == inside).all()
    got = points_in_boxes_mask(torch.from_numpy(pts), torch.from_numpy(boxes)).numpy()
    np.testing.assert_array_equal(got, ref)


def test_closed_boundaries_on_axis_aligned_box():
    box = torch.tensor([[1.0, 2.0, 0.5, 2.0, 4.0, 1.0, 0.0]])   # x 0..2, y 0..4, z 0..1
    on = torch.tensor([[0.0, 2.0, 0.5], [2.0, 2.0, 0.5], [1.0, 0.0, 0.5], [1.0, 4.0, 0.5],
                       [1.0, 2.0, 0.0], [1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [2.0, 4.0, 1.0]])
    off = torch.tensor([[-1e-5, 2.0, 0.5], [2.00001, 2.0, 0.5], [1.0, 4.00001, 0.5],
                        [1.0, 2.0, 1.00001], [1.0, 2.0, -1e-6]])
    assert points_in_boxes_mask(on, box).all()
    assert not points_in_boxes_mask(off, box).any()
    assert points_in_boxes(on, box).eq(0).all() and points_in_boxes(off, box).eq(-1).all()


def test_overlapping_boxes_first_wins_and_extra_columns_ignored():
    boxes = torch.tensor([[0.0, 0, 0, 4, 4, 4, 0, 3], [0.0, 0, 0, 2, 2, 2, 0.7, 1],
                          [5.0, 0, 0, 2, 2, 2, 0, 2]])
    pts = torch.tensor([[0.0, 0, 0, 0.5, 9], [1.5, 1.5, 0, 0, 0], [5, 0, 0, 0, 0],
                        [9, 9, 9, 0, 0]])
    np.testing.assert_array_equal(points_in_boxes(pts, boxes).numpy(), [0, 0, 2, -1])
    np.testing.assert_array_equal(points_in_boxes(pts, boxes[[1, 0, 2]]).numpy(), [0, 1, 2, -1])
    mask = points_in_boxes_mask(pts, boxes).numpy()
    np.testing.assert_array_equal(mask, reference_mask(pts.numpy(), boxes.numpy()))
    assert mask[0].tolist() == [True, True, False]


def test_degenerate_padding_boxes_contain_nothing():
    boxes = torch.zeros(3, 8)                        # gt_boxes zero padding rows
    boxes[1] = torch.tensor([0.0, 0, 0, 1, 0, 1, 0, 1])  # zero width
    pts = torch.zeros(4, 3)                          # at the padding rows' "centre"
    assert not points_in_boxes_mask(pts, boxes).any()
    assert points_in_boxes(pts, boxes).eq(-1).all()


def test_empty_inputs():
    boxes = torch.tensor([[0.0, 0, 0, 1, 1, 1, 0]])
    assert points_in_boxes(torch.zeros(0, 3), boxes).shape == (0,)
    assert points_in_boxes_mask(torch.zeros(0, 3), boxes).shape == (0, 1)
    idx = points_in_boxes(torch.zeros(5, 4), torch.zeros(0, 7))
    assert idx.tolist() == [-1] * 5 and idx.dtype == torch.long
    assert points_in_boxes_mask(torch.zeros(5, 4), torch.zeros(0, 7)).shape == (5, 0)
    assert points_in_boxes(torch.zeros(0, 3), torch.zeros(0, 7)).shape == (0,)


def test_chunked_evaluation_gives_the_same_answer():
    rng = np.random.default_rng(3)
    boxes = torch.from_numpy(random_boxes(rng, 7))
    pts = torch.from_numpy(points_around(rng, boxes.numpy(), 20, 1.3))
    full = points_in_boxes(pts, boxes)
    for max_pairs in (1, 7, 50, 10**9):   # 1 point per chunk .. everything at once
        assert torch.equal(points_in_boxes(pts, boxes, max_pairs=max_pairs), full)
        assert torch.equal(points_in_boxes_mask(pts, boxes, max_pairs=max_pairs),
                           points_in_boxes_mask(pts, boxes))
    assert (full >= 0).sum() > 20


def test_half_and_double_inputs():
    rng = np.random.default_rng(4)
    boxes = random_boxes(rng, 4)
    pts = points_around(rng, boxes, 10, 1.5)
    ref = reference_index(reference_mask(pts, boxes))
    clear = (face_distance(pts, boxes) > 1e-4).all(axis=1)
    got64 = points_in_boxes(torch.from_numpy(pts).double(), torch.from_numpy(boxes).double())
    np.testing.assert_array_equal(got64.numpy()[clear], ref[clear])
    # half points are rounded to ~1e-2 m here, but the comparison itself runs in float32
    half = torch.from_numpy(pts).half()
    ref_half = reference_index(reference_mask(half.float().numpy(), boxes))
    clear_half = (face_distance(half.float().numpy(), boxes) > 1e-4).all(axis=1)
    got16 = points_in_boxes(half, torch.from_numpy(boxes))
    np.testing.assert_array_equal(got16.numpy()[clear_half], ref_half[clear_half])


@pytest.mark.parametrize('points, boxes', [
    (torch.zeros(4, 2), torch.zeros(1, 7)),
    (torch.zeros(4), torch.zeros(1, 7)),
    (torch.zeros(4, 3), torch.zeros(1, 6)),
    (np.zeros((4, 3)), torch.zeros(1, 7)),
])
def test_bad_shapes_raise_input_error(points, boxes):
    with pytest.raises(InputError, match='points_in_boxes'):
        points_in_boxes(points, boxes)
