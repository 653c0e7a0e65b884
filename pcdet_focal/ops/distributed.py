"""Loss normalisers that give the same gradients in one process and under DDP.

DistributedDataParallel averages gradients over its W ranks. A loss that each rank divides by
its own count (heatmap positives, assigned objects, voxels) weighs every rank's share equally,
whatever its count, so W ranks do not train like one process holding the whole global batch.
Dividing each rank's sum by ``global count / W`` instead makes DDP's average the gradient of
``sum over the global batch / global count``, the single-process loss (mmdet's ``reduce_mean``
does the same).
"""
import torch
import torch.distributed as dist


def global_normaliser(count, min_value=1.0):
    """Denominator for this rank's loss sum: ``max(sum of count over ranks, min_value) / W``.

    count: 0-dim tensor (any dtype; on the process group's device under NCCL), this rank's
    number of loss elements. Returns a 0-dim float32 tensor on ``count``'s device, detached.
    Without torch.distributed (or with one rank) it is ``max(count, min_value)``, the usual
    clamped local count.

    Under torch.distributed with W > 1 ranks it is a collective (an all-reduce of one number):
    every rank must call it the same number of times, as every training forward does.
    """
    total = count.detach().reshape(()).to(torch.float64)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world > 1:
        total = total.clone()
        dist.all_reduce(total)
    return (total.clamp(min=min_value) / world).to(torch.float32)
