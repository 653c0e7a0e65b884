"""DSVT grouping ops against brute-force Python references written here."""
import math
from collections import defaultdict

import pytest
import torch

from pcdet_focal.ops.dsvt_sets import (ceil_shape, pooling_index, rank_in_group,
                                       size_equal_sets, window_partition)


def _random_voxels(n, shape_xyz, batch_size, gen):
    """n unique voxels [b, z, y, x] (long) on a grid of shape_xyz, in random order."""
    x, y, z = shape_xyz
    lin = torch.randperm(batch_size * x * y * z, generator=gen)[:n]
    coords = torch.stack((lin // (x * y * z), (lin // (x * y)) % z, (lin // x) % y, lin % x), 1)
    return coords.long()


def _brute_window(c, size, w, s):
    """Window index along one axis by scanning window boundaries -s + k*w (no // or %)."""
    k = 0
    while not (-s + k * w <= c < -s + (k + 1) * w):
        k += 1
    return k, c - (-s + k * w)


# ----------------------------------------------------------------------------- rank in group

def test_rank_in_group_matches_counter():
    gen = torch.Generator().manual_seed(0)
    groups = torch.randint(0, 7, (200,), generator=gen) * 1000 - 3000  # any values, negatives too
    seen = defaultdict(int)
    expected = []
    for g in groups.tolist():
        expected.append(seen[g])
        seen[g] += 1
    assert rank_in_group(groups).tolist() == expected
    assert rank_in_group(torch.zeros(0, dtype=torch.long)).numel() == 0


# ----------------------------------------------------------------------------- windows

@pytest.mark.parametrize('shape,window,shift', [
    ([23, 17, 6], [5, 4, 6], [0, 0, 0]),
    ([23, 17, 6], [5, 4, 6], [2, 2, 3]),      # z shift dropped: one window spans the height
    ([23, 17, 6], [6, 4, 2], [3, 2, 1]),
])
def test_window_partition_brute_force(shape, window, shift):
    gen = torch.Generator().manual_seed(1)
    coords = _random_voxels(300, shape, 2, gen)
    win_ids, in_win = window_partition(coords, shape, window, shift)
    eff_shift = list(shift)
    if window[2] == shape[2]:
        eff_shift[2] = 0
    ref_windows, ref_in = [], []
    for b, z, y, x in coords.tolist():
        wins, ins = zip(*(_brute_window(c, shape[a], window[a], eff_shift[a])
                          for a, c in enumerate((x, y, z))))
        ref_windows.append((b, *wins))
        ref_in.append([ins[2], ins[1], ins[0]])
    assert in_win.tolist() == ref_in
    # same window id <=> same brute-force window
    ids = win_ids.tolist()
    pairs = {}
    for wid, ref in zip(ids, ref_windows):
        assert pairs.setdefault(wid, ref) == ref
    assert len(set(ids)) == len(set(ref_windows))


def test_shift_moves_the_partition():
    gen = torch.Generator().manual_seed(2)
    shape, window = [24, 24, 1], [6, 6, 1]
    coords = _random_voxels(400, shape, 1, gen)
    w0, _ = window_partition(coords, shape, window, [0, 0, 0])
    w1, c1 = window_partition(coords, shape, window, [3, 3, 0])
    # shifted windows start at -3 + 6k: every voxel's in-window x is (x + 3) mod 6
    assert torch.equal(c1[:, 2], (coords[:, 3] + 3) % 6)
    same0 = w0[:, None] == w0[None, :]
    same1 = w1[:, None] == w1[None, :]
    assert (same0 != same1).any()  # the grouping really changed


# ----------------------------------------------------------------------------- sets

def _brute_sets(win_ids, in_win, window, set_size, along):
    """Eq. 3 by hand: {window: [sets as voxel tuples]} for sort order 'y' or 'x'."""
    wx, wy, wz = window
    members = defaultdict(list)
    for i, (w, (z, y, x)) in enumerate(zip(win_ids.tolist(), in_win.tolist())):
        key = (y, x, z) if along == 'y' else (x, y, z)
        members[w].append((key, i))
    out = {}
    for w, items in members.items():
        order = [i for _, i in sorted(items)]
        n = len(order)
        s_num = math.ceil(n / set_size)
        out[w] = [tuple(order[(j * set_size + k) * n // (s_num * set_size)]
                        for k in range(set_size)) for j in range(s_num)]
    return out


@pytest.mark.parametrize('set_size', [1, 4, 9, 40])
def test_size_equal_sets_brute_force(set_size):
    gen = torch.Generator().manual_seed(3)
    shape, window = [20, 16, 4], [5, 4, 4]
    # dense corner + sparse rest: windows with many voxels and windows with 1-2 voxels
    dense = _random_voxels(150, [6, 6, 4], 2, gen)
    sparse = _random_voxels(40, shape, 2, gen)
    coords = torch.unique(torch.cat((dense, sparse)), dim=0)
    coords = coords[torch.randperm(coords.shape[0], generator=gen)]
    win_ids, in_win = window_partition(coords, shape, window, [2, 2, 0])
    part = size_equal_sets(win_ids, in_win, window, set_size)
    n = coords.shape[0]
    s_num = part.voxel_inds.shape[1]
    assert part.voxel_inds.shape == (2, s_num, set_size)
    assert part.padding_mask.shape == (s_num, set_size)
    for order, along in enumerate('yx'):
        inds = part.voxel_inds[order]
        ref = _brute_sets(win_ids, in_win, window, set_size, along)
        ours = sorted(tuple(r) for r in inds.tolist())
        assert ours == sorted(s for sets in ref.values() for s in sets)
        # every voxel in at least one set (Eq. 3 even gives exactly one); no set crosses a window
        assert torch.equal(torch.unique(inds), torch.arange(n))
        set_of = torch.arange(s_num)[:, None].expand_as(inds)
        pairs = torch.unique(torch.stack((inds.flatten(), set_of.flatten()), 1), dim=0)
        assert torch.equal(torch.bincount(pairs[:, 0], minlength=n), torch.ones(n).long())
        assert (win_ids[inds] == win_ids[inds[:, :1]]).all()
        # padding: True exactly where the slot repeats the previous voxel
        for row, mask in zip(inds.tolist(), part.padding_mask.tolist()):
            assert mask == [k > 0 and row[k] == row[k - 1] for k in range(set_size)]
        # first_slot: the first flat position holding each voxel
        flat = inds.reshape(-1).tolist()
        first = {}
        for pos, v in enumerate(flat):
            first.setdefault(v, pos)
        assert part.first_slot[order].tolist() == [first[v] for v in range(n)]


def test_sets_sorted_along_y_and_x():
    # one 4 x 4 x 1 window holding every cell: order y is row-major in y, order x in x
    window = [4, 4, 1]
    ys, xs = torch.meshgrid(torch.arange(4), torch.arange(4), indexing='ij')
    coords = torch.stack((torch.zeros(16), torch.zeros(16), ys.flatten(), xs.flatten()), 1)
    coords = coords.long()[torch.randperm(16)]
    win_ids, in_win = window_partition(coords, [4, 4, 1], window, [0, 0, 0])
    part = size_equal_sets(win_ids, in_win, window, 16)
    along_y = coords[part.voxel_inds[0, 0]]
    along_x = coords[part.voxel_inds[1, 0]]
    assert (along_y[:, 2] * 4 + along_y[:, 3]).tolist() == list(range(16))
    assert (along_x[:, 3] * 4 + along_x[:, 2]).tolist() == list(range(16))
    assert not part.padding_mask.any()


def test_sets_empty_input():
    empty = torch.zeros((0, 4), dtype=torch.long)
    win_ids, in_win = window_partition(empty, [8, 8, 1], [4, 4, 1], [2, 2, 0])
    part = size_equal_sets(win_ids, in_win, [4, 4, 1], 8)
    assert part.voxel_inds.shape == (2, 0, 8) and part.first_slot.shape == (2, 0)


# ----------------------------------------------------------------------------- pooling

def test_pooling_index_brute_force():
    gen = torch.Generator().manual_seed(4)
    shape, stride = [9, 7, 10], [2, 3, 4]
    coords = _random_voxels(200, shape, 3, gen)
    pool = pooling_index(coords, shape, stride)
    assert ceil_shape(shape, stride) == [5, 3, 3]
    cells = {}
    for b, z, y, x in coords.tolist():
        cells[(b, z // 4, y // 3, x // 2)] = True
    assert sorted(cells) == [tuple(c) for c in pool.coords.tolist()]  # lexicographic order
    for i, (b, z, y, x) in enumerate(coords.tolist()):
        assert tuple(pool.coords[pool.group[i]].tolist()) == (b, z // 4, y // 3, x // 2)
        assert pool.slot[i].item() == ((x % 2) * 3 + y % 3) * 4 + z % 4
    assert pool.volume == 24


def test_sets_with_huge_window_ids():
    # window ids too large for id * window volume in int64 are compacted first: same sets
    gen = torch.Generator().manual_seed(5)
    coords = _random_voxels(120, [12, 12, 2], 2, gen)
    win_ids, in_win = window_partition(coords, [12, 12, 2], [4, 4, 2], [0, 0, 0])
    small = size_equal_sets(win_ids, in_win, [4, 4, 2], 5)
    huge = size_equal_sets(win_ids * (1 << 55) + 7, in_win, [4, 4, 2], 5)
    for a, b in zip(small, huge):
        assert torch.equal(a, b)
