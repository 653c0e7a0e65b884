"""Memory rule of CenterHead (see center_head.py) on the estimator's tape: the shared conv and
one conv tower per output, read from the built module; predictions and targets kept in
``forward_ret_dict`` (module state that lives into the next step); then the loss the detector
computes after every forward (sigmoid + Gaussian focal loss on the heatmap, masked L1 on the
gathered box code).
"""
HEAD_ORDER = ('center', 'center_z', 'dim', 'rot')


def _gaussian_focal_loss(tape, sig, numel, label):
    """pcdet_focal.ops.losses.gaussian_focal_loss on (B, K, H, W) heatmaps.

    Kept for backward (each heatmap-sized): clamp(p), pos / neg masks (float), log(p),
    (1 - p), (1 - p)^2, log(1 - p)'s input, log(1 - p), p^2, (1 - gt)^4."""
    pred = tape.op(f'{label} clamp', [sig], numel, save=[sig])
    pos = tape.index(numel, f'{label} pos mask', tape.FP32)
    neg = tape.index(numel, f'{label} neg mask', tape.FP32)
    # positive term: log(p) * (1 - p)^2 * pos
    lg = tape.op(f'{label} log(p)', [pred], numel, save=[pred])
    omp = tape.op(f'{label} 1 - p', [pred], numel)
    pw = tape.op(f'{label} (1 - p)^2', [omp], numel, save=[omp])
    tape.drop(omp)
    prod = tape.op(f'{label} log(p) * (1 - p)^2', [lg, pw], numel, save=[lg, pw])
    tape.drop(lg, pw)
    pl = tape.op(f'{label} * pos', [prod], numel, save=[pos])
    tape.drop(prod)
    ps = tape.op(f'{label} pos sum', [pl], 1, grad_alias=True)
    tape.drop(pl)
    # negative term: log(1 - p) * p^2 * (1 - gt)^4 * neg
    omp2 = tape.op(f'{label} 1 - p (neg)', [pred], numel)
    lg2 = tape.op(f'{label} log(1 - p)', [omp2], numel, save=[omp2])
    tape.drop(omp2)
    p2 = tape.op(f'{label} p^2', [pred], numel, save=[pred])
    prod2 = tape.op(f'{label} log(1 - p) * p^2', [lg2, p2], numel, save=[lg2, p2])
    tape.drop(lg2, p2)
    tmp = tape.index(numel, f'{label} 1 - gt', tape.FP32)
    wgt = tape.index(numel, f'{label} (1 - gt)^4', tape.FP32)
    tape.drop(tmp)
    w1 = tape.op(f'{label} * (1 - gt)^4', [prod2], numel, save=[wgt])
    tape.drop(prod2, wgt)
    nl = tape.op(f'{label} * neg', [w1], numel, save=[neg])
    tape.drop(w1)
    ns = tape.op(f'{label} neg sum', [nl], 1, grad_alias=True)
    tape.drop(nl, pos, neg, pred)
    return [ps, ns]


def center_head_memory(self, tape, flow):
    """CenterHead.memory: see the module docstring."""
    x = flow.bev
    feat = tape.run(x, self.shared_conv, 'shared_conv')
    b, h, w = x.b, x.h, x.w
    max_objs = self.num_max_objs
    all_preds = []
    for hi, (names, head) in enumerate(zip(self.class_names_each_head, self.heads_list)):
        preds = {}
        for name in head.names:
            preds[name] = tape.run(feat, getattr(head, name), f'heads_list.{hi}.{name}')
        all_preds.append((hi, names, preds))
    # forward_ret_dict = {'pred_dicts': ...}: last step's predictions and targets die here
    tape.release_prior_state()
    for hi, names, preds in all_preds:
        for name, out in preds.items():
            tape.set_state(f'pred_{hi}_{name}', out.t)
            tape.drop(out.t)
    targets = []
    for hi, names, preds in all_preds:
        # assign_center_targets: heatmap, target_boxes (8 floats), inds (int64), mask (bool)
        hm_t = tape.tensor(b * len(names) * h * w, f'head {hi} target heatmap')
        box_t = tape.tensor(b * max_objs * 8, f'head {hi} target boxes')
        ind_t = tape.index(b * max_objs, f'head {hi} target inds')
        msk_t = tape.index(b * max_objs, f'head {hi} target mask', tape.BOOL)
        for i, t in enumerate((hm_t, box_t, ind_t, msk_t)):
            tape.set_state(f'target_{hi}_{i}', t)
            tape.drop(t)
        targets.append((hm_t, box_t, ind_t, msk_t))
    tape.drop(feat.t)
    flow.losses += _center_loss(tape, all_preds, targets, HEAD_ORDER, b, h, w, max_objs)
    flow.shape_line(f'DENSE_HEAD CenterHead: {len(all_preds)} head(s) on {h} x {w} '
                    f'(FEATURE_MAP_STRIDE {self.feature_map_stride})')


def _center_loss(tape, all_preds, targets, order, b, h, w, max_objs):
    """CenterHead.get_loss, run by the detector after every module's forward."""
    losses = []
    for (hi, names, preds), (hm_t, box_t, ind_t, msk_t) in zip(all_preds, targets):
        hm = preds['hm']
        n_hm = hm.numel
        sig = tape.op(f'head {hi} sigmoid', [hm.t], n_hm, save_output=True, kind='fp32')
        losses += _gaussian_focal_loss(tape, sig, n_hm, f'head {hi} hm loss')
        tape.drop(sig)
        reg = [preds[n] for n in order]
        if not reg:
            continue
        c = sum(r.c for r in reg)
        code = tape.op(f'head {hi} cat box code', [r.t for r in reg], b * c * h * w,
                       grad_alias=True)
        gath = tape.op(f'head {hi} gather at inds', [code], b * max_objs * c, save=[ind_t])
        tape.drop(code)
        weight = tape.index(b * max_objs, f'head {hi} mask weight', tape.FP32)
        diff = tape.op(f'head {hi} pred - target', [gath], b * max_objs * c, grad_alias=True)
        tape.drop(gath)
        ab = tape.op(f'head {hi} abs', [diff], b * max_objs * c, save=[diff])
        tape.drop(diff)
        wl = tape.op(f'head {hi} * mask', [ab], b * max_objs * c, save=[weight])
        tape.drop(ab, weight)
        per_dim = tape.op(f'head {hi} reg loss sum', [wl], c, grad_alias=True)
        tape.drop(wl)
        losses.append(per_dim)
    return losses
