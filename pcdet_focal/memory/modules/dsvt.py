"""BACKBONE_3D memory models: DSVTDownsample (pcdet_focal) and DSVT (OpenPCDet's, same math).

Follows pcdet_focal.models.dsvt: optional input merge (input_downsample, max / mean / learned
reduction), then per stage a window + set partition for each of the two shifts (no grad), a
learned position embedding per block and shift (Linear -> BN -> ReLU -> Linear on N voxels),
blocks of two set-attention encoder layers, pooling between stages.

Counts per sample. Merging (input_downsample, stage pooling) and the set partition depend on
where the voxels are; the model takes voxels spread uniformly at random over the grid, which
occupies the most cells and windows for a given count (clustered LiDAR returns occupy fewer,
so they merge more and need fewer padded sets):
- voxels after merging N voxels into C cells: C (1 - (1 - 1/C)^N) (expected occupied cells);
- sets of a stage and shift with W windows per sample and set size k: a window of n voxels
  gets ceil(n / k) sets; with n ~ Poisson(N / W) the expected total is W E[ceil(n / k)]
  (never more than the worst case N, or (N + W (k - 1)) / k when N > W).
Set attention runs on (sets x k, C) tensors ("X" below): gathered features, query/key sum,
three projection inputs (copies: the batch-first transpose is not contiguous) and outputs,
the attention output and the output projection; nn.MultiheadAttention with
need_weights=False uses fused scaled-dot-product attention, which never stores the
sets x heads x k x k weights (the model states them as a transient when it would).
"""
import math

from ...errors import ConfigError
from .. import layers as L
from ..context import Sparse
from ..dsvt_geometry import dsvt_stages
from ..graph import BOOL, FP32, INT32, INT64


def _windows_per_sample(shape, window, shift):
    """Windows a sample is cut into (pcdet_focal.ops.dsvt_sets.window_partition's count)."""
    (nx, ny, nz), (wx, wy, wz), (sx, sy, sz) = shape, window, shift
    if wz == nz:
        sz = 0
    return ((nx - 1 + sx) // wx + 1) * ((ny - 1 + sy) // wy + 1) * ((nz - 1 + sz) // wz + 1)


def max_sets(n_per_sample, windows, set_size):
    """Largest number of sets n voxels of one sample can form over ``windows`` windows."""
    n = int(n_per_sample)
    if n <= windows:
        return n
    return (n + windows * (set_size - 1)) // set_size


def expected_occupied(n, cells, volume=1):
    """Expected occupied cells when n distinct voxels of a grid of ``cells`` x ``volume``
    voxels (``volume`` voxels per cell) are picked uniformly at random."""
    n, cells, volume = int(n), int(cells), max(1, int(volume))
    if n <= 0 or cells <= 0:
        return 0
    total = cells * volume
    if volume == 1 or n >= total:
        return min(n, cells)
    p_empty = math.exp(volume * math.log1p(-n / total))
    return max(1, min(n, cells, int(math.ceil(cells * (1 - p_empty)))))


def expected_sets(n_per_sample, windows, set_size):
    """Expected sets of n voxels spread uniformly over ``windows`` windows (Poisson counts),
    capped by :func:`max_sets`."""
    n, w, k = int(n_per_sample), int(windows), int(set_size)
    if n <= 0:
        return 0
    lam = n / w
    if lam > 500:     # normal regime: E[ceil(X / k)] = lam / k + (k - 1) / (2 k)
        per = lam / k + (k - 1) / (2 * k)
    else:
        per, pmf, i = 0.0, math.exp(-lam), 0
        top = int(lam + 12 * math.sqrt(lam) + 30)
        while i <= top:
            per += pmf * (-(-i // k))
            i += 1
            pmf *= lam / i
    return max(1, min(max_sets(n, w, k), int(math.ceil(w * per))))


def _pooling_index(g, n, m, label):
    """ops.dsvt_sets.pooling_index: cell keys, unique (sort), cell coords, slots (no grad).
    Returns (group, slot, coords) index tensors; temporaries are freed."""
    keys = [L.index_tensor(g, n, f'{label} cell key {i}') for i in range(3)]
    g.drop(*keys[:2])
    srt = L.index_tensor(g, 2 * n, f'{label} unique sort buffers')
    group = L.index_tensor(g, n, f'{label} group (inverse)')
    cells = L.index_tensor(g, m, f'{label} cells')
    g.drop(srt, keys[2])
    parts = [L.index_tensor(g, m, f'{label} cell coord {i}') for i in range(3)]
    coords = L.index_tensor(g, 4 * m, f'{label} cell coords (M, 4)')
    g.drop(cells, *parts)
    tmp = L.index_tensor(g, n, f'{label} slot temp')
    slot = L.index_tensor(g, n, f'{label} slot')
    g.drop(tmp)
    return group, slot, coords


def _set_partition(g, n, n_sets, k, label):
    """ops.dsvt_sets.size_equal_sets for one shift: returns (voxel_inds, mask, first_slot)."""
    slots = n_sets * k
    keys = [L.index_tensor(g, n, f'{label} {w} sort key') for w in ('y', 'x')]
    perms = [L.index_tensor(g, n, f'{label} argsort {w}') for w in ('y', 'x')]
    g.temp(2 * n * INT64, f'{label} argsort buffers')
    g.drop(*keys)
    m = L.index_tensor(g, slots, f'{label} slot index m')
    prod = L.index_tensor(g, slots, f'{label} m * n')
    pos = L.index_tensor(g, slots, f'{label} sorted position')
    g.drop(prod)
    ys = L.index_tensor(g, slots, f'{label} perm_y[pos]')
    xs = L.index_tensor(g, slots, f'{label} perm_x[pos]')
    inds = L.index_tensor(g, 2 * slots, f'{label} set voxel_inds (2, S, k)')
    g.drop(ys, xs)
    mask = L.index_tensor(g, slots, f'{label} padding mask', BOOL)
    g.drop(m, pos)
    tmp = [L.index_tensor(g, n, f'{label} first-slot temp {i}') for i in range(3)]
    first = L.index_tensor(g, 2 * n, f'{label} first_slot (2, N)')
    g.drop(*tmp, *perms)
    return inds, mask, first


def _linear_copy(g, x, numel, c_in, c_out, w, b, label):
    """F.linear on a batch-first attention input: matmul copies the non-contiguous
    (transposed) input, saves the copy, and adds the bias out of place."""
    copy = g.op(f'{label} input copy', [x], numel)
    rows = numel // c_in
    out = g.op(label, [copy], rows * c_out, save=[copy], params=[w, b], kind='mm',
               temp_fwd=rows * c_out * FP32, temp_fwd_label=f'{label} matmul before bias',
               temp_bwd=numel * FP32, temp_bwd_label=f'{label} gradient reshape copy')
    g.drop(copy)
    return out


def _attention(g, q_src, kv_src, v_src, n_q, n_kv, c, heads, mask_numel, label, shared_qk):
    """nn.MultiheadAttention(batch_first=True, need_weights=False) in training.

    n_q / n_kv: query / key rows (sets x slots). Returns the output projection (n_q, c)."""
    in_w = g.param(3 * c * c, f'{label}.in_proj_weight')
    in_b = g.param(3 * c, f'{label}.in_proj_bias')
    fmask = g.tensor(mask_numel, f'{label} float key padding mask', FP32) if mask_numel else None
    q = _linear_copy(g, q_src, n_q * c, c, c, in_w, in_b, f'{label} q_proj')
    k = _linear_copy(g, kv_src, n_kv * c, c, c, in_w, None, f'{label} k_proj')
    v = _linear_copy(g, v_src, n_kv * c, c, c, in_w, None, f'{label} v_proj')
    merged = g.tensor(mask_numel * heads, f'{label} merged mask', FP32) if mask_numel else None
    lse = g.tensor(n_q * heads, f'{label} softmax logsumexp', FP32)
    att = g.op(f'{label} scaled_dot_product_attention', [q, k, v], n_q * c,
               save=[q, k, v, lse] + ([merged] if merged is not None else []), kind='mm')
    g.drop(q, k, v, lse)
    if merged is not None:
        g.drop(merged, fmask)
    out = L.linear(g, att, n_q, c, c, label=f'{label}.out_proj')
    g.drop(att)
    return out


def _set_attention(g, src, pos, inds, first, n, n_sets, k, c, heads, ff, act, label):
    """pcdet_focal.models.dsvt.SetAttention (+ the encoder layer's residual LayerNorm)."""
    x = n_sets * k
    feats = L.gather_rows(g, src, inds, x, c, f'{label} src[voxel_inds]')
    pos_g = L.gather_rows(g, pos, inds, x, c, f'{label} pos[voxel_inds]')
    qk = L.add(g, feats, pos_g, x * c, f'{label} q = k = feats + pos')
    g.drop(pos_g)
    attn = _attention(g, qk, qk, feats, x, x, c, heads, x, f'{label}.self_attn', True)
    copy = g.op(f'{label} attn.reshape copy', [attn], x * c)
    back = L.gather_rows(g, copy, first, n, c, f'{label} attn[first_slot]')
    g.drop(copy)
    s1 = L.add(g, src, back, n * c, f'{label} src + attn')
    g.drop(back)
    n1 = L.layernorm(g, s1, n, c, f'{label}.norm1')
    g.drop(s1)
    h1 = L.linear(g, n1, n, c, ff, label=f'{label}.linear1')
    a1 = L.activation(g, act, h1, n * ff, f'{label}.{act}')
    g.drop(h1)
    h2 = L.linear(g, a1, n, ff, c, label=f'{label}.linear2')
    g.drop(a1)
    s2 = L.add(g, n1, h2, n * c, f'{label} src + ffn')
    g.drop(h2, n1)
    out = L.layernorm(g, s2, n, c, f'{label}.norm2')
    g.drop(s2)
    g.drop(feats, qk, attn)      # SetAttention's locals die when it returns
    s3 = L.add(g, src, out, n * c, f'{label} encoder residual')
    g.drop(out)
    enc = L.layernorm(g, s3, n, c, f'{label}.encoder_norm')
    g.drop(s3)
    return enc


def _pos_embed(g, n, dim_in, c, label):
    """PositionEmbeddingLearned: Linear(dim_in, C) -> BN1d -> ReLU(inplace) -> Linear(C, C)."""
    xyz = g.tensor(n * dim_in, f'{label} in-window positions', FP32)
    h = L.linear(g, xyz, n, dim_in, c, label=f'{label}.0')
    g.drop(xyz)
    bn = L.bn1d(g, h, n, c, label=f'{label}.1')
    g.drop(h)
    # ReLU(inplace=True) on the BN output: no new memory, it saves that tensor
    bn.saved += 1
    out = L.linear(g, bn, n, c, c, label=f'{label}.3')
    g.drop(bn)
    return out


def _input_merge(g, cfgd, src, n, n0, field):
    """input_downsample merge: max / mean / learned reduction of the voxels sharing a cell."""
    c = src.c
    group, slot, coords = _pooling_index(g, n, n0, 'input_downsample')
    mode = cfgd['input_reduction']
    if mode == 'max':
        zeros = g.tensor(n0 * c, 'input max: zeros (M, C)', FP32)
        out = g.op('input max scatter_reduce(amax)', [src.t], n0 * c,
                   save=[zeros, group, src.t], save_output=True,
                   temp_bwd=n * c * (2 * FP32 + BOOL), temp_bwd_label='input max backward masks')
        g.drop(zeros)
    elif mode == 'mean':
        total = g.op('input mean index_add', [src.t], n0 * c, save=[group])
        count = L.index_tensor(g, n0, 'input mean counts', FP32)
        out = g.op('input mean divide', [total], n0 * c, save=[count])
        g.drop(total, count)
    else:
        heads = cfgd['heads']
        zeros = g.tensor(n0 * c, 'input attention: zeros (M, C)', FP32)
        query = g.op('input attention max query', [src.t], n0 * c, save=[zeros, group, src.t],
                     save_output=True)
        g.drop(zeros)
        vol = cfgd['volume']
        in_w = g.param(3 * c * c, 'input_reduction.self_attn.in_proj_weight')
        in_b = g.param(3 * c, 'input_reduction.self_attn.in_proj_bias')
        pos_e = g.param(vol * c, 'input_reduction.pos_embedding')
        q = L.linear(g, query, n0, c, c, label='input attention q')
        pe = g.op('input attention pos_embedding[slot]', [], n * c, params=[pos_e], save=[slot])
        kin = L.add(g, src.t, pe, n * c, 'input attention feats + pos')
        g.drop(pe)
        kk = g.op('input attention k', [kin], n * c, save=[kin], params=[in_w, in_b], kind='mm')
        vv = g.op('input attention v', [src.t], n * c, save=[src.t], params=[in_w], kind='mm')
        g.drop(kin)
        qg = L.gather_rows(g, q, group, n, c, 'input attention q[group]')
        prod = g.op('input attention q*k', [qg, kk], n * c, save=[qg, kk])
        score = g.op('input attention score sum', [prod], n * heads, grad_alias=True)
        g.drop(prod, qg, kk, q)
        e = g.op('input attention exp', [score], n * heads, save_output=True)
        g.drop(score)
        den = g.op('input attention denominators', [e], n0 * heads, save=[group])
        w = g.op('input attention weights', [e, den], n * heads, save=[e, den])
        g.drop(e, den)
        wv = g.op('input attention weight * v', [w, vv], n * c, save=[w, vv])
        g.drop(w, vv)
        agg = g.op('input attention index_add', [wv], n0 * c, save=[group])
        g.drop(wv)
        o = L.linear(g, agg, n0, c, c, label='input_reduction.self_attn.out_proj')
        g.drop(agg)
        s = L.add(g, o, query, n0 * c, 'input attention residual')
        g.drop(o, query)
        out = L.layernorm(g, s, n0, c, 'input_reduction.norm')
        g.drop(s)
    g.drop(group, slot)
    return out, coords


def _config(mcfg, src_c, field):
    il = mcfg.get('INPUT_LAYER') or {}
    d_model = list(il.get('d_model') or mcfg.get('d_model') or [])
    set_info = list(il.get('set_info') or mcfg.get('set_info') or [])
    n = len(d_model)
    if not n or len(set_info) != n:
        raise ConfigError(f'{field}.INPUT_LAYER: d_model and set_info need one entry per stage')
    if int(d_model[0]) != int(src_c):
        raise ConfigError(f'{field}.INPUT_LAYER.d_model[0]={d_model[0]} but the incoming voxel '
                          f'features have {src_c} channels; DSVT has no input projection: set '
                          f'd_model[0]: {src_c}')
    nhead = list(mcfg.get('nhead') or [8] * n)
    ff = list(mcfg.get('dim_feedforward') or [2 * d for d in d_model])
    windows = list(il.get('window_shape') or [])
    hybrid = list(il.get('hybrid_factor') or [1, 1, 1])
    shifts = il.get('shifts_list')
    if len(windows) != n:
        raise ConfigError(f'{field}.INPUT_LAYER.window_shape needs one [wx, wy, wz] per stage')
    pairs = [[list(w), [w[a] * hybrid[a] for a in range(3)]] for w in windows]
    if shifts is None:
        shifts = [[[0, 0, 0], [v // 2 for v in p[1]]] for p in pairs]
    return {'d_model': [int(v) for v in d_model],
            'set_size': [int(s[0]) for s in set_info], 'blocks': [int(s[1]) for s in set_info],
            'nhead': [int(v) for v in nhead], 'ff': [int(v) for v in ff],
            'windows': pairs, 'shifts': [[list(a) for a in s] for s in shifts],
            'act': str(mcfg.get('activation', 'relu')),
            'reduction': str(mcfg.get('reduction_type', 'attention')),
            'input_reduction': str(il.get('input_reduction', 'max')),
            'ckpt': bool(mcfg.get('USE_CHECKPOINT', False))}


def dsvt(g, mcfg, ctx, field='MODEL.BACKBONE_3D'):
    src = ctx.sparse
    if src is None:
        raise ConfigError(f'{field}: DSVT needs voxel features (a VFE or a sparse encoder)')
    d, h, w = src.spatial
    geo = dsvt_stages(mcfg, field, input_shape=[w, h, d])
    cfgd = _config(mcfg, src.c, field)
    b = ctx.batch_size
    n_in = src.n
    per_sample = n_in // b
    shapes = geo['shapes']
    cfgd['heads'] = cfgd['nhead'][0]
    down = geo['input_downsample']
    cfgd['volume'] = down[0] * down[1] * down[2]
    ctx.shape_line(f'{field} DSVT: input [{w}, {h}, {d}] (x, y, z), input_downsample {down} -> '
                   + ', '.join(f'stage {s} [{", ".join(map(str, sh))}]'
                               for s, sh in enumerate(shapes)))
    coords = L.index_tensor(g, 4 * n_in, 'DSVT voxel_coords .long()')
    # ------------------------------------------------------------------ input layer
    cells0 = (shapes[0][0] * shapes[0][1] * shapes[0][2])
    seen = ctx.observed.get('dsvt_voxels') or []
    seen_sets = ctx.observed.get('dsvt_sets') or []
    if cfgd['volume'] > 1:
        # the cells of the input grid: merging cells hold ``volume`` input voxels each
        n_s = expected_occupied(per_sample, cells0, cfgd['volume'])
        if seen:
            n_s = max(1, -(-int(seen[0]) // b))
        x, stage_coords = _input_merge(g, cfgd, src, n_in, n_s * b, field)
        ctx.note(f'DSVT input_downsample {down}: {per_sample:,} voxels per sample merge into '
                 f'{n_s:,} (expected for voxels spread uniformly; clustered data merges more)')
    else:
        n_s = per_sample
        x = src.t
        x.py += 1
        stage_coords = None
    layouts = []
    for s, shape in enumerate(shapes):
        n = n_s * b
        c = cfgd['d_model'][s]
        parts = [(L.index_tensor(g, n, f'stage {s} shift {i} window ids'),
                  L.index_tensor(g, 3 * n, f'stage {s} shift {i} coords in window'))
                 for i in range(2)]
        sets, n_sets = [], []
        for i in range(2):
            win = cfgd['windows'][s][i]
            wcount = _windows_per_sample(shape, win, cfgd['shifts'][s][i])
            ns = b * expected_sets(n_s, wcount, cfgd['set_size'][s])
            if s < len(seen_sets):
                ns = int(seen_sets[s][i])
            n_sets.append(ns)
            sets.append(_set_partition(g, n, ns, cfgd['set_size'][s], f'stage {s} shift {i}'))
        dim_in = 3 if shape[2] > 1 else 2
        positions = [g.tensor(n * dim_in, f'stage {s} shift {i} positions', FP32)
                     for i in range(2)]
        pos = [[_pos_embed(g, n, dim_in, c, f'posembed.{s}.{bl}.{i}') for i in range(2)]
               for bl in range(cfgd['blocks'][s])]
        g.drop(*positions)
        for a, bb in parts:
            g.drop(a, bb)
        pool = None
        if s + 1 < len(shapes):
            nxt = shapes[s + 1]
            st = mcfg['INPUT_LAYER']['downsample_stride'][s]
            m = expected_occupied(n_s, nxt[0] * nxt[1] * nxt[2], st[0] * st[1] * st[2]) * b
            if s + 1 < len(seen):
                m = int(seen[s + 1])
            pool = _pooling_index(g, n, m, f'stage {s} pooling') + (m,)
            n_s = m // b
        layouts.append((n, c, sets, n_sets, pos, pool))
        ctx.shape_line(f'  DSVT stage {s}: {n // b:,} voxels per sample, '
                       f'{n_sets[0] // b:,} / {n_sets[1] // b:,} sets of '
                       f'{cfgd["set_size"][s]} per sample (shift 0 / 1)')
    # ------------------------------------------------------------------ blocks
    block_id = 0
    prev_out = None     # forward's local ``out`` keeps the last block output until replaced
    for s, (n, c, sets, n_sets, pos, pool) in enumerate(layouts):
        heads, ff, k = cfgd['nhead'][s], cfgd['ff'][s], cfgd['set_size'][s]
        for bl in range(cfgd['blocks'][s]):
            shift = block_id % 2
            inds, mask, first = sets[shift]
            y = x
            if cfgd['ckpt']:
                g.checkpoint_begin()
            for i in range(2):
                y2 = _set_attention(g, y, pos[bl][i], inds, first, n, n_sets[shift], k, c,
                                    heads, ff, cfgd['act'], f'stage_{s}.{bl}.encoder_{i}')
                if y is not x:
                    g.drop(y)
                y = y2
            if cfgd['ckpt']:
                g.checkpoint_end(outputs=[y])
            g.drop(prev_out)
            prev_out = y
            res = L.add(g, y, x, n * c, f'stage_{s}.{bl} residual')
            x2 = L.layernorm(g, res, n, c, f'residual_norm_stage_{s}.{bl}')
            g.drop(res, x)
            x = x2
            block_id += 1
        if pool is not None:
            group, slot, ncoords, m = pool
            st = mcfg['INPUT_LAYER']['downsample_stride'][s]
            vol = st[0] * st[1] * st[2]
            zeros = g.tensor(m * vol * c, f'stage {s} pooling zeros (M, vol, C)', FP32)
            cells = g.op(f'stage {s} pooling index_put', [x], m * vol * c, save=[group, slot])
            g.drop(zeros, x)
            c2 = cfgd['d_model'][s + 1]
            red = cfgd['reduction']
            if red == 'linear':
                lin = L.linear(g, cells, m, vol * c, c2, bias=False, label=f'stage_{s}_reduction')
                x = L.layernorm(g, lin, m, c2, f'stage_{s}_reduction.norm')
                g.drop(lin)
            elif red == 'maxpool':
                x = g.op(f'stage {s} max pool', [cells], m * c, save=[cells], save_output=True)
            else:
                query = g.op(f'stage {s} reduction query (amax)', [cells], m * c, save=[cells],
                             save_output=True)
                pe = g.param(vol * c, f'stage_{s}_reduction.pos_embedding')
                key = g.op(f'stage {s} cells + pos_embedding', [cells], m * vol * c, params=[pe],
                           grad_alias=True)
                att = _attention(g, query, key, cells, m, m * vol, c, 8, 0,
                                 f'stage_{s}_reduction.self_attn', False)
                g.drop(key)
                r = L.add(g, att, query, m * c, f'stage {s} reduction residual')
                g.drop(att, query)
                x = L.layernorm(g, r, m, c, f'stage_{s}_reduction.norm')
                g.drop(r)
            g.drop(cells, group, slot)
            stage_coords = ncoords
    # the layouts (sets, position embeddings) and the locals die when forward returns
    g.drop(prev_out)
    for n, c, sets, n_sets, pos, pool in layouts:
        for inds, mask, first in sets:
            g.drop(inds, mask, first)
        for pair in pos:
            g.drop(*pair)
    n_out = layouts[-1][0]
    c_out = cfgd['d_model'][-1]
    out_coords = L.index_tensor(g, 4 * n_out, 'DSVT output voxel_coords int32', INT32)
    g.drop(coords)
    if stage_coords is not None:
        g.drop(stage_coords)
    g.set_batch('voxel_features', x)
    g.set_batch('voxel_coords', out_coords)
    g.set_batch('encoded_spconv_tensor', x)
    g.drop(out_coords)
    last = shapes[-1]
    stride = geo['strides'][-1]
    ctx.sparse = Sparse(x, n_out, c_out, (last[2], last[1], last[0]),
                        (src.stride[0] * stride[2], src.stride[1] * stride[1],
                         src.stride[2] * stride[0]), out_coords, {})
    g.drop(x)
    if cfgd['ckpt']:
        ctx.note(f'{field}.USE_CHECKPOINT: block activations are recomputed in backward (only '
                 'block inputs / outputs are kept; one block\'s activations come back as a '
                 'backward transient)')


MODELS = {'DSVTDownsample': dsvt, 'DSVT': dsvt}
