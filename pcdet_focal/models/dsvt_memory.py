"""Memory rule of DSVTDownsample (see dsvt.py): the training forward replayed on the estimator's
tape, from the module's own attributes (stage shapes, windows, sets, widths, submodules).

Input merge (input_downsample: max / mean / learned reduction), then per stage a window + set
partition for each of the two shifts (no grad), a learned position embedding per block and
shift (Linear -> BN -> ReLU -> Linear on N voxels), blocks of two set-attention encoder layers,
pooling between stages. Set attention runs on (sets x set_size, C) tensors: gathered features,
query/key sum, three projection inputs (copies: the batch-first transpose is not contiguous)
and outputs, the attention output and the output projection; nn.MultiheadAttention with
need_weights=False uses fused scaled-dot-product attention, which never stores the
sets x heads x k x k weights.

Counts per sample (voxels after each merge / pooling, sets per stage and shift) come from the
module's own index code (DSVTInputLayer.partition) run on the counted frames; without frames,
from the expectation for voxels spread uniformly at random, which occupies the most cells and
windows for a given count (clustered LiDAR returns occupy fewer).
"""
import math

import torch

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


def _pooling_index(tape, n, m, label):
    """ops.dsvt_sets.pooling_index: cell keys, unique (sort), cell coords, slots (no grad).
    Returns (group, slot, coords) index tensors; temporaries are freed."""
    keys = [tape.index(n, f'{label} cell key {i}') for i in range(3)]
    tape.drop(*keys[:2])
    srt = tape.index(2 * n, f'{label} unique sort buffers')
    group = tape.index(n, f'{label} group (inverse)')
    cells = tape.index(m, f'{label} cells')
    tape.drop(srt, keys[2])
    parts = [tape.index(m, f'{label} cell coord {i}') for i in range(3)]
    coords = tape.index(4 * m, f'{label} cell coords (M, 4)')
    tape.drop(cells, *parts)
    tmp = tape.index(n, f'{label} slot temp')
    slot = tape.index(n, f'{label} slot')
    tape.drop(tmp)
    return group, slot, coords


def _set_partition(tape, n, n_sets, k, label):
    """ops.dsvt_sets.size_equal_sets for one shift: returns (voxel_inds, mask, first_slot)."""
    slots = n_sets * k
    keys = [tape.index(n, f'{label} {w} sort key') for w in ('y', 'x')]
    perms = [tape.index(n, f'{label} argsort {w}') for w in ('y', 'x')]
    tape.temp(2 * n * tape.INT64, f'{label} argsort buffers')
    tape.drop(*keys)
    m = tape.index(slots, f'{label} slot index m')
    prod = tape.index(slots, f'{label} m * n')
    pos = tape.index(slots, f'{label} sorted position')
    tape.drop(prod)
    ys = tape.index(slots, f'{label} perm_y[pos]')
    xs = tape.index(slots, f'{label} perm_x[pos]')
    inds = tape.index(2 * slots, f'{label} set voxel_inds (2, S, k)')
    tape.drop(ys, xs)
    mask = tape.index(slots, f'{label} padding mask', tape.BOOL)
    tape.drop(m, pos)
    tmp = [tape.index(n, f'{label} first-slot temp {i}') for i in range(3)]
    first = tape.index(2 * n, f'{label} first_slot (2, N)')
    tape.drop(*tmp, *perms)
    return inds, mask, first


def _linear_copy(tape, x, numel, c_in, c_out, w, b, label):
    """F.linear on a batch-first attention input: matmul copies the non-contiguous
    (transposed) input, saves the copy, and adds the bias out of place."""
    copy = tape.op(f'{label} input copy', [x], numel)
    rows = numel // c_in
    out = tape.op(label, [copy], rows * c_out, save=[copy], params=[w, b], kind='mm',
                  temp_fwd=rows * c_out * tape.FP32, temp_fwd_label=f'{label} matmul before bias',
                  temp_bwd=numel * tape.FP32, temp_bwd_label=f'{label} gradient reshape copy')
    tape.drop(copy)
    return out




def _attention(tape, mha, q_src, kv_src, v_src, n_q, n_kv, mask_numel, label):
    """``mha`` (nn.MultiheadAttention, batch_first, need_weights=False) in training;
    n_q / n_kv: query / key rows (sets x slots). Returns the output projection (n_q, C)."""
    c, heads = mha.embed_dim, mha.num_heads
    in_w = tape.param(mha.in_proj_weight, f'{label}.in_proj_weight')
    in_b = tape.param(mha.in_proj_bias, f'{label}.in_proj_bias')
    fmask = tape.tensor(mask_numel, f'{label} float key padding mask') if mask_numel else None
    q = _linear_copy(tape, q_src, n_q * c, c, c, in_w, in_b, f'{label} q_proj')
    k = _linear_copy(tape, kv_src, n_kv * c, c, c, in_w, None, f'{label} k_proj')
    v = _linear_copy(tape, v_src, n_kv * c, c, c, in_w, None, f'{label} v_proj')
    merged = tape.tensor(mask_numel * heads, f'{label} merged mask') if mask_numel else None
    lse = tape.tensor(n_q * heads, f'{label} softmax logsumexp')
    att = tape.op(f'{label} scaled_dot_product_attention', [q, k, v], n_q * c,
                  save=[q, k, v, lse] + ([merged] if merged is not None else []), kind='mm')
    tape.drop(q, k, v, lse)
    if merged is not None:
        tape.drop(merged, fmask)
    out = tape.linear(att, n_q, mha.out_proj, f'{label}.out_proj')
    tape.drop(att)
    return out


def _encoder_layer(tape, layer, src, pos, inds, first, n, n_sets, k, act, label):
    """DSVTEncoderLayer: SetAttention (+ FFN) then the layer's residual LayerNorm."""
    sa = layer.win_attn
    c = sa.d_model
    x = n_sets * k
    feats = tape.gather_rows(src, inds, x, c, f'{label} src[voxel_inds]')
    sp = tape.add(src, pos, n * c, f'{label} src + pos')
    qk = tape.gather_rows(sp, inds, x, c, f'{label} q = k = (src + pos)[voxel_inds]')
    tape.drop(sp)
    attn = _attention(tape, sa.self_attn, qk, qk, feats, x, x, x, f'{label}.self_attn')
    copy = tape.op(f'{label} attn.reshape copy', [attn], x * c)
    back = tape.gather_rows(copy, first, n, c, f'{label} attn[first_slot]')
    tape.drop(copy)
    s1 = tape.add(src, back, n * c, f'{label} src + attn')
    tape.drop(back)
    out = set_attention_ffn(tape, s1, n, sa, act, label)
    tape.drop(feats, qk, attn)      # SetAttention's locals die when it returns
    s3 = tape.add(src, out, n * c, f'{label} encoder residual')
    tape.drop(out)
    enc = tape.layernorm(s3, n, layer.norm, f'{label}.encoder_norm')
    tape.drop(s3)
    return enc


def set_attention_ffn(tape, s1, n, sa, act, label):
    """SetAttention after its attention residual ``s1`` (N, C): norm1, linear1, activation,
    linear2, + residual, norm2 (OpenPCDet's and ours alike). Consumes ``s1``."""
    c = sa.linear1.in_features       # OpenPCDet's SetAttention keeps no d_model
    n1 = tape.layernorm(s1, n, sa.norm1, f'{label}.norm1')
    tape.drop(s1)
    h1 = tape.linear(n1, n, sa.linear1, f'{label}.linear1')
    a1 = tape.activation(act, h1, n * sa.linear1.out_features, f'{label}.{act}')
    tape.drop(h1)
    h2 = tape.linear(a1, n, sa.linear2, f'{label}.linear2')
    tape.drop(a1)
    s2 = tape.add(n1, h2, n * c, f'{label} src + ffn')
    tape.drop(h2, n1)
    out = tape.layernorm(s2, n, sa.norm2, f'{label}.norm2')
    tape.drop(s2)
    return out


def _pos_embed(tape, head, n, dim_in, label):
    """PositionEmbeddingLearned: Linear -> BN1d -> ReLU(inplace) -> Linear on N positions."""
    lin0, bn, _, lin3 = head
    xyz = tape.tensor(n * dim_in, f'{label} in-window positions')
    h = tape.linear(xyz, n, lin0, f'{label}.0')
    tape.drop(xyz)
    z = tape.bn1d(h, n, bn, f'{label}.1')
    tape.drop(h)
    z.saved += 1      # ReLU(inplace=True) on the BN output: no new memory, it saves that tensor
    out = tape.linear(z, n, lin3, f'{label}.3')
    tape.drop(z)
    return out


def _input_merge(tape, layer, src, n, n0):
    """input_downsample: max / mean / learned reduction of the voxels sharing a cell."""
    c = src.c
    group, slot, coords = _pooling_index(tape, n, n0, 'input_downsample')
    mode = layer.input_reduction_mode
    if mode == 'max':
        zeros = tape.tensor(n0 * c, 'input max: zeros (M, C)')
        out = tape.op('input max scatter_reduce(amax)', [src.t], n0 * c,
                      save=[zeros, group, src.t], save_output=True,
                      temp_bwd=n * c * (2 * tape.FP32 + tape.BOOL),
                      temp_bwd_label='input max backward masks')
        tape.drop(zeros)
    elif mode == 'mean':
        total = tape.op('input mean index_add', [src.t], n0 * c, save=[group])
        count = tape.tensor(n0, 'input mean counts')
        out = tape.op('input mean divide', [total], n0 * c, save=[count])
        tape.drop(total, count)
    else:
        pool = layer.input_reduction
        heads = pool.heads
        zeros = tape.tensor(n0 * c, 'input attention: zeros (M, C)')
        query = tape.op('input attention max query', [src.t], n0 * c, save=[zeros, group, src.t],
                        save_output=True)
        tape.drop(zeros)
        mha = pool.self_attn
        in_w = tape.param(mha.in_proj_weight, 'input_reduction.self_attn.in_proj_weight')
        in_b = tape.param(mha.in_proj_bias, 'input_reduction.self_attn.in_proj_bias')
        pos_e = tape.param(pool.pos_embedding, 'input_reduction.pos_embedding')
        q = tape.op('input attention q', [query], n0 * c, save=[query], params=[in_w, in_b],
                    kind='mm')
        pe = tape.op('input attention pos_embedding[slot]', [], n * c, params=[pos_e],
                     save=[slot])
        kin = tape.add(src.t, pe, n * c, 'input attention feats + pos')
        tape.drop(pe)
        kk = tape.op('input attention k', [kin], n * c, save=[kin], params=[in_w, in_b],
                     kind='mm')
        vv = tape.op('input attention v', [src.t], n * c, save=[src.t], params=[in_w], kind='mm')
        tape.drop(kin)
        qg = tape.gather_rows(q, group, n, c, 'input attention q[group]')
        prod = tape.op('input attention q*k', [qg, kk], n * c, save=[qg, kk])
        score = tape.op('input attention score sum', [prod], n * heads, grad_alias=True)
        tape.drop(prod, qg, kk)
        e = tape.op('input attention exp', [score], n * heads, save_output=True)
        tape.drop(score)
        den = tape.op('input attention denominators', [e], n0 * heads, save=[group])
        w = tape.op('input attention weights', [e, den], n * heads, save=[e, den])
        tape.drop(e, den)
        wv = tape.op('input attention weight * v', [w, vv], n * c, save=[w, vv])
        tape.drop(w, vv)
        # index_add keeps its source (measured: the (N, C) product lives until backward)
        agg = tape.op('input attention index_add', [wv], n0 * c, save=[group, wv])
        tape.drop(wv)
        o = tape.linear(agg, n0, mha.out_proj, 'input_reduction.self_attn.out_proj')
        tape.drop(agg)
        s = tape.add(o, query, n0 * c, 'input attention residual')
        tape.drop(o, query)
        out = tape.layernorm(s, n0, pool.norm, 'input_reduction.norm')
        tape.drop(s, q)        # the local q dies when AttentionPool.forward returns
    tape.drop(group, slot)
    return out, coords


def _stage_pool(tape, red, reduction, x, n, m, c, c2, vol, group, slot, label):
    """Pooling between stages: zero cells (M, volume, C), index_put, then the reduction."""
    zeros = tape.tensor(m * vol * c, f'{label} pooling zeros (M, vol, C)')
    cells = tape.op(f'{label} pooling index_put', [x], m * vol * c, save=[group, slot])
    tape.drop(zeros)
    if reduction == 'linear':
        lin = tape.linear(cells, m, red.linear1, f'{label}_reduction')
        out = tape.layernorm(lin, m, red.norm, f'{label}_reduction.norm')
        tape.drop(lin)
    elif reduction == 'maxpool':
        out = tape.op(f'{label} max pool', [cells], m * c, save=[cells], save_output=True)
    else:
        query = tape.op(f'{label} reduction query (amax)', [cells], m * c, save=[cells],
                        save_output=True)
        pe = tape.param(red.pos_embedding, f'{label}_reduction.pos_embedding')
        key = tape.op(f'{label} cells + pos_embedding', [cells], m * vol * c, params=[pe],
                      grad_alias=True)
        att = _attention(tape, red.self_attn, query, key, cells, m, m * vol, 0,
                         f'{label}_reduction.self_attn')
        tape.drop(key)
        r = tape.add(att, query, m * c, f'{label} reduction residual')
        tape.drop(att, query)
        out = tape.layernorm(r, m, red.norm, f'{label}_reduction.norm')
        tape.drop(r)
    tape.drop(cells)
    return out


def layout_counts(self, frames, batch_size, observed):
    """Per sample voxels entering each stage and sets per stage and shift: observed (a real
    step, over the batch), counted on the frames with the module's own partition, or expected
    for voxels spread uniformly. Returns ([N_s], [[S_s0, S_s1]], how, the frames' voxels on
    the last stage's grid ([z, y, x] arrays) or None)."""
    cfg, b = self.cfg, batch_size
    seen, seen_sets = observed.get('dsvt_voxels') or [], observed.get('dsvt_sets') or []
    if seen and seen_sets:
        return [-(-int(v) // b) for v in seen], \
            [[-(-int(s) // b) for s in pair] for pair in seen_sets], 'as measured', None
    if not frames:
        return None, None, 'expected for voxels spread uniformly at random', None
    voxels, sets, last = [], [], []
    for frame in frames:
        coords = torch.zeros((len(frame), 4), dtype=torch.long)
        coords[:, 1:] = torch.as_tensor(frame)
        _, stages = self.input_layer.partition(coords)
        voxels.append([st.coords.shape[0] for st in stages])
        sets.append([[st.sets[i].voxel_inds.shape[1] for i in range(2)] for st in stages])
        last.append(stages[-1].coords[:, 1:].numpy())
    n = cfg.stage_num
    return ([max(v[s] for v in voxels) for s in range(n)],
            [[max(p[s][i] for p in sets) for i in range(2)] for s in range(n)],
            f'the densest of {len(frames)} counted frames', last)


def _geometry_key(cfg):
    """What the partition of a DSVT depends on (its counts are shared between DSVTs alike)."""
    return (cfg.sparse_shape, cfg.input_downsample, cfg.stage_shapes, cfg.windows, cfg.shifts,
            cfg.set_sizes, cfg.downsample_stride)


def dsvt_memory(self, tape, flow, label='BACKBONE_3D'):
    """DSVTDownsample.memory: see the module docstring."""
    src = flow.sparse
    cfg, layer = self.cfg, self.input_layer
    b = flow.batch_size
    d, h, w = src.spatial
    shapes = cfg.stage_shapes
    down = cfg.input_downsample
    volume0 = down[0] * down[1] * down[2]
    per_sample = src.n // b
    if flow.observed.get('dsvt_voxels'):
        stage_n, stage_sets, how, last_frames = layout_counts(self, None, b, flow.observed)
    else:
        stage_n, stage_sets, how, last_frames = flow.cached(
            ('dsvt', id(src.frames), repr(_geometry_key(cfg))),
            lambda: layout_counts(self, src.frames, b, {}))
    if stage_n is None:       # no frames: the uniform expectation
        stage_n, stage_sets = [], []
        cur = expected_occupied(per_sample, math.prod(shapes[0]), volume0)
        for s, shape in enumerate(shapes):
            stage_n.append(cur)
            stage_sets.append([expected_sets(cur, _windows_per_sample(
                shape, cfg.windows[s][i], cfg.shifts[s][i]), cfg.set_sizes[s]) for i in range(2)])
            if s + 1 < len(shapes):
                st = cfg.downsample_stride[s]
                cur = expected_occupied(cur, math.prod(shapes[s + 1]), math.prod(st))
    flow.shape_line(f'{label} DSVT: input [{w}, {h}, {d}] (x, y, z), input_downsample {down} -> '
                    + ', '.join(f'stage {s} [{", ".join(map(str, sh))}]'
                                for s, sh in enumerate(shapes)))
    coords = tape.index(4 * src.n, 'DSVT voxel_coords .long()')
    if layer.merges_input:
        x, stage_coords = _input_merge(tape, layer, src, src.n, stage_n[0] * b)
        flow.note(f'DSVT input_downsample {down}: {per_sample:,} voxels per sample merge into '
                  f'{stage_n[0]:,} ({how})')
    else:
        x = src.t
        x.py += 1
        stage_coords = None
    layouts = []
    for s, shape in enumerate(shapes):
        n, c = stage_n[s] * b, cfg.d_model[s]
        parts = [(tape.index(n, f'stage {s} shift {i} window ids'),
                  tape.index(3 * n, f'stage {s} shift {i} coords in window')) for i in range(2)]
        n_sets = [stage_sets[s][i] * b for i in range(2)]
        sets = [_set_partition(tape, n, n_sets[i], cfg.set_sizes[s], f'stage {s} shift {i}')
                for i in range(2)]
        dim_in = 3 if shape[2] > 1 else 2
        positions = [tape.tensor(n * dim_in, f'stage {s} shift {i} positions') for i in range(2)]
        pos = [[_pos_embed(tape, layer.posembed_layers[s][bl][i].position_embedding_head, n,
                           dim_in, f'posembed.{s}.{bl}.{i}') for i in range(2)]
               for bl in range(cfg.blocks[s])]
        tape.drop(*positions)
        for a, bb in parts:
            tape.drop(a, bb)
        pool = None
        if s + 1 < len(shapes):
            m = stage_n[s + 1] * b
            pool = _pooling_index(tape, n, m, f'stage {s} pooling') + (m,)
        layouts.append((n, c, sets, n_sets, pos, pool))
        flow.shape_line(f'  DSVT stage {s}: {n // b:,} voxels per sample, '
                        f'{n_sets[0] // b:,} / {n_sets[1] // b:,} sets of '
                        f'{cfg.set_sizes[s]} per sample (shift 0 / 1; {how})')
    block_id, prev_out = 0, None   # forward's local ``out`` keeps the last block output
    for s, (n, c, sets, n_sets, pos, pool) in enumerate(layouts):
        k = cfg.set_sizes[s]
        blocks, norms = getattr(self, f'stage_{s}'), getattr(self, f'residual_norm_stage_{s}')
        for bl, block in enumerate(blocks):
            inds, mask, first = sets[block_id % 2]
            y = x
            if cfg.use_checkpoint:
                tape.checkpoint_begin()
            for i, enc in enumerate(block.encoder_list):
                y2 = _encoder_layer(tape, enc, y, pos[bl][i], inds, first, n,
                                    n_sets[block_id % 2], k, cfg.activation,
                                    f'stage_{s}.{bl}.encoder_{i}')
                if y is not x:
                    tape.drop(y)
                y = y2
            if cfg.use_checkpoint:     # checkpoint(block, x, sets, *pos) keeps its inputs
                tape.checkpoint_end(outputs=[y], inputs=[x, inds, mask, first, *pos[bl]])
            tape.drop(prev_out)
            prev_out = y
            res = tape.add(y, x, n * c, f'stage_{s}.{bl} residual')
            x2 = tape.layernorm(res, n, norms[bl], f'residual_norm_stage_{s}.{bl}')
            tape.drop(res, x)
            x = x2
            block_id += 1
        if pool is not None:
            group, slot, ncoords, m = pool
            st = cfg.downsample_stride[s]
            red = getattr(self, f'stage_{s}_reduction')
            x_new = _stage_pool(tape, red, cfg.reduction_type, x, n, m, c, cfg.d_model[s + 1],
                                math.prod(st), group, slot, f'stage_{s}')
            tape.drop(x, group, slot)
            x = x_new
            if stage_coords is not None:
                tape.drop(stage_coords)
            stage_coords = ncoords
    # the layouts (sets, position embeddings) and the locals die when forward returns
    tape.drop(prev_out)
    for n, c, sets, n_sets, pos, pool in layouts:
        for inds, mask, first in sets:
            tape.drop(inds, mask, first)
        for pair in pos:
            tape.drop(*pair)
    n_out, c_out = layouts[-1][0], cfg.d_model[-1]
    out_coords = tape.index(4 * n_out, 'DSVT output voxel_coords int32', tape.INT32)
    tape.drop(coords)
    if stage_coords is not None:
        tape.drop(stage_coords)
    tape.set_batch('voxel_features', x)
    tape.set_batch('voxel_coords', out_coords)
    tape.set_batch('encoded_spconv_tensor', x)
    tape.drop(out_coords)
    last = shapes[-1]
    flow.sparse = src.like(x, c_out)
    flow.sparse.n, flow.sparse.coords, flow.sparse.indice_dict = n_out, out_coords, {}
    flow.sparse.spatial = (last[2], last[1], last[0])
    flow.sparse.stride = (src.stride[0] * cfg.stride[2], src.stride[1] * cfg.stride[1],
                          src.stride[2] * cfg.stride[0])
    flow.sparse.frames = last_frames
    tape.drop(x)
    if cfg.use_checkpoint:
        flow.note(f'{label}.USE_CHECKPOINT: block activations are recomputed in backward (only '
                  "block inputs / outputs are kept; one block's activations come back as a "
                  'backward transient)')
