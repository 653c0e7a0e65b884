"""Small engine utilities: batch to device, seeding, RNG state capture, logging."""
import logging
import os
import random
import sys

import numpy as np
import torch

# batch_dict keys that stay as they are (strings, metadata) when moved to a device.
_KEEP_KEYS = {'frame_id', 'metadata', 'calib', 'image_shape', 'batch_size', 'use_lead_xyz'}
_INT_KEYS = {'voxel_coords', 'voxel_num_points'}


def load_data_to_device(batch_dict, device):
    """numpy arrays in ``batch_dict`` -> tensors on ``device`` (in place; returns it).

    ``voxel_coords`` / ``voxel_num_points`` become int32 (spconv indices), every other numeric
    array float32 (OpenPCDet's convention), strings and metadata are kept.
    """
    for key, val in batch_dict.items():
        if key in _KEEP_KEYS or not isinstance(val, np.ndarray) or val.dtype.kind in 'USO':
            continue
        dtype = torch.int32 if key in _INT_KEYS else torch.float32
        batch_dict[key] = torch.from_numpy(np.ascontiguousarray(val)).to(device=device,
                                                                         dtype=dtype)
    return batch_dict


def set_random_seed(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def get_rng_state():
    """Python, numpy, torch (and CUDA) RNG states in a form ``torch.load(weights_only=True)``
    accepts (tensors, ints, lists, tuples)."""
    np_state = np.random.get_state()
    state = {
        'python': random.getstate(),
        'numpy': (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                  int(np_state[2]), int(np_state[3]), float(np_state[4])),
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    if not state:
        return
    if 'python' in state:
        version, internal, gauss = state['python']
        random.setstate((version, tuple(internal), gauss))
    if 'numpy' in state:
        name, keys, pos, has_gauss, gauss = state['numpy']
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if 'torch' in state:
        torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def create_logger(log_file=None, rank=0, name='pcdet_focal'):
    """Logger writing to stderr (rank 0 only) and to ``log_file``."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO if rank == 0 else logging.ERROR)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter('%(asctime)s  %(levelname)5s  %(message)s', '%H:%M:%S')
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if log_file is not None and rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        file_handler = logging.FileHandler(log_file, encoding='utf-8')
        file_handler.setFormatter(logging.Formatter('%(asctime)s  %(levelname)5s  %(message)s'))
        logger.addHandler(file_handler)
    return logger


def describe_device(device):
    """One line naming the device in use (printed at start: saves debugging time)."""
    device = torch.device(device)
    if device.type == 'cuda':
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        return (f'cuda:{idx} ({props.name}, {props.total_memory / 2 ** 30:.1f} GiB, '
                f'torch {torch.__version__}, CUDA {torch.version.cuda})')
    return f'cpu ({torch.get_num_threads()} threads, torch {torch.__version__})'
