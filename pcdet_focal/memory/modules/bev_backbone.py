"""BACKBONE_2D memory models: BaseBEVBackbone and BaseBEVResBackbone (OpenPCDet keys).

BaseBEVBackbone level i: ZeroPad2d(1) -> Conv2d(3x3, stride) -> BN -> ReLU, then LAYER_NUMS[i]
x (Conv2d 3x3 -> BN -> ReLU); its deblock ConvTranspose2d(k=s, stride=s) -> BN -> ReLU (a
Conv2d(k=1/s, stride=1/s) for strides below 1); outputs concatenated on channels.
BaseBEVResBackbone level i: a BasicBlock (with a 1x1 downsample branch) then LAYER_NUMS[i]
BasicBlocks (conv-bn-relu-conv-bn, += identity, relu).
"""
from ...errors import ConfigError
from .. import layers as L


def _lists(mcfg, input_channels):
    nums = list(mcfg.get('LAYER_NUMS') or [])
    strides = list(mcfg.get('LAYER_STRIDES') or [])
    filters = list(mcfg.get('NUM_FILTERS') or [])
    ups = list(mcfg.get('UPSAMPLE_STRIDES') or [])
    up_filters = list(mcfg.get('NUM_UPSAMPLE_FILTERS') or [])
    if not (len(nums) == len(strides) == len(filters)):
        raise ConfigError(f'MODEL.BACKBONE_2D: LAYER_NUMS ({len(nums)}), LAYER_STRIDES '
                          f'({len(strides)}) and NUM_FILTERS ({len(filters)}) must have the '
                          'same length')
    if len(ups) != len(up_filters):
        raise ConfigError(f'MODEL.BACKBONE_2D: UPSAMPLE_STRIDES ({len(ups)}) and '
                          f'NUM_UPSAMPLE_FILTERS ({len(up_filters)}) must have the same length')
    if ups and len(ups) < len(nums):
        raise ConfigError(f'MODEL.BACKBONE_2D: UPSAMPLE_STRIDES has {len(ups)} entries for '
                          f'{len(nums)} levels; give one per level')
    return nums, strides, filters, ups, up_filters


def _deblock(g, x, stride, cout, label):
    if stride >= 1:
        y = L.deconv2d(g, x, cout, int(stride), int(stride), label=label)
    else:
        k = int(round(1 / stride))
        y = L.conv2d(g, x, cout, k, k, 0, label=label)
    z = L.bn2d(g, y, label=f'{label}.bn')
    g.drop(y.t)
    r = L.relu2d(g, z, label=f'{label}.relu')
    g.drop(z.t)
    return r


def _basic_block(g, x, cout, stride, downsample, label):
    """OpenPCDet's 2D BasicBlock; ``out += identity`` happens in place on bn2's output."""
    a = L.conv_bn_relu(g, x, cout, 3, stride, 1, label=f'{label}.conv1')
    c2 = L.conv2d(g, a, cout, 3, 1, 1, label=f'{label}.conv2')
    g.drop(a.t)
    out = L.bn2d(g, c2, label=f'{label}.bn2')
    g.drop(c2.t)
    if downsample:
        d = L.conv2d(g, x, cout, 1, stride, 0, label=f'{label}.downsample')
        ident = L.bn2d(g, d, label=f'{label}.downsample.bn')
        g.drop(d.t)
        g.drop(ident.t)   # added in place into ``out``; the add saves nothing
    r = L.relu2d(g, out, label=f'{label}.relu2')
    g.drop(out.t)
    return r


def _bev_backbone(g, mcfg, ctx, residual):
    x0 = ctx.bev
    if x0 is None:
        raise ConfigError('MODEL.BACKBONE_2D needs a BEV map: add a MAP_TO_BEV module')
    nums, strides, filters, ups, up_filters = _lists(mcfg, x0.c)
    x = x0
    outs, levels = [], []
    for i, (n, s, f) in enumerate(zip(nums, strides, filters)):
        lab = f'blocks.{i}'
        if residual:
            y = _basic_block(g, x, f, int(s), True, f'{lab}.0')
            for j in range(int(n)):
                z = _basic_block(g, y, f, 1, False, f'{lab}.{j + 1}')
                g.drop(y.t)
                y = z
        else:
            p = L.pad2d(g, x, 1, label=f'{lab}.pad')
            y = L.conv_bn_relu(g, p, f, 3, int(s), 0, label=f'{lab}.0')
            g.drop(p.t)
            for j in range(int(n)):
                z = L.conv_bn_relu(g, y, f, 3, 1, 1, label=f'{lab}.{j + 1}')
                g.drop(y.t)
                y = z
        x = y   # the level output stays referenced by ret_dict until forward returns
        levels.append(y)
        if ups:
            outs.append(_deblock(g, y, ups[i], up_filters[i], f'deblocks.{i}'))
        else:
            outs.append(y)
    if len(outs) > 1:
        if len({(o.h, o.w) for o in outs}) != 1:
            raise ConfigError('MODEL.BACKBONE_2D: the upsampled levels have different sizes '
                              f'{[(o.h, o.w) for o in outs]}; check UPSAMPLE_STRIDES against '
                              'LAYER_STRIDES')
        out = L.cat_channels(g, outs, label='cat')
    elif outs:
        out = outs[0]
    else:
        out = x0
    refs = {o.t.tid: o.t for o in outs + levels}
    if len(ups) > len(nums):
        extra = _deblock(g, out, ups[-1], out.c, f'deblocks.{len(nums)}')
        if out.t.tid not in refs:
            g.drop(out.t)
        out = extra
    g.set_batch('spatial_features_2d', out.t)
    # the level outputs (ret_dict), the ups list and the local ``x`` die when forward returns
    for t in refs.values():
        g.drop(t)
    if out.t.tid not in refs:
        g.drop(out.t)
    ctx.bev = out
    total_stride = 1
    for s in strides:
        total_stride *= int(s)
    up_last = ups[-1] if ups else 1
    ctx.bev_stride = ctx.bev_stride * total_stride / up_last if ups else ctx.bev_stride * total_stride
    ctx.shape_line(f'BACKBONE_2D output: {out.c} x {out.h} x {out.w} (C, H, W)')


def base_bev_backbone(g, mcfg, ctx):
    _bev_backbone(g, mcfg, ctx, residual=False)


def base_bev_res_backbone(g, mcfg, ctx):
    _bev_backbone(g, mcfg, ctx, residual=True)


MODELS = {'BaseBEVBackbone': base_bev_backbone, 'BaseBEVResBackbone': base_bev_res_backbone}
