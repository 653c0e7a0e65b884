"""DENSE_HEAD memory models: CenterHead and AnchorHeadSingle (training forward + loss).

Both heads keep their predictions and targets in ``forward_ret_dict`` (module state that lives
into the next step) and compute the loss from it after the forward.
"""
from ...errors import ConfigError
from .. import layers as L
from ..graph import BOOL, FP32, INT32, INT64



# ---------------------------------------------------------------------------- CenterHead
def _heads_each(mcfg, ctx):
    each = mcfg.get('CLASS_NAMES_EACH_HEAD')
    if not each:
        return [list(ctx.class_names) or ['object']]
    return [list(h) for h in each]


def _gaussian_focal_loss(g, sig, gt, numel, label):
    """pcdet_focal.ops.losses.gaussian_focal_loss on (B, K, H, W) heatmaps.

    Kept for backward (each heatmap-sized): clamp(p), pos / neg masks (float), log(p),
    (1 - p), (1 - p)^2, log(1 - p)'s input, log(1 - p), p^2, (1 - gt)^4."""
    pred = g.op(f'{label} clamp', [sig], numel, save=[sig])
    pos = L.index_tensor(g, numel, f'{label} pos mask', FP32)
    neg = L.index_tensor(g, numel, f'{label} neg mask', FP32)
    # positive term: log(p) * (1 - p)^2 * pos
    lg = g.op(f'{label} log(p)', [pred], numel, save=[pred])
    omp = g.op(f'{label} 1 - p', [pred], numel)
    pw = g.op(f'{label} (1 - p)^2', [omp], numel, save=[omp])
    g.drop(omp)
    prod = g.op(f'{label} log(p) * (1 - p)^2', [lg, pw], numel, save=[lg, pw])
    g.drop(lg, pw)
    pl = g.op(f'{label} * pos', [prod], numel, save=[pos])
    g.drop(prod)
    ps = g.op(f'{label} pos sum', [pl], 1, grad_alias=True)
    g.drop(pl)
    # negative term: log(1 - p) * p^2 * (1 - gt)^4 * neg
    omp2 = g.op(f'{label} 1 - p (neg)', [pred], numel)
    lg2 = g.op(f'{label} log(1 - p)', [omp2], numel, save=[omp2])
    g.drop(omp2)
    p2 = g.op(f'{label} p^2', [pred], numel, save=[pred])
    prod2 = g.op(f'{label} log(1 - p) * p^2', [lg2, p2], numel, save=[lg2, p2])
    g.drop(lg2, p2)
    tmp = L.index_tensor(g, numel, f'{label} 1 - gt', FP32)
    wgt = L.index_tensor(g, numel, f'{label} (1 - gt)^4', FP32)
    g.drop(tmp)
    w1 = g.op(f'{label} * (1 - gt)^4', [prod2], numel, save=[wgt])
    g.drop(prod2, wgt)
    nl = g.op(f'{label} * neg', [w1], numel, save=[neg])
    g.drop(w1)
    ns = g.op(f'{label} neg sum', [nl], 1, grad_alias=True)
    g.drop(nl, pos, neg, pred)
    return [ps, ns]


def center_head(g, mcfg, ctx):
    """pcdet_focal.models.center_head.CenterHead (OpenPCDet's layout): shared conv, one
    conv tower per output, targets and predictions kept in forward_ret_dict, then the loss
    (sigmoid + Gaussian focal loss on the heatmap, masked L1 on the gathered box code)."""
    x = ctx.bev
    if x is None:
        raise ConfigError('MODEL.DENSE_HEAD CenterHead needs spatial_features_2d: add a '
                          'BACKBONE_2D or MAP_TO_BEV module')
    shared = int(mcfg.get('SHARED_CONV_CHANNEL', 64))
    bias = bool(mcfg.get('USE_BIAS_BEFORE_NORM', False))
    sep = mcfg.get('SEPARATE_HEAD_CFG') or {}
    head_dict = dict(sep.get('HEAD_DICT') or {})
    order = [n for n in (sep.get('HEAD_ORDER') or head_dict.keys()) if n in head_dict]
    tcfg = mcfg.get('TARGET_ASSIGNER_CONFIG') or {}
    max_objs = int(tcfg.get('NUM_MAX_OBJS', 500))
    hm_conv = int(mcfg.get('NUM_HM_CONV', 2))
    feat = L.conv_bn_relu(g, x, shared, 3, 1, 1, bias=bias, label='shared_conv')
    b, h, w = x.b, x.h, x.w
    heads = _heads_each(mcfg, ctx)
    all_preds = []
    for hi, names in enumerate(heads):
        branches = dict(head_dict)
        branches['hm'] = {'out_channels': len(names), 'num_conv': hm_conv}
        preds = {}
        for name, spec in branches.items():
            y = feat
            for j in range(int(spec.get('num_conv', 2)) - 1):
                z = L.conv_bn_relu(g, y, shared, 3, 1, 1, bias=bias,
                                   label=f'heads_list.{hi}.{name}.{j}')
                if y is not feat:
                    g.drop(y.t)
                y = z
            out = L.conv2d(g, y, int(spec['out_channels']), 3, 1, 1, bias=True,
                           label=f'heads_list.{hi}.{name}.out')
            if y is not feat:
                g.drop(y.t)
            preds[name] = out
        all_preds.append((hi, names, preds))
    # forward_ret_dict = {'pred_dicts': ...}: last step's predictions and targets die here
    g.release_prior_state()
    for hi, names, preds in all_preds:
        for name, out in preds.items():
            g.set_state(f'pred_{hi}_{name}', out.t)
            g.drop(out.t)
    targets = []
    for hi, names, preds in all_preds:
        # assign_center_targets: heatmap, target_boxes (8 floats), inds (int64), mask (bool)
        hm_t = g.tensor(b * len(names) * h * w, f'head {hi} target heatmap', FP32)
        box_t = g.tensor(b * max_objs * 8, f'head {hi} target boxes', FP32)
        ind_t = g.tensor(b * max_objs, f'head {hi} target inds', INT64)
        msk_t = g.tensor(b * max_objs, f'head {hi} target mask', BOOL)
        for i, t in enumerate((hm_t, box_t, ind_t, msk_t)):
            g.set_state(f'target_{hi}_{i}', t)
            g.drop(t)
        targets.append((hm_t, box_t, ind_t, msk_t))
    g.drop(feat.t)
    ctx.losses += _center_loss(g, all_preds, targets, order, b, h, w, max_objs)
    ctx.shape_line(f'DENSE_HEAD CenterHead: {len(heads)} head(s) on {h} x {w} '
                   f'(FEATURE_MAP_STRIDE {tcfg.get("FEATURE_MAP_STRIDE")})')


def _center_loss(g, all_preds, targets, order, b, h, w, max_objs):
    """CenterHead.get_loss, run by the detector after every module's forward."""
    losses = []
    for (hi, names, preds), (hm_t, box_t, ind_t, msk_t) in zip(all_preds, targets):
        hm = preds['hm']
        n_hm = hm.numel
        sig = g.op(f'head {hi} sigmoid', [hm.t], n_hm, save_output=True, kind='fp32')
        losses += _gaussian_focal_loss(g, sig, hm_t, n_hm, f'head {hi} hm loss')
        g.drop(sig)
        reg = [preds[n] for n in order]
        if not reg:
            continue
        c = sum(r.c for r in reg)
        code = g.op(f'head {hi} cat box code', [r.t for r in reg], b * c * h * w,
                    grad_alias=True)
        gath = g.op(f'head {hi} gather at inds', [code], b * max_objs * c, save=[ind_t])
        g.drop(code)
        weight = L.index_tensor(g, b * max_objs, f'head {hi} mask weight', FP32)
        diff = g.op(f'head {hi} pred - target', [gath], b * max_objs * c, grad_alias=True)
        g.drop(gath)
        ab = g.op(f'head {hi} abs', [diff], b * max_objs * c, save=[diff])
        g.drop(diff)
        wl = g.op(f'head {hi} * mask', [ab], b * max_objs * c, save=[weight])
        g.drop(ab, weight)
        per_dim = g.op(f'head {hi} reg loss sum', [wl], c, grad_alias=True)
        g.drop(wl)
        losses.append(per_dim)
    return losses


# ---------------------------------------------------------------------------- AnchorHead
def anchor_head_single(g, mcfg, ctx):
    x = ctx.bev
    if x is None:
        raise ConfigError('MODEL.DENSE_HEAD AnchorHeadSingle needs spatial_features_2d')
    gens = list(mcfg.get('ANCHOR_GENERATOR_CONFIG') or [])
    num_class = max(1, len(ctx.class_names))
    per_loc = 0
    for gen in gens:
        per_loc += (len(gen.get('anchor_rotations', [0, 1.57])) * len(gen.get('anchor_sizes', [[1, 1, 1]]))
                    * len(gen.get('anchor_bottom_heights', [0])))
    per_loc = per_loc or 2 * num_class
    tac = mcfg.get('TARGET_ASSIGNER_CONFIG') or {}
    code_size = 7 + int((tac.get('BOX_CODER_CONFIG') or {}).get('code_size', 7) - 7)
    dir_bins = int(mcfg.get('NUM_DIR_BINS', 2)) if mcfg.get('USE_DIRECTION_CLASSIFIER') else 0
    b, h, w = x.b, x.h, x.w
    anchors = h * w * per_loc
    # anchors live on the device for the whole run (a module attribute, not a parameter)
    g.param(anchors * code_size, 'anchors', trainable=False)
    outs = []
    for name, cout in (('conv_cls', per_loc * num_class), ('conv_box', per_loc * code_size),
                       ('conv_dir_cls', per_loc * dir_bins)):
        if cout == 0:
            continue
        y = L.conv2d(g, x, cout, 1, 1, 0, bias=True, label=name)
        perm = g.op(f'{name} permute.contiguous', [y.t], y.numel)
        g.drop(y.t)
        g.set_state(f'{name}_preds', perm)
        outs.append((name, perm, cout))
    # target assignment: per class, an IoU matrix anchors x gt boxes (transient)
    per_class_anchors = h * w * max(1, per_loc // num_class)
    g.temp(per_class_anchors * ctx.gt_boxes * FP32 * 2, 'anchor/gt IoU matrices')
    labels = g.tensor(b * anchors, 'box_cls_labels', INT32)
    targets = g.tensor(b * anchors * code_size, 'box_reg_targets', FP32)
    weights = g.tensor(b * anchors, 'reg_weights', FP32)
    for i, t in enumerate((labels, targets, weights)):
        g.set_state(f'targets_{i}', t)
        g.drop(t)
    losses = []
    for name, pred, cout in outs:
        numel = b * h * w * cout
        # sigmoid focal (cls), smooth-L1 with sin difference (box), cross-entropy (dir):
        # about six same-size tensors saved for backward per branch
        saved = [g.op(f'{name} loss term {k}', [pred], numel, save=[pred]) for k in range(3)]
        s = g.op(f'{name} loss', saved, 1, save=saved)
        g.drop(*saved)
        losses.append(s)
        g.drop(pred)
    ctx.losses += losses


MODELS = {'CenterHead': center_head, 'AnchorHeadSingle': anchor_head_single}
