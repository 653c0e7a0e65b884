"""Memory rules of FocalSSTEncoder and FocalSSTDSVT (see focal_sst.py): what one training
forward allocates and what autograd keeps, replayed on the estimator's tape.

Per focal block on the N current voxels of a sample: importance SubMConv3d (K^3 outputs, its
own index pairs) + bias + sigmoid; the dilation (ops.focal_dilation, no grad: int64 spawn
buffers of S spawn candidates, coordinate / key / sort buffers over N); the spawn-target
feature scaling; a zero-padded concat to N + M rows; the block's SubMConv3d on the union (new
index pairs) + BN + ReLU; in training the importance loss (voxel-centre targets by chunked
points_in_boxes, a sigmoid focal loss on the N own-importance logits).

M (new voxels) and S (spawns) depend on the data and the weights. Without a checkpoint the
worst case the module allows is taken: every voxel important and every offset passing, then
TOPK_RATIO and the MAX_NEW_VOXELS_RATIO cap, computed with the module's own dilation op on
the counted frames (or from the cap alone without frames). No cap (null) means no bound.
The dilation's working set is replayed op by op from its counts (:class:`DilationCounts`):
its int64 candidate tensors scale with the spawn candidates *before* the cap (every important
voxel x every passing offset), not with the spawns the cap keeps. ``--measure`` records those
counts from the real step (:func:`probe_dilation`).
"""
import math
from typing import NamedTuple

import numpy as np
import torch

from ..ops.focal_dilation import focal_dilation, select_important

PIB_MAX_PAIRS = 1 << 22       # ops.points_in_boxes chunk size (points x boxes pairs)
PIB_BYTES_PER_PAIR = 26       # its per-pair temporaries: offsets (12 B), local x/y, masks
class DilationCounts(NamedTuple):
    """What ops.focal_dilation allocates depends on, for one block over the batch."""

    important: int    # I: voxels that spawn
    raw: int          # R: spawn candidates (I x offsets passing), outside the grid included
    inside: int       # S0: candidates inside the grid
    miss: int         # Mi: candidates not landing on an input voxel
    unique: int       # U: distinct new voxels before the cap
    spawns: int       # S: spawns the cap keeps
    miss_kept: int    # Mi': kept spawns landing on a new voxel
    new: int          # M: new voxels kept

    def times(self, b):
        """The counts of ``b`` samples like this one."""
        return DilationCounts(*(b * v for v in self))


def dilation_counts(coords, importance, spatial, threshold, topk, cap):
    """DilationCounts of ``focal_dilation(coords, importance, spatial, threshold, topk, cap)``
    (runs the op without and with the cap). coords (N, 4) [b, z, y, x]; importance (N, K^3)."""
    n = coords.shape[0]
    important = select_important(importance[:, -1], coords[:, 0].long(), threshold, topk)
    raw = int((importance[important, :-1] >= threshold).sum())
    free = focal_dilation(coords, importance, spatial, threshold, topk, None)
    kept = free if cap is None else focal_dilation(coords, importance, spatial, threshold,
                                                   topk, cap)
    return DilationCounts(int(important.sum()), raw, int(free.spawn_src.numel()),
                          int((free.spawn_dst >= n).sum()), int(free.num_new),
                          int(kept.spawn_src.numel()), int((kept.spawn_dst >= n).sum()),
                          int(kept.num_new))


def _worst(every, n, k, topk, cap):
    """The worst DilationCounts a block allows on N = ``n`` voxels (one sample), from
    ``every``: the counts with every voxel important and every offset passing, no cap.

    With TOPK_RATIO only I = floor(N x ratio) voxels spawn: at most I x (K^3 - 1) candidates,
    and never more (inside, landing on inputs, missing, new) than all voxels together make.
    The cap keeps M = min(U, floor(N x ratio)) new voxels; each receives at most K^3 - 1
    spawns and each dropped one took at least one with it, which bounds the kept spawns that
    miss. Each count is bounded on its own (the spawns landing on inputs and those missing
    them may not both reach their bound): every tensor the replay sizes by them is bounded."""
    important = n if topk is None else int(math.floor(n * topk))
    raw = every.raw if topk is None else min(every.raw, important * (k ** 3 - 1))
    inside = min(every.inside, raw)
    hits = min(every.inside - every.miss, inside)
    miss = min(every.miss, inside)
    unique = min(every.unique, miss)
    new = unique if cap is None else min(unique, int(math.floor(n * cap)))
    kept_miss = min(miss - (unique - new), new * (k ** 3 - 1))
    return DilationCounts(important, raw, inside, miss, unique, hits + kept_miss, kept_miss,
                          new)


def _spread(frame, new, width, m):
    """The ``m`` of the candidate new voxels ``new`` ((U, 3) [z, y, x]) that occupy the most
    BEV columns: first one per column no input voxel occupies, then one per other column,
    then the rest (what the cap keeps depends on the weights; counts downstream of the block
    (merged cells, DSVT sets, BEV columns) are largest for the most spread-out choice)."""
    cols = new[:, 1] * width + new[:, 2]
    first = np.zeros(len(new), dtype=bool)
    first[np.unique(cols, return_index=True)[1]] = True
    fresh = ~np.isin(cols, frame[:, 1] * width + frame[:, 2])
    rank = np.where(first & fresh, 0, np.where(first, 1, 2))
    return new[np.argsort(rank, kind='stable')[:m]]


def worst_dilation(frame, spatial, k, topk, cap):
    """One focal block at its worst on one frame (:func:`_worst`).

    frame: (n, 3) int64 [z, y, x]. Returns (union (n + m, 3) int64, m new voxels, s spawns,
    DilationCounts): the union is the input and the m most spread-out voxels every voxel
    would spawn (:func:`_spread`)."""
    n = len(frame)
    coords = torch.zeros((n, 4), dtype=torch.long)
    coords[:, 1:] = torch.as_tensor(frame)
    dil = focal_dilation(coords, torch.ones((n, k ** 3)), spatial, 0.0)
    miss = int((dil.spawn_dst >= n).sum())
    m, s = int(dil.num_new), int(dil.spawn_src.numel())
    counts = _worst(DilationCounts(n, n * (k ** 3 - 1), s, miss, m, s, miss, m), n, k, topk, cap)
    new = _spread(np.asarray(frame), dil.coords[n:, 1:].long().numpy(), spatial[2], counts.new)
    return np.concatenate([np.asarray(frame), new]), counts.new, counts.spawns, counts


def probe_dilation(block, stash):
    """Forward hook on FocalBlock ``block``'s importance conv for ``--measure``: keeps numpy
    copies of its input voxels and importance logits in ``stash[block]`` (numpy memory, so
    the measured peak of live torch tensors is untouched); :func:`probed_counts` turns them
    into DilationCounts after the step. Returns the hook handle."""
    def hook(_conv, args, out):
        x = args[0]
        stash.setdefault(block, []).append(
            (x.indices.detach().cpu().numpy().copy(), out.features.detach().cpu().numpy().copy(),
             [int(v) for v in x.spatial_shape]))
    return block.conv_imp.register_forward_hook(hook)


def probed_counts(stash):
    """[DilationCounts as a list] per probed block (in probing order), the largest of each
    count over the block's calls: the focal_dilation calls of the measured steps rerun."""
    out = []
    for block, calls in stash.items():
        bias = block.imp_bias.detach().cpu().float()
        per_call = []
        for indices, logits, spatial in calls:
            importance = torch.sigmoid(torch.from_numpy(logits).float() + bias)
            per_call.append(dilation_counts(torch.from_numpy(indices), importance, spatial,
                                            block.threshold, block.topk_ratio,
                                            block.max_new_ratio))
        out.append([max(c[f] for c in per_call) for f in range(len(DilationCounts._fields))])
    return out


def _grow(frames, spatial, k, topk, cap):
    """:func:`worst_dilation` of every frame: ([(union, m, s)], [union per frame])."""
    grown = [worst_dilation(f, spatial, k, topk, cap) for f in frames]
    return grown, [g[0] for g in grown]


def worst_counts(n, volume, k, topk, cap):
    """DilationCounts without frames (:func:`_worst`): every candidate inside the grid and
    landing on a distinct new voxel."""
    raw = n * (k ** 3 - 1)
    unique = min(raw, max(0, volume - n))
    return _worst(DilationCounts(n, raw, raw, raw, unique, raw, raw, unique), n, k, topk, cap)


def seen_counts(n, m, s):
    """DilationCounts when only the new voxels ``m`` and kept spawns ``s`` are known (a
    checkpoint's growth): the cap taken as not binding, every spawn missing the inputs."""
    return DilationCounts(min(n, s), s, s, s, m, s, s, m)


def _points_in_boxes_temp(tape, points, boxes, label):
    pairs = min(points * boxes, max(boxes, (PIB_MAX_PAIRS // max(boxes, 1)) * boxes))
    tape.temp(pairs * PIB_BYTES_PER_PAIR, f'{label} points_in_boxes chunk')


def _sigmoid_focal_loss(tape, logits, n, label):
    """ops.losses.sigmoid_focal_loss(reduction='sum') / normaliser on (N,) logits."""
    t = tape.tensor(n, f'{label} targets float')
    ce = tape.op(f'{label} bce_with_logits', [logits], n, save=[logits, t])
    neg = tape.op(f'{label} -x', [logits], n)
    s1 = tape.op(f'{label} sigmoid(-x)', [neg], n, save_output=True)
    tape.drop(neg)
    a = tape.op(f'{label} t * sigmoid(-x)', [s1], n, save=[t])
    tape.drop(s1)
    s2 = tape.op(f'{label} sigmoid(x)', [logits], n, save_output=True)
    b = tape.op(f'{label} (1 - t) * sigmoid(x)', [s2], n, save=[t])
    tape.drop(s2)
    omp = tape.add(a, b, n, f'{label} 1 - p_t')
    tape.drop(a, b)
    pw = tape.op(f'{label} (1 - p_t)^gamma', [omp], n, save=[omp])
    tape.drop(omp)
    loss = tape.op(f'{label} ce * (1 - p_t)^gamma', [ce, pw], n, save=[ce, pw])
    tape.drop(ce, pw)
    aw = tape.tensor(n, f'{label} alpha weights')
    wl = tape.op(f'{label} alpha weighting', [loss], n, save=[aw])
    tape.drop(loss, aw, t)
    total = tape.op(f'{label} sum / normaliser', [wl], 1)
    tape.drop(wl)
    return total


def _masked(tape, count, width, label):
    """``t[mask]`` of a bool mask with ``count`` hits: nonzero indices (freed), (count, width)
    int64 result."""
    idx = tape.index(count, f'{label} nonzero')
    out = tape.index(count * width, label)
    tape.drop(idx)
    return out


def _linear_keys(tape, rows, label):
    """ops.focal_dilation.linear_keys: ((b * D + z) * H + y) * W + x on int64, one temp."""
    key = tape.index(rows, f'{label} keys')
    tape.temp(rows * tape.INT64, f'{label} key temp')
    return key


def _dilation(tape, n, cnt, k, topk, capped, label):
    """ops.focal_dilation (no grad) replayed from its counts ``cnt`` (DilationCounts over the
    batch, N = ``n`` input voxels); returns the union coords (N + M, 4) int32 and what the
    block keeps (important, [spawn src, offset, dst]). Mirrors the op line by line: the int64
    candidate tensors over R / S0 spawns dominate; ``rows, offset`` (its nonzero) live until
    it returns."""
    i_, r, s0, mi, u, s, mi2, m = cnt
    bool_ = tape.BOOL
    lab = f'{label} dilation'
    c = tape.index(4 * n, f'{lab} coords.long()')
    if topk is not None:       # select_important's per-sample ranking (sorts, ranks over N)
        tape.temp(6 * n * tape.INT64, f'{lab} top-k ranking')
    important = tape.index(n, f'{label} important', bool_)
    src = tape.index(i_, f'{lab} src')
    cand = tape.tensor(i_ * (k ** 3 - 1), f'{lab} importance[src, :-1]')
    passing = tape.index(i_ * (k ** 3 - 1), f'{lab} >= threshold', bool_)
    tape.drop(cand)
    rows = tape.index(2 * r, f'{lab} nonzero (rows, offset)')
    tape.drop(passing)
    spawn_src = tape.index(r, f'{lab} spawn_src')
    picked = tape.index(4 * r, f'{lab} c[spawn_src]')
    target = tape.index(4 * r, f'{lab} target')
    tape.drop(picked)
    tape.temp(3 * r * tape.INT64, f'{lab} kernel_offsets[offset]')
    lo, hi = (tape.index(3 * r, f'{lab} inside test {w}', bool_) for w in ('>= 0', '< shape'))
    both = tape.index(3 * r, f'{lab} inside test &', bool_)
    tape.drop(lo, hi)
    inside = tape.index(r, f'{lab} inside', bool_)
    tape.drop(both)
    kept = [_masked(tape, s0, w, f'{lab} {name}[inside]')
            for name, w in (('spawn_src', 1), ('offset', 1), ('target', 4))]
    tape.drop(spawn_src, target, inside, src)
    spawn_src, offset, target = kept
    keys = _linear_keys(tape, n, f'{lab} input')
    sorted_keys = tape.index(n, f'{lab} sorted keys')
    perm = tape.index(n, f'{lab} sort perm')
    tape.temp(n * tape.INT64 + n, f'{lab} sort / duplicate check')
    tkeys = _linear_keys(tape, s0, f'{lab} target')
    spawn_dst = tape.index(s0, f'{lab} spawn_dst')
    pos = tape.index(s0, f'{lab} searchsorted')
    found = tape.index(s0, f'{lab} sorted_keys[pos]')
    hit = tape.index(s0, f'{lab} hit', bool_)
    tape.drop(found)
    hits = s0 - mi
    tape.temp(3 * hits * tape.INT64, f'{lab} spawn_dst[hit] = perm[pos[hit]]')

    def misses(count, rows_, label_):
        flip = tape.index(rows_, f'{label_} ~hit', bool_)
        miss = tape.index(count, f'{label_} miss')
        tape.drop(flip)
        tkm = tape.index(count, f'{label_} tkeys[miss]')
        tape.temp(3 * count * tape.INT64, f'{label_} unique sort')
        return miss, tkm

    miss, tkm = misses(mi, s0, lab)
    uniq = tape.index(u, f'{lab} unique')
    inverse = tape.index(mi, f'{lab} inverse')
    tape.drop(tkm)
    held = []                  # the cap's locals: alive until the op returns
    first_cap = None
    if capped and u:
        picks = [tape.index(mi, f'{lab} cap {w}[miss]') for w in ('spawn_src', 'offset')]
        score = tape.tensor(mi, f'{lab} cap score')
        tape.drop(*picks)
        best = tape.tensor(u, f'{lab} cap best score')
        first_cap = tape.index(u, f'{lab} cap first spawn')
        tape.temp(7 * u * tape.INT64, f'{lab} _cap_new_voxels ranking')
        keep_new = tape.index(u, f'{lab} cap keep_new', bool_)
        held = [score, best, keep_new]
        if m < u:
            keep = tape.index(s0, f'{lab} cap keep', bool_)
            tape.temp(2 * mi + 2 * (mi - mi2) * tape.INT64, f'{lab} cap dropped spawns')
            again = [_masked(tape, s, w, f'{lab} {name}[keep]')
                     for name, w in (('spawn_src', 1), ('offset', 1), ('target', 4))]
            tape.drop(spawn_src, offset, target)
            spawn_src, offset, target = again
            again = [_masked(tape, s, 1, f'{lab} tkeys[keep]'),
                     tape.index(s, f'{lab} hit[keep]', bool_),
                     _masked(tape, s, 1, f'{lab} spawn_dst[keep]')]
            tape.drop(tkeys, hit, spawn_dst)
            tkeys, hit, spawn_dst = again
            held.append(keep)
            old = miss
            miss, tkm = misses(mi2, s, f'{lab} (capped)')
            tape.drop(old)
            olds = uniq, inverse
            uniq = tape.index(m, f'{lab} unique (capped)')
            inverse = tape.index(mi2, f'{lab} inverse (capped)')
            tape.drop(tkm, *olds)
    first = tape.index(m, f'{lab} first spawn')
    tape.drop(first_cap)
    tape.temp(2 * m * tape.INT64, f'{lab} argsort(first)')
    by_first = tape.index(m, f'{lab} by_first')
    rank = tape.index(m, f'{lab} rank')
    tape.temp(m * tape.INT64, f'{lab} arange')
    tape.temp(2 * (mi2 if capped else mi) * tape.INT64, f'{lab} n + rank[inverse]')
    fb = tape.index(m, f'{lab} first[by_first]')
    new_coords = tape.index(4 * m, f'{lab} target[first[by_first]]')
    tape.drop(fb)
    union64 = tape.index(4 * (n + m), f'{lab} cat([c, new])')
    tape.drop(new_coords)
    union = tape.index(4 * (n + m), f'{label} union coords (N + M, 4)', tape.INT32)
    tape.drop(union64, c, rows, target, keys, sorted_keys, perm, tkeys, pos, hit, miss, uniq,
              inverse, first, by_first, rank, *held)
    return union, important, [spawn_src, offset, spawn_dst]


def _scale_spawn_targets(tape, x, imp, n, hits, label):
    """FocalBlock._scale_spawn_targets on the Sparse ``x``: the ``hits`` spawns landing on
    input voxels (all of them taken as landing on important ones) gather their importance
    (autograd keeps the two index tensors), sum and count per voxel, then scale the features.
    Returns the scaled (N, C) features."""
    tape.temp(3 * hits * tape.INT64, f'{label} spawn_dst < N selection')
    picked = [_masked(tape, hits, 1, f'{label} spawn {w}[on_input]') for w in ('dst', 'src', 'off')]
    dst, src, off = picked
    vals = tape.op(f'{label} imp[src, off]', [imp], hits, save=[src, off])
    ones = tape.tensor(hits, f'{label} ones_like(vals)')
    total = tape.op(f'{label} index_add(vals)', [vals], n, save=[dst])
    count = tape.tensor(n, f'{label} index_add(ones)')
    tape.drop(vals, ones, dst, src, off)
    ratio = tape.op(f'{label} spawn-importance ratio', [total], n, save=[count])
    tape.drop(total, count)
    scaled = tape.op(f'{label} feats * ratio', [x.t, ratio], n * x.c, save=[x.t, ratio])
    tape.drop(ratio)
    return scaled


def _block_counts(i, n, b, spatial, k, topk, cap, grown, observed, observed_new,
                  observed_spawns):
    """DilationCounts of focal block ``i`` over the batch (N = ``n`` voxels entering it): as
    measured (``--measure``), on the frames (the worst case, or a checkpoint's growth), else
    the worst case on N voxels."""
    if i < len(observed):
        return DilationCounts(*(int(v) for v in observed[i]))
    if i < len(observed_new):
        spawns = observed_spawns[i] if i < len(observed_spawns) else observed_new[i]
        return seen_counts(n, int(observed_new[i]), int(spawns))
    if grown:
        if all(len(g) > 3 for g in grown):
            return DilationCounts(*(max(g[3][f] for g in grown)
                                    for f in range(len(DilationCounts._fields)))).times(b)
        return seen_counts(n, b * max(g[1] for g in grown), b * max(g[2] for g in grown))
    d, h, w = spatial
    return worst_counts(n // b, d * h * w, k, topk, cap).times(b)


def encoder_memory(self, tape, flow, label='BACKBONE_3D'):
    """FocalSSTEncoder.memory: see the module docstring."""
    src = flow.sparse
    cfg = self.cfg
    b, k, topk, cap = flow.batch_size, cfg.KERNEL_SIZE, cfg.TOPK_RATIO, cfg.MAX_NEW_VOXELS_RATIO
    kv = k ** 3
    d, h, w = src.spatial
    observed_new = flow.observed.get('focal_new_voxels') or []
    observed_spawns = flow.observed.get('focal_spawns') or []
    trained = flow.observed.get('focal_frames') or []   # --ckpt: per block, per frame
    boxes = flow.gt_boxes if self.training else 0
    x = src.like(src.t, src.c)
    x.indice_dict = {}
    stem = tape.subm(x, self.stem_conv, 'stem_conv', hot=flow.hot_pairs(x, k))
    x = tape.sparse_bn_relu(stem, self.stem_bn, 'stem')
    tape.drop(stem.t)
    losses, targets_n, frames = [], 0, src.frames
    held = []     # forward's local ``dil`` keeps the last block's dilation outputs
    n = x.n
    sizes = [n // b]
    observed_dil = flow.observed.get('focal_dilation') or []     # --measure: per block
    for i, block in enumerate(self.blocks):
        lab = f'blocks.{i}'
        if i < len(trained):
            grown = trained[i]
            grown_frames = [g[0] for g in grown]
        elif frames:
            grown, grown_frames = flow.cached(('focal', id(frames), (d, h, w), k, topk, cap),
                                              lambda: _grow(frames, (d, h, w), k, topk, cap))
        else:
            grown, grown_frames = [], None
        cnt = _block_counts(i, n, b, (d, h, w), k, topk, cap, grown, observed_dil,
                            observed_new, observed_spawns)
        m, s = cnt.new, cnt.spawns
        if boxes:
            # targets of the voxels entering this block (only the new rows are computed)
            fresh = n - targets_n
            c64 = tape.index(4 * fresh, f'{lab} target coords.long()')
            xyz = tape.tensor(3 * fresh, f'{lab} voxel centres')
            _points_in_boxes_temp(tape, fresh // max(1, b), boxes, lab)
            inside = tape.index(n, f'{lab} targets (N,) bool', tape.BOOL)
            tape.drop(c64, xyz)
            targets_n = n
        imp_out = tape.subm(x, block.conv_imp, f'{lab}.conv_imp', hot=flow.hot_pairs(x, k))
        bias = tape.param(block.imp_bias, f'{lab}.imp_bias')
        logits = tape.op(f'{lab} conv_imp + bias', [imp_out.t], n * kv, params=[bias],
                         grad_alias=True)
        tape.drop(imp_out.t)
        imp = tape.op(f'{lab} sigmoid', [logits], n * kv, save_output=True, kind='fp32')
        union, important, spawn = _dilation(tape, n, cnt, k, topk, cap is not None, lab)
        scaled = _scale_spawn_targets(tape, x, imp, n, cnt.spawns - cnt.miss_kept, lab)
        zeros = tape.tensor(m * x.c, f'{lab} zero features of new voxels')
        feats = tape.add(scaled, zeros, (n + m) * x.c, f'{lab} cat([feats, zeros])')
        tape.drop(scaled, zeros, imp)
        ux = x.like(feats, x.c)
        ux.n, ux.coords, ux.indice_dict = n + m, union, {}
        ux.frames = grown_frames
        conv = tape.subm(ux, block.conv, f'{lab}.conv', hot=flow.hot_pairs(ux, k))
        tape.drop(feats)
        out = tape.sparse_bn_relu(conv, block.bn, f'{lab}.bn')
        tape.drop(conv.t, *held)       # ``x, own_logits, dil = block(x)`` replaces them
        held = [important, *spawn]
        if boxes:
            own = tape.op(f'{lab} own-importance logits (copy)', [logits], n)
            losses.append(_sigmoid_focal_loss(tape, own, n, f'{lab} importance loss'))
            tape.drop(own)
            tape.set_state(f'foreground_{i}', inside)   # kept in last_stats until next step
            tape.drop(inside)
        tape.drop(logits)
        for pairs in x.indice_dict.values():   # live on only where autograd saved them
            tape.drop(pairs)
        tape.drop(x.t)
        if x.coords is not src.coords:
            tape.drop(x.coords)
        x, n, frames = out, out.n, ux.frames
        sizes.append(n // b)
    tape.drop(*held)
    for key, pairs in x.indice_dict.items():     # held by encoded_spconv_tensor
        tape.set_batch(f'indice_dict.{key}', pairs)
        tape.drop(pairs)
    tape.set_batch('encoded_spconv_tensor', x.t)
    tape.set_batch('voxel_features', x.t)
    if x.coords is not src.coords:
        tape.set_batch('voxel_coords', x.coords)
        tape.drop(x.coords)
    tape.drop(x.t)
    if losses:
        total = tape.op('focal importance loss sum', losses, 1, grad_alias=True)
        tape.drop(*losses)
        flow.losses.append(total)
    flow.sparse = x
    if observed_new:
        how = 'as measured'
    elif trained:
        how = 'the trained importance head on the counted frames (--ckpt)'
    else:
        how = ('worst case on the counted frames: every voxel spawns' if src.frames else
               'worst case: every voxel spawns') + (
            f', capped at MAX_NEW_VOXELS_RATIO {cap:g} x N per block' if cap is not None
            else '')
    flow.shape_line(f'{label} focal encoder: stride 1, sparse shape [{d}, {h}, {w}] (z, y, x);'
                    f' voxels per sample {" -> ".join(f"{c:,}" for c in sizes)} ({how})')
    if cap is None and self.blocks:
        flow.no_bound(f'{label}.MAX_NEW_VOXELS_RATIO',
                      'null: focal dilation may add up to N x (K^3 - 1) voxels per block')


def focal_sst_dsvt_memory(self, tape, flow):
    """FocalSSTDSVT.memory: the encoder's row, then DSVT's."""
    tape.g.rename_module('BACKBONE_3D FocalSSTDSVT: focal encoder')
    encoder_memory(self.focal_encoder, tape, flow, 'BACKBONE_3D.FOCAL_ENCODER')
    tape.end()
    tape.begin('BACKBONE_3D FocalSSTDSVT: DSVT', 'BACKBONE_3D', self.dsvt)
    self.dsvt.memory(tape, flow)
