"""Shared pytest fixtures. Tests run on the CPU; CUDA variants skip without a GPU."""
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# ../shared/data/kitti_mini beside the checkout (CI has it); override with KITTI_MINI.
KITTI_MINI = Path(os.environ.get('KITTI_MINI', REPO_ROOT.parent / 'shared' / 'data' / 'kitti_mini'))

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def kitti_mini():
    """Path to the four real KITTI frames in ../shared; skips when absent."""
    if not (KITTI_MINI / 'training' / 'velodyne').is_dir():
        pytest.skip(f'kitti_mini not found at {KITTI_MINI}')
    return KITTI_MINI


@pytest.fixture(params=['cpu', pytest.param('cuda', marks=cuda_only)])
def device(request):
    return torch.device(request.param)
