"""A toy dataset and detector in the engine's contract, for fast engine tests.

The toy is linear regression (no BatchNorm), so a distributed run with the same global batch
must follow the single-process run exactly, and runs are cheap enough to train many times.
Importing this module registers ``ToyDataset`` and ``ToyDetector``.
"""
import time

import numpy as np
import torch
from torch import nn

from pcdet_focal.registry import DATASET, DETECTOR

DIM = 6


@DATASET.register()
class ToyDataset(torch.utils.data.Dataset):
    def __init__(self, dataset_cfg, class_names, training=True, root_path=None, logger=None):
        self.dataset_cfg = dataset_cfg
        self.class_names = class_names
        self.training = training
        self.mode = 'train' if training else 'test'
        n = dataset_cfg.NUM_FRAMES[self.mode]
        rng = np.random.RandomState(dataset_cfg.SEED[self.mode])
        self.x = rng.randn(n, DIM).astype(np.float32)
        w = np.arange(1, DIM + 1, dtype=np.float32) / DIM
        self.y = (self.x @ w + 0.5).astype(np.float32)[:, None]
        self.sleep = float(dataset_cfg.get('SLEEP', 0.0))
        self.noise = float(dataset_cfg.get('NOISE', 0.01))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        if self.sleep:
            time.sleep(self.sleep)
        x = self.x[index]
        if self.training and self.noise:  # "augmentation" from numpy's global RNG: resume
            x = x + np.random.normal(scale=self.noise, size=x.shape).astype(np.float32)
        return {'frame_id': index, 'x': x, 'y': self.y[index]}

    @staticmethod
    def collate_batch(batch_list):
        return {'x': np.stack([b['x'] for b in batch_list]),
                'y': np.stack([b['y'] for b in batch_list]),
                'frame_id': np.array([b['frame_id'] for b in batch_list]),
                'batch_size': len(batch_list)}

    def generate_prediction_dicts(self, batch_dict, pred_dicts, class_names, output_path=None):
        return [{'frame_id': int(f), 'pred': float(p['pred'])}
                for f, p in zip(batch_dict['frame_id'], pred_dicts)]

    def evaluation(self, det_annos, class_names, **kwargs):
        pred = np.array([a['pred'] for a in det_annos])
        target = self.y[[a['frame_id'] for a in det_annos], 0]
        mse = float(np.mean((pred - target) ** 2))
        return f'toy mse {mse:.6f} over {len(pred)} frames', {'mse': mse, 'frames': len(pred)}


@DETECTOR.register()
class ToyDetector(nn.Module):
    def __init__(self, model_cfg, num_class, dataset):
        super().__init__()
        self.linear = nn.Linear(DIM, 1)

    def forward(self, batch_dict):
        pred = self.linear(batch_dict['x'])
        if self.training:
            loss = ((pred - batch_dict['y']) ** 2).mean()
            return {'loss': loss}, {'mse': loss.item()}, {}
        return [{'pred': p} for p in pred[:, 0]], {}
