"""Voxelisation against a brute-force python reference (one point at a time, like a streaming
voxeliser), plus the grid checks."""
import numpy as np
import pytest

from pcdet_focal.data.voxelize import grid_size_from_range, points_to_voxels
from pcdet_focal.errors import ConfigError


def brute_force_voxels(points, voxel_size, pc_range, max_points, max_voxels):
    """Reference: walk the points in order; a new voxel opens while fewer than max_voxels exist;
    a voxel keeps its first max_points points."""
    voxel_size = np.asarray(voxel_size, np.float32)
    lo = np.asarray(pc_range[:3], np.float32)
    grid = np.round((np.asarray(pc_range[3:], np.float32) - lo) / voxel_size).astype(int)
    slots, order = {}, []
    for p in points:
        ijk = [int(np.floor((np.float32(p[a]) - lo[a]) / voxel_size[a])) for a in range(3)]
        if any(v < 0 or v >= g for v, g in zip(ijk, grid)):
            continue
        key = (ijk[2], ijk[1], ijk[0])
        if key not in slots:
            if len(order) >= max_voxels:
                continue
            slots[key] = []
            order.append(key)
        if len(slots[key]) < max_points:
            slots[key].append(p)
    voxels = np.zeros((len(order), max_points, points.shape[1]), np.float32)
    for i, key in enumerate(order):
        voxels[i, :len(slots[key])] = slots[key]
    coords = np.array(order, np.int32).reshape(-1, 3)
    num = np.array([len(slots[k]) for k in order], np.int32)
    return voxels, coords, num


@pytest.mark.parametrize('max_points,max_voxels', [(5, 1000), (2, 1000), (3, 17), (1, 1)])
def test_matches_brute_force(max_points, max_voxels):
    rng = np.random.default_rng(1)
    pc_range = [-2.0, -1.0, -1.0, 2.0, 1.0, 0.6]
    voxel_size = [0.5, 0.25, 0.4]
    # clustered points (several per voxel), some outside the range on each axis
    centres = rng.uniform([-2.5, -1.3, -1.3], [2.5, 1.3, 0.9], size=(60, 3))
    pts = centres[rng.integers(0, 60, 400)] + rng.normal(0, 0.05, (400, 3))
    points = np.concatenate([pts, rng.uniform(0, 1, (400, 1))], 1).astype(np.float32)
    got = points_to_voxels(points, voxel_size, pc_range, max_points, max_voxels)
    ref = brute_force_voxels(points, voxel_size, pc_range, max_points, max_voxels)
    assert got[0].shape == ref[0].shape and got[0].dtype == np.float32
    assert got[1].dtype == np.int32 and got[2].dtype == np.int32
    np.testing.assert_array_equal(got[1], ref[1])
    np.testing.assert_array_equal(got[2], ref[2])
    np.testing.assert_array_equal(got[0], ref[0])
    # mean-able: the zero padding beyond voxel_num_points
    for v, n in zip(got[0], got[2]):
        assert not v[n:].any()


def test_range_is_half_open_and_coords_zyx():
    pc_range = [0, 0, 0, 4, 2, 1]
    points = np.array([[0.0, 0.0, 0.0, 1],      # first voxel corner: inside
                       [4.0, 1.0, 0.5, 1],      # x == x_max: outside
                       [3.99, 1.99, 0.99, 2],   # last voxel
                       [-0.01, 1.0, 0.5, 3]],   # x < x_min: outside
                      np.float32)
    voxels, coords, num = points_to_voxels(points, [1, 1, 1], pc_range, 4, 10)
    np.testing.assert_array_equal(coords, [[0, 0, 0], [0, 1, 3]])  # [z, y, x]
    np.testing.assert_array_equal(num, [1, 1])
    np.testing.assert_allclose(voxels[1, 0], points[2])


def test_empty_and_nothing_in_range():
    for pts in (np.zeros((0, 4), np.float32), np.full((5, 4), 100.0, np.float32)):
        voxels, coords, num = points_to_voxels(pts, [0.1, 0.1, 0.2], [0, -1, -1, 1, 1, 1], 5, 100)
        assert voxels.shape == (0, 5, 4) and coords.shape == (0, 3) and num.shape == (0,)


def test_deterministic_and_order_dependent_subset():
    rng = np.random.default_rng(0)
    points = rng.uniform(0, 1, (2000, 4)).astype(np.float32)
    a = points_to_voxels(points, [0.5, 0.5, 0.5], [0, 0, 0, 1, 1, 1], 3, 8)
    b = points_to_voxels(points.copy(), [0.5, 0.5, 0.5], [0, 0, 0, 1, 1, 1], 3, 8)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert a[0].shape == (8, 3, 4) and (a[2] == 3).all()


def test_grid_size_and_whole_number_check():
    np.testing.assert_array_equal(
        grid_size_from_range([0, -40, -3, 70.4, 40, 1], [0.05, 0.05, 0.1]), [1408, 1600, 40])
    np.testing.assert_array_equal(grid_size_from_range([0, -20, -3, 100, 20, 4], [0.2, 0.2, 0.04]),
                                  [500, 200, 175])
    with pytest.raises(ConfigError) as err:
        grid_size_from_range([0, -40, -3, 70.4, 40, 1], [0.3, 0.05, 0.1], 'A.POINT_CLOUD_RANGE',
                             'B.VOXEL_SIZE')
    msg = str(err.value)
    assert 'A.POINT_CLOUD_RANGE' in msg and 'B.VOXEL_SIZE' in msg and '\n' not in msg
    with pytest.raises(ConfigError, match='max must exceed'):
        grid_size_from_range([0, 0, 0, 0, 1, 1], [0.1, 0.1, 0.1])
    with pytest.raises(ConfigError, match='3 positive'):
        grid_size_from_range([0, 0, 0, 1, 1, 1], [0.1, 0.1])
