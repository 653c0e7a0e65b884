"""Write synthetic scenes in KITTI layout (tools/make_demo_data.py), readable by KittiDataset.

Frames 0..num_train-1 are the synthetic train split's frames 0..num_train-1 (seed
``seed_train``), frames num_train.. are the val split's frames 0..num_val-1 (``seed_val``), so a
demo folder holds exactly what SyntheticDataset would generate. Labels carry what KITTI's
annotation has: the 2D box (the 3D box projected with P2, clipped to a 375 x 1242 image; 0s
behind the camera), truncation (share of that 2D box outside the image), occlusion
(0 / 1 / 2 from the share of the object's rays blocked by nearer things: < 20 %, < 50 %, more)
and alpha. Boxes are written with 6 decimals so they read back within 1e-5 m.
"""
import logging
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from . import kitti_io
from .synthetic_scene import SceneGenerator

logger = logging.getLogger('pcdet_focal')


def scene_to_kitti_label(scene, calib, image_shape=kitti_io.KITTI_IMAGE_SHAPE):
    """One generated frame -> read_label-style dict (camera frame, KITTI fields)."""
    boxes = scene['gt_boxes']
    loc, dims, rot_y = kitti_io.lidar_to_camera_boxes(boxes, calib)
    bbox, truncation = kitti_io.image_boxes(boxes, calib, image_shape)
    occlusion = np.digitize(scene['occlusion'], [0.2, 0.5]).astype(np.int32)
    alpha = rot_y - np.arctan2(loc[:, 0], loc[:, 2])
    return {'name': scene['gt_names'], 'truncated': truncation, 'occluded': occlusion,
            'alpha': (alpha + np.pi) % (2 * np.pi) - np.pi, 'bbox': bbox, 'dimensions': dims,
            'location': loc, 'rotation_y': rot_y}


def write_demo_dataset(out, num_train=40, num_val=10, seed_train=0, seed_val=1,
                       scene_cfg=None, point_cloud_range=(0.0, -40.0, -3.0, 70.4, 40.0, 1.0),
                       overwrite=False):
    """Write ``num_train + num_val`` scenes under ``out`` (KITTI layout). Returns a summary dict.

    scene_cfg: DATA_CONFIG.SCENE mapping (sensor/scene knobs); point_cloud_range: the region
    (x, y) where labelled objects are placed.
    """
    out = Path(out)
    for name, value in (('num_train', num_train), ('num_val', num_val)):
        if not isinstance(value, int) or value < 0:
            raise ConfigError(f'--{name} must be an int >= 0, got {value!r}')
    if num_train + num_val == 0:
        raise ConfigError('--num_train and --num_val are both 0: nothing to write')
    if seed_train == seed_val:
        raise ConfigError(f'train and val seeds are both {seed_train}: the val scenes would '
                          'repeat the training scenes')
    training = out / 'training'
    if (training / 'velodyne').is_dir() and any((training / 'velodyne').iterdir()) \
            and not overwrite:
        raise DataError(f'{training / "velodyne"} already holds scans; choose another --out or '
                        'pass --overwrite')
    for sub in ('velodyne', 'label_2', 'calib'):
        (training / sub).mkdir(parents=True, exist_ok=True)
    (out / 'ImageSets').mkdir(parents=True, exist_ok=True)

    pc = point_cloud_range
    generator = SceneGenerator(scene_cfg, region=(pc[0], pc[1], pc[3], pc[4]))
    calib = kitti_io.Calibration(kitti_io.DEFAULT_CALIB['P2'], kitti_io.DEFAULT_CALIB['R0_rect'],
                                 kitti_io.DEFAULT_CALIB['Tr_velo_to_cam'])
    ids = {'train': [], 'val': []}
    n_points = n_objects = 0
    jobs = [('train', seed_train, i) for i in range(num_train)] + \
        [('val', seed_val, i) for i in range(num_val)]
    for frame_no, (split, seed, index) in enumerate(jobs):
        frame_id = f'{frame_no:06d}'
        scene = generator.generate(seed, index)
        kitti_io.write_velodyne(training / 'velodyne' / f'{frame_id}.bin', scene['points'])
        kitti_io.write_label(training / 'label_2' / f'{frame_id}.txt',
                             scene_to_kitti_label(scene, calib))
        kitti_io.write_calib(training / 'calib' / f'{frame_id}.txt')
        ids[split].append(frame_id)
        n_points += len(scene['points'])
        n_objects += len(scene['gt_boxes'])
    for split, frame_ids in ids.items():
        (out / 'ImageSets' / f'{split}.txt').write_text(''.join(f + '\n' for f in frame_ids),
                                                        encoding='utf-8')
    summary = {'out': str(out), 'train': len(ids['train']), 'val': len(ids['val']),
               'points_per_frame': n_points / len(jobs), 'objects_per_frame': n_objects / len(jobs)}
    logger.info('wrote %d train + %d val synthetic scenes in KITTI layout to %s '
                '(%.0f points, %.1f labelled objects per frame)', summary['train'],
                summary['val'], out, summary['points_per_frame'], summary['objects_per_frame'])
    return summary
