"""Small engine utilities: batch to device, seeding, RNG state capture, logging."""
import logging
import os
import random
import sys

import numpy as np
import torch

# OpenPCDet's load_data_to_gpu (pcdet/models/__init__.py), key by key: these stay as they are.
_KEEP_KEYS = {'frame_id', 'metadata', 'calib', 'image_paths', 'ori_shape', 'img_process_infos'}


def load_data_to_device(batch_dict, device):
    """numpy arrays in ``batch_dict`` -> tensors on ``device`` (in place; returns it), key by key
    as OpenPCDet's ``load_data_to_gpu``, so its datasets and modules get the types they expect:

    - ``camera_imgs`` (a tensor already) moves to ``device``;
    - ``frame_id``, ``metadata``, ``calib``, ``image_paths``, ``ori_shape``,
      ``img_process_infos`` and every value that is not a numpy array (``batch_size``, lists)
      stay as they are;
    - ``images`` (B, H, W, C) -> float32 (B, C, H, W), contiguous (kornia's image_to_tensor);
    - ``image_shape`` -> int32 (OpenPCDet's ``generate_prediction_dicts`` calls ``.cpu()`` on it);
    - every other array -> float32: ``voxel_coords`` [b, z, y, x] and ``voxel_num_points``
      too (our modules take float coordinates; see ops.sparse.to_int_coords).

    Unlike OpenPCDet's, any ``device`` (not only CUDA), and string / object arrays stay numpy
    (``torch.from_numpy`` would raise on them).
    """
    for key, val in batch_dict.items():
        if key == 'camera_imgs' and torch.is_tensor(val):
            batch_dict[key] = val.to(device)
        elif (key in _KEEP_KEYS or not isinstance(val, np.ndarray)
              or val.dtype.kind in 'USO'):
            continue
        elif key == 'images':
            batch_dict[key] = _image_to_tensor(val).float().to(device).contiguous()
        elif key == 'image_shape':
            batch_dict[key] = torch.from_numpy(np.ascontiguousarray(val)).int().to(device)
        else:
            batch_dict[key] = torch.from_numpy(np.ascontiguousarray(val)).float().to(device)
    return batch_dict


def _image_to_tensor(image):
    """numpy (H, W), (H, W, C) or (B, H, W, C) -> tensor (1, H, W), (C, H, W), (B, C, H, W)."""
    tensor = torch.from_numpy(np.ascontiguousarray(image))
    if tensor.dim() == 2:
        return tensor.unsqueeze(0)
    if tensor.dim() == 3:
        return tensor.permute(2, 0, 1)
    return tensor.permute(0, 3, 1, 2)


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
