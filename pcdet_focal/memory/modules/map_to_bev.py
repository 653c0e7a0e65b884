"""MAP_TO_BEV memory models: HeightCompression, PointPillarScatter(3d), SparseHeightCompression.

These decide the flattened BEV channel count the first BEV conv sees, which is where the users'
config died: HeightCompression densifies [B, C, D, H, W] and folds D into C*D channels.
"""
from ...errors import ConfigError
from .. import layers as L
from ..context import Dense
from ..graph import INT64


def _need_sparse(ctx, name):
    if ctx.sparse is None:
        raise ConfigError(f'MODEL.MAP_TO_BEV {name} needs 3D sparse features: add a '
                          'BACKBONE_3D (or a VFE that writes voxel features)')
    return ctx.sparse


def _bev_out(g, ctx, t, c, h, w, name, stride):
    g.set_batch('spatial_features', t)
    ctx.bev = Dense(t, ctx.batch_size, c, h, w)
    ctx.bev_shape = (c, h, w)
    ctx.bev_stride = stride


def _densify(g, sp, b, label):
    """spconv's ``.dense()``: zeros in channels-last order, index_put, permute + contiguous.

    Two full volumes exist for a moment; the channels-last one dies when .dense() returns.
    The index_put node saves the (N, 4) int64 indices."""
    d, h, w = sp.spatial
    numel = b * sp.c * d * h * w
    idx = L.index_tensor(g, sp.n * 4, f'{label} indices .long()', INT64)
    zeros = g.op(f'{label} zeros [B, D, H, W, C] + index_put', [sp.t], numel, save=[idx])
    g.drop(idx)
    dense = g.op(f'{label} permute(...).contiguous() [B, C, D, H, W]', [zeros], numel)
    g.drop(zeros)
    return dense


def height_compression(g, mcfg, ctx):
    sp = _need_sparse(ctx, 'HeightCompression')
    d, h, w = sp.spatial
    flat = sp.c * d
    nbf = mcfg.get('NUM_BEV_FEATURES')
    if nbf is not None and int(nbf) != flat:
        raise ConfigError(f'MODEL.MAP_TO_BEV.NUM_BEV_FEATURES={nbf} but HeightCompression '
                          f'flattens C*D = {sp.c}*{d} = {flat} channels (BACKBONE_3D output '
                          f'C={sp.c}, D={d} height bins); set NUM_BEV_FEATURES: {flat}')
    ctx.flattened_bev_channels = flat
    ctx.map_to_bev_input = (sp.c, d, h, w)
    ctx.shape_line(f'MAP_TO_BEV HeightCompression: dense [B, {sp.c}, {d}, {h}, {w}] -> '
                   f'[B, {flat}, {h}, {w}]: {flat} flattened BEV channels (C*D = {sp.c}*{d})')
    dense = _densify(g, sp, ctx.batch_size, 'HeightCompression .dense()')
    _bev_out(g, ctx, dense, flat, h, w, 'HeightCompression', sp.stride[2])
    g.drop(dense)


def _scatter3d(g, mcfg, ctx, name, nz_default=None):
    """pcdet_focal's PointPillarScatter3d (ops.bev_scatter.scatter_height_to_channels): one
    zero (B, C, nz*ny*nx) canvas and an index_put_ of the (N, C) features. (OpenPCDet's own
    version builds per-sample canvases and stacks them: one more map at its peak.)"""
    sp = _need_sparse(ctx, name)
    shape = mcfg.get('INPUT_SHAPE')
    if shape is not None:
        nx, ny, nz = (int(v) for v in shape)
    else:
        nz_, ny, nx = sp.spatial
        nz = nz_ if nz_default is None else nz_default
    nbf = int(mcfg.get('NUM_BEV_FEATURES', sp.c * nz))
    if nbf % nz:
        raise ConfigError(f'MODEL.MAP_TO_BEV.NUM_BEV_FEATURES={nbf} is not a multiple of '
                          f'INPUT_SHAPE z={nz} ({name} keeps NUM_BEV_FEATURES/nz channels per '
                          'height bin)')
    c = nbf // nz
    if c != sp.c:
        raise ConfigError(f'MODEL.MAP_TO_BEV.NUM_BEV_FEATURES={nbf} means {c} channels per '
                          f'height bin (NUM_BEV_FEATURES / INPUT_SHAPE z={nz}) but the 3D '
                          f'backbone writes C={sp.c}; set NUM_BEV_FEATURES: {sp.c * nz}')
    b = ctx.batch_size
    ctx.flattened_bev_channels = nbf
    ctx.map_to_bev_input = (c, nz, ny, nx)
    ctx.shape_line(f'MAP_TO_BEV {name}: [B, {c}, {nz}, {ny}, {nx}] -> [B, {nbf}, {ny}, {nx}] '
                   f'({nbf} flattened BEV channels)')
    c64 = L.index_tensor(g, sp.n * 4, f'{name} coords.long()', INT64)
    tmp = L.index_tensor(g, sp.n, f'{name} flat index temp', INT64)
    flat = L.index_tensor(g, sp.n, f'{name} flat index', INT64)
    g.drop(tmp)
    canvas = g.op(f'{name} zero canvas + index_put_', [sp.t], b * c * nz * ny * nx,
                  save=[c64, flat])
    g.drop(c64, flat)
    _bev_out(g, ctx, canvas, nbf, ny, nx, name, sp.stride[2])
    g.drop(canvas)


def point_pillar_scatter3d(g, mcfg, ctx):
    _scatter3d(g, mcfg, ctx, 'PointPillarScatter3d')


def point_pillar_scatter(g, mcfg, ctx):
    _scatter3d(g, mcfg, ctx, 'PointPillarScatter', nz_default=1)


def sparse_height_compression(g, mcfg, ctx):
    from .shc import sparse_height_compression as model
    model(g, mcfg, ctx)


MODELS = {'HeightCompression': height_compression,
          'PointPillarScatter3d': point_pillar_scatter3d,
          'PointPillarScatter': point_pillar_scatter,
          'SparseHeightCompression': sparse_height_compression}

