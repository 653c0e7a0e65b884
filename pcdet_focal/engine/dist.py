"""torch.distributed setup for ``--launcher pytorch`` (torchrun): NCCL on CUDA, gloo on CPU."""
import os

import torch
import torch.distributed as dist

from ..errors import ConfigError


def init_distributed(launcher, device_type):
    """Initialise the process group from torchrun's environment.

    Returns ``(rank, world_size, local_rank)``; ``(0, 1, 0)`` for launcher 'none'.
    """
    if launcher == 'none':
        return 0, 1, 0
    if launcher != 'pytorch':
        raise ConfigError(f'--launcher {launcher!r}: use none or pytorch (torchrun)')
    missing = [k for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')
               if k not in os.environ]
    if missing:
        raise ConfigError(f'--launcher pytorch needs torchrun\'s environment ({", ".join(missing)} '
                          'unset); start with: torchrun --nproc_per_node=N tools/train.py ...')
    local_rank = int(os.environ['LOCAL_RANK'])
    if device_type == 'cuda':
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        backend = 'nccl'
    else:
        backend = 'gloo'
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size(), local_rank


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_distributed() else 0


def get_world_size():
    return dist.get_world_size() if is_distributed() else 1


def barrier():
    if is_distributed():
        dist.barrier()


def all_gather_object(obj):
    """List of ``obj`` from every rank (a one-element list without distribution)."""
    if not is_distributed():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(value):
    """Mean of a python float over ranks."""
    if not is_distributed():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == 'nccl':
        t = t.cuda()
    dist.all_reduce(t)
    return t.item() / get_world_size()


def cleanup():
    if is_distributed():
        dist.destroy_process_group()
