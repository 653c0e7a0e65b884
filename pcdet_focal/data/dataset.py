"""DatasetTemplate (OpenPCDet's dataset contract), collate into batch_dict, build_dataset.

A subclass loads one frame's raw data in ``__getitem__`` and calls :meth:`prepare_data` with
``{'frame_id', 'points' (P, C) float32 LiDAR frame, 'gt_boxes' (M, 7) float, 'gt_names' (M,) str}``;
it implements ``__len__`` and ``_gt_anno(index)`` (one evaluation anno). Everything else here:

prepare_data: drop non-finite points (counted in ``num_dropped_points``, shared across
DataLoader workers) -> keep boxes of ``class_names`` (class id = 1-based position) ->
augmentation (training) -> point feature encoding -> DATA_PROCESSOR (range mask, shuffle,
voxels). Empty clouds and clouds with no point in range give a valid sample with zero voxels.
"""
import logging
import multiprocessing
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..schema import REQUIRED, Float, Key, ListOf, PerSplit, Section, Str
from .augment import AUGMENTOR_CONFIG, DataAugmentor
from .processor import ENCODING_CONFIG, PROCESSOR_STEPS, DataProcessor, PointFeatureEncoder

# DATA_CONFIG keys every dataset reads (OpenPCDet's); a dataset class declares
# ``CONFIG = Schema(name, [*DATA_KEYS, ...its own keys])``
DATA_KEYS = (
    Key('DATASET', Str(), REQUIRED, 'the dataset class, e.g. SyntheticDataset, KittiDataset'),
    Key('DATA_PATH', Str(), None, "data folder; a relative path resolves against the config "
        "files' folders, the repo root, then the current directory"),
    Key('POINT_CLOUD_RANGE', ListOf(Float(), length=6), REQUIRED,
        '[x_min, y_min, z_min, x_max, y_max, z_max], metres'),
    Key('DATA_SPLIT', PerSplit(Str()), {'train': 'train', 'test': 'val'}, 'split names'),
    Key('DATA_AUGMENTOR', Section(AUGMENTOR_CONFIG), None, 'training augmentations'),
    Key('POINT_FEATURE_ENCODING', Section(ENCODING_CONFIG), None, 'which point columns'),
    Key('DATA_PROCESSOR', PROCESSOR_STEPS, REQUIRED,
        'processing steps in order; transform_points_to_voxels gives the voxel grid'),
)


class SharedCounter:
    """An integer shared by the dataset and its DataLoader worker processes.

    Backed by a multiprocessing.Value so counts made inside workers reach the main process
    (the engine logs ``dataset.num_dropped_points``). Pickled for anything but a process
    spawn (deepcopy, plain pickle), it degrades to a private counter holding the current value.
    """

    def __init__(self, value=0):
        self._value = multiprocessing.Value('q', int(value))

    def add(self, n):
        with self._value.get_lock():
            self._value.value += int(n)

    @property
    def value(self):
        return int(self._value.value)

    def __reduce__(self):
        from multiprocessing import context
        if context.get_spawning_popen() is not None:  # handing it to a worker: share it
            return _rebuild_shared_counter, (self._value,)
        return SharedCounter, (self.value,)


def _rebuild_shared_counter(value):
    counter = SharedCounter.__new__(SharedCounter)
    counter._value = value
    return counter


def foreign_keys(schema):
    """DATA_CONFIG keys our other datasets declare: a config switched to another dataset
    (``--set DATA_CONFIG.DATASET KittiDataset``) keeps them, unused, without an error."""
    from ..registry import DATASET
    return {key.name for _, cls in DATASET.items() if getattr(cls, 'CONFIG', None) is not None
            for key in cls.CONFIG} - {key.name for key in schema}


class DatasetTemplate(torch.utils.data.Dataset):
    """Base of our datasets; attributes and methods as OpenPCDet's DatasetTemplate.

    Attributes: ``dataset_cfg``, ``class_names`` (list), ``training``, ``mode`` ('train' |
    'test'), ``root_path`` (Path or None), ``point_cloud_range`` (6,) float32,
    ``voxel_size`` (3,) float32 x y z, ``grid_size`` (3,) int64 x y z,
    ``depth_downsample_factor`` (None), ``point_feature_encoder`` (``.num_point_features``),
    ``num_point_features``, ``num_dropped_points`` (non-finite points dropped so far).
    """

    # log a line about non-finite points for the first frame that has them, then every N frames
    NONFINITE_LOG_EVERY = 1000
    CONFIG = None   # a subclass's DATA_CONFIG declaration (checked at construction)

    def __init__(self, dataset_cfg, class_names, training=True, root_path=None, logger=None):
        super().__init__()
        if dataset_cfg is None:
            raise ConfigError('DATA_CONFIG is missing from the config')
        self.dataset_cfg = dataset_cfg
        self.cfg = None
        if self.CONFIG is not None:
            self.cfg = self.CONFIG.parse(dataset_cfg, 'DATA_CONFIG', foreign_keys(self.CONFIG))
        self.class_names = list(class_names or [])
        if not self.class_names or len(set(self.class_names)) != len(self.class_names):
            raise ConfigError(f'CLASS_NAMES must be a non-empty list of distinct names, got '
                              f'{class_names!r}')
        self.training = bool(training)
        self.logger = logger or logging.getLogger('pcdet_focal')
        self.root_path = Path(root_path) if root_path is not None else None
        self.point_cloud_range = np.asarray(dataset_cfg.get('POINT_CLOUD_RANGE', []),
                                            dtype=np.float32)
        self.point_feature_encoder = PointFeatureEncoder(dataset_cfg.get('POINT_FEATURE_ENCODING'))
        self.data_augmentor = DataAugmentor(dataset_cfg.get('DATA_AUGMENTOR'), self.logger) \
            if self.training else None
        self.data_processor = DataProcessor(dataset_cfg.get('DATA_PROCESSOR'),
                                            self.point_cloud_range, self.training)
        self.grid_size = self.data_processor.grid_size
        self.voxel_size = self.data_processor.voxel_size
        self.depth_downsample_factor = None
        self._dropped_points = SharedCounter()
        self._frames_with_nonfinite = SharedCounter()
        self._merge_all_iters_to_one_epoch = False
        self.total_epochs = 0

    # ---------------------------------------------------------------- OpenPCDet attributes
    @property
    def mode(self):
        return 'train' if self.training else 'test'

    @property
    def num_point_features(self):
        return self.point_feature_encoder.num_point_features

    @property
    def num_dropped_points(self):
        """Non-finite (NaN/inf) points dropped so far, over all DataLoader workers."""
        return self._dropped_points.value

    def set_epoch(self, epoch):
        """Hook called by the engine before each epoch (nothing to do for our datasets)."""

    def merge_all_iters_to_one_epoch(self, merge=True, epochs=None):
        """OpenPCDet's option: one long epoch of ``epochs`` passes over the data."""
        self._merge_all_iters_to_one_epoch = bool(merge)
        self.total_epochs = int(epochs or 0) if merge else 0

    def __getstate__(self):
        state = dict(self.__dict__)
        state['logger'] = None  # loggers hold handlers (files, streams): re-acquire by name
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.logger = logging.getLogger('pcdet_focal')

    # ---------------------------------------------------------------- subclass interface
    def __len__(self):
        raise NotImplementedError

    def __getitem__(self, index):
        raise NotImplementedError

    def _gt_anno(self, index):
        """Evaluation anno of frame ``index``: name (M,), boxes_lidar (M, 7), difficulty (M,)."""
        raise NotImplementedError

    def _num_frames(self):
        """Frames in the split (``__len__`` may be larger with merge_all_iters_to_one_epoch)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- processing
    def _drop_nonfinite(self, data_dict):
        points = data_dict['points']
        finite = np.isfinite(points).all(axis=1)
        n_bad = int(points.shape[0] - finite.sum())
        if n_bad:
            data_dict['points'] = points[finite]
            self._dropped_points.add(n_bad)
            self._frames_with_nonfinite.add(1)
            frames = self._frames_with_nonfinite.value
            if frames == 1 or frames % self.NONFINITE_LOG_EVERY == 0:
                self.logger.warning('frame %s: dropped %d non-finite (NaN/inf) points; %d '
                                    'dropped so far in %d frame(s) of the %s split',
                                    data_dict.get('frame_id'), n_bad, self.num_dropped_points,
                                    frames, self.mode)
        boxes = data_dict.get('gt_boxes')
        if boxes is not None and len(boxes):
            ok = np.isfinite(boxes).all(axis=1)
            if not ok.all():
                self.logger.warning('frame %s: dropped %d ground-truth box(es) with non-finite '
                                    'values', data_dict.get('frame_id'), int((~ok).sum()))
                data_dict['gt_boxes'] = boxes[ok]
                data_dict['gt_names'] = data_dict['gt_names'][ok]
        return data_dict

    def prepare_data(self, data_dict):
        """Raw frame -> model sample.

        In: ``frame_id``, ``points`` (P, len(src_feature_list)) float, optional ``gt_boxes``
        (M, 7) + ``gt_names`` (M,) str. Out (numpy): ``points`` (P', C) float32, ``gt_boxes``
        (M', 8) float32 (class id 1-based in column 8), ``voxels`` (N, max_pts, C) float32,
        ``voxel_coords`` (N, 3) int32 [z, y, x], ``voxel_num_points`` (N,) int32,
        ``use_lead_xyz``, ``frame_id``.
        """
        points = np.asarray(data_dict.get('points', np.zeros((0, 4))), dtype=np.float32)
        if points.ndim != 2:
            points = points.reshape(0, len(self.point_feature_encoder.src_feature_list))
        data_dict['points'] = points
        has_boxes = data_dict.get('gt_boxes') is not None
        if has_boxes:
            boxes = np.asarray(data_dict['gt_boxes'], dtype=np.float32).reshape(-1, 7)
            names = np.asarray(data_dict['gt_names']).reshape(-1)
            keep = np.array([n in self.class_names for n in names], dtype=bool)
            data_dict['gt_boxes'], data_dict['gt_names'] = boxes[keep], names[keep]
        data_dict = self._drop_nonfinite(data_dict)

        if self.training and has_boxes and self.data_augmentor is not None:
            data_dict = self.data_augmentor.forward(data_dict)
        if has_boxes:
            class_ids = np.array([self.class_names.index(n) + 1 for n in data_dict['gt_names']],
                                 dtype=np.float32).reshape(-1, 1)
            data_dict['gt_boxes'] = np.concatenate([data_dict['gt_boxes'][:, :7], class_ids],
                                                   axis=1).astype(np.float32)
        elif self.training:
            data_dict['gt_boxes'] = np.zeros((0, 8), np.float32)
        data_dict = self.point_feature_encoder.forward(data_dict)
        data_dict = self.data_processor.forward(data_dict)
        data_dict.pop('gt_names', None)
        return data_dict

    # ---------------------------------------------------------------- batching
    @staticmethod
    def collate_batch(batch_list, _unused=False):
        """List of samples -> OpenPCDet batch_dict (numpy).

        ``voxels`` (sum N, max_pts, C) and ``voxel_num_points`` concatenated; ``voxel_coords``
        (sum N, 4) int32 [b, z, y, x]; ``points`` (sum P, 1 + C) float32 with the batch index
        first; ``gt_boxes`` (B, max(1, max M), 8) float32 zero-padded; ``batch_size`` int;
        ``frame_id`` (B,) array; other per-sample arrays stacked (lists if they cannot be).
        """
        if not batch_list:
            raise DataError('collate_batch got an empty batch')
        merged = defaultdict(list)
        for sample in batch_list:
            for key, val in sample.items():
                merged[key].append(val)
        batch_size = len(batch_list)
        out = {}
        for key, vals in merged.items():
            if key in ('voxels', 'voxel_num_points'):
                out[key] = np.concatenate(vals, axis=0)
            elif key in ('voxel_coords', 'points'):
                dtype = np.int32 if key == 'voxel_coords' else np.float32
                out[key] = np.concatenate(
                    [np.concatenate([np.full((len(v), 1), i, dtype), v.astype(dtype)], axis=1)
                     for i, v in enumerate(vals)], axis=0)
            elif key == 'gt_boxes':
                width = vals[0].shape[-1] if vals[0].ndim == 2 else 8
                boxes = np.zeros((batch_size, max(1, max(len(v) for v in vals)), width),
                                 np.float32)
                for i, v in enumerate(vals):
                    boxes[i, :len(v)] = v
                out[key] = boxes
            elif key == 'calib':
                out[key] = vals
            else:
                try:
                    out[key] = np.stack(vals, axis=0)
                except (ValueError, TypeError):
                    out[key] = vals
        out['batch_size'] = batch_size
        return out

    # ---------------------------------------------------------------- predictions / eval
    def generate_prediction_dicts(self, batch_dict, pred_dicts, class_names, output_path=None):
        """Model output -> det annos (one per sample, in batch order).

        pred_dicts[i]: ``pred_boxes`` (K, 7) LiDAR frame, ``pred_scores`` (K,), ``pred_labels``
        (K,) 1-based; tensors or arrays. Returns dicts with ``name`` (K,) str, ``score`` (K,),
        ``boxes_lidar`` (K, 7), ``pred_labels`` (K,), ``frame_id``. Subclasses that know the
        sensor geometry (KITTI) also write result files when ``output_path`` is given.
        """
        annos = []
        names_table = np.asarray(list(class_names))
        for i, pred in enumerate(pred_dicts):
            boxes = _to_numpy(pred['pred_boxes']).astype(np.float32).reshape(-1, 7)
            scores = _to_numpy(pred['pred_scores']).astype(np.float32).reshape(-1)
            labels = _to_numpy(pred['pred_labels']).astype(np.int64).reshape(-1)
            if len(labels) and (labels.min() < 1 or labels.max() > len(names_table)):
                raise DataError(f'pred_labels must be 1-based class ids in [1, '
                                f'{len(names_table)}], got {labels.min()}..{labels.max()}')
            anno = {'name': names_table[labels - 1] if len(labels) else np.zeros(0, '<U1'),
                    'score': scores, 'boxes_lidar': boxes, 'pred_labels': labels,
                    'frame_id': _frame_id(batch_dict, i)}
            annos.append(anno)
        if output_path is not None:
            self._write_predictions(annos, Path(output_path))
        return annos

    def _write_predictions(self, annos, output_path):
        """Base format: one ``<frame_id>.txt`` per frame, lines
        ``name x y z dx dy dz heading score`` in the LiDAR frame (KITTI overrides this)."""
        output_path.mkdir(parents=True, exist_ok=True)
        for anno in annos:
            with open(output_path / f'{anno["frame_id"]}.txt', 'w', encoding='utf-8') as f:
                for name, box, score in zip(anno['name'], anno['boxes_lidar'], anno['score']):
                    f.write(f'{name} ' + ' '.join(f'{v:.4f}' for v in box) + f' {score:.4f}\n')

    def get_gt_annos(self):
        """Ground-truth annos of every frame of the split (frame order): ``name`` (M,),
        ``boxes_lidar`` (M, 7), ``difficulty`` (M,) int (-1 = ignore), ``frame_id``."""
        return [self._gt_anno(i) for i in range(self._num_frames())]

    def evaluation(self, det_annos, class_names, **kwargs):
        """KITTI-style R40 AP (BEV and 3D) of ``det_annos`` against this split's ground truth.

        det annos are matched to frames by ``frame_id``; frames without a det anno count as
        frames with no detections. Extra kwargs: ``iou_thresholds``, ``difficulties`` (passed
        to eval.ap.evaluate); OpenPCDet's ``eval_metric``/``output_path`` are accepted and
        ignored. Returns ``(result_str, result_dict)``.
        """
        from ..eval.ap import evaluate

        gt_annos = self.get_gt_annos()
        by_frame = {str(a['frame_id']): a for a in det_annos}
        empty = {'name': np.zeros(0, '<U1'), 'score': np.zeros(0, np.float32),
                 'boxes_lidar': np.zeros((0, 7), np.float32)}
        unknown = set(by_frame) - {str(g['frame_id']) for g in gt_annos}
        if unknown:
            raise DataError(f'{len(unknown)} detection frame id(s) are not in the {self.mode} '
                            f'split (e.g. {sorted(unknown)[0]!r}): evaluate with the dataset '
                            'that produced them')
        dets = [by_frame.get(str(g['frame_id']), dict(empty, frame_id=g['frame_id']))
                for g in gt_annos]
        return evaluate(gt_annos, dets, list(class_names),
                        iou_thresholds=kwargs.get('iou_thresholds'),
                        difficulties=kwargs.get('difficulties'))

    def _ignore_outside_range(self, boxes, difficulty):
        """Evaluation: boxes whose centre lies outside POINT_CLOUD_RANGE (x, y) -> -1 (the
        model cannot see them, so they are neither misses nor matches)."""
        lo, hi = self.point_cloud_range[:2], self.point_cloud_range[3:5]
        outside = ~np.all((boxes[:, :2] >= lo) & (boxes[:, :2] <= hi), axis=1)
        difficulty = difficulty.copy()
        difficulty[outside] = -1
        return difficulty


def _to_numpy(x):
    if torch.is_tensor(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _frame_id(batch_dict, i):
    frame_ids = batch_dict.get('frame_id')
    if frame_ids is None:
        return i
    fid = frame_ids[i]
    return fid.item() if isinstance(fid, np.generic) else fid


def build_dataset(dataset_cfg, class_names, training, logger=None):
    """``DATA_CONFIG.DATASET`` -> dataset instance, resolved through the DATASET registry."""
    from ..registry import lookup

    if not isinstance(dataset_cfg, dict) or not dataset_cfg.get('DATASET'):
        raise ConfigError('DATA_CONFIG.DATASET is required (e.g. SyntheticDataset or '
                          'KittiDataset)')
    cls = lookup('DATASET', dataset_cfg['DATASET'], field='DATA_CONFIG.DATASET')
    return cls(dataset_cfg=dataset_cfg, class_names=class_names, training=training,
               root_path=None, logger=logger)


__all__ = ['DatasetTemplate', 'SharedCounter', 'build_dataset']
