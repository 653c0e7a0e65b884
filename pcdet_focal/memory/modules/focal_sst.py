"""BACKBONE_3D memory models: FocalSSTEncoder and FocalSSTDSVT (pcdet_focal.models.focal_sst).

Encoder: stem SubMConv3d + BN + ReLU, then per focal block on the current N voxels:
importance SubMConv3d (K^3 outputs, its own index pairs) + bias + sigmoid, the dilation
(ops.focal_dilation, no grad: int64 coordinate / key / sort buffers over N), the spawn-target
feature scaling (N, C), a zero-padded concat to N + M rows, the block's SubMConv3d on the union
(new index pairs over N + M) + BN + ReLU; in training the importance loss: voxel-centre
targets (points_in_boxes: chunked (points x boxes) temporaries) and a sigmoid focal loss on the
N own-importance logits.

New voxels M per block: data and weight dependent, bounded by N (K^3 - 1), the grid, with
TOPK_RATIO by TOPK_RATIO x (K^3 - 1) x N, and by the module's cap MAX_NEW_VOXELS_RATIO x N
(default 1.0: a block at most doubles its input). The estimate takes the cap as the worst case;
with the cap disabled (null) it assumes 1.0 x N. ``--focal-growth`` overrides the assumption
(never above the cap); ``--measure`` re-estimates with the counts the real step produced.
"""
from ...errors import ConfigError
from .. import layers as L
from ..context import Sparse
from ..graph import BOOL, FP32, INT32, INT64
from .dsvt import dsvt as dsvt_model

DEFAULT_GROWTH = 1.0          # assumed new voxels per input voxel and block without a cap
DEFAULT_CAP = 1.0             # models.focal_sst's MAX_NEW_VOXELS_RATIO default
PIB_MAX_PAIRS = 1 << 22       # ops.points_in_boxes chunk size (points x boxes pairs)
PIB_BYTES_PER_PAIR = 26       # its per-pair temporaries: offsets (12 B), local x/y, masks


def focal_keys(mcfg, field):
    nf = mcfg.get('NUM_FILTERS')
    if not isinstance(nf, (list, tuple)) or not nf or \
            not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in nf):
        raise ConfigError(f'{field}.NUM_FILTERS={nf!r} must be a non-empty list of positive '
                          'integers (stem width, then one focal block per entry)')
    k = mcfg.get('KERNEL_SIZE', 3)
    if isinstance(k, bool) or not isinstance(k, int) or k < 3 or k % 2 == 0:
        raise ConfigError(f'{field}.KERNEL_SIZE={k!r} must be an odd integer >= 3')
    return [int(v) for v in nf], int(k), mcfg.get('TOPK_RATIO')


def new_voxel_cap(mcfg):
    """MAX_NEW_VOXELS_RATIO of a focal encoder config (None: no cap)."""
    return mcfg.get('MAX_NEW_VOXELS_RATIO', DEFAULT_CAP)


def new_voxels(n_per_sample, volume, k, topk, growth, cap=None):
    """New voxels one focal block adds to n voxels of one sample (see the module docstring)."""
    bound = n_per_sample * (k ** 3 - 1)
    if topk is not None:
        bound = min(bound, int(n_per_sample * float(topk)) * (k ** 3 - 1))
    if cap is not None:
        bound = min(bound, int(n_per_sample * float(cap)))
    return max(0, min(int(n_per_sample * float(growth)), bound, volume - n_per_sample))


def _dilation(g, n, s, m, label):
    """ops.focal_dilation temporaries (no grad); returns the union coords (N + M, 4) int32."""
    c64 = L.index_tensor(g, 4 * n, f'{label} coords.long()')
    imp = L.index_tensor(g, n, f'{label} important', BOOL)
    spawn = [L.index_tensor(g, s, f'{label} spawn {w}') for w in ('src', 'offset', 'dst')]
    target = L.index_tensor(g, 4 * s, f'{label} spawn target coords')
    keys = L.index_tensor(g, n, f'{label} voxel keys')
    srt = L.index_tensor(g, 2 * n, f'{label} sorted keys + perm')
    g.temp(2 * n * INT64, f'{label} sort buffers')
    tk = L.index_tensor(g, 2 * s, f'{label} spawn keys / search')
    union = L.index_tensor(g, 4 * (n + m), f'{label} union coords (N + M, 4)', INT32)
    g.drop(c64, keys, srt, tk, target)
    return union, imp, spawn


def _points_in_boxes_temp(g, points, boxes, label):
    pairs = min(points * boxes, max(boxes, (PIB_MAX_PAIRS // max(boxes, 1)) * boxes))
    g.temp(pairs * PIB_BYTES_PER_PAIR, f'{label} points_in_boxes chunk')


def _sigmoid_focal_loss(g, logits, n, label):
    """ops.losses.sigmoid_focal_loss(reduction='mean') on (N,) logits: ~nine N-float tensors
    kept for backward."""
    t = L.index_tensor(g, n, f'{label} targets float', FP32)
    ce = g.op(f'{label} bce_with_logits', [logits], n, save=[logits, t])
    neg = g.op(f'{label} -x', [logits], n)
    s1 = g.op(f'{label} sigmoid(-x)', [neg], n, save_output=True)
    g.drop(neg)
    a = g.op(f'{label} t * sigmoid(-x)', [s1], n, save=[t])
    g.drop(s1)
    s2 = g.op(f'{label} sigmoid(x)', [logits], n, save_output=True)
    b = g.op(f'{label} (1 - t) * sigmoid(x)', [s2], n, save=[t])
    g.drop(s2)
    omp = L.add(g, a, b, n, f'{label} 1 - p_t')
    g.drop(a, b)
    pw = g.op(f'{label} (1 - p_t)^gamma', [omp], n, save=[omp])
    g.drop(omp)
    loss = g.op(f'{label} ce * (1 - p_t)^gamma', [ce, pw], n, save=[ce, pw])
    g.drop(ce, pw)
    aw = L.index_tensor(g, n, f'{label} alpha weights', FP32)
    wl = g.op(f'{label} alpha weighting', [loss], n, save=[aw])
    g.drop(loss, aw, t)
    mean = g.op(f'{label} mean', [wl], 1)
    g.drop(wl)
    return mean


def focal_encoder(g, mcfg, ctx, field='MODEL.BACKBONE_3D'):
    src = ctx.sparse
    if src is None:
        raise ConfigError(f'{field}: the focal encoder needs voxel features from a VFE')
    widths, k, topk = focal_keys(mcfg, field)
    cap = new_voxel_cap(mcfg)
    growth = ctx.focal_growth
    if growth is None:
        growth = cap if cap is not None else DEFAULT_GROWTH
    b = ctx.batch_size
    d, h, w = src.spatial
    volume = d * h * w
    kv = k ** 3
    observed = ctx.focal_new_voxels or []
    boxes = ctx.gt_boxes
    x = Sparse(src.t, src.n, src.c, src.spatial, (1, 1, 1), src.coords, {})
    # stem: SubMConv3d + BN + ReLU
    y = L.subm_conv(g, x, widths[0], k, 'focal_stem', label='stem_conv')
    x = L.sparse_bn_relu(g, y, 'stem')
    g.drop(y.t)
    losses = []
    targets_n = 0
    n = x.n
    counts = [n // b]
    for i, cout in enumerate(widths[1:], start=1):
        label = f'blocks.{i - 1}'
        if i - 1 < len(observed):
            m = int(observed[i - 1])
        else:
            m = b * new_voxels(n // b, volume, k, topk, growth, cap)
        if boxes:
            # targets of the voxels entering this block (only the new rows are computed):
            # int64 coords and float centres of the new rows, chunked points_in_boxes
            fresh = n - targets_n
            c64 = L.index_tensor(g, 4 * fresh, f'{label} target coords.long()')
            xyz = L.index_tensor(g, 3 * fresh, f'{label} voxel centres', FP32)
            _points_in_boxes_temp(g, fresh // max(1, b), boxes, label)
            inside = L.index_tensor(g, n, f'{label} targets (N,) bool', BOOL)
            g.drop(c64, xyz)
            targets_n = n
        # importance head on the N current voxels (its own indice_key: new pairs)
        imp_out = L.subm_conv(g, x, kv, k, f'focal{i}_imp', label=f'{label}.conv_imp')
        bias = g.param(kv, f'{label}.imp_bias')
        logits = g.op(f'{label} conv_imp + bias', [imp_out.t], n * kv, params=[bias],
                      grad_alias=True)
        g.drop(imp_out.t)
        imp = g.op(f'{label} sigmoid', [logits], n * kv, save_output=True, kind='fp32')
        s = m      # spawns, after dedup >= new voxels; the model takes one spawn per new voxel
        union, important, spawn = _dilation(g, n, s, m, f'{label} dilation')
        ratio = g.op(f'{label} spawn-importance ratio', [imp], n, save=[spawn[0], spawn[1]])
        scaled = g.op(f'{label} feats * ratio', [x.t, ratio], n * x.c, save=[x.t, ratio])
        g.drop(ratio)
        zeros = g.tensor(m * x.c, f'{label} zero features of new voxels', FP32)
        feats = L.add(g, scaled, zeros, (n + m) * x.c, f'{label} cat([feats, zeros])')
        g.drop(scaled, zeros, important, *spawn, imp)
        ux = Sparse(feats, n + m, x.c, x.spatial, (1, 1, 1), union, {})
        conv = L.subm_conv(g, ux, cout, k, f'focal{i}', label=f'{label}.conv')
        g.drop(feats)
        out = L.sparse_bn_relu(g, conv, f'{label}.bn')
        g.drop(conv.t)
        if boxes:
            own = g.op(f'{label} own-importance logits', [logits], n, grad_alias=True)
            losses.append(_sigmoid_focal_loss(g, own, n, f'{label} importance loss'))
            g.drop(own)
            g.set_state(f'foreground_{i}', inside)   # kept in last_stats until next step
            g.drop(inside)
        g.drop(logits)
        # the previous tensors' index pairs live on only where autograd saved them
        for pairs in x.indice_dict.values():
            g.drop(pairs)
        g.drop(x.t)
        if x.coords is not src.coords:
            g.drop(x.coords)
        x = out
        n = out.n
        counts.append(n // b)
    for key, pairs in x.indice_dict.items():     # held by encoded_spconv_tensor
        g.set_batch(f'indice_dict.{key}', pairs)
        g.drop(pairs)
    g.set_batch('encoded_spconv_tensor', x.t)
    g.set_batch('voxel_features', x.t)
    if x.coords is not src.coords:
        g.set_batch('voxel_coords', x.coords)
        g.drop(x.coords)
    g.drop(x.t)
    if losses:
        total = g.op('focal importance loss sum', losses, 1, grad_alias=True)
        g.drop(*losses)
        ctx.losses.append(total)
    ctx.sparse = Sparse(x.t, x.n, x.c, x.spatial, (1, 1, 1), x.coords, {})
    how = 'as measured' if observed else (
        (f'worst case: capped at MAX_NEW_VOXELS_RATIO {cap:g} x N per block'
         if cap is not None and growth >= cap else f'assumed growth {growth:g} x N per block')
        + (f', TOPK_RATIO {topk}' if topk else ''))
    ctx.shape_line(f'{field} focal encoder: stride 1, sparse shape [{d}, {h}, {w}] (z, y, x); '
                   f'voxels per sample {" -> ".join(f"{c:,}" for c in counts)} ({how})')
    if not observed and cap is None:
        ctx.note(f'{field}: MAX_NEW_VOXELS_RATIO is null, so focal dilation has no cap on new '
                 f'voxels (bounded only by N x {kv - 1} and the grid); assumed {growth:g} x N '
                 'new voxels per block; set a cap to make the estimate a bound, or '
                 '--focal-growth R to change the assumption')


def focal_sst_encoder(g, mcfg, ctx):
    focal_encoder(g, mcfg, ctx, 'MODEL.BACKBONE_3D')


def focal_sst_dsvt(g, mcfg, ctx):
    fe, dv = mcfg.get('FOCAL_ENCODER'), mcfg.get('DSVT')
    for key, val in (('FOCAL_ENCODER', fe), ('DSVT', dv)):
        if not isinstance(val, dict):
            raise ConfigError(f'MODEL.BACKBONE_3D.{key} is required for FocalSSTDSVT')
    widths, _, _ = focal_keys(fe, 'MODEL.BACKBONE_3D.FOCAL_ENCODER')
    d_model = (dv.get('INPUT_LAYER') or {}).get('d_model') or []
    if d_model and int(d_model[0]) != widths[-1]:
        raise ConfigError(f'MODEL.BACKBONE_3D.FOCAL_ENCODER.NUM_FILTERS[-1]={widths[-1]} but '
                          f'MODEL.BACKBONE_3D.DSVT.INPUT_LAYER.d_model[0]={d_model[0]}; DSVT has '
                          'no input projection, so they must be equal')
    g.rename_module('BACKBONE_3D FocalSSTDSVT: focal encoder')
    focal_encoder(g, fe, ctx, 'MODEL.BACKBONE_3D.FOCAL_ENCODER')
    g.end_module()
    g.begin_module('BACKBONE_3D FocalSSTDSVT: DSVT', 'BACKBONE_3D')
    dsvt_model(g, dv, ctx, 'MODEL.BACKBONE_3D.DSVT')


MODELS = {'FocalSSTEncoder': focal_sst_encoder, 'FocalSSTDSVT': focal_sst_dsvt}

