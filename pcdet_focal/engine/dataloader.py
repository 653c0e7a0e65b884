"""DataLoaders for training and evaluation, single process or torch.distributed.

Training never hands BatchNorm a batch of one sample: when the last batch of an epoch would hold
a single sample it is dropped (said once in the log); a dataset smaller than one batch is an
error. The training order is a seeded shuffle per epoch (``set_epoch``), so runs and resumes
are reproducible.
"""
import logging

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from ..errors import ConfigError, DataError

logger = logging.getLogger('pcdet_focal')


class _SkipSampler(Sampler):
    """Wraps a sampler and skips its first ``skip`` indices once (mid-epoch resume)."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.skip = 0

    def set_epoch(self, epoch):
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        it = iter(self.sampler)
        for _ in range(self.skip):
            next(it, None)
        self.skip = 0
        return it

    def __len__(self):
        return len(self.sampler)


class ShardSampler(Sampler):
    """Evaluation: rank r takes indices r, r + W, r + 2W, ... (no padding duplicates)."""

    def __init__(self, length, rank=0, world_size=1):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def _worker_init(worker_id):
    # torch seeds each worker from the loader's base seed; derive numpy/random from it so
    # augmentation differs between workers and is reproducible run to run.
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    import random
    random.seed(seed)


def build_train_loader(dataset, batch_size, workers=0, rank=0, world_size=1, seed=0):
    """Returns ``(loader, sampler)``; call ``sampler.set_epoch(e)`` before each epoch."""
    if batch_size is None or int(batch_size) < 1:
        raise ConfigError(f'--batch_size must be >= 1, got {batch_size}')
    batch_size = int(batch_size)
    n = len(dataset)
    if n < batch_size * world_size:
        raise DataError(f'the training set has {n} frame(s), fewer than one batch '
                        f'(--batch_size {batch_size} x {world_size} process(es)); lower '
                        '--batch_size or add frames')
    per_rank = -(-n // world_size)
    drop_last = per_rank % batch_size == 1
    if drop_last and batch_size > 1:
        logger.info('dropping the last batch of each epoch: it would hold 1 sample '
                    '(%d frames per process, batch %d), and BatchNorm cannot train on one',
                    per_rank, batch_size)
    sampler = _SkipSampler(DistributedSampler(dataset, num_replicas=world_size, rank=rank,
                                              shuffle=True, seed=seed, drop_last=False))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        collate_fn=dataset.collate_batch, drop_last=drop_last and batch_size > 1,
                        pin_memory=False, worker_init_fn=_worker_init,
                        persistent_workers=False)
    return loader, sampler


def build_eval_loader(dataset, batch_size, workers=0, rank=0, world_size=1):
    if batch_size is None or int(batch_size) < 1:
        raise ConfigError(f'--batch_size must be >= 1, got {batch_size}')
    sampler = ShardSampler(len(dataset), rank, world_size)
    return DataLoader(dataset, batch_size=int(batch_size), sampler=sampler, num_workers=workers,
                      collate_fn=dataset.collate_batch, drop_last=False,
                      worker_init_fn=_worker_init)
