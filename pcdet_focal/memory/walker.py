"""Walk ``cfg.MODEL`` in OpenPCDet's build order and replay each module's memory on a graph.

Order: input batch, VFE, BACKBONE_3D, MAP_TO_BEV, (PFE), BACKBONE_2D, DENSE_HEAD, (POINT_HEAD,
ROI_HEAD), then the detector's loss sum. A NAME without a memory model becomes a "not
modelled" row: the walk guesses what it hands on (from NUM_FILTERS / NUM_BEV_FEATURES-style
keys) so the later modules are still estimated, and the total is reported as a lower bound.
"""
from ..errors import ConfigError, PcdetFocalError
from .context import Dense, Sparse
from .graph import FP32, INT32
from .modules import MODELS

SLOTS = ('VFE', 'BACKBONE_3D', 'MAP_TO_BEV', 'PFE', 'BACKBONE_2D', 'DENSE_HEAD', 'POINT_HEAD',
         'ROI_HEAD')


def _input_batch(g, ctx):
    """The collated batch on the device (load_data_to_device): voxels, coords, points, boxes."""
    g.begin_module('input batch', 'INPUT')
    b, geom = ctx.batch_size, ctx.geom
    n = b * ctx.voxels
    tensors = {
        'voxels': g.tensor(n * geom.max_points_per_voxel * geom.num_point_features,
                           'voxels (N, max_points, C)', FP32),
        'voxel_num_points': g.tensor(n, 'voxel_num_points', INT32),
        'voxel_coords': g.tensor(n * 4, 'voxel_coords (N, 4)', INT32),
        'points': g.tensor(b * ctx.points * (geom.num_point_features + 1), 'points', FP32),
        'gt_boxes': g.tensor(b * ctx.gt_boxes * 8, 'gt_boxes', FP32),
    }
    for key, t in tensors.items():
        g.set_batch(key, t)
        g.drop(t)
    g.end_module()


def _hint_channels(mcfg, default):
    for key in ('NUM_FILTERS', 'NUM_UPSAMPLE_FILTERS'):
        v = mcfg.get(key)
        if isinstance(v, (list, tuple)) and v and all(isinstance(x, int) for x in v):
            return int(sum(v)) if key == 'NUM_UPSAMPLE_FILTERS' else int(v[-1])
    for key in ('NUM_BEV_FEATURES', 'num_point_features', 'conv_out_channel',
                'NUM_OUTPUT_FEATURES', 'OUT_CHANNELS'):
        v = mcfg.get(key)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return default


def _not_modelled(g, slot, name, mcfg, ctx, why=''):
    """Keep the walk going past a module we have no model for (its memory is not counted)."""
    ctx.not_modelled.append(f'{slot} {name}' + (f' ({why})' if why else ''))
    g.modules[g.module].modelled = False
    g.note('not modelled: its memory is not counted' + (f'; {why}' if why else ''))
    b = ctx.batch_size
    nz, ny, nx = ctx.geom.spatial
    if slot == 'VFE':
        c = _hint_channels(mcfg, ctx.geom.num_point_features)
        n = b * ctx.voxels
        t = g.tensor(n * c, f'{name} output (guessed width {c})', FP32)
        g.set_batch('voxel_features', t)
        g.drop(t)
        pillar = 'pillar' in name.lower()
        ctx.sparse = Sparse(t, n, c, (1 if pillar else nz, ny, nx), (1, 1, 1),
                            g.get_batch('voxel_coords'))
        ctx.point_features = c
    elif slot == 'BACKBONE_3D':
        src = ctx.sparse
        c = _hint_channels(mcfg, src.c if src else ctx.point_features)
        n = src.n if src else b * ctx.voxels
        t = g.tensor(n * c, f'{name} output (guessed width {c})', FP32)
        g.set_batch('encoded_spconv_tensor', t)
        g.drop(t)
        spatial = src.spatial if src else ctx.geom.spatial
        ctx.sparse = Sparse(t, n, c, spatial, src.stride if src else (1, 1, 1), None, {})
        ctx.guessing = True
    elif slot == 'MAP_TO_BEV':
        src = ctx.sparse
        spatial = src.spatial if src else ctx.geom.spatial
        c = _hint_channels(mcfg, src.c if src else 64)
        t = g.tensor(b * c * spatial[1] * spatial[2], f'{name} BEV map (guessed)', FP32)
        g.set_batch('spatial_features', t)
        g.drop(t)
        ctx.bev = Dense(t, b, c, spatial[1], spatial[2])
        ctx.bev_shape = (c, spatial[1], spatial[2])
        ctx.guessing = True
    elif slot == 'BACKBONE_2D' and ctx.bev is not None:
        x = ctx.bev
        c = _hint_channels(mcfg, x.c)
        t = g.tensor(b * c * x.h * x.w, f'{name} output (guessed width {c})', FP32)
        g.set_batch('spatial_features_2d', t)
        g.drop(t)
        ctx.bev = Dense(t, b, c, x.h, x.w)
        ctx.guessing = True


def _run_module(g, slot, name, mcfg, ctx):
    fn = MODELS.get(slot, {}).get(name)
    g.begin_module(f'{slot} {name}', slot)
    if fn is None:
        _not_modelled(g, slot, name, mcfg, ctx)
    else:
        try:
            fn(g, mcfg, ctx)
        except ConfigError as err:
            if not getattr(ctx, 'guessing', False):
                raise
            # inputs guessed after an unmodelled module: do not blame this config for them
            _not_modelled(g, slot, name, mcfg, ctx, why=f'inputs unknown: {err}')
        except PcdetFocalError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError,
                ZeroDivisionError) as err:
            raise ConfigError(f'MODEL.{slot} ({name}): cannot read its config for the memory '
                              f'estimate ({type(err).__name__}: {err}); check its keys') from None
    g.end_module()


def _loss(g, ctx):
    """The detector sums every module's loss (FocalCenterPoint adds the focal loss too)."""
    g.begin_module(f'loss ({ctx.cfg.MODEL.get("NAME", "detector")})', 'LOSS')
    losses = list(ctx.losses)
    if not losses:
        # no modelled head: still run backward through what was modelled
        src = ctx.bev.t if ctx.bev is not None else (ctx.sparse.t if ctx.sparse else None)
        if src is not None:
            losses = [g.op('placeholder loss', [src], 1)]
    loss = g.op('loss sum', losses, 1) if losses else g.tensor(1, 'loss', FP32)
    for t in losses:
        g.drop(t)
    g.end_module()
    return loss


def replay(g, ctx):
    """Replay one training forward of ``ctx.cfg.MODEL``; returns the loss SymTensor."""
    model = ctx.cfg.get('MODEL')
    if not isinstance(model, dict):
        raise ConfigError(f'{ctx.cfg.get("CFG_FILE", "config")}: MODEL is missing')
    ctx.shape_line(ctx.geom.describe())
    _input_batch(g, ctx)
    for slot in SLOTS:
        mcfg = model.get(slot)
        if not mcfg:
            continue
        if not isinstance(mcfg, dict) or not mcfg.get('NAME'):
            raise ConfigError(f'MODEL.{slot}.NAME is missing')
        _run_module(g, slot, str(mcfg['NAME']), mcfg, ctx)
    return _loss(g, ctx)
