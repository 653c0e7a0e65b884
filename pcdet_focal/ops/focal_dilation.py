"""Focal dilation: important voxels spawn new voxels at the neighbour offsets they predict.

The focal sparse conv's importance head outputs ``K^3`` probabilities per voxel (K = kernel
size, odd). Channel layout, fixed by :func:`kernel_offsets`:

- channels ``0 .. K^3 - 2``: the ``K^3 - 1`` neighbour offsets ``(dz, dy, dx)``, each in
  ``-K//2 .. K//2``, in lexicographic order (dz slowest, dx fastest), the centre left out;
- channel ``K^3 - 1`` (the last): the voxel's own importance.

A voxel is *important* when its own importance is >= ``threshold`` or, with ``topk_ratio``,
when it ranks among the ``floor(n_b * topk_ratio)`` highest own importances of its sample b
(ties broken by input order). Each important voxel spawns a voxel at every offset whose
importance is >= ``threshold`` and that lies inside the grid. Spawned voxels that coincide
with an input voxel or with each other are kept once. With ``max_new_ratio`` r, a sample b with
n_b input voxels gains at most ``floor(r * n_b)`` new voxels: those whose best spawn importance
is highest (ties: first spawn first); this bounds the voxel count, hence memory, per block.

Pure tensor code, vectorised over voxels (sort / unique / searchsorted on linearised keys).
Coordinates: ``[b, z, y, x]`` int; ``spatial_shape`` ``[D, H, W]`` (spconv order).
"""
from typing import NamedTuple

import torch

from ..errors import InputError


class Dilation(NamedTuple):
    """Result of :func:`focal_dilation` (N input voxels, M new voxels, S spawns).

    coords:       (N + M, 4) int32 [b, z, y, x]: the N input voxels in their order, then the
                  M new voxels in order of first spawn (spawning voxel order, then offset order).
    num_new:      M.
    important:    (N,) bool, the voxels that spawned (own importance passed).
    spawn_src:    (S,) long, input voxel that spawned (ascending, offsets ascending within).
    spawn_offset: (S,) long, offset index = importance channel of the spawn.
    spawn_dst:    (S,) long, row of ``coords`` the spawn landed on (< N: an input voxel).
    Spawns outside the grid are dropped and not listed.
    """
    coords: torch.Tensor
    num_new: int
    important: torch.Tensor
    spawn_src: torch.Tensor
    spawn_offset: torch.Tensor
    spawn_dst: torch.Tensor


def kernel_offsets(kernel_size, device=None):
    """(K^3 - 1, 3) long neighbour offsets (dz, dy, dx), in importance-channel order."""
    r = int(kernel_size) // 2
    steps = torch.arange(-r, r + 1, device=device)
    grid = torch.stack(torch.meshgrid(steps, steps, steps, indexing='ij'), dim=-1).reshape(-1, 3)
    return grid[(grid != 0).any(dim=1)]  # meshgrid 'ij' + reshape: dz slowest, dx fastest


def kernel_size_from_channels(channels):
    """K such that K^3 == channels (odd K >= 3), or InputError."""
    k = round(channels ** (1.0 / 3.0))
    if k ** 3 != channels or k < 3 or k % 2 == 0:
        raise InputError(f'focal_dilation: importance has {channels} channels; it must have '
                         'K^3 (27 for K=3, 125 for K=5) for an odd kernel size K >= 3')
    return k


def linear_keys(coords, spatial_shape):
    """(N, 4) [b, z, y, x] -> (N,) int64 keys, unique per voxel of a [B, D, H, W] grid."""
    d, h, w = (int(s) for s in spatial_shape)
    c = coords.long()
    return ((c[:, 0] * d + c[:, 1]) * h + c[:, 2]) * w + c[:, 3]


def select_important(own, batch_idx, threshold, topk_ratio=None):
    """own (N,) float, batch_idx (N,) int -> (N,) bool (rule in the module docstring)."""
    if topk_ratio is None:
        return own >= threshold
    n = own.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=own.device)
    b = batch_idx.long()
    # order by (sample, importance descending); stable sorts keep input order among ties
    by_imp = torch.sort(own, descending=True, stable=True).indices
    order = by_imp[torch.sort(b[by_imp], stable=True).indices]
    counts = torch.bincount(b)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(n, dtype=torch.long, device=own.device)
    rank[order] = torch.arange(n, device=own.device) - starts[b[order]]
    keep = torch.floor(counts.double() * float(topk_ratio)).long()
    return rank < keep[b]


def _cap_new_voxels(new_keys, score, first, coords, spatial_shape, ratio):
    """(M,) bool: which new voxels survive the per-sample cap floor(ratio * n_b).

    new_keys: (M,) int64 linear keys of the new voxels; score: (M,) their best spawn
    importance; first: (M,) index of their first spawn (breaks ties); coords: (N, 4) inputs.
    """
    d, h, w = (int(v) for v in spatial_shape)
    new_b = new_keys // (d * h * w)
    n_b = torch.bincount(coords[:, 0].long(), minlength=int(new_b.max()) + 1)
    allowed = torch.floor(n_b.double() * float(ratio)).long()
    # order by (sample, score descending, first spawn): stable sorts from the last key back
    order = torch.argsort(first)
    order = order[torch.sort(score[order], descending=True, stable=True).indices]
    order = order[torch.sort(new_b[order], stable=True).indices]
    counts = torch.bincount(new_b, minlength=n_b.numel())
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(new_b)
    rank[order] = torch.arange(new_b.numel(), device=new_b.device) - starts[new_b[order]]
    return rank < allowed[new_b]


def _check_inputs(coords, importance, spatial_shape, threshold, topk_ratio):
    if coords.dim() != 2 or coords.shape[1] != 4:
        raise InputError(f'focal_dilation: coords must be (N, 4) [b, z, y, x], got '
                         f'{tuple(coords.shape)}')
    if importance.dim() != 2 or importance.shape[0] != coords.shape[0]:
        raise InputError(f'focal_dilation: importance must be (N, K^3) with N = '
                         f'{coords.shape[0]} (one row per voxel), got {tuple(importance.shape)}')
    if len(spatial_shape) != 3:
        raise InputError(f'focal_dilation: spatial_shape must be [D, H, W], got {spatial_shape}')
    if not 0.0 <= float(threshold) <= 1.0:
        raise InputError(f'focal_dilation: threshold={threshold} must be in [0, 1]')
    if topk_ratio is not None and not 0.0 < float(topk_ratio) <= 1.0:
        raise InputError(f'focal_dilation: topk_ratio={topk_ratio} must be in (0, 1] or None')


def focal_dilation(coords, importance, spatial_shape, threshold=0.5, topk_ratio=None,
                   max_new_ratio=None):
    """Union of the input voxels and the voxels spawned by the important ones.

    coords: (N, 4) int [b, z, y, x], unique, inside ``spatial_shape`` (callers check with
    ops.sparse.check_coords); importance: (N, K^3) probabilities in the channel layout of the
    module docstring (no gradient is taken through this function: pass ``.detach()``);
    spatial_shape: [D, H, W]; threshold: float in [0, 1]; topk_ratio: None or (0, 1];
    max_new_ratio: None (no cap) or >= 0, new voxels per input voxel of the same sample.
    Returns a :class:`Dilation`.
    """
    _check_inputs(coords, importance, spatial_shape, threshold, topk_ratio)
    if max_new_ratio is not None and not float(max_new_ratio) >= 0:
        raise InputError(f'focal_dilation: max_new_ratio={max_new_ratio} must be >= 0 or None')
    k = kernel_size_from_channels(importance.shape[1])
    device = coords.device
    n = coords.shape[0]
    c = coords.long()
    shape = torch.tensor([int(s) for s in spatial_shape], device=device)

    important = select_important(importance[:, -1], c[:, 0], threshold, topk_ratio)
    src = important.nonzero().squeeze(1)
    # nonzero is row-major: spawns come ordered by source voxel, then by offset index
    rows, offset = (importance[src, :-1] >= threshold).nonzero(as_tuple=True)
    spawn_src = src[rows]
    target = c[spawn_src].clone()
    target[:, 1:] += kernel_offsets(k, device)[offset]
    inside = ((target[:, 1:] >= 0) & (target[:, 1:] < shape)).all(dim=1)
    spawn_src, offset, target = spawn_src[inside], offset[inside], target[inside]

    keys = linear_keys(c, spatial_shape)
    sorted_keys, perm = torch.sort(keys)
    if n > 1 and bool((sorted_keys[1:] == sorted_keys[:-1]).any()):
        raise InputError('focal_dilation: coords hold duplicate voxels; each [b, z, y, x] must '
                         'appear once (spconv requires unique indices)')
    tkeys = linear_keys(target, spatial_shape)
    s = tkeys.shape[0]
    spawn_dst = torch.empty(s, dtype=torch.long, device=device)
    if n:
        pos = torch.searchsorted(sorted_keys, tkeys).clamp(max=n - 1)
        hit = sorted_keys[pos] == tkeys
        spawn_dst[hit] = perm[pos[hit]]
    else:
        hit = torch.zeros(s, dtype=torch.bool, device=device)

    miss = (~hit).nonzero().squeeze(1)
    uniq, inverse = torch.unique(tkeys[miss], return_inverse=True)
    if max_new_ratio is not None and uniq.numel():
        score = importance[spawn_src[miss], offset[miss]].float()
        best = score.new_full((uniq.numel(),), -1.0).scatter_reduce_(0, inverse, score, 'amax')
        first = torch.full_like(uniq, s).scatter_reduce_(0, inverse, miss, reduce='amin')
        keep_new = _cap_new_voxels(uniq, best, first, c, spatial_shape, max_new_ratio)
        if not bool(keep_new.all()):
            keep = torch.ones(s, dtype=torch.bool, device=device)
            keep[miss[~keep_new[inverse]]] = False
            spawn_src, offset, target = spawn_src[keep], offset[keep], target[keep]
            tkeys, hit, spawn_dst = tkeys[keep], hit[keep], spawn_dst[keep]
            s = tkeys.shape[0]
            miss = (~hit).nonzero().squeeze(1)
            uniq, inverse = torch.unique(tkeys[miss], return_inverse=True)
    m = uniq.shape[0]
    # first spawn of each new key, then rank the new keys by it (first-appearance order)
    first = torch.full((m,), s, dtype=torch.long, device=device).scatter_reduce_(
        0, inverse, miss, reduce='amin')
    by_first = torch.argsort(first)
    rank = torch.empty(m, dtype=torch.long, device=device)
    rank[by_first] = torch.arange(m, device=device)
    spawn_dst[miss] = n + rank[inverse]

    union = torch.cat([c, target[first[by_first]]], dim=0).to(torch.int32)
    return Dilation(union, m, important, spawn_src, offset, spawn_dst)
