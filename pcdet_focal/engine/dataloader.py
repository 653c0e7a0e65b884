"""DataLoaders for training and evaluation, single process or torch.distributed.

Training draws the same global batches whatever the number of processes, so W processes of
batch B train like one process of batch W x B:

- order: a seeded shuffle per epoch (``set_epoch``), the same permutation on every rank;
- global batch k is ``perm[k*W*B : (k+1)*W*B]`` and rank r takes the r-th slice of it;
- randomness inside a sample (augmentation, point shuffling, any ``np.random`` / ``random`` /
  torch CPU draw in ``__getitem__``) comes from a seed derived from (run seed, epoch, frame
  index), so a frame is augmented the same way whichever rank or worker loads it, and a
  resumed run draws what the uninterrupted one drew.

BatchNorm never trains on one sample: an incomplete last global batch that would give a rank
fewer than two samples (none when B = 1) is dropped (said once in the log); a dataset smaller
than one global batch is an error.

Evaluation shards frames r, r + W, r + 2W, ... to rank r (no padding duplicates).
"""
import logging
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import ConfigError, DataError

logger = logging.getLogger('pcdet_focal')


def sample_seed(seed, epoch, index):
    """32-bit seed of frame ``index`` in ``epoch`` of a run seeded with ``seed``."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(1)[0])


class _SeededSamples(Dataset):
    """``dataset[index]`` drawn under :func:`sample_seed` (python, numpy and torch CPU RNGs).

    The global RNG states are restored afterwards, so loading in the main process
    (``workers=0``) leaves the training step's own random draws (dropout) untouched.
    """

    def __init__(self, dataset, seed):
        self.dataset, self.seed, self.epoch = dataset, int(seed), 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
        s = sample_seed(self.seed, self.epoch, index)
        random.seed(s)
        np.random.seed(s)
        torch.random.default_generator.manual_seed(s)
        try:
            return self.dataset[index]
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.random.set_rng_state(states[2])


class GlobalBatchSampler(Sampler):
    """Training batches of one rank: its slice of each global batch (see the module doc).

    Yields lists of dataset indices. ``set_epoch(e)`` before each epoch picks the permutation
    (and the per-sample seeds); ``skip`` (samples of this rank, whole batches) is skipped once,
    for a mid-epoch resume.
    """

    def __init__(self, dataset_len, batch_size, rank=0, world_size=1, seed=0, samples=None):
        self.n, self.batch_size = int(dataset_len), int(batch_size)
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        self.samples = samples  # the _SeededSamples whose epoch follows ours
        self.epoch, self.skip = 0, 0
        self.global_batch = self.batch_size * self.world_size
        full, rest = divmod(self.n, self.global_batch)
        # the last global batch is kept only if every rank gets enough of it for BatchNorm
        self.last = rest if rest and rest // self.world_size >= min(2, self.batch_size) else 0
        self.dropped = rest - self.last
        self.num_batches = full + (1 if self.last else 0)

    def set_epoch(self, epoch):
        self.epoch = int(epoch)
        if self.samples is not None:
            self.samples.epoch = self.epoch

    def _bounds(self, k):
        """[start, stop) of this rank's slice of global batch k, as positions in perm."""
        base = k * self.global_batch
        if base + self.global_batch <= self.n:
            start = base + self.rank * self.batch_size
            return start, start + self.batch_size
        # the incomplete last batch: split as evenly as possible, larger slices first
        size, extra = divmod(self.last, self.world_size)
        start = base + self.rank * size + min(self.rank, extra)
        return start, start + size + (1 if self.rank < extra else 0)

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)  # as DistributedSampler: same perm on every rank
        perm = torch.randperm(self.n, generator=g).tolist()
        first, self.skip = self.skip // self.batch_size, 0
        for k in range(first, self.num_batches):
            start, stop = self._bounds(k)
            yield perm[start:stop]

    def __len__(self):
        return self.num_batches


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
    # draws outside a seeded sample (evaluation) differ between workers and are reproducible.
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)


def build_train_loader(dataset, batch_size, workers=0, rank=0, world_size=1, seed=0):
    """Returns ``(loader, sampler)``; call ``sampler.set_epoch(e)`` before each epoch.

    batch_size: per process; the global batch is ``batch_size * world_size``.
    """
    if batch_size is None or int(batch_size) < 1:
        raise ConfigError(f'--batch_size must be >= 1, got {batch_size}')
    batch_size = int(batch_size)
    n = len(dataset)
    if n < batch_size * world_size:
        raise DataError(f'the training set has {n} frame(s), fewer than one batch '
                        f'(--batch_size {batch_size} x {world_size} process(es)); lower '
                        '--batch_size or add frames')
    samples = _SeededSamples(dataset, seed)
    sampler = GlobalBatchSampler(n, batch_size, rank, world_size, seed, samples)
    if sampler.dropped:
        logger.info('dropping the last %d frame(s) of each epoch: split over %d process(es) '
                    'they would give a process fewer than 2 samples, and BatchNorm cannot '
                    'train on one', sampler.dropped, world_size)
    # persistent_workers=False: workers are forked per epoch and see the epoch set before it
    loader = DataLoader(samples, batch_sampler=sampler, num_workers=workers,
                        collate_fn=dataset.collate_batch, pin_memory=False,
                        worker_init_fn=_worker_init, persistent_workers=False)
    return loader, sampler


def build_eval_loader(dataset, batch_size, workers=0, rank=0, world_size=1):
    if batch_size is None or int(batch_size) < 1:
        raise ConfigError(f'--batch_size must be >= 1, got {batch_size}')
    sampler = ShardSampler(len(dataset), rank, world_size)
    return DataLoader(dataset, batch_size=int(batch_size), sampler=sampler, num_workers=workers,
                      collate_fn=dataset.collate_batch, drop_last=False,
                      worker_init_fn=_worker_init)
