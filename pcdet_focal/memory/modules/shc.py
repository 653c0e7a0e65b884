"""SparseHeightCompression memory model (pcdet_focal.models.map_to_bev + ops.bev_scatter).

Never densifies [B, C, D, H, W]. All modes find the M occupied (b, y, x) columns (a unique
over N int64 keys), reduce into an (M, C_out) table and write it into the (B, C_out, H, W) map:
- max: scatter_reduce_(amax) into the table (autograd keeps the table, a copy of it and the
  inverse index);
- mean: per height level, index_add_ of that level's voxels, then divide by the counts;
- learned: per height level, (voxels of the level) @ (C, F) weight slice, index_add_; the
  matmul keeps each level's gathered features (N x C in all) and the reordered weight;
  then BatchNorm2d + ReLU on the map (USE_NORM).
M, the occupied columns, is the expected count for voxels spread uniformly at random (clustered
data occupies fewer columns).
"""
from ...errors import ConfigError
from .. import layers as L
from ..context import Dense
from ..graph import FP32, INT64
from .dsvt import expected_occupied

MODES = ('max', 'mean', 'learned')


def validate(mcfg, c, d):
    """(mode, output channels); ConfigError unless MODE / NUM_BEV_FEATURES / INPUT_FEATURES /
    NUM_HEIGHT_BINS agree with the input's C channels and D height bins."""
    mode = str(mcfg.get('MODE', 'max')).lower()
    if mode not in MODES:
        raise ConfigError(f'MODEL.MAP_TO_BEV.MODE={mcfg.get("MODE")!r} is unknown; use one of '
                          f'{", ".join(MODES)}')
    nbf, cin = mcfg.get('NUM_BEV_FEATURES'), mcfg.get('INPUT_FEATURES')
    if mode in ('max', 'mean'):
        if nbf is not None and int(nbf) != c:
            raise ConfigError(f'MODEL.MAP_TO_BEV.NUM_BEV_FEATURES={nbf} but MODE={mode} keeps '
                              f'the input\'s C={c} channels (BACKBONE_3D output); set '
                              f'NUM_BEV_FEATURES: {c} or MODE: learned')
        if cin is not None and int(cin) != c:
            raise ConfigError(f'MODEL.MAP_TO_BEV.INPUT_FEATURES={cin} but the 3D backbone writes '
                              f'C={c} channels; set INPUT_FEATURES: {c}')
        return mode, c
    if nbf is None or cin is None:
        raise ConfigError('MODEL.MAP_TO_BEV: MODE=learned needs NUM_BEV_FEATURES (output '
                          'channels) and INPUT_FEATURES (the 3D backbone\'s C)')
    if int(cin) != c:
        raise ConfigError(f'MODEL.MAP_TO_BEV.INPUT_FEATURES={cin} but the 3D backbone writes '
                          f'C={c} channels; set INPUT_FEATURES: {c}')
    bins = mcfg.get('NUM_HEIGHT_BINS')
    if bins is not None and int(bins) != d:
        raise ConfigError(f'MODEL.MAP_TO_BEV.NUM_HEIGHT_BINS={bins} but the input has D={d} '
                          f'height bins; set NUM_HEIGHT_BINS: {d} (or drop it)')
    return mode, int(nbf)


def _columns(g, n, m):
    """ops.bev_scatter.occupied_columns: (N, 4) int64 coords copy, flat keys, unique."""
    c64 = L.index_tensor(g, 4 * n, 'SHC coords.long()')
    t = [L.index_tensor(g, n, f'SHC column key temp {i}') for i in range(2)]
    g.drop(t[0])
    flat = L.index_tensor(g, n, 'SHC flat column ids')
    g.drop(t[1])
    g.temp(2 * n * INT64, 'SHC unique sort buffers')
    cols = L.index_tensor(g, m, 'SHC columns (M,)')
    inv = L.index_tensor(g, n, 'SHC inverse (N,)')
    g.drop(c64, flat)
    return cols, inv


def _to_bev(g, table, cols, b, c, h, w, m):
    """ops.bev_scatter.columns_to_bev: zero map, index_put_ of the (M, C) table."""
    ib = L.index_tensor(g, m, 'SHC columns // HW')
    ip = L.index_tensor(g, m, 'SHC columns % HW')
    bev = g.op('SHC zero map + index_put_', [table], b * c * h * w, save=[ib, ip])
    g.drop(ib, ip)
    return bev


def _height_groups(g, n):
    """ops.bev_scatter.height_groups: argsort of z (the groups are views of it)."""
    z = L.index_tensor(g, n, 'SHC z.long()')
    order = L.index_tensor(g, n, 'SHC z argsort (groups)')
    zs = L.index_tensor(g, n, 'SHC z[order]')
    g.drop(z, zs)
    return order


def sparse_height_compression(g, mcfg, ctx):
    sp = ctx.sparse
    if sp is None:
        raise ConfigError('MODEL.MAP_TO_BEV SparseHeightCompression needs voxel features: '
                          'add a BACKBONE_3D')
    d, h, w = sp.spatial
    mode, nbf = validate(mcfg, sp.c, d)
    b, n, c = ctx.batch_size, sp.n, sp.c
    m = expected_occupied(max(1, n // b), h * w, d) * b
    if ctx.observed.get('bev_columns'):
        m = int(ctx.observed['bev_columns'])
    ctx.flattened_bev_channels = nbf
    ctx.map_to_bev_input = (c, d, h, w)
    ctx.shape_line(f'MAP_TO_BEV SparseHeightCompression ({mode}): sparse [B, {c}, {d}, {h}, '
                   f'{w}] -> [B, {nbf}, {h}, {w}] without densifying ({nbf} BEV channels; '
                   f'{m // b:,} occupied columns per sample)')
    cols, inv = _columns(g, n, m)
    if mode == 'max':
        # amax backward gathers the table back to the voxels, compares and counts ties:
        # four (N, C) and four (M, C) float temporaries and an (N, C) bool mask (measured)
        table = g.op('SHC table scatter_reduce_(amax)', [sp.t], m * c, save=[inv, sp.t],
                     save_output=True, temp_bwd=(4 * n + 4 * m) * c * FP32 + n * c,
                     temp_bwd_label='SHC max backward masks')
        orig = L.index_tensor(g, m * c, 'SHC table (original, kept by autograd)', FP32)
        orig.saved += 1        # kept by the in-place scatter_reduce_ node until backward
        g.drop(orig)
        out_c = c
    elif mode == 'mean':
        order = _height_groups(g, n)
        idx = L.index_tensor(g, n, 'SHC inverse[idx] per level')
        cnt = L.index_tensor(g, m, 'SHC counts', FP32)
        # backward per level: index_select's gradient is a zero (N, C) tensor + index_add
        # each level's gathered voxels are kept by its index_add_ node: (N, C) in all
        # (levels are released one by one in backward: keep them until the gathers run)
        sel = g.op('SHC per-level index_select', [sp.t], n * c, save=[order], save_output=True,
                   temp_bwd=n * c * FP32, temp_bwd_label='SHC per-level gradient buffers')
        table = g.op('SHC per-level index_add_ + div_(counts)', [sel], m * c,
                     save=[sel, idx, cnt], temp_bwd=m * c * FP32,
                     temp_bwd_label='SHC divide backward')
        g.drop(sel, idx, cnt, order)
        out_c = c
    else:
        wgt = g.param(nbf * c * d, 'SHC learned.weight')
        per_level = g.op('SHC weight reordered (D, C, F)', [], nbf * c * d, params=[wgt])
        order = _height_groups(g, n)
        sel = g.op('SHC per-level index_select', [sp.t], n * c, save=[order],
                   temp_bwd=n * c * FP32, temp_bwd_label='SHC per-level gradient buffers')
        idx = L.index_tensor(g, n, 'SHC inverse[idx] per level')
        # each level's projection (n_level, F) is kept by its index_add_ node: (N, F) in all
        proj = g.op('SHC per-level matmul', [sel, per_level], n * nbf, save=[sel, per_level],
                    kind='mm')
        table = g.op('SHC per-level index_add_', [proj], m * nbf, save=[proj, idx])
        g.drop(sel, per_level, idx, order, proj)
        out_c = nbf
    bev = _to_bev(g, table, cols, b, out_c, h, w, m)
    g.drop(table, cols, inv)
    out = Dense(bev, b, out_c, h, w)
    if mode == 'learned' and mcfg.get('USE_NORM', True):
        z = L.bn2d(g, out, 'SHC norm.0')
        g.drop(bev)
        out = L.relu2d(g, z, 'SHC norm.1')
        g.drop(z.t)
    g.set_batch('spatial_features', out.t)
    ctx.bev = out
    ctx.bev_shape = (out_c, h, w)
    ctx.bev_stride = sp.stride[2]
    g.drop(out.t)
