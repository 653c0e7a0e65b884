"""Synthetic LiDAR scenes: ray casting geometry, occlusion, determinism, splits, dataset."""
import math
from pathlib import Path

import numpy as np
import pytest

from pcdet_focal.config import load_config
from pcdet_focal.data import raycast
from pcdet_focal.data.dataset import build_dataset
from pcdet_focal.data.synthetic_scene import SceneGenerator, _Prim
from pcdet_focal.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SMALL = {'NUM_BEAMS': 32, 'NUM_AZIMUTH': 512}


def box_frame(points, box):
    """Numpy reference: points (P, 3+) in the frame of one (7,) box."""
    d = points[:, :3].astype(np.float64) - box[:3]
    c, s = math.cos(-box[6]), math.sin(-box[6])
    return np.stack([c * d[:, 0] - s * d[:, 1], s * d[:, 0] + c * d[:, 1], d[:, 2]], 1)


def unit_rays(n, seed):
    rng = np.random.default_rng(seed)
    d = rng.normal(size=(n, 3))
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def test_ray_box_hits_lie_on_the_visible_faces():
    box = np.array([6.0, 2.0, -0.5, 4.0, 1.8, 1.5, 0.6])
    # rays aimed at random points of the box, plus random rays
    rng = np.random.default_rng(0)
    targets = box[:3] + box_frame_inv(rng.uniform(-0.5, 0.5, (3000, 3)) * box[3:6], box[6])
    dirs = np.concatenate([targets / np.linalg.norm(targets, axis=1, keepdims=True),
                           unit_rays(3000, 1)])
    t, cos = raycast.ray_box(dirs, box[:3], box[3:6], box[6])
    hit = np.isfinite(t)
    assert hit[:3000].all() and 0 < hit[3000:].sum() < 3000
    local = box_frame(dirs[hit] * t[hit, None], box)
    half = box[3:6] / 2
    on_face = np.isclose(np.abs(local), half, atol=1e-6)  # (H, 3): which face holds the hit
    assert np.all(np.abs(local) <= half + 1e-6) and on_face.any(axis=1).all()
    # visible: the outward normal of that face points back towards the sensor
    axis = on_face.argmax(axis=1)
    normal_local = np.zeros_like(local)
    normal_local[np.arange(len(axis)), axis] = np.sign(local[np.arange(len(axis)), axis])
    normal = box_frame_inv(normal_local, box[6])
    assert np.all(np.einsum('ij,ij->i', normal, dirs[hit]) < 0)
    np.testing.assert_allclose(cos[hit], np.abs(np.einsum('ij,ij->i', normal, dirs[hit])),
                               atol=1e-9)


def box_frame_inv(local, yaw):
    c, s = math.cos(yaw), math.sin(yaw)
    return np.stack([c * local[:, 0] - s * local[:, 1], s * local[:, 0] + c * local[:, 1],
                     local[:, 2]], 1)


def test_ray_cylinder_sphere_plane():
    dirs = unit_rays(4000, 2)
    t, _ = raycast.ray_vertical_cylinder(dirs, (3.0, -4.0), 0.5, -1.0, 1.0)
    hit = np.isfinite(t)
    p = dirs[hit] * t[hit, None]
    assert hit.sum() > 10
    np.testing.assert_allclose(np.hypot(p[:, 0] - 3, p[:, 1] + 4), 0.5, atol=1e-9)
    assert np.all((p[:, 2] >= -1 - 1e-9) & (p[:, 2] <= 1 + 1e-9))
    assert np.all(np.hypot(p[:, 0], p[:, 1]) <= 5.0)  # the near side (centre is 5 m away)
    t, _ = raycast.ray_sphere(dirs, (0.0, 6.0, 1.0), 2.0)
    hit = np.isfinite(t)
    p = dirs[hit] * t[hit, None]
    np.testing.assert_allclose(np.linalg.norm(p - [0, 6, 1], axis=1), 2.0, atol=1e-9)
    t, cos = raycast.ray_plane(dirs, np.array([0, 0, 1.0]), -1.73)
    hit = np.isfinite(t)
    np.testing.assert_allclose((dirs[hit] * t[hit, None])[:, 2], -1.73)
    assert np.all(dirs[hit, 2] < 0) and np.all(~np.isfinite(t[dirs[:, 2] > 0]))


def fixed_layout(objects, prims):
    return lambda rng: (objects, prims, np.zeros(2))


def test_occlusion_and_unseen_objects_are_not_labelled(monkeypatch):
    """A car right behind another one (same bearing) gets no returns and no label."""
    gen = SceneGenerator(dict(SMALL, DROPOUT=0.0), region=(0, -40, 70, 40))
    h = 1.73
    near = [10.0, 0.0, -h + 0.75, 4.0, 1.8, 1.5, 0.0]
    far = [20.0, 0.0, -h + 0.7, 3.6, 1.6, 1.4, 0.0]
    side = [12.0, 8.0, -h + 0.75, 4.0, 1.8, 1.5, 1.0]
    objects = [('Car', near), ('Car', far), ('Car', side)]
    prims = [_Prim('box', (tuple(b[:3]), tuple(b[3:6]), b[6]), k, 0.5)
             for k, (_, b) in enumerate(objects)]
    # a wall taller than the far car, right in front of it, hides it completely
    prims.append(_Prim('box', ((16.0, 0.0, -h + 2.0), (0.3, 6.0, 4.0), 0.0), -1, 0.3))
    monkeypatch.setattr(gen, '_layout', fixed_layout(objects, prims))
    scene = gen.generate(0, 0)
    np.testing.assert_allclose(scene['gt_boxes'], np.array([near, side], np.float32))
    assert scene['gt_names'].tolist() == ['Car', 'Car']
    pts = scene['points']
    for box, n in zip(scene['gt_boxes'], scene['num_points_in_gt']):
        local = box_frame(pts, box)
        inside = np.all(np.abs(local) <= box[3:6] / 2 + 0.08, axis=1).sum()
        assert n > 30 and inside >= n  # returns sit on the box (range noise 2 cm)
    # nothing came back from behind the wall
    local = box_frame(pts, np.array(far))
    assert np.all(np.abs(local) <= np.array(far[3:6]) / 2 + 0.1, axis=1).sum() == 0
    # ground returns lie on the ground plane
    ground = pts[np.abs(pts[:, 2] + h) < 0.1]
    assert len(ground) > 0.5 * len(pts)


def test_determinism_and_splits():
    gen = SceneGenerator(SMALL, region=(0, -30, 60, 30))
    a, b = gen.generate(5, 3), gen.generate(5, 3)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    c = SceneGenerator(SMALL, region=(0, -30, 60, 30)).generate(5, 3)  # another instance
    np.testing.assert_array_equal(a['points'], c['points'])
    d = gen.generate(6, 3)
    e = gen.generate(5, 4)
    assert a['points'].shape != d['points'].shape or not np.array_equal(a['points'], d['points'])
    assert not np.array_equal(a['gt_boxes'], e['gt_boxes'][:len(a['gt_boxes'])]) or \
        len(a['gt_boxes']) != len(e['gt_boxes'])


def test_scene_statistics_are_plausible():
    gen = SceneGenerator(SMALL, region=(0, -40, 70.4, 40))
    names, boxes, counts, inside_frac = [], [], [], []
    for i in range(4):
        s = gen.generate(1, i)
        p = s['points']
        assert p.dtype == np.float32 and p.shape[1] == 4 and len(p) > 10000
        assert np.all((p[:, 3] >= 0) & (p[:, 3] <= 1))
        assert np.hypot(p[:, 0], p[:, 1]).max() <= 80.5
        for box, n, name in zip(s['gt_boxes'], s['num_points_in_gt'], s['gt_names']):
            # returns above the ground: the object's own points (clutter never overlaps it)
            local = box_frame(p, box)
            body = (np.all(np.abs(local[:, :2]) <= box[3:5] / 2 + 0.05, axis=1)
                    & (local[:, 2] >= -box[5] / 2 + 0.08) & (local[:, 2] <= box[5] / 2 + 0.05))
            if name == 'Car' and n >= 20:
                inside_frac.append(body.sum() / n)
        names += s['gt_names'].tolist()
        boxes.append(s['gt_boxes'])
        counts.append(s['num_points_in_gt'])
    boxes, counts = np.concatenate(boxes), np.concatenate(counts)
    assert set(names) <= {'Car', 'Pedestrian', 'Cyclist'} and names.count('Car') >= 16
    assert (counts >= 1).all()  # unseen objects are not labelled
    # most of a car's returns lie on or within a few cm of its box (not the ground below it)
    assert len(inside_frac) >= 8 and np.median(inside_frac) > 0.85, inside_frac
    cars = boxes[np.array(names) == 'Car']
    assert np.all((cars[:, 3] > 2.9) & (cars[:, 3] < 5.4) & (cars[:, 5] > 1.2) & (cars[:, 5] < 2.1))
    # boxes stand on the ground (z = -1.73 up to the small tilt), headings wrapped
    bottom = boxes[:, 2] - boxes[:, 5] / 2
    assert np.all(np.abs(bottom + 1.73) < 0.02 * np.hypot(boxes[:, 0], boxes[:, 1]) + 0.01)
    assert np.all(np.abs(boxes[:, 6]) <= math.pi + 1e-6)
    # labelled objects lie inside the region
    assert np.all((boxes[:, 0] >= 0) & (boxes[:, 0] <= 70.4) & (np.abs(boxes[:, 1]) <= 40))


def synthetic_cfg(**scene):
    cfg = load_config(REPO / 'cfgs' / 'dataset_configs' / 'synthetic_dataset.yaml')
    cfg.NUM_FRAMES = {'train': 3, 'test': 2}
    cfg.SCENE.update(SMALL, **scene)
    return cfg


def test_synthetic_dataset_splits_and_annos():
    cfg = synthetic_cfg()
    train = build_dataset(cfg, ['Car', 'Pedestrian', 'Cyclist'], True)
    val = build_dataset(cfg, ['Car', 'Pedestrian', 'Cyclist'], False)
    assert len(train) == 3 and len(val) == 2
    assert not np.array_equal(train.get_frame(0)['points'], val.get_frame(0)['points'])
    s = val[1]
    assert s['frame_id'] == '000001' and s['voxel_coords'].shape[1] == 3
    np.testing.assert_array_equal(val[1]['voxels'], s['voxels'])  # test mode: deterministic
    annos = val.get_gt_annos()
    assert [a['frame_id'] for a in annos] == ['000000', '000001']
    for i, anno in enumerate(annos):
        raw = val.get_frame(i)
        np.testing.assert_array_equal(anno['boxes_lidar'], raw['gt_boxes'])
        expected = np.where(raw['num_points_in_gt'] >= 5, 0, -1)
        np.testing.assert_array_equal(anno['difficulty'], expected)
    # Car-only training keeps Car boxes only, class id 1
    car_only = build_dataset(cfg, ['Car'], False)
    raw = car_only.get_frame(0)
    sample = car_only[0]
    assert len(sample['gt_boxes']) == (raw['gt_names'] == 'Car').sum() > 0
    np.testing.assert_array_equal(sample['gt_boxes'][:, :7],
                                  raw['gt_boxes'][raw['gt_names'] == 'Car'])
    assert np.all(sample['gt_boxes'][:, 7] == 1)


def test_synthetic_config_errors():
    cfg = synthetic_cfg()
    cfg.SEED = {'train': 4, 'test': 4}
    with pytest.raises(ConfigError, match='SEED: train and test are both 4'):
        build_dataset(cfg, ['Car'], True)
    cfg = synthetic_cfg(NUM_BEEMS=3)
    with pytest.raises(ConfigError, match='SCENE.NUM_BEEMS: unknown key; did you mean NUM_BEAMS?'):
        build_dataset(cfg, ['Car'], True)
    cfg = synthetic_cfg(DROPOUT=1.5)
    with pytest.raises(ConfigError, match='DROPOUT'):
        build_dataset(cfg, ['Car'], True)


def test_clutter_never_overlaps_labelled_objects():
    """Every clutter footprint (box, cylinder, sphere) stays outside every object's BEV box,
    so the returns inside a box are the object's own (checked on a grid of BEV samples)."""
    gen = SceneGenerator(SMALL, region=(0, -40, 70.4, 40))
    grid = np.stack(np.meshgrid(np.linspace(-0.5, 0.5, 11), np.linspace(-0.5, 0.5, 11)),
                    -1).reshape(-1, 2)
    checked = 0
    for i in range(5):
        objects, prims, _ = gen._layout(np.random.default_rng([3, i]))
        for _, box in objects:
            box = np.asarray(box)
            c, s = math.cos(box[6]), math.sin(box[6])
            local = grid * box[3:5]
            pts = np.stack([c * local[:, 0] - s * local[:, 1] + box[0],
                            s * local[:, 0] + c * local[:, 1] + box[1]], 1)
            for prim in prims:
                if prim.owner >= 0:
                    continue
                if prim.kind == 'box':
                    (px, py, _), (dx, dy, _), yaw = prim.params
                    du, dv = pts[:, 0] - px, pts[:, 1] - py
                    cu, su = math.cos(yaw), math.sin(yaw)
                    inside = (np.abs(du * cu + dv * su) <= dx / 2) & \
                        (np.abs(-du * su + dv * cu) <= dy / 2)
                else:
                    (px, py), r = prim.params[0][:2], prim.params[1]
                    inside = np.hypot(pts[:, 0] - px, pts[:, 1] - py) <= r
                assert not inside.any(), (box, prim)
                checked += 1
    assert checked > 1000
