"""BACKBONE_3D memory models of OpenPCDet's spconv backbones: VoxelBackBone8x, VoxelResBackBone8x.

Layout (OpenPCDet): conv_input SubM(C->16) | conv1 | conv2 stride 2 | conv3 stride 2 |
conv4 stride 2 (no z padding) | conv_out SparseConv3d(k=(3,1,1), stride=(2,1,1)) -> 128 channels,
spatial shape grid[::-1] + [1, 0, 0]. Every stage's sparse tensor is kept in
``multi_scale_3d_features`` (batch_dict) until the step ends.

Occupancy of strided convs is data dependent: the model assumes each strided conv keeps as
many voxels as its input (LiDAR surfaces downsampled 2x in every axis keep roughly that many),
capped by the output grid; ``--data`` does not change it.
"""
from .. import layers as L
from ..context import Sparse

STRIDED_OCCUPANCY = 1.0   # output voxels / input voxels of a stride-2 sparse conv (assumed)


def _out_voxels(sp, spatial_out, b):
    d, h, w = spatial_out
    return max(1, min(int(sp.n * STRIDED_OCCUPANCY), b * d * h * w))


def _post_act(g, x, cout, key, label, b, stride=None, padding=1, conv_type='subm'):
    if conv_type == 'subm':
        y = L.subm_conv(g, x, cout, 3, key, label=label)
    else:
        k = (3, 3, 3)
        s = (stride,) * 3
        p = padding if isinstance(padding, (tuple, list)) else (padding,) * 3
        spatial = tuple((sz + 2 * pp - kk) // ss + 1
                        for sz, kk, ss, pp in zip(x.spatial, k, s, p))
        y = L.sparse_conv(g, x, cout, k, s, p, _out_voxels(x, spatial, b), key, label=label)
    out = L.sparse_bn_relu(g, y, label)
    g.drop(y.t)
    return out


def _res_block(g, x, c, key, label):
    """SparseBasicBlock: subm-bn-relu-subm-bn, + identity (new tensor), relu."""
    a = L.subm_conv(g, x, c, 3, key, label=f'{label}.conv1', bias=True)
    a2 = L.sparse_bn_relu(g, a, f'{label}.bn1')
    g.drop(a.t)
    b = L.subm_conv(g, a2, c, 3, key, label=f'{label}.conv2', bias=True)
    g.drop(a2.t)
    bn = L.bn1d(g, b.t, b.n, c, label=f'{label}.bn2')
    g.drop(b.t)
    s = L.add(g, bn, x.t, x.n * c, label=f'{label}.add')
    g.drop(bn)
    r = L.relu(g, s, x.n * c, label=f'{label}.relu')
    g.drop(s)
    return Sparse(r, x.n, c, x.spatial, x.stride, x.coords, x.indice_dict)


def _voxel_backbone(g, mcfg, ctx, residual):
    src = ctx.sparse
    b = ctx.batch_size
    d, h, w = ctx.geom.spatial
    x = Sparse(src.t, src.n, src.c, (d + 1, h, w), (1, 1, 1), src.coords, {})
    ctx.shape_line(f'BACKBONE_3D {"VoxelResBackBone8x" if residual else "VoxelBackBone8x"}: '
                   f'sparse shape [{d + 1}, {h}, {w}] (z, y, x)')
    x = _post_act(g, x, 16, 'subm1', 'conv_input', b)
    stages = []
    if residual:
        chans = [16, 32, 64, 128]
        y = _res_block(g, x, 16, 'res1', 'conv1.0')
        z = _res_block(g, y, 16, 'res1', 'conv1.1')
        g.drop(x.t, y.t)
        x = z
    else:
        chans = [16, 32, 64, 64]
        y = _post_act(g, x, 16, 'subm1', 'conv1.0', b)
        g.drop(x.t)
        x = y
    stages.append(x)
    pads = [1, 1, (0, 1, 1)]
    for i, (cout, pad) in enumerate(zip(chans[1:], pads), start=2):
        y = _post_act(g, x, cout, f'spconv{i}', f'conv{i}.0', b, stride=2, padding=pad,
                      conv_type='spconv')
        for j in (1, 2):
            if residual:
                z = _res_block(g, y, cout, f'res{i}', f'conv{i}.{j}')
            else:
                z = _post_act(g, y, cout, f'subm{i}', f'conv{i}.{j}', b)
            g.drop(y.t)
            y = z
        stages.append(y)
        x = y
    last_pad = mcfg.get('last_pad', 0)
    p = (last_pad, 0, 0) if isinstance(last_pad, int) else tuple(last_pad)
    k, s = (3, 1, 1), (2, 1, 1)
    spatial = tuple((sz + 2 * pp - kk) // ss + 1 for sz, kk, ss, pp in zip(x.spatial, k, s, p))
    out = L.sparse_conv(g, x, 128, k, s, p, _out_voxels(x, spatial, b),
                        'spconv_down2', label='conv_out')
    out2 = L.sparse_bn_relu(g, out, 'conv_out')
    g.drop(out.t)
    for i, st in enumerate(stages):
        g.set_batch(f'multi_scale_3d_features.x_conv{i + 1}', st.t)
        g.drop(st.t)
    for key, pairs in out2.indice_dict.items():   # the pairs live with the sparse tensors
        g.set_batch(f'indice_dict.{key}', pairs)
        g.drop(pairs)
    g.set_batch('encoded_spconv_tensor', out2.t)
    g.drop(out2.t)
    out2.stride = (out2.stride[0], 8, 8)
    ctx.sparse = out2
    ctx.shape_line(f'BACKBONE_3D output: {out2.c} channels at [{", ".join(map(str, out2.spatial))}]'
                   f' (z, y, x), stride 8; {out2.n:,} voxels over the batch (assumed)')


def voxel_backbone_8x(g, mcfg, ctx):
    _voxel_backbone(g, mcfg, ctx, residual=False)


def voxel_res_backbone_8x(g, mcfg, ctx):
    _voxel_backbone(g, mcfg, ctx, residual=True)


MODELS = {'VoxelBackBone8x': voxel_backbone_8x, 'VoxelResBackBone8x': voxel_res_backbone_8x}
