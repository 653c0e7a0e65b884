"""DatasetTemplate.prepare_data, collate_batch and build_dataset on hand-made frames."""
import copy
import logging

import numpy as np
import pytest
import torch
from easydict import EasyDict

from pcdet_focal.data.dataset import DatasetTemplate, SharedCounter, build_dataset
from pcdet_focal.errors import ConfigError

CLASSES = ['Car', 'Pedestrian']


def data_cfg(**over):
    cfg = EasyDict({
        'DATASET': 'SyntheticDataset',
        'POINT_CLOUD_RANGE': [0, -8, -2, 16, 8, 2],
        'DATA_AUGMENTOR': {'DISABLE_AUG_LIST': [], 'AUG_CONFIG_LIST': [
            {'NAME': 'random_world_flip', 'ALONG_AXIS_LIST': ['x']}]},
        'POINT_FEATURE_ENCODING': {'encoding_type': 'absolute_coordinates_encoding',
                                   'used_feature_list': ['x', 'y', 'z', 'intensity'],
                                   'src_feature_list': ['x', 'y', 'z', 'intensity']},
        'DATA_PROCESSOR': [
            {'NAME': 'mask_points_and_boxes_outside_range', 'REMOVE_OUTSIDE_BOXES': True},
            {'NAME': 'shuffle_points', 'SHUFFLE_ENABLED': {'train': True, 'test': False}},
            {'NAME': 'transform_points_to_voxels', 'VOXEL_SIZE': [0.5, 0.5, 0.5],
             'MAX_POINTS_PER_VOXEL': 4, 'MAX_NUMBER_OF_VOXELS': {'train': 500, 'test': 600}}],
    })
    cfg.update(over)
    return cfg


class FramesDataset(DatasetTemplate):
    """Serves the raw frames it is given (the subclass contract in its smallest form)."""

    def __init__(self, frames, training=True, cfg=None, class_names=CLASSES):
        super().__init__(cfg or data_cfg(), class_names, training)
        self.frames = frames

    def __len__(self):
        return len(self.frames)

    def _num_frames(self):
        return len(self.frames)

    def __getitem__(self, index):
        return self.prepare_data(copy.deepcopy(self.frames[index]))


def frame(fid, points, boxes=(), names=()):
    return {'frame_id': fid, 'points': np.asarray(points, np.float32).reshape(-1, 4),
            'gt_boxes': np.asarray(boxes, np.float32).reshape(-1, 7),
            'gt_names': np.asarray(names, dtype='<U16')}


def cloud(n, seed):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.uniform([0, -8, -2], [16, 8, 2], (n, 3)),
                           rng.uniform(0, 1, (n, 1))], 1)


def test_attributes():
    ds = FramesDataset([])
    np.testing.assert_array_equal(ds.grid_size, [32, 32, 8])
    assert ds.grid_size.dtype == np.int64 and ds.voxel_size.dtype == np.float32
    assert ds.point_cloud_range.dtype == np.float32 and ds.point_cloud_range.shape == (6,)
    assert ds.num_point_features == ds.point_feature_encoder.num_point_features == 4
    assert ds.mode == 'train' and FramesDataset([], training=False).mode == 'test'
    assert ds.depth_downsample_factor is None
    ds.set_epoch(3)  # no-op hook


def test_class_filter_ids_and_sample_keys():
    boxes = [[4, 1, 0, 4, 2, 1.5, 0], [6, -2, 0, 0.8, 0.6, 1.7, 1], [9, 3, 0, 2, 1, 1, 0],
             [12, 0, 0, 4, 2, 1.5, 0]]
    f = frame('a', cloud(300, 0), boxes, ['Car', 'Pedestrian', 'Truck', 'Car'])
    sample = FramesDataset([f], training=False)[0]
    np.testing.assert_allclose(sample['gt_boxes'][:, 7], [1, 2, 1])  # 1-based, Truck dropped
    np.testing.assert_allclose(sample['gt_boxes'][:, :7], np.asarray(boxes)[[0, 1, 3]])
    assert sample['gt_boxes'].dtype == np.float32
    assert sample['voxel_coords'].shape[1] == 3 and sample['voxel_coords'].dtype == np.int32
    assert sample['voxels'].shape[1:] == (4, 4)
    assert 'gt_names' not in sample and sample['use_lead_xyz'] is True
    # test mode: no shuffle, so the points keep their order (all 300 are in range)
    np.testing.assert_allclose(sample['points'], f['points'])
    # voxel counts add up to the points kept (max 4 per voxel)
    assert sample['voxel_num_points'].sum() <= len(sample['points'])


def test_nonfinite_points_dropped_and_counted(caplog):
    pts = cloud(50, 1)
    pts[[3, 7], 0] = np.nan
    pts[11, 2] = np.inf
    pts[12, 3] = -np.inf
    ds = FramesDataset([frame('nan', pts, [[5, 0, 0, 4, 2, 1.5, 0]], ['Car'])])
    with caplog.at_level(logging.WARNING, logger='pcdet_focal'):
        sample = ds[0]
        ds[0]
    assert np.isfinite(sample['points']).all() and len(sample['points']) == 46
    assert ds.num_dropped_points == 8
    lines = [r.getMessage() for r in caplog.records if 'non-finite' in r.getMessage()]
    assert len(lines) == 1 and 'dropped 4' in lines[0]  # first frame logged, not every frame


@pytest.mark.parametrize('points', [np.zeros((0, 4)), np.array([[100.0, 0, 0, 1],
                                                                 [-5, 50, 0, 1]])])
def test_empty_or_out_of_range_cloud_gives_valid_sample(points):
    ds = FramesDataset([frame('empty', points, [[5, 0, 0, 4, 2, 1.5, 0]], ['Car']),
                        frame('full', cloud(100, 2))])
    sample = ds[0]
    assert sample['voxels'].shape == (0, 4, 4) and sample['voxel_coords'].shape == (0, 3)
    assert sample['points'].shape == (0, 4)
    batch = ds.collate_batch([sample, ds[1]])
    assert batch['batch_size'] == 2
    assert (batch['voxel_coords'][:, 0] == 1).all() and len(batch['voxel_coords']) > 0
    assert batch['gt_boxes'].shape == (2, 1, 8)  # frame 2 has no boxes: padded, >= 1 row
    assert not batch['gt_boxes'][1].any()


def test_collate_shapes_and_batch_indices():
    frames = [frame('f0', cloud(80, 3), [[5, 0, 0, 4, 2, 1.5, 0]] * 3, ['Car'] * 3),
              frame('f1', np.zeros((0, 4))),
              frame('f2', cloud(120, 4), [[3, 3, 0, 0.8, 0.6, 1.7, 0]], ['Pedestrian'])]
    ds = FramesDataset(frames, training=False)
    samples = [ds[i] for i in range(3)]
    batch = ds.collate_batch(samples)
    assert batch['batch_size'] == 3
    np.testing.assert_array_equal(batch['frame_id'], ['f0', 'f1', 'f2'])
    n = [len(s['voxel_coords']) for s in samples]
    assert batch['voxel_coords'].shape == (sum(n), 4) and batch['voxel_coords'].dtype == np.int32
    np.testing.assert_array_equal(batch['voxel_coords'][:, 0], np.repeat([0, 1, 2], n))
    np.testing.assert_array_equal(batch['voxel_coords'][:, 1:],
                                  np.concatenate([s['voxel_coords'] for s in samples]))
    assert batch['voxels'].shape == (sum(n), 4, 4)
    assert batch['voxel_num_points'].shape == (sum(n),)
    p = [len(s['points']) for s in samples]
    assert batch['points'].shape == (sum(p), 5) and batch['points'].dtype == np.float32
    np.testing.assert_array_equal(batch['points'][:, 0], np.repeat([0, 1, 2], p))
    assert batch['gt_boxes'].shape == (3, 3, 8)
    np.testing.assert_allclose(batch['gt_boxes'][2, 0], [3, 3, 0, 0.8, 0.6, 1.7, 0, 2], rtol=1e-6)
    assert not batch['gt_boxes'][1].any() and not batch['gt_boxes'][2, 1:].any()
    # the engine's device transfer accepts it
    from pcdet_focal.engine.utils import load_data_to_device
    moved = load_data_to_device(batch, 'cpu')
    # float32 like every array, as OpenPCDet's load_data_to_gpu converts it
    assert moved['voxel_coords'].dtype == torch.float32 and moved['voxels'].dtype == torch.float32


def test_training_removes_boxes_outside_range():
    boxes = [[5, 0, 0, 4, 2, 1.5, 0], [30, 0, 0, 4, 2, 1.5, 0], [5, 0, 0, 4, 2, 1.5, 0]]
    cfg = data_cfg(DATA_AUGMENTOR={'AUG_CONFIG_LIST': []})
    sample = FramesDataset([frame('r', cloud(50, 5), boxes, ['Car'] * 3)], cfg=cfg)[0]
    assert len(sample['gt_boxes']) == 2
    # training frames without any box still give a (0, 8) array
    sample = FramesDataset([frame('n', cloud(50, 5))], cfg=cfg)[0]
    assert sample['gt_boxes'].shape == (0, 8)


def test_predictions_to_annos(tmp_path):
    ds = FramesDataset([], training=False)
    preds = [{'pred_boxes': torch.tensor([[1.0, 2, 0, 4, 2, 1.5, 0.1]]),
              'pred_scores': torch.tensor([0.9]), 'pred_labels': torch.tensor([2])},
             {'pred_boxes': torch.zeros(0, 7), 'pred_scores': torch.zeros(0),
              'pred_labels': torch.zeros(0, dtype=torch.long)}]
    annos = ds.generate_prediction_dicts({'frame_id': np.array(['x', 'y'])}, preds, CLASSES,
                                         output_path=tmp_path)
    assert annos[0]['name'].tolist() == ['Pedestrian'] and annos[0]['frame_id'] == 'x'
    assert annos[1]['boxes_lidar'].shape == (0, 7) and len(annos[1]['name']) == 0
    assert (tmp_path / 'x.txt').read_text().startswith('Pedestrian 1.0000 2.0000')
    assert (tmp_path / 'y.txt').read_text() == ''


def test_config_errors():
    with pytest.raises(ConfigError) as err:
        FramesDataset([], cfg=data_cfg(POINT_CLOUD_RANGE=[0, -8, -2, 16.2, 8, 2]))
    assert 'POINT_CLOUD_RANGE' in str(err.value) and 'VOXEL_SIZE' in str(err.value)
    bad = data_cfg()
    bad.DATA_PROCESSOR = bad.DATA_PROCESSOR[:2]
    with pytest.raises(ConfigError, match='transform_points_to_voxels'):
        FramesDataset([], cfg=bad)
    bad = data_cfg()
    bad.DATA_PROCESSOR[0]['NAME'] = 'sample_points'
    with pytest.raises(ConfigError, match="'sample_points' is not a known DATA_PROCESSOR step"):
        FramesDataset([], cfg=bad)
    with pytest.raises(ConfigError, match='CLASS_NAMES'):
        FramesDataset([], class_names=[])
    with pytest.raises(ConfigError, match='unknown module .*known DATASET modules: .*'
                                          'KittiDataset.*SyntheticDataset'):
        build_dataset(data_cfg(DATASET='NuScenesDataset'), CLASSES, True)
    with pytest.raises(ConfigError, match='DATA_CONFIG.DATASET is required'):
        build_dataset(EasyDict({}), CLASSES, True)


class _CountingDataset(torch.utils.data.Dataset):
    def __init__(self):
        self.counter = SharedCounter()

    def __len__(self):
        return 6

    def __getitem__(self, i):
        self.counter.add(i)
        return i


def test_shared_counter_sums_over_loader_workers():
    ds = _CountingDataset()
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    assert sorted(int(x) for b in loader for x in b) == list(range(6))
    assert ds.counter.value == sum(range(6))
    # deepcopy / pickle outside a process spawn gives an independent counter with the value
    clone = copy.deepcopy(ds.counter)
    clone.add(100)
    assert clone.value == 115 and ds.counter.value == 15
