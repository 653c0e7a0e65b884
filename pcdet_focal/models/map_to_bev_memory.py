"""Memory rules of the MAP_TO_BEV modules (see map_to_bev.py) on the estimator's tape.

They decide the flattened BEV channel count the first BEV conv sees, which is where the users'
config died: HeightCompression densifies [B, C, D, H, W] and folds D into C*D channels.

SparseHeightCompression never densifies [B, C, D, H, W]. All modes find the M occupied
(b, y, x) columns (a unique over N int64 keys), reduce into an (M, C_out) table and write it
into the (B, C_out, H, W) map:
- max: scatter_reduce_(amax) into the table (autograd keeps the table, a copy of it and the
  inverse index);
- mean: per height level, index_add_ of that level's voxels, then divide by the counts;
- learned: per height level, (voxels of the level) @ (C, F) weight slice, index_add_; the
  matmul keeps each level's gathered features (N x C in all) and the reordered weight; then
  BatchNorm2d + ReLU on the map (USE_NORM).
M comes from the counted frames (their distinct (y, x) columns), else the expectation for
voxels spread uniformly at random.
"""
import numpy as np

from .dsvt_memory import expected_occupied


def _columns(tape, n, m):
    """ops.bev_scatter.occupied_columns: (N, 4) int64 coords copy, flat keys, unique."""
    c64 = tape.index(4 * n, 'SHC coords.long()')
    t = [tape.index(n, f'SHC column key temp {i}') for i in range(2)]
    tape.drop(t[0])
    flat = tape.index(n, 'SHC flat column ids')
    tape.drop(t[1])
    tape.temp(2 * n * tape.INT64, 'SHC unique sort buffers')
    cols = tape.index(m, 'SHC columns (M,)')
    inv = tape.index(n, 'SHC inverse (N,)')
    tape.drop(c64, flat)
    return cols, inv


def _to_bev(tape, table, b, c, h, w, m):
    """ops.bev_scatter.columns_to_bev: zero map, index_put_ of the (M, C) table."""
    ib = tape.index(m, 'SHC columns // HW')
    ip = tape.index(m, 'SHC columns % HW')
    bev = tape.op('SHC zero map + index_put_', [table], b * c * h * w, save=[ib, ip])
    tape.drop(ib, ip)
    return bev


def _height_groups(tape, n):
    """ops.bev_scatter.height_groups: argsort of z (the groups are views of it)."""
    z = tape.index(n, 'SHC z.long()')
    order = tape.index(n, 'SHC z argsort (groups)')
    zs = tape.index(n, 'SHC z[order]')
    tape.drop(z, zs)
    return order


def _occupied_columns(flow, x):
    """(largest, median) occupied BEV columns per sample of the Sparse ``x``."""
    seen = flow.observed.get('bev_columns')
    if seen:
        return -(-int(seen) // flow.batch_size), None
    d, h, w = x.spatial
    return flow.cached(('columns', flow.counts_key(x), flow.batch_size), lambda: flow.worst(
        x.frames, lambda f: len(np.unique(f[:, 1] * w + f[:, 2])),
        lambda: expected_occupied(max(1, x.n // flow.batch_size), h * w, d)))


def _bev_out(tape, flow, t, c, h, w, stride):
    tape.set_batch('spatial_features', t)
    flow.bev = flow.dense(t, c, h, w)
    flow.bev_stride = stride


def shc_memory(self, tape, flow):
    """SparseHeightCompression.memory: see the module docstring."""
    sp = flow.sparse
    d, h, w = sp.spatial
    b, n, c = flow.batch_size, sp.n, sp.c
    mode, out_c = self.mode, self.num_bev_features
    per_sample, median = _occupied_columns(flow, sp)
    m = per_sample * b
    flow.flattened_bev_channels = out_c
    flow.map_to_bev_input = (c, d, h, w)
    flow.shape_line(f'MAP_TO_BEV SparseHeightCompression ({mode}): sparse [B, {c}, {d}, {h}, '
                    f'{w}] -> [B, {out_c}, {h}, {w}] without densifying ({out_c} BEV channels; '
                    f'{per_sample:,} occupied columns per sample'
                    + (f', median {median:,}' if median is not None and median != per_sample
                       else '') + ')')
    cols, inv = _columns(tape, n, m)
    if mode == 'max':
        # amax backward gathers the table back to the voxels, compares and counts ties:
        # four (N, C) and four (M, C) float temporaries and an (N, C) bool mask (measured)
        table = tape.op('SHC table scatter_reduce_(amax)', [sp.t], m * c, save=[inv, sp.t],
                        save_output=True, temp_bwd=(4 * n + 4 * m) * c * tape.FP32 + n * c,
                        temp_bwd_label='SHC max backward masks')
        orig = tape.tensor(m * c, 'SHC table (original, kept by autograd)')
        orig.saved += 1        # kept by the in-place scatter_reduce_ node until backward
        tape.drop(orig)
    elif mode == 'mean':
        order = _height_groups(tape, n)
        idx = tape.index(n, 'SHC inverse[idx] per level')
        cnt = tape.tensor(m, 'SHC counts')
        # backward per level: index_select's gradient is a zero (N, C) tensor + index_add;
        # each level's gathered voxels are kept by its index_add_ node: (N, C) in all
        sel = tape.op('SHC per-level index_select', [sp.t], n * c, save=[order],
                      save_output=True, temp_bwd=n * c * tape.FP32,
                      temp_bwd_label='SHC per-level gradient buffers')
        table = tape.op('SHC per-level index_add_ + div_(counts)', [sel], m * c,
                        save=[sel, idx, cnt], temp_bwd=m * c * tape.FP32,
                        temp_bwd_label='SHC divide backward')
        tape.drop(sel, idx, cnt, order)
    else:
        wgt = tape.param(self.weight, 'SHC learned.weight')
        per_level = tape.op('SHC weight reordered (D, C, F)', [], out_c * c * d, params=[wgt])
        order = _height_groups(tape, n)
        sel = tape.op('SHC per-level index_select', [sp.t], n * c, save=[order],
                      temp_bwd=n * c * tape.FP32, temp_bwd_label='SHC per-level gradient buffers')
        idx = tape.index(n, 'SHC inverse[idx] per level')
        # each level's projection (n_level, F) is kept by its index_add_ node: (N, F) in all
        proj = tape.op('SHC per-level matmul', [sel, per_level], n * out_c,
                       save=[sel, per_level], kind='mm')
        table = tape.op('SHC per-level index_add_', [proj], m * out_c, save=[proj, idx])
        tape.drop(sel, per_level, idx, order, proj)
    bev = _to_bev(tape, table, b, out_c, h, w, m)
    tape.drop(table, cols, inv)
    out = flow.dense(bev, out_c, h, w)
    if self.mode == 'learned' and self.norm is not None:
        z = tape.bn2d(out, self.norm[0], 'SHC norm.0')
        tape.drop(bev)
        out = tape.relu2d(z, 'SHC norm.1')
        tape.drop(z.t)
    _bev_out(tape, flow, out.t, out_c, h, w, sp.stride[2])
    tape.drop(out.t)


def _densify(tape, sp, b, label):
    """spconv's ``.dense()``: zeros in channels-last order, index_put, permute + contiguous.
    Two full volumes exist for a moment; the channels-last one dies when .dense() returns.
    The index_put node saves the (N, 4) int64 indices."""
    d, h, w = sp.spatial
    numel = b * sp.c * d * h * w
    idx = tape.index(sp.n * 4, f'{label} indices .long()')
    zeros = tape.op(f'{label} zeros [B, D, H, W, C] + index_put', [sp.t], numel, save=[idx])
    tape.drop(idx)
    dense = tape.op(f'{label} permute(...).contiguous() [B, C, D, H, W]', [zeros], numel)
    tape.drop(zeros)
    return dense


def height_compression_memory(self, tape, flow):
    """HeightCompression.memory (ours and OpenPCDet's: the same ``.dense()`` + view)."""
    sp = flow.sparse
    d, h, w = sp.spatial
    flat = sp.c * d
    flow.flattened_bev_channels = flat
    flow.map_to_bev_input = (sp.c, d, h, w)
    flow.shape_line(f'MAP_TO_BEV HeightCompression: dense [B, {sp.c}, {d}, {h}, {w}] -> '
                    f'[B, {flat}, {h}, {w}]: {flat} flattened BEV channels (C*D = {sp.c}*{d})')
    dense = _densify(tape, sp, flow.batch_size, 'HeightCompression .dense()')
    _bev_out(tape, flow, dense, flat, h, w, sp.stride[2])
    tape.drop(dense)


def scatter3d_memory(self, tape, flow):
    """PointPillarScatter3d.memory (ours: ops.bev_scatter.scatter_height_to_channels, one zero
    (B, C, nz*ny*nx) canvas and an index_put_ of the (N, C) features)."""
    sp = flow.sparse
    nx, ny, nz = self.nx, self.ny, self.nz
    nbf, c = self.num_bev_features, self.num_bev_features_before_compression
    flow.flattened_bev_channels = nbf
    flow.map_to_bev_input = (c, nz, ny, nx)
    flow.shape_line(f'MAP_TO_BEV PointPillarScatter3d: [B, {c}, {nz}, {ny}, {nx}] -> '
                    f'[B, {nbf}, {ny}, {nx}] ({nbf} flattened BEV channels)')
    c64 = tape.index(sp.n * 4, 'PointPillarScatter3d coords.long()')
    tmp = tape.index(sp.n, 'PointPillarScatter3d flat index temp')
    flat = tape.index(sp.n, 'PointPillarScatter3d flat index')
    tape.drop(tmp)
    canvas = tape.op('PointPillarScatter3d zero canvas + index_put_', [sp.t],
                     flow.batch_size * c * nz * ny * nx, save=[c64, flat])
    tape.drop(c64, flat)
    _bev_out(tape, flow, canvas, nbf, ny, nx, sp.stride[2])
    tape.drop(canvas)
