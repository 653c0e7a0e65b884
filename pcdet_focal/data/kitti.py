"""``KittiDataset``: KITTI-format folders read directly (no info pkls, no gt database).

Layout under ``DATA_PATH``::

    ImageSets/train.txt, val.txt (test.txt)   frame ids, one per line
    training/velodyne/<id>.bin                float32 x, y, z, intensity
    training/label_2/<id>.txt                 KITTI labels (camera frame)
    training/calib/<id>.txt                   P2, R0_rect, Tr_velo_to_cam
    training/image_2/<id>.png                 optional: only its size is read (FOV, 2D boxes)
    testing/...                               the 'test' split (no labels)

DATA_CONFIG keys: OpenPCDet's (DATASET, DATA_PATH, DATA_SPLIT {train, test}, FOV_POINTS_ONLY,
POINT_CLOUD_RANGE, DATA_AUGMENTOR, POINT_FEATURE_ENCODING, DATA_PROCESSOR; INFO_PATH and
GET_ITEM_LIST are accepted and unused) plus ``STRICT`` (default False: a frame with a broken
or missing file is skipped with one warning line and counted in ``num_skipped_frames``; True:
the first such frame stops the run with that line), ``IMAGE_SHAPE`` ([H, W] assumed when
image_2 is absent, default KITTI's [375, 1242]) and ``EVAL_IGNORE_OUTSIDE_RANGE`` (default
False, as KITTI's protocol: objects whose centre is outside POINT_CLOUD_RANGE count in the
evaluation; True marks them ignored).

Labels and calibrations are read once at construction (they are small); scans on access.
Training boxes: every labelled object except DontCare, then CLASS_NAMES filtering.
Evaluation annos: every labelled object with its KITTI name (Van, Person_sitting... stay: the
evaluation ignores KITTI's neighbour classes itself) and its KITTI difficulty; DontCare rows
are dropped: they carry no 3D box (dimensions -1, location -1000), only a 2D image region, and
KITTI's own BEV/3D evaluation does not use them either (only its 2D-box metric does).
"""
from pathlib import Path

import numpy as np

from ..config import resolve_path
from ..errors import ConfigError, DataError
from ..schema import AnyValue, Bool, Int, Key, ListOf, Schema
from ..registry import DATASET
from . import kitti_io
from .dataset import DATA_KEYS, DatasetTemplate

_MAX_WARNINGS = 20  # per dataset; the rest are summarised in one line


def resolve_data_path(dataset_cfg, root_path=None):
    """DATA_PATH -> existing folder (config folders, repo root, cwd), or one clear DataError."""
    if root_path is not None:
        path = Path(root_path)
        if not path.is_dir():
            raise DataError(f'KITTI root {path} does not exist')
        return path
    data_path = dataset_cfg.get('DATA_PATH')
    if not data_path:
        raise ConfigError('DATA_CONFIG.DATA_PATH is required for KittiDataset (the folder holding '
                          'ImageSets/ and training/)')
    path = resolve_path(data_path, dataset_cfg, 'DATA_CONFIG.DATA_PATH', must_exist=False)
    if not path.is_dir():
        raise DataError(
            f'DATA_CONFIG.DATA_PATH {str(data_path)!r} not found (looked relative to the config '
            f'files, the repo root and the current directory, e.g. {path}); put a KITTI-format '
            'dataset there (ImageSets/, training/velodyne, label_2, calib) or pass --set '
            'DATA_CONFIG.DATA_PATH /path/to/kitti; no data? run the demo: python tools/train.py '
            '--cfg cfgs/focalsst_dsvt_demo.yaml, or write KITTI-layout demo scenes: python '
            'tools/make_demo_data.py --out data/kitti_demo')
    return path


# alias: inside an OpenPCDet checkout 'KittiDataset' stays OpenPCDet's own (info pkls);
# DATASET: KittiRawDataset selects this reader there
@DATASET.register(aliases=('KittiRawDataset',))
class KittiDataset(DatasetTemplate):
    CONFIG = Schema('KittiDataset', [
        *DATA_KEYS,
        Key('STRICT', Bool(), False, 'a broken frame stops the run instead of being skipped'),
        Key('FOV_POINTS_ONLY', Bool(), False, "keep the points inside camera 2's image"),
        Key('IMAGE_SHAPE', ListOf(Int(lo=1), length=2, what='[H, W]'),
            list(kitti_io.KITTI_IMAGE_SHAPE), 'image size when training/image_2 is absent'),
        Key('EVAL_IGNORE_OUTSIDE_RANGE', Bool(), False,
            'objects centred outside POINT_CLOUD_RANGE are ignored by the evaluation'),
        Key('INFO_PATH', AnyValue(), None, "OpenPCDet's info pkls (unused: raw files are read)"),
        Key('GET_ITEM_LIST', AnyValue(), None, "OpenPCDet's key (unused)"),
    ])

    def __init__(self, dataset_cfg, class_names, training=True, root_path=None, logger=None):
        super().__init__(dataset_cfg, class_names, training, root_path, logger)
        cfg = self.cfg
        self.root_path = resolve_data_path(dataset_cfg, root_path)
        self.split = str(cfg.DATA_SPLIT[self.mode])
        self.root_split_path = self.root_path / ('testing' if self.split == 'test' else 'training')
        self.strict = cfg.STRICT
        self.fov_points_only = cfg.FOV_POINTS_ONLY
        self.default_image_shape = tuple(cfg.IMAGE_SHAPE)
        self.eval_ignore_outside_range = cfg.EVAL_IGNORE_OUTSIDE_RANGE
        self.num_raw_features = len(self.point_feature_encoder.src_feature_list)
        self.skipped_frames = []  # (frame id, reason)
        self.frames = self._load_frames()
        self._frame_index = {f['id']: i for i, f in enumerate(self.frames)}
        self.logger.info('KITTI %s split (%s): %d frames%s', self.split, self.root_path,
                         len(self.frames), f', {len(self.skipped_frames)} skipped'
                         if self.skipped_frames else '')

    # ---------------------------------------------------------------- loading
    @property
    def num_skipped_frames(self):
        return len(self.skipped_frames)

    def _read_ids(self):
        split_file = self.root_path / 'ImageSets' / f'{self.split}.txt'
        if not split_file.is_file():
            raise DataError(f'{split_file}: split file not found (DATA_CONFIG.DATA_SPLIT.'
                            f'{self.mode}={self.split!r}); list the frame ids of the split, one '
                            'per line, e.g. 000000')
        ids = [line.strip() for line in split_file.read_text(encoding='utf-8').splitlines()]
        ids = [i for i in ids if i]
        if not ids:
            raise DataError(f'{split_file}: the split lists no frames')
        return split_file, ids

    def _skip(self, frame_id, reason):
        if self.strict:
            raise DataError(reason)
        self.skipped_frames.append((frame_id, reason))
        if len(self.skipped_frames) <= _MAX_WARNINGS:
            self.logger.warning('skipping frame %s: %s', frame_id, reason)

    def _load_frames(self):
        split_file, ids = self._read_ids()
        has_labels = self.split != 'test' and (self.root_split_path / 'label_2').is_dir()
        frames = []
        for frame_id in ids:
            velodyne = self.root_split_path / 'velodyne' / f'{frame_id}.bin'
            try:
                if not velodyne.is_file():
                    raise DataError(f'{split_file} lists {frame_id!r} but {velodyne} does not '
                                    'exist')
                kitti_io.check_velodyne_size(velodyne, self.num_raw_features)
                calib = kitti_io.read_calib(self.root_split_path / 'calib' / f'{frame_id}.txt')
                label = kitti_io.read_label(self.root_split_path / 'label_2'
                                            / f'{frame_id}.txt') if has_labels else None
            except DataError as err:
                self._skip(frame_id, str(err))
                continue
            frames.append({'id': frame_id, 'velodyne': velodyne, 'calib': calib,
                           'label': label, 'image_shape': None})
        extra = len(self.skipped_frames) - _MAX_WARNINGS
        if extra > 0:
            self.logger.warning('... and %d more skipped frames (%d in all); the list is in '
                                'dataset.skipped_frames', extra, len(self.skipped_frames))
        if not frames:
            raise DataError(f'{split_file}: none of its {len(ids)} frames is usable (first '
                            f'problem: {self.skipped_frames[0][1]})')
        return frames

    def image_shape(self, index):
        """(H, W) of image_2/<id>.png if present, else DATA_CONFIG.IMAGE_SHAPE."""
        frame = self.frames[index]
        if frame['image_shape'] is None:
            size = kitti_io.png_size(self.root_split_path / 'image_2' / f'{frame["id"]}.png')
            frame['image_shape'] = size or self.default_image_shape
        return frame['image_shape']

    # ---------------------------------------------------------------- samples
    def _num_frames(self):
        return len(self.frames)

    def __len__(self):
        if self._merge_all_iters_to_one_epoch:
            return len(self.frames) * max(1, self.total_epochs)
        return len(self.frames)

    def get_lidar(self, index):
        """(P, C) float32 points of frame ``index`` (camera-FOV only with FOV_POINTS_ONLY)."""
        frame = self.frames[index]
        points = kitti_io.read_velodyne(frame['velodyne'], self.num_raw_features)
        if self.fov_points_only:
            uv, depth = frame['calib'].lidar_to_img(points[:, :3])
            h, w = self.image_shape(index)
            fov = (depth >= 0) & (uv[:, 0] >= 0) & (uv[:, 0] < w) & (uv[:, 1] >= 0) \
                & (uv[:, 1] < h)
            points = points[fov]
        return points

    def get_boxes(self, index):
        """Labelled objects except DontCare: (M, 7) LiDAR boxes and (M,) names."""
        label = self.frames[index]['label']
        if label is None:
            return np.zeros((0, 7), np.float32), np.zeros(0, '<U16')
        keep = label['name'] != 'DontCare'
        boxes = kitti_io.camera_to_lidar_boxes(label['location'][keep], label['dimensions'][keep],
                                               label['rotation_y'][keep],
                                               self.frames[index]['calib'])
        return boxes.astype(np.float32), label['name'][keep]

    def __getitem__(self, index):
        index = index % len(self.frames)
        data = {'frame_id': self.frames[index]['id'], 'points': self.get_lidar(index)}
        if self.frames[index]['label'] is not None:
            data['gt_boxes'], data['gt_names'] = self.get_boxes(index)
        return self.prepare_data(data)

    # ---------------------------------------------------------------- evaluation
    def _gt_anno(self, index):
        frame = self.frames[index]
        label = frame['label']
        if label is None:
            raise DataError(f'the {self.split} split has no labels ({self.root_split_path}/'
                            'label_2): it cannot be evaluated; predict with --save_to_file '
                            'instead')
        keep = label['name'] != 'DontCare'
        boxes, names = self.get_boxes(index)
        difficulty = kitti_io.kitti_difficulty(label['bbox'][keep], label['truncated'][keep],
                                               label['occluded'][keep])
        if self.eval_ignore_outside_range:
            difficulty = self._ignore_outside_range(boxes, difficulty)
        return {'frame_id': frame['id'], 'name': names, 'boxes_lidar': boxes,
                'difficulty': difficulty.astype(np.int32)}

    def generate_prediction_dicts(self, batch_dict, pred_dicts, class_names, output_path=None):
        """Det annos with KITTI's camera-frame fields added (``location``, ``dimensions`` h w l,
        ``rotation_y``, ``alpha``, ``bbox``: the projected 3D box clipped to the image, whose
        size is assumed (IMAGE_SHAPE) when image_2 is absent; 0s for boxes behind the camera).
        With ``output_path``: one KITTI result file ``<frame_id>.txt`` per frame."""
        annos = super().generate_prediction_dicts(batch_dict, pred_dicts, class_names)
        for anno in annos:
            index = self._frame_index.get(str(anno['frame_id']))
            if index is None:
                raise DataError(f'frame id {anno["frame_id"]!r} is not in the {self.split} split')
            calib = self.frames[index]['calib']
            loc, dims, rot_y = kitti_io.lidar_to_camera_boxes(anno['boxes_lidar'], calib)
            bbox, _ = kitti_io.image_boxes(anno['boxes_lidar'], calib, self.image_shape(index))
            # observation angle: rotation_y minus the ray's azimuth seen from the camera
            alpha = rot_y - np.arctan2(loc[:, 0], loc[:, 2]) if len(loc) else np.zeros(0)
            anno.update(location=loc, dimensions=dims, rotation_y=rot_y,
                        alpha=(alpha + np.pi) % (2 * np.pi) - np.pi, bbox=bbox)
        if output_path is not None:
            self._write_predictions(annos, Path(output_path))
        return annos

    def _write_predictions(self, annos, output_path):
        output_path.mkdir(parents=True, exist_ok=True)
        for anno in annos:
            n = len(anno['name'])
            kitti_io.write_label(output_path / f'{anno["frame_id"]}.txt', {
                'name': anno['name'], 'truncated': np.full(n, -1.0),
                'occluded': np.full(n, -1), 'alpha': anno['alpha'], 'bbox': anno['bbox'],
                'dimensions': anno['dimensions'], 'location': anno['location'],
                'rotation_y': anno['rotation_y'], 'score': anno['score']}, precision=4)
