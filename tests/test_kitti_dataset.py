"""KittiDataset on real frames (kitti_mini), on make_demo_data scenes, and on broken folders."""
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pcdet_focal.config import load_config
from pcdet_focal.data import kitti_io
from pcdet_focal.data.dataset import build_dataset
from pcdet_focal.data.demo_data import write_demo_dataset
from pcdet_focal.data.synthetic_scene import SceneGenerator
from pcdet_focal.errors import DataError

REPO = Path(__file__).resolve().parents[1]
CLASSES = ['Car', 'Pedestrian', 'Cyclist']
SCENE = {'NUM_BEAMS': 32, 'NUM_AZIMUTH': 512}
PC_RANGE = [0, -40, -3, 70.4, 40, 1]


def kitti_cfg(path, **over):
    cfg = load_config(REPO / 'cfgs' / 'dataset_configs' / 'kitti_dataset.yaml')
    cfg.DATA_PATH = str(path)
    cfg.update(over)
    return cfg


def points_in_box(points, box, margin=0.0, above_ground=0.0):
    """Numpy reference: number of points inside one (7,) LiDAR box (optionally only those
    ``above_ground`` metres over its bottom face, leaving out the ground it stands on)."""
    d = points[:, :3].astype(np.float64) - box[:3]
    c, s = math.cos(box[6]), math.sin(box[6])
    local = np.stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1], d[:, 2]], 1)
    inside = np.all(np.abs(local) <= np.asarray(box[3:6]) / 2 + margin, axis=1)
    inside &= local[:, 2] >= -box[5] / 2 + above_ground
    return int(inside.sum())


def test_kitti_mini_boxes_contain_their_points(kitti_mini):
    ds = build_dataset(kitti_cfg(kitti_mini, DATA_SPLIT={'train': 'train', 'test': 'val'},
                                 FOV_POINTS_ONLY=False), CLASSES, True)
    assert len(ds) == 3 and ds.num_skipped_frames == 0
    found = 0
    for i in range(len(ds)):
        points = ds.get_lidar(i)
        assert points.shape[1] == 4 and len(points) > 100000
        boxes, names = ds.get_boxes(i)
        for box, name in zip(boxes, names):
            dist = math.hypot(box[0], box[1])
            n = points_in_box(points, box, above_ground=0.2)
            if name in ('Car', 'Pedestrian') and dist < 40:
                assert n >= 30, (name, dist, n)  # real objects at moderate range: dozens
                found += 1
            # control: the air right above the object (the same box raised by its height) is
            # nearly empty, so the count measures the object, not the surroundings (a box
            # centre taken as its bottom, KITTI's convention, would fail here)
            raised = box.copy()
            raised[2] += box[5]
            if n >= 30:
                assert points_in_box(points, raised) < n / 4
    assert found >= 2
    sample = ds[0]
    assert sample['gt_boxes'].shape[1] == 8 and set(sample['gt_boxes'][:, 7]) <= {1, 2, 3}


def test_kitti_mini_fov_and_eval_annos(kitti_mini):
    ds = build_dataset(kitti_cfg(kitti_mini), CLASSES, False)  # val split: frame 000003
    assert [f['id'] for f in ds.frames] == ['000003']
    pts = ds.get_lidar(0)
    raw = kitti_io.read_velodyne(kitti_mini / 'training' / 'velodyne' / '000003.bin')
    assert 0.1 * len(raw) < len(pts) < 0.5 * len(raw)  # camera FOV is ~90 of 360 degrees
    assert np.all(pts[:, 0] > 0)
    uv, _ = ds.frames[0]['calib'].lidar_to_img(pts[:, :3])
    assert np.all((uv[:, 0] >= 0) & (uv[:, 0] < 1242) & (uv[:, 1] >= 0) & (uv[:, 1] < 375))
    anno = ds.get_gt_annos()[0]
    label = kitti_io.read_label(kitti_mini / 'training' / 'label_2' / '000003.txt')
    assert anno['name'].tolist() == [n for n in label['name'] if n != 'DontCare']
    assert anno['boxes_lidar'].shape == (len(anno['name']), 7)
    assert anno['difficulty'].dtype == np.int32 and set(anno['difficulty']) <= {-1, 0, 1, 2}


@pytest.fixture(scope='module')
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp('demo')
    write_demo_dataset(out, num_train=3, num_val=2, seed_train=7, seed_val=8, scene_cfg=SCENE,
                       point_cloud_range=PC_RANGE)
    return out


def test_make_demo_data_round_trip(demo_dir):
    gen = SceneGenerator(SCENE, region=(0, -40, 70.4, 40))
    assert (demo_dir / 'ImageSets' / 'train.txt').read_text().split() == ['000000', '000001',
                                                                         '000002']
    assert (demo_dir / 'ImageSets' / 'val.txt').read_text().split() == ['000003', '000004']
    for mode, seed, offset in (('train', 7, 0), ('test', 8, 3)):
        ds = build_dataset(kitti_cfg(demo_dir, FOV_POINTS_ONLY=False), CLASSES, mode == 'train')
        for i in range(len(ds)):
            scene = gen.generate(seed, i)
            assert ds.frames[i]['id'] == f'{i + offset:06d}'
            np.testing.assert_array_equal(ds.get_lidar(i), scene['points'])
            boxes, names = ds.get_boxes(i)
            assert names.tolist() == scene['gt_names'].tolist()
            ref = scene['gt_boxes']
            np.testing.assert_allclose(boxes[:, :6], ref[:, :6], atol=1e-3)
            dyaw = np.remainder(boxes[:, 6] - ref[:, 6] + math.pi, 2 * math.pi) - math.pi
            assert np.abs(dyaw).max(initial=0) < 1e-3
            for box, n in zip(boxes, scene['num_points_in_gt']):
                # every return of the object lies within the range noise of its box
                assert points_in_box(scene['points'], box, margin=0.08) >= n
    # the eval annos of the val split score a perfect detector at AP 1
    val = build_dataset(kitti_cfg(demo_dir, FOV_POINTS_ONLY=False), CLASSES, False)
    gts = val.get_gt_annos()
    preds = [{'pred_boxes': torch.from_numpy(g['boxes_lidar']),
              'pred_scores': torch.linspace(1, 0.5, len(g['name'])),
              'pred_labels': torch.tensor([CLASSES.index(n) + 1 for n in g['name']])}
             for g in gts]
    dets = val.generate_prediction_dicts({'frame_id': np.array([g['frame_id'] for g in gts])},
                                         preds, CLASSES)
    _, result = val.evaluation(dets, CLASSES)
    assert result['Car_bev_R40_0.70'] == pytest.approx(1.0)


def test_prediction_files_in_kitti_format(demo_dir, tmp_path):
    val = build_dataset(kitti_cfg(demo_dir), CLASSES, False)
    boxes = np.array([[12.0, 1.0, -0.9, 4.0, 1.7, 1.5, 0.3], [-10, 0, -0.9, 4, 1.7, 1.5, 0]],
                     np.float32)
    preds = [{'pred_boxes': torch.from_numpy(boxes), 'pred_scores': torch.tensor([0.9, 0.4]),
              'pred_labels': torch.tensor([1, 3])}]
    annos = val.generate_prediction_dicts({'frame_id': np.array(['000004'])}, preds, CLASSES,
                                          output_path=tmp_path / 'pred')
    lines = (tmp_path / 'pred' / '000004.txt').read_text().splitlines()
    assert len(lines) == 2 and all(len(line.split()) == 16 for line in lines)
    back = kitti_io.read_label(tmp_path / 'pred' / '000004.txt')
    assert back['name'].tolist() == ['Car', 'Cyclist']
    np.testing.assert_allclose(back['score'], [0.9, 0.4], atol=1e-4)
    lidar = kitti_io.camera_to_lidar_boxes(back['location'], back['dimensions'],
                                           back['rotation_y'], val.frames[0]['calib'])
    np.testing.assert_allclose(lidar[:, :6], boxes[:, :6], atol=2e-3)
    assert back['bbox'][0].all() and not back['bbox'][1].any()  # behind the camera: 0s
    assert annos[0]['bbox'].shape == (2, 4)


def broken_copy(demo_dir, tmp_path):
    root = tmp_path / 'kitti'
    shutil.copytree(demo_dir, root)
    return root


def test_bad_velodyne_skipped_counted_or_strict(demo_dir, tmp_path, caplog):
    root = broken_copy(demo_dir, tmp_path)
    bad = root / 'training' / 'velodyne' / '000001.bin'
    bad.write_bytes(bad.read_bytes()[:-5])
    with caplog.at_level(logging.WARNING, logger='pcdet_focal'):
        ds = build_dataset(kitti_cfg(root), CLASSES, True)
    assert len(ds) == 2 and ds.num_skipped_frames == 1
    lines = [r.getMessage() for r in caplog.records if 'skipping frame' in r.getMessage()]
    assert len(lines) == 1 and str(bad) in lines[0] and 'not a multiple of 16' in lines[0]
    with pytest.raises(DataError) as err:
        build_dataset(kitti_cfg(root, STRICT=True), CLASSES, True)
    assert str(err.value).startswith(str(bad)) and '\n' not in str(err.value)


@pytest.mark.parametrize('case', ['label_fields', 'missing_calib', 'missing_velodyne'])
def test_bad_frames_one_line_each(demo_dir, tmp_path, case):
    root = broken_copy(demo_dir, tmp_path)
    training = root / 'training'
    if case == 'label_fields':
        path = training / 'label_2' / '000002.txt'
        lines = path.read_text().splitlines()
        lines[1] = ' '.join(lines[1].split()[:12])
        path.write_text('\n'.join(lines) + '\n')
        expected = f'{path}:2: a label line has 15 fields'
    elif case == 'missing_calib':
        path = training / 'calib' / '000002.txt'
        path.unlink()
        expected = f'{path}: calib file not found'
    else:
        path = training / 'velodyne' / '000002.bin'
        path.unlink()
        expected = f"{root / 'ImageSets' / 'train.txt'} lists '000002' but {path} does not exist"
    with pytest.raises(DataError) as err:
        build_dataset(kitti_cfg(root, STRICT=True), CLASSES, True)
    assert str(err.value).startswith(expected) and '\n' not in str(err.value)
    ds = build_dataset(kitti_cfg(root), CLASSES, True)
    assert len(ds) == 2 and ds.skipped_frames[0][0] == '000002'
    assert ds.skipped_frames[0][1].startswith(expected)


def test_missing_data_path_and_split(tmp_path):
    with pytest.raises(DataError) as err:
        build_dataset(kitti_cfg('no/such/kitti'), CLASSES, True)
    msg = str(err.value)
    assert "'no/such/kitti' not found" in msg and '\n' not in msg
    assert 'tools/train.py --cfg cfgs/focalsst_dsvt_demo.yaml' in msg
    assert 'tools/make_demo_data.py' in msg
    (tmp_path / 'training').mkdir()
    with pytest.raises(DataError, match=r'ImageSets/train.txt: split file not found'):
        build_dataset(kitti_cfg(tmp_path), CLASSES, True)


def test_make_demo_data_cli(tmp_path):
    tool = REPO / 'tools' / 'make_demo_data.py'
    run = subprocess.run([sys.executable, str(tool), '--out', str(tmp_path / 'd'), '--num_train',
                          '2', '--num_val', '1', '--seed', '3'], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert 'wrote 2 train + 1 val scenes' in run.stdout
    assert len(list((tmp_path / 'd' / 'training' / 'velodyne').glob('*.bin'))) == 3
    # same folder again: refused with one line, nothing overwritten
    run = subprocess.run([sys.executable, str(tool), '--out', str(tmp_path / 'd')],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and run.stderr.startswith('error: ')
    assert 'already holds scans' in run.stderr and run.stderr.count('\n') == 1
