"""DSVT's voxel grouping in pure torch: rank-in-group, windows, size-equal sets, pooling cells.

Everything here is index bookkeeping (no gradients, no parameters) built from sorts, cumsums and
gathers, so it runs on any device without custom kernels and costs O(N log N) in the number of
voxels N. Conventions:

- ``coords``: (N, 4) long ``[b, z, y, x]`` (OpenPCDet's voxel_coords);
- ``sparse_shape``, ``window_shape``, ``shift``, ``stride``: ``[x, y, z]`` (DSVT config order);
- ``coords_in_win``: (N, 3) long ``[z, y, x]`` inside the window (OpenPCDet's order).

The set partition follows Eq. 3 of the DSVT paper (Wang et al., CVPR 2023): a window holding
``n`` voxels gets ``S = ceil(n / set_size)`` sets; slot ``k`` of set ``j`` takes the voxel at
sorted position ``floor((j * set_size + k) * n / (S * set_size))``. Sets are therefore
window-bounded and all exactly ``set_size`` long; when ``n`` is not a multiple of
``set_size`` some voxels fill several consecutive slots, and the repeats are masked as keys.
Each voxel lies in exactly one set per order: a repeat never crosses a set boundary, because
n > (S - 1) * set_size makes the slot step n / (S * set_size) exceed frac(j * n / S).
"""
from collections import namedtuple

import torch

# voxel_inds: (2, S, set_size) long, index into the N voxels; order 0 = sorted along y
#   (y-major key y, x, z inside the window), order 1 = sorted along x (x, y, z).
# padding_mask: (S, set_size) bool, True where the slot repeats the previous slot's voxel
#   (the same for both orders: repeats depend only on the slot positions).
# first_slot: (2, N) long, flat index (set * set_size + slot) of each voxel's first slot; the
#   set-attention output of a voxel is read there (its repeats, in the same set, agree).
SetPartition = namedtuple('SetPartition', ['voxel_inds', 'padding_mask', 'first_slot'])

# coords: (M, 4) long [b, z, y, x] of the coarse cells, sorted lexicographically;
# group: (N,) long cell of each fine voxel in [0, M); slot: (N,) long position of the voxel
#   inside its cell, x-major (cx * sy * sz + cy * sz + cz, OpenPCDet's order) in [0, volume).
Pooling = namedtuple('Pooling', ['coords', 'group', 'slot', 'volume'])


def ceil_shape(shape, stride):
    """``[x, y, z]`` shape after a ``[sx, sy, sz]`` stride (ceil division, OpenPCDet's rule)."""
    return [-(-int(s) // int(t)) for s, t in zip(shape, stride)]


def rank_in_group(group_ids):
    """Rank of every element inside its group; a pure-torch ``ingroup_inds``.

    group_ids: (N,) integer tensor, any values, any order.
    Returns (N,) long in input order: 0 for the first element of a group (in input order),
    1 for the second, ... Ties are broken by input position (stable sort), so the result is
    deterministic, unlike OpenPCDet's atomic-counter CUDA op (which gives some permutation).
    """
    n = group_ids.numel()
    order = torch.argsort(group_ids, stable=True)
    sorted_ids = group_ids[order]
    pos = torch.arange(n, device=group_ids.device)
    is_start = torch.ones(n, dtype=torch.bool, device=group_ids.device)
    is_start[1:] = sorted_ids[1:] != sorted_ids[:-1]
    # each position's group start = the last start at or before it (running max)
    start = torch.where(is_start, pos, torch.zeros_like(pos)).cummax(dim=0).values
    rank = torch.empty_like(pos)
    rank[order] = pos - start
    return rank


def window_partition(coords, sparse_shape, window_shape, shift):
    """Assign voxels to (shifted) windows.

    coords: (N, 4) long [b, z, y, x]; sparse_shape, window_shape, shift: [x, y, z] ints.
    Returns ``(win_ids (N,) long, coords_in_win (N, 3) long [z, y, x])``. Window ids are unique
    per (sample, window) but not contiguous. A voxel at c goes to window (c + shift) // w, so a
    shift of w/2 moves every window boundary by half a window. As in OpenPCDet, the z shift is
    dropped when one window spans the whole height (window z == sparse z): shifting would only
    split the single z window in two.
    """
    wx, wy, wz = (int(v) for v in window_shape)
    sx, sy, sz = (int(v) for v in shift)
    nx_, ny_, nz_ = (int(v) for v in sparse_shape)
    if wz == nz_:
        sz = 0
    # windows per axis including the partial window a shift creates at the far end
    n_wy = (ny_ - 1 + sy) // wy + 1
    n_wz = (nz_ - 1 + sz) // wz + 1
    n_wx = (nx_ - 1 + sx) // wx + 1
    x = coords[:, 3] + sx
    y = coords[:, 2] + sy
    z = coords[:, 1] + sz
    win_ids = ((coords[:, 0] * n_wx + x // wx) * n_wy + y // wy) * n_wz + z // wz
    coords_in_win = torch.stack((z % wz, y % wy, x % wx), dim=1)
    return win_ids, coords_in_win


def size_equal_sets(win_ids, coords_in_win, window_shape, set_size):
    """Split every window into equal-size sets along y and along x (DSVT's rotated sets).

    win_ids: (N,) long window of each voxel (e.g. from :func:`window_partition`);
    coords_in_win: (N, 3) long [z, y, x] inside the window; window_shape: [wx, wy, wz];
    set_size: voxels per set.
    Returns a :data:`SetPartition`. Sets never cross windows; every voxel appears in at least
    one set of each order; within a set, slots follow the sorted order of the window.
    """
    device = win_ids.device
    wx, wy, wz = (int(v) for v in window_shape)
    volume = wx * wy * wz
    n = win_ids.numel()
    lo, hi = torch.stack(torch.aminmax(win_ids)).tolist() if n else (0, 0)
    if lo < 0 or hi >= (1 << 62) // volume:
        win_ids = torch.unique(win_ids, return_inverse=True)[1]  # compact ids: no overflow
    z, y, x = coords_in_win.unbind(dim=1)
    # Keys unique inside a window; window-major composite keys give, after one sort, every
    # window's voxels contiguous and in the wanted order (windows in the same order for both).
    key_y = (y * wx + x) * wz + z
    key_x = (x * wy + y) * wz + z
    perm_y = torch.argsort(win_ids * volume + key_y, stable=True)
    perm_x = torch.argsort(win_ids * volume + key_x, stable=True)
    # contiguous window index of every sorted position, window sizes
    sorted_ids = win_ids[perm_y]
    new_win = torch.ones(n, dtype=torch.long, device=device)
    new_win[1:] = (sorted_ids[1:] != sorted_ids[:-1]).long()
    sorted_win = torch.cumsum(new_win, 0) - 1                       # (N,) in [0, W)
    counts = torch.bincount(sorted_win)                              # (W,)

    win_start = torch.cumsum(counts, 0) - counts                     # (W,)
    sets_per_win = torch.div(counts + set_size - 1, set_size, rounding_mode='floor')
    set_start = torch.cumsum(sets_per_win, 0) - sets_per_win          # (W,)
    num_sets = int(sets_per_win.sum()) if n else 0
    set_win = torch.repeat_interleave(torch.arange(counts.numel(), device=device), sets_per_win,
                                      output_size=num_sets)           # (S,)
    set_in_win = torch.arange(num_sets, device=device) - set_start[set_win]

    # Eq. 3: slot m = j * set_size + k of a window with n voxels and S sets holds sorted
    # position floor(m * n / (S * set_size)); integer floor division keeps it exact.
    m = set_in_win[:, None] * set_size + torch.arange(set_size, device=device)[None, :]
    n_w = counts[set_win][:, None]
    span = (sets_per_win[set_win] * set_size)[:, None]
    pos = win_start[set_win][:, None] + torch.div(m * n_w, span, rounding_mode='floor')
    voxel_inds = torch.stack((perm_y[pos], perm_x[pos]), dim=0)      # (2, S, set_size)
    padding_mask = torch.zeros_like(pos, dtype=torch.bool)
    padding_mask[:, 1:] = pos[:, 1:] == pos[:, :-1]

    # First slot holding sorted position q of window w: the smallest m with
    # floor(m * n / span) == q, i.e. m = ceil(q * span / n).
    q = torch.arange(n, device=device) - win_start[sorted_win]
    span_v = sets_per_win[sorted_win] * set_size
    cnt_v = counts[sorted_win]
    m_first = torch.div(q * span_v + cnt_v - 1, cnt_v, rounding_mode='floor')
    flat_first = set_start[sorted_win] * set_size + m_first
    first_slot = torch.empty((2, n), dtype=torch.long, device=device)
    first_slot[0, perm_y] = flat_first
    first_slot[1, perm_x] = flat_first
    return SetPartition(voxel_inds, padding_mask, first_slot)


def pooling_index(coords, sparse_shape, stride):
    """Group voxels into coarse cells of ``stride`` voxels (stage transition / input downsample).

    coords: (N, 4) long [b, z, y, x] on a grid of ``sparse_shape`` [x, y, z];
    stride: [sx, sy, sz]. Returns a :data:`Pooling`; coarse coords live on the grid
    ``ceil_shape(sparse_shape, stride)``.
    """
    sx, sy, sz = (int(v) for v in stride)
    cx_, cy_, cz_ = ceil_shape(sparse_shape, stride)
    b, z, y, x = coords.unbind(dim=1)
    key = ((b * cz_ + z // sz) * cy_ + y // sy) * cx_ + x // sx
    cells, group = torch.unique(key, return_inverse=True)
    xc = cells % cx_
    rest = cells // cx_
    yc = rest % cy_
    rest = rest // cy_
    cell_coords = torch.stack((rest // cz_, rest % cz_, yc, xc), dim=1)
    slot = ((x % sx) * sy + (y % sy)) * sz + (z % sz)
    return Pooling(cell_coords, group, slot, sx * sy * sz)
