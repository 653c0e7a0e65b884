"""``SyntheticDataset``: simulated LiDAR street scenes, the embedded default (no files needed).

DATA_CONFIG keys on top of OpenPCDet's (POINT_CLOUD_RANGE, DATA_AUGMENTOR,
POINT_FEATURE_ENCODING, DATA_PROCESSOR):

- ``NUM_FRAMES: {train: N, test: M}`` frames per split;
- ``SEED: {train: a, test: b}`` split seeds (must differ: val scenes are not training scenes);
  frame i of a split is generated from (seed, i) alone, so it is the same in every process;
- ``EVAL_MIN_POINTS`` (default 5): ground-truth objects with fewer returns get difficulty -1
  (ignored by the evaluation: neither a miss nor a false positive), the others difficulty 0;
- ``SCENE: {...}``: sensor and scene knobs, see :class:`~.synthetic_scene.SceneConfig`.

Labelled objects are placed inside POINT_CLOUD_RANGE (x, y), so the model's view holds them.
"""
import numpy as np

from ..errors import ConfigError
from ..registry import DATASET
from ..schema import Int, Key, PerSplit, Schema, Section
from .dataset import DATA_KEYS, DatasetTemplate
from .synthetic_scene import SCENE_CONFIG, SceneGenerator, scene_config


@DATASET.register()
class SyntheticDataset(DatasetTemplate):
    CONFIG = Schema('SyntheticDataset', [
        *DATA_KEYS,
        Key('NUM_FRAMES', PerSplit(Int(lo=1)), {'train': 200, 'test': 50}, 'frames per split'),
        Key('SEED', PerSplit(Int(lo=0)), {'train': 0, 'test': 1},
            'split seeds (must differ: val scenes are not training scenes)'),
        Key('EVAL_MIN_POINTS', Int(lo=0), 5,
            'objects with fewer returns are ignored by the evaluation'),
        Key('SCENE', Section(SCENE_CONFIG), None, 'sensor and scene knobs'),
    ])

    def __init__(self, dataset_cfg, class_names, training=True, root_path=None, logger=None):
        super().__init__(dataset_cfg, class_names, training, root_path, logger)
        cfg = self.cfg
        self.seed = cfg.SEED[self.mode]
        if cfg.SEED.train == cfg.SEED.test:
            raise ConfigError(f'DATA_CONFIG.SEED: train and test are both {self.seed}, so the '
                              'validation scenes would be the training scenes; give them '
                              'different seeds')
        self.eval_min_points = cfg.EVAL_MIN_POINTS
        self.num_frames = cfg.NUM_FRAMES[self.mode]
        self.scene_cfg = scene_config(dataset_cfg.get('SCENE'))
        pc = self.point_cloud_range
        self.generator = SceneGenerator(self.scene_cfg, region=(pc[0], pc[1], pc[3], pc[4]))
        self._gt_cache = None

    def _num_frames(self):
        return self.num_frames

    def __len__(self):
        if self._merge_all_iters_to_one_epoch:
            return self.num_frames * max(1, self.total_epochs)
        return self.num_frames

    def frame_id(self, index):
        return f'{index:06d}'

    def get_frame(self, index):
        """Raw frame ``index`` (no processing): see SceneGenerator.generate."""
        return self.generator.generate(self.seed, index)

    def __getitem__(self, index):
        index = index % self.num_frames
        raw = self.get_frame(index)
        return self.prepare_data({'frame_id': self.frame_id(index), 'points': raw['points'],
                                  'gt_boxes': raw['gt_boxes'], 'gt_names': raw['gt_names']})

    def _anno_from_raw(self, index, raw):
        difficulty = np.where(raw['num_points_in_gt'] >= self.eval_min_points, 0, -1)
        difficulty = self._ignore_outside_range(raw['gt_boxes'], difficulty.astype(np.int32))
        return {'frame_id': self.frame_id(index), 'name': raw['gt_names'],
                'boxes_lidar': raw['gt_boxes'].astype(np.float32),
                'difficulty': difficulty.astype(np.int32),
                'num_points_in_gt': raw['num_points_in_gt']}

    def _gt_anno(self, index):
        return self._anno_from_raw(index, self.get_frame(index))

    def get_gt_annos(self):
        """Regenerates every frame once (about 30 ms each for 32 beams) and keeps the annos."""
        if self._gt_cache is None:
            self._gt_cache = [self._gt_anno(i) for i in range(self.num_frames)]
        return self._gt_cache
