"""Shared pytest fixtures. Tests run on the CPU; CUDA variants skip without a GPU."""
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# ../shared/data/kitti_mini beside the checkout (CI has it); override with KITTI_MINI.
KITTI_MINI = Path(os.environ.get('KITTI_MINI', REPO_ROOT.parent / 'shared' / 'data' / 'kitti_mini'))

CUDA_SKIP_REASON = 'needs a CUDA device'
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP_REASON)


def pytest_configure(config):
    config.addinivalue_line('markers', 'cuda: runs on a CUDA device, skips without one '
                            '(`pytest -m cuda` selects them; benchmarks/gpu_suite.py step 2)')


def pytest_collection_modifyitems(items):
    """Mark every test that skips without a GPU (a skipif with CUDA_SKIP_REASON, such as
    cuda_only or the 'cuda' param of the device fixture) with ``cuda``."""
    for item in items:
        if any(m.kwargs.get('reason') == CUDA_SKIP_REASON for m in item.iter_markers('skipif')):
            item.add_marker(pytest.mark.cuda)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _forget_init_path():
    """tools/*.py import their own folder's ``_init_path``; tests load the tools of several
    checkouts (ours, fake and real OpenPCDet ones), so none may find another's cached."""
    yield
    sys.modules.pop('_init_path', None)


@pytest.fixture
def kitti_mini():
    """Path to the four real KITTI frames in ../shared; skips when absent."""
    if not (KITTI_MINI / 'training' / 'velodyne').is_dir():
        pytest.skip(f'kitti_mini not found at {KITTI_MINI}')
    return KITTI_MINI


@pytest.fixture(params=['cpu', pytest.param('cuda', marks=cuda_only)])
def device(request):
    return torch.device(request.param)
