"""Memory rules of OpenPCDet's own classes, for the pcdet host (their modules are OpenPCDet's;
our classes carry their rules beside their code).

RULES: OpenPCDet class name -> ``rule(module, tape, flow)`` reading the built module's
attributes (layers, channel counts, sparse shapes, anchors); no config is parsed again.
LOSSES: detector class name -> ``loss(model, tape, flow)`` returning the loss.

Each rule replays the module's training forward as OpenPCDet 8caccce writes it (what it keeps in
``batch_dict`` and ``forward_ret_dict``, what autograd saves) and appends its head loss to
``flow.losses``. Data-dependent counts:

- strided sparse convs (SparseConv3d / SparseConv2d): output site o is active when some input
  voxel i and kernel offset k give ``i + p - k * d == o * s`` on every axis. On counted frames
  the active sites are computed exactly (numpy, per frame; the densest frame gates); without
  frames the count is the expectation for the voxels spread uniformly at random over the input
  grid (no two inputs share an output less often than that), which the report states;
- DSVT windows, sets and pooled voxels: OpenPCDet's window / set / pooling arithmetic on the
  frames, else the uniform expectation of :mod:`pcdet_focal.models.dsvt_memory`;
- ROI heads: the sampled ROIs per image (TARGET_CONFIG.ROI_PER_IMAGE, a fixed count).
"""
import itertools
import math

import numpy as np

from ..models.bev_backbone import bev_backbone_memory
from ..models.center_head_memory import _center_loss
from ..models.dsvt_memory import (_linear_copy, _pos_embed, _windows_per_sample,
                                  expected_occupied, expected_sets, set_attention_ffn)
from ..models.map_to_bev_memory import height_compression_memory
from .flow import NotModelled, Sparse
from .graph import BOOL, FP32, INT32, INT64

UNIFORM_NOTE = ('strided sparse conv outputs: no frames were counted, so each is the expected '
                'count for voxels spread uniformly at random over its input grid (an assumption: '
                'clustered LiDAR voxels share outputs more often, so real counts are lower)')


# ============================================================================ counting
def _conv_out_shape(spatial, kernel, stride, padding, dilation):
    return [(sz + 2 * p - d * (k - 1) - 1) // s + 1
            for sz, k, s, p, d in zip(spatial, kernel, stride, padding, dilation)]


def conv_output_sites(frame, spatial, kernel, stride, padding, dilation):
    """Active output sites of a regular (not submanifold) sparse conv.

    frame: (n, D) int64 input coordinates (D = 2 or 3, the conv's axis order); output o is
    active when some input i and kernel offset k give ``i + p - k * d == o * s`` per axis.
    Returns (m, D) int64 unique output coordinates."""
    frame = np.asarray(frame, np.int64).reshape(-1, len(kernel))
    out_shape = np.asarray(_conv_out_shape(spatial, kernel, stride, padding, dilation), np.int64)
    stride, padding, dilation = (np.asarray(v, np.int64) for v in (stride, padding, dilation))
    found = []
    for offset in itertools.product(*(range(int(k)) for k in kernel)):
        num = frame + padding - np.asarray(offset, np.int64) * dilation
        out = num // stride
        ok = np.all((num >= 0) & (num % stride == 0) & (out < out_shape), axis=1)
        found.append(np.ravel_multi_index(out[ok].T, out_shape))
    keys = np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)
    return np.stack(np.unravel_index(keys, out_shape), axis=1).astype(np.int64)


def expected_conv_sites(n, spatial, kernel, stride, padding, dilation):
    """Expected active outputs of a regular sparse conv when ``n`` voxels sit uniformly at random
    in the grid ``spatial``: sum over outputs of 1 - (1 - n / volume) ** (inputs it reads)."""
    volume = math.prod(int(s) for s in spatial)
    n = min(int(n), volume)
    if n <= 0:
        return 0
    hist = []
    for sz, k, s, p, d, out in zip(spatial, kernel, stride, padding, dilation,
                                   _conv_out_shape(spatial, kernel, stride, padding, dilation)):
        taps = np.arange(out)[:, None] * s - p + np.arange(k)[None, :] * d
        reads = ((taps >= 0) & (taps < sz)).sum(axis=1)
        hist.append(list(zip(*np.unique(reads, return_counts=True))))
    log_empty = math.log1p(-n / volume) if n < volume else -math.inf
    total = 0.0
    for combo in itertools.product(*hist):
        reads = math.prod(int(r) for r, _ in combo)
        sites = math.prod(int(c) for _, c in combo)
        if reads:
            total += sites * (1.0 if log_empty == -math.inf else -math.expm1(reads * log_empty))
    return max(1, int(math.ceil(total)))


def _per_sample(flow, n):
    return max(1, -(-int(n) // flow.batch_size))


# ============================================================================ sparse replay
def _is_spconv(m):
    return hasattr(m, 'subm') and hasattr(m, 'indice_key') and hasattr(m, 'kernel_size')


def _scale(flow, x):
    """Voxels per sample of ``x`` over those of its densest frame: 1 on counted frames, n / m
    on a scan layout that filled m < n voxels (counts on it scale with it)."""
    top = max((len(f) for f in x.frames), default=0)
    return max(1.0, _per_sample(flow, x.n) / top) if top else 1.0


class SparseReplay:
    """Replays spconv module trees of an OpenPCDet backbone / head on the tape.

    Walks SparseSequential / Sequential, OpenPCDet's SparseBasicBlock, spconv convs (submanifold,
    strided, inverse), BatchNorm1d, ReLU and Dropout as their forward runs them; anything else is
    NotModelled. ``conv_inputs`` remembers the input of every strided conv by indice_key: an
    inverse conv with that key returns to those voxels."""

    def __init__(self, tape, flow):
        self.tape, self.flow = tape, flow
        self.conv_inputs = {}

    def run(self, x, m, label):
        kind = type(m).__name__
        if kind in ('SparseSequential', 'Sequential'):
            y = x
            for i, child in enumerate(m.children()):
                z = self.run(y, child, f'{label}.{i}')
                if y is not x:
                    self.tape.drop(y.t)
                y = z
            if y is x:
                x.t.py += 1
            return y
        if _is_spconv(m):
            return self.conv(x, m, label)
        if kind == 'SparseBasicBlock':
            return self.basic_block(x, m, label)
        if kind == 'BatchNorm1d':
            return x.like(self.tape.bn1d(x.t, x.n, m, label), x.c)
        if kind == 'ReLU':     # in-place or not: modelled as a new saved output (an upper bound)
            return x.like(self.tape.relu(x.t, x.n * x.c, label), x.c)
        if kind in ('Dropout', 'Identity'):
            x.t.py += 1
            return x.like(x.t, x.c)
        raise NotModelled(f'{kind} inside {label}')

    def _hot(self, x, m):
        if self.flow.target != 'cpu':
            return 0
        if len(x.spatial) == 3 and len(set(m.kernel_size)) == 1:
            return self.flow.hot_pairs(x, int(m.kernel_size[0]))
        return x.n

    def conv(self, x, m, label):
        tape = self.tape
        if m.subm:
            return tape.subm(x, m, label, hot=self._hot(x, m))
        if getattr(m, 'inverse', False):
            return self._inverse(x, m, label)
        self.conv_inputs[m.indice_key] = x
        per_sample, frames = self.count(x, m, label)
        y = tape.sparse_conv(x, m, per_sample * self.flow.batch_size, label, hot=self._hot(x, m))
        y.stride = tuple(a * b for a, b in zip(x.stride[-len(m.stride):], m.stride)) \
            if len(m.stride) == len(x.stride) else x.stride
        y.frames = frames
        return y

    def _inverse(self, x, m, label):
        """SparseInverseConv3d: back to the voxels of the strided conv with the same key, with
        that conv's index pairs (no new pairs)."""
        src = self.conv_inputs.get(m.indice_key)
        if src is None:
            raise NotModelled(f'{label}: inverse conv {m.indice_key!r} without its strided conv')
        tape = self.tape
        w, b = tape.param(m.weight, f'{label}.weight'), tape.param(m.bias, f'{label}.bias')
        pairs = x.indice_dict.get(m.indice_key)
        y = tape.op(label, [x.t], src.n * m.out_channels, save=[x.t] + ([pairs] if pairs else []),
                    params=[w, b], kind='mm')
        return Sparse(y, src.n, m.out_channels, src.spatial, src.stride, src.coords,
                      x.indice_dict, src.frames)

    def count(self, x, m, label):
        """(output voxels per sample, the frames' output coords or None) of the strided conv
        ``m`` on ``x``: exact on the frames (the densest gates), else the uniform expectation."""
        args = (tuple(int(s) for s in x.spatial), tuple(int(k) for k in m.kernel_size),
                tuple(int(s) for s in m.stride), tuple(int(p) for p in m.padding),
                tuple(int(d) for d in m.dilation))
        if x.frames:
            outs = self.flow.cached(('pcdet sparse conv', id(x.frames), label) + args,
                                    lambda: [conv_output_sites(f, *args) for f in x.frames])
            return max(1, math.ceil(max(len(o) for o in outs) * _scale(self.flow, x))), outs
        self.flow.note(UNIFORM_NOTE)
        return expected_conv_sites(_per_sample(self.flow, x.n), *args), None

    def basic_block(self, x, m, label):
        """OpenPCDet's SparseBasicBlock: subm-BN-ReLU-subm-BN, + identity, ReLU."""
        tape = self.tape
        c1 = self.conv(x, m.conv1, f'{label}.conv1')
        b1 = tape.bn1d(c1.t, c1.n, m.bn1, f'{label}.bn1')
        tape.drop(c1.t)
        r1 = tape.relu(b1, c1.n * c1.c, f'{label}.relu')
        tape.drop(b1)
        c2 = self.conv(c1.like(r1, c1.c), m.conv2, f'{label}.conv2')
        tape.drop(r1)
        b2 = tape.bn1d(c2.t, c2.n, m.bn2, f'{label}.bn2')
        tape.drop(c2.t)
        ident = self.run(x, m.downsample, f'{label}.downsample') if m.downsample is not None \
            else x
        s = tape.add(b2, ident.t, c2.n * c2.c, f'{label} + identity')
        tape.drop(b2)
        if ident is not x:
            tape.drop(ident.t)
        r2 = tape.relu(s, c2.n * c2.c, f'{label}.relu (out)')
        tape.drop(s)
        return c2.like(r2, c2.c)


def _input_sparse(tape, flow, module):
    """The SparseConvTensor a backbone builds from voxel_features and voxel_coords.int()."""
    sp = flow.sparse
    coords = tape.index(sp.n * 4, 'voxel_coords.int()', INT32)
    spatial = tuple(int(s) for s in module.sparse_shape)
    flow.shape_line(f'BACKBONE_3D {type(module).__name__}: sparse input {list(spatial)} (z, y, x),'
                    f' {sp.n // flow.batch_size:,} voxels per sample')
    return Sparse(sp.t, sp.n, sp.c, spatial, (1, 1, 1), coords, {}, sp.frames)


def _keep_levels(tape, flow, levels, out):
    """batch_dict keeps multi_scale_3d_features (and encoded_spconv_tensor) until the step ends;
    ROI heads read the levels from ``flow.pcdet_levels``."""
    for name, sp in levels.items():
        tape.set_batch(f'multi_scale_3d_features.{name}', sp.t)
    if out is not None:
        tape.set_batch('encoded_spconv_tensor', out.t)
    flow.pcdet_levels = dict(levels)
    if out is not None:
        flow.sparse = out
        flow.shape_line(f'  encoded_spconv_tensor: {out.n // flow.batch_size:,} voxels per '
                        f'sample x {out.c} channels on {list(out.spatial)}')


def _encoder(tape, flow, module):
    """The VoxelBackBone8x encoder: conv_input, conv1..conv4 (and conv_out when it has one).
    Returns (walk, conv_input output, {x_convK: level}, conv_out output or None)."""
    walk = SparseReplay(tape, flow)
    x = _input_sparse(tape, flow, module)
    h = walk.run(x, module.conv_input, 'conv_input')
    levels, cur = {}, h
    for name in ('conv1', 'conv2', 'conv3', 'conv4'):
        cur = walk.run(cur, getattr(module, name), name)
        levels[f'x_{name}'] = cur
    conv_out = getattr(module, 'conv_out', None)
    out = walk.run(cur, conv_out, 'conv_out') if conv_out is not None else None
    return walk, h, levels, out


def voxel_backbone_memory(module, tape, flow):
    """VoxelBackBone8x / VoxelResBackBone8x: conv_input, conv1..conv4, conv_out."""
    _, h, levels, out = _encoder(tape, flow, module)
    _keep_levels(tape, flow, levels, out)
    tape.drop(h.t, out.t, *(sp.t for sp in levels.values()))
    _level_lines(flow, levels)


def _level_lines(flow, levels):
    flow.shape_line('  ' + ', '.join(f'{k} {v.n // flow.batch_size:,}' for k, v in levels.items())
                    + ' voxels per sample')


def _channel_reduction(tape, x, out_c, label):
    """UNetV2.channel_reduction: (N, C) viewed (N, out_c, C / out_c), summed."""
    return x.like(tape.op(label, [x.t], x.n * out_c, grad_alias=True), out_c)


def unet_v2_memory(module, tape, flow):
    """UNetV2 (PartA2): the VoxelBackBone8x encoder, then four UR blocks back to the input
    voxels; point_features / point_coords of the finest level go to batch_dict."""
    walk, h, levels, out = _encoder(tape, flow, module)
    lat = [levels['x_conv4'], levels['x_conv3'], levels['x_conv2'], levels['x_conv1']]
    blocks = [('conv_up_t4', 'conv_up_m4', 'inv_conv4'), ('conv_up_t3', 'conv_up_m3', 'inv_conv3'),
              ('conv_up_t2', 'conv_up_m2', 'inv_conv2'), ('conv_up_t1', 'conv_up_m1', 'conv5')]
    bottom = levels['x_conv4']
    ups = []
    for lateral, (t, m, inv) in zip(lat, blocks):
        trans = walk.run(lateral, getattr(module, t), t)
        cat = tape.op(f'{t} cat(bottom, trans)', [bottom.t, trans.t],
                      trans.n * (bottom.c + trans.c), grad_alias=True)
        xc = trans.like(cat, bottom.c + trans.c)
        tape.drop(trans.t)
        xm = walk.run(xc, getattr(module, m), m)
        red = _channel_reduction(tape, xc, xm.c, f'{m} channel_reduction')
        tape.drop(cat)
        s = tape.add(xm.t, red.t, xm.n * xm.c, f'{m} + reduction')
        tape.drop(xm.t, red.t)
        up = walk.run(xm.like(s, xm.c), getattr(module, inv), inv)
        tape.drop(s)
        ups.append(up)
        bottom = up
    final = ups[-1]
    tape.set_batch('point_features', final.t)
    pc = tape.tensor(final.n * 4, 'point_coords (N, 4)')
    tape.set_batch('point_coords', pc)
    tape.drop(pc)
    flow.pcdet_points = (final.n, final.c)
    _keep_levels(tape, flow, levels, out)
    tape.drop(h.t, *(u.t for u in ups), *(sp.t for sp in levels.values()))
    if out is not None:
        tape.drop(out.t)
    _level_lines(flow, levels)


def voxelnext_backbone_memory(module, tape, flow):
    """VoxelResBackBone8xVoxelNeXt: conv_input, conv1..conv6, conv5 / conv6 voxels moved onto
    the conv4 grid and concatenated, bev_out (a unique over (b, y, x) and index_add_), a
    regular SparseConv2d (conv_out) and a submanifold shared_conv."""
    walk = SparseReplay(tape, flow)
    x = _input_sparse(tape, flow, module)
    h = walk.run(x, module.conv_input, 'conv_input')
    levels, cur = {}, h
    names = [f'conv{i}' for i in range(1, 7)]
    for name in names:
        cur = walk.run(cur, getattr(module, name), name)
        levels[f'x_{name}'] = cur
    c4, c5, c6 = levels['x_conv4'], levels['x_conv5'], levels['x_conv6']
    n_cat = c4.n + c5.n + c6.n
    cat = tape.op('cat(x_conv4, x_conv5, x_conv6) features', [c4.t, c5.t, c6.t], n_cat * c4.c,
                  grad_alias=True)
    cat_idx = tape.index(n_cat * 4, 'cat indices', INT32)
    frames = None
    if c4.frames and c5.frames and c6.frames:
        frames = flow.cached(('pcdet voxelnext bev', id(c4.frames), id(c5.frames),
                              id(c6.frames)), lambda: [
            np.unique(np.concatenate([a[:, 1:], b[:, 1:] * 2, c[:, 1:] * 4]), axis=0)
            for a, b, c in zip(c4.frames, c5.frames, c6.frames)])
        m = max(1, math.ceil(max(len(f) for f in frames) * _scale(flow, c4)))
    else:
        d4, h4, w4 = c4.spatial
        m = min(expected_occupied(_per_sample(flow, n_cat), h4 * w4, d4), h4 * w4)
    m_all = m * flow.batch_size
    tape.temp(n_cat * 3 * INT64 * 2, 'bev_out unique sort buffers')
    inv = tape.index(n_cat, 'bev_out inverse')
    table = tape.op('bev_out zeros + index_add_', [cat], m_all * c4.c, save=[inv])
    tape.drop(cat, inv)
    bev = Sparse(table, m_all, c4.c, tuple(c4.spatial[1:]), c4.stride[1:], cat_idx, {}, frames)
    out = walk.run(bev, module.conv_out, 'conv_out')
    tape.drop(table)
    shared = walk.run(out, module.shared_conv, 'shared_conv')
    tape.drop(out.t)
    levels4 = {k: levels[k] for k in ('x_conv1', 'x_conv2', 'x_conv3')}
    levels4['x_conv4'] = c4.like(cat, c4.c)
    _keep_levels(tape, flow, levels4, shared)
    tape.drop(h.t, shared.t, *(sp.t for sp in levels.values()))
    _level_lines(flow, levels)


# ============================================================================ VFE
def mean_vfe_memory(module, tape, flow):
    """OpenPCDet's MeanVFE: sum over the point slots, clamp_min of the counts, divide (no
    grad)."""
    src = flow.sparse
    n, c = src.n, module.num_point_features
    total = tape.tensor(n * c, 'MeanVFE sum over points (N, C)')
    norm = tape.tensor(n, 'MeanVFE clamp_min(voxel_num_points)')
    mean = tape.tensor(n * c, 'voxel_features (N, C)')
    tape.drop(total, norm)
    tape.set_batch('voxel_features', mean)
    flow.sparse = src.like(mean, c)
    tape.drop(mean)


def _run_rows(tape, x, rows, seq, label):
    """An nn.Sequential of Linear / Conv1d (kernel 1) / BatchNorm1d / ReLU / Dropout applied to
    (rows, C) features; returns (tensor, channels)."""
    y, c = x, None
    for i, m in enumerate(seq):
        kind, lab = type(m).__name__, f'{label}.{i}'
        if kind == 'Linear':
            z, c = tape.linear(y, rows, m, lab), m.out_features
        elif kind in ('Conv1d', 'Conv2d') and set(m.kernel_size) == {1}:
            w = tape.param(m.weight, f'{lab}.weight')
            b = tape.param(m.bias, f'{lab}.bias')
            c = m.out_channels
            z = tape.op(lab, [y], rows * c, save=[y], params=[w, b], kind='mm')
        elif kind in ('BatchNorm1d', 'BatchNorm2d'):
            c = m.num_features
            z = tape.bn1d(y, rows, m, lab)
        elif kind == 'ReLU':
            z = tape.relu(y, y.numel, lab)
        elif kind in ('Dropout', 'Identity'):
            continue
        else:
            raise NotModelled(f'{kind} inside {label}')
        if y is not x:
            tape.drop(y)
        y = z
    if y is x:
        x.py += 1
    return y, c


def _pfn_stack(tape, module, feats, rows, n, label, spread):
    """PFN layers on ``rows`` point rows: linear, BN, ReLU, the max of each of the n voxels
    (over its slots, or scatter_max), and (not last) that max spread back to the rows by
    ``spread(mx, c, label)`` and concatenated. Returns the (n, C) features."""
    x = feats
    for i, pfn in enumerate(module.pfn_layers):
        lab = f'{label}.pfn_layers.{i}'
        y = tape.linear(x, rows, pfn.linear, f'{lab}.linear')
        c = pfn.linear.out_features
        if pfn.use_norm:
            z = tape.bn1d(y, rows, pfn.norm, f'{lab}.norm')
            tape.drop(y)
            y = z
        r = tape.relu(y, rows * c, f'{lab}.relu')
        tape.drop(y)
        arg = tape.index(n * c, f'{lab} max indices')
        mx = tape.op(f'{lab} max into the voxels', [r], n * c, save=[arg])
        tape.drop(arg)
        if x is not feats:
            tape.drop(x)
        if pfn.last_vfe:
            tape.drop(r)
            x = mx
        else:
            back = spread(mx, c, lab)
            x = tape.op(f'{lab} cat', [r, back], rows * 2 * c, grad_alias=True)
            tape.drop(r, back, mx)
    return x


def _dynamic_points(tape, flow, dims, label):
    """What every dynamic VFE does to the points first: voxel coords of each point, the in-range
    mask, the masked points, merged keys and their unique (inverse, counts). Returns (points P
    over the batch, voxels N over the batch, inverse index, [temporaries to drop])."""
    b = flow.batch_size
    p = b * flow.counts.points_per_sample
    n = flow.sparse.n
    cpts = tape.get_batch('points')
    c_pt = cpts.numel // max(1, p) if cpts is not None else 5
    coords = tape.index(p * dims, f'{label} point coords .int()', INT32)
    mask = tape.index(p, f'{label} in-range mask', BOOL)
    pts = tape.tensor(p * c_pt, f'{label} points[mask]')
    pc = tape.index(p * dims, f'{label} point_coords[mask]', INT32)
    tape.drop(coords, mask)
    merge = tape.index(p, f'{label} merge_coords', INT32)
    tape.temp(3 * p * INT64, f'{label} unique sort buffers')
    unq = tape.index(n, f'{label} unq_coords', INT32)
    inv = tape.index(p, f'{label} unq_inv')
    cnt = tape.index(n, f'{label} unq_cnt')
    tape.drop(merge)
    return p, n, c_pt, pts, pc, unq, inv, cnt


def _vfe_out(tape, flow, feats, c, unq, label, coords=True):
    if coords:
        vc = tape.index(flow.sparse.n * 4, f'{label} voxel_coords (N, 4)', INT32)
        tape.set_batch('voxel_coords', vc)
        tape.drop(vc)
    tape.set_batch('voxel_features', feats)
    tape.set_batch('pillar_features', feats)
    flow.sparse = flow.sparse.like(feats, c)
    tape.drop(feats, unq)


def dynamic_vfe_memory(module, tape, flow):
    """DynamicVoxelVFE / DynamicPillarVFE / DynamicPillarVFESimple2D: per-point features (the
    point, its offset from the voxel mean / centre), PFN layers with scatter_max into the voxels
    (torch_scatter)."""
    kind = type(module).__name__
    dims = 3 if kind == 'DynamicVoxelVFE' else 2
    p, n, c_pt, pts, pc, unq, inv, cnt = _dynamic_points(tape, flow, dims, kind)
    xyz = tape.tensor(p * 3, f'{kind} points_xyz')
    parts = []
    if kind != 'DynamicPillarVFESimple2D':
        mean = tape.tensor(n * 3, f'{kind} scatter_mean (N, 3)')
        g = tape.tensor(p * 3, f'{kind} points_mean[unq_inv]')
        parts.append(tape.tensor(p * 3, f'{kind} f_cluster'))
        tape.drop(mean, g)
    parts.append(tape.tensor(p * 3, f'{kind} f_center'))
    c_in = module.pfn_layers[0].linear.in_features
    feats = tape.tensor(p * c_in, f'{kind} features cat (P, {c_in})')
    tape.drop(*parts, xyz, pc, pts, cnt)
    out = _pfn_stack(tape, module, feats, p, n, kind, lambda mx, c, lab: tape.gather_rows(
        mx, inv, p, c, f'{lab} x_max[unq_inv]'))
    tape.drop(feats, inv)
    c = module.pfn_layers[-1].linear.out_features
    flow.shape_line(f'VFE {kind}: {p // flow.batch_size:,} points -> {n // flow.batch_size:,} '
                    f'voxels per sample, {c} channels')
    if kind == 'DynamicPillarVFESimple2D':
        pcrd = tape.index(n * 3, 'pillar_coords (N, 3)', INT32)
        tape.set_batch('pillar_coords', pcrd)
        tape.drop(pcrd)
        tape.set_batch('pillar_features', out)
        flow.sparse = flow.sparse.like(out, c)
        tape.drop(out, unq)
        return
    _vfe_out(tape, flow, out, c, unq, kind)


def dynamic_mean_vfe_memory(module, tape, flow):
    """DynamicMeanVFE (no grad): scatter_mean of the points into their voxels."""
    p, n, c_pt, pts, pc, unq, inv, cnt = _dynamic_points(tape, flow, 3, 'DynamicMeanVFE')
    data = tape.tensor(p * (c_pt - 1), 'DynamicMeanVFE points_data')
    mean = tape.tensor(n * (c_pt - 1), 'DynamicMeanVFE scatter_mean (N, C)')
    tape.drop(data, pts, pc, inv, cnt)
    _vfe_out(tape, flow, mean, module.num_point_features, unq, 'DynamicMeanVFE')


def pillar_vfe_memory(module, tape, flow):
    """PillarVFE: per point slot of each pillar, its offsets from the pillar mean and centre,
    masked, then PFNLayers (linear, BN over the permuted slots, ReLU, max over the slots)."""
    src = flow.sparse
    n = src.n
    c_pt = module.pfn_layers[0].linear.in_features
    slots = src.t.numel // max(1, n * src.c) if src.t is not None else 1
    rows = n * slots
    mean = tape.tensor(n * 3, 'PillarVFE points_mean')
    cluster = tape.tensor(rows * 3, 'PillarVFE f_cluster')
    center = tape.tensor(rows * 3, 'PillarVFE f_center')
    tape.temp(rows * FP32, 'PillarVFE f_center column temporaries')
    feats = tape.tensor(rows * c_pt, f'PillarVFE features cat (N, P, {c_pt})')
    tape.drop(mean, cluster, center)
    mask = tape.tensor(rows, 'PillarVFE padding mask')
    tape.drop(mask)
    x = _pfn_stack(tape, module, feats, rows, n, 'PillarVFE', lambda mx, c, lab: tape.op(
        f'{lab} x_max.repeat', [mx], rows * c, grad_alias=True))
    tape.drop(feats)
    c = module.pfn_layers[-1].linear.out_features
    tape.set_batch('pillar_features', x)
    flow.sparse = src.like(x, c)
    tape.drop(x)


# ============================================================================ MAP_TO_BEV
def pillar_scatter_memory(module, tape, flow):
    """PointPillarScatter / PointPillarScatter3d: per sample, a zero (C, nz*ny*nx) canvas and an
    index_put of that sample's pillars; the canvases are stacked (two copies at that moment)."""
    sp, b = flow.sparse, flow.batch_size
    nx, ny, nz = int(module.nx), int(module.ny), int(module.nz)
    c = int(getattr(module, 'num_bev_features_before_compression', module.num_bev_features))
    per = _per_sample(flow, sp.n)
    canvases = []
    for i in range(b):
        mask = tape.index(sp.n, f'sample {i} batch_mask', BOOL)
        this = tape.tensor(per * 4, f'sample {i} this_coords')
        idx = tape.index(per, f'sample {i} indices .long()')
        pil = tape.op(f'sample {i} pillar_features[batch_mask]', [sp.t], per * c, save=[mask])
        canvas = tape.op(f'sample {i} zero canvas + spatial_feature[:, indices] = pillars.t()',
                         [pil], c * nz * ny * nx, save=[idx])
        tape.drop(mask, this, idx, pil)
        canvases.append(canvas)
    stacked = tape.op('torch.stack(canvases)', canvases, b * c * nz * ny * nx, grad_alias=True)
    tape.drop(*canvases)
    flow.flattened_bev_channels = c * nz
    flow.map_to_bev_input = (c, nz, ny, nx)
    flow.shape_line(f'MAP_TO_BEV {type(module).__name__}: [B, {c}, {nz}, {ny}, {nx}] -> '
                    f'[B, {c * nz}, {ny}, {nx}]')
    tape.set_batch('spatial_features', stacked)
    flow.bev = flow.dense(stacked, c * nz, ny, nx)
    flow.bev_stride = 1
    tape.drop(stacked)


# ============================================================================ BACKBONE_2D
def base_bev_backbone_memory(module, tape, flow):
    """OpenPCDet's BaseBEVBackbone: ours' rule, with every level kept in its ret_dict until
    forward returns."""
    if len(module.deblocks) > len(module.blocks):
        raise NotModelled('BaseBEVBackbone with an extra final deblock')
    bev_backbone_memory(module, tape, flow, keep_levels=True)


def _res_block_2d(tape, x, blk, label):
    """backbones_2d BasicBlock: conv-BN-ReLU-conv-BN, += identity (in place), ReLU."""
    c1 = tape.conv2d(x, blk.conv1, f'{label}.conv1')
    b1 = tape.bn2d(c1, blk.bn1, f'{label}.bn1')
    tape.drop(c1.t)
    r1 = tape.relu2d(b1, f'{label}.relu1')
    tape.drop(b1.t)
    c2 = tape.conv2d(r1, blk.conv2, f'{label}.conv2')
    tape.drop(r1.t)
    b2 = tape.bn2d(c2, blk.bn2, f'{label}.bn2')
    tape.drop(c2.t)
    ident = tape.run(x, blk.downsample_layer, f'{label}.downsample_layer') if blk.downsample \
        else None
    if ident is not None:
        tape.drop(ident.t)    # added in place into the BN output; nothing keeps it
    out = tape.relu2d(b2, f'{label}.relu2')
    tape.drop(b2.t)
    return out


def base_bev_res_backbone_memory(module, tape, flow):
    """BaseBEVResBackbone: blocks of BasicBlocks, deblocks, concatenated (levels kept)."""
    x0 = flow.bev
    x, ups, levels = x0, [], []
    for i, block in enumerate(module.blocks):
        y = x
        for j, blk in enumerate(block):
            z = _res_block_2d(tape, y, blk, f'blocks.{i}.{j}')
            if y is not x:
                tape.drop(y.t)
            y = z
        levels.append(y)
        x = y
        ups.append(tape.run(y, module.deblocks[i], f'deblocks.{i}') if len(module.deblocks)
                   else y)
    if len(ups) > 1:
        out = tape.cat_channels(ups, 'cat')
        if len(module.deblocks):
            tape.drop(*(u.t for u in ups))
    else:
        out = ups[0]
        out.t.py += 1
        if len(module.deblocks):
            tape.drop(out.t)
    tape.set_batch('spatial_features_2d', out.t)
    tape.drop(out.t, *(lv.t for lv in levels))
    flow.bev_stride *= max(1, x0.h // out.h) if out.h <= x0.h else 1
    flow.bev = out
    flow.shape_line(f'BACKBONE_2D output: {out.c} x {out.h} x {out.w} (C, H, W)')


# ============================================================================ losses
def pointwise_loss(tape, x, numel, kept, label, temps=0):
    """A pointwise loss over ``numel`` elements of ``x`` whose autograd graph keeps ``kept``
    tensors of that size until backward (counted from the loss's code), plus ``temps`` that die
    in the forward. Returns the scalar."""
    y = x
    for i in range(temps):
        tape.temp(numel * FP32, f'{label} temporary {i}')
    for i in range(kept):
        z = tape.op(f'{label} term {i}', [y], numel, save_output=True, kind='fp32')
        if y is not x:
            tape.drop(y)
        y = z
    s = tape.op(f'{label} sum', [y], 1, grad_alias=True)
    if y is not x:
        tape.drop(y)
    return s


# ============================================================================ dense heads
def _heads_state(tape, preds, targets):
    """forward_ret_dict = {...}: last step's predictions and targets die, these live on."""
    tape.release_prior_state()
    for key, t in list(preds.items()) + list(targets.items()):
        tape.set_state(key, t)


def anchor_head_memory(module, tape, flow):
    """AnchorHeadSingle: 1x1 convs (cls, box, dir) permuted to (B, H, W, C) copies, the
    target assignment (an anchors x ground-truth IoU matrix per class and sample), the decoded
    boxes of two-stage models, and its loss (sigmoid focal over B x A x K, smooth-L1 with the
    sin difference over B x A x code, direction cross entropy)."""
    x = flow.bev
    b, h, w = x.b, x.h, x.w
    preds = {}
    for name in ('conv_cls', 'conv_box', 'conv_dir_cls'):
        conv = getattr(module, name, None)
        if conv is None:
            continue
        y = tape.conv2d(x, conv, name)
        p = tape.op(f'{name} permute(0, 2, 3, 1).contiguous()', [y.t], y.numel)
        tape.drop(y.t)
        preds[name] = p
    anchors = int(module.num_anchors_per_location) * h * w
    code = int(module.box_coder.code_size)
    k = int(module.num_class)
    gt = flow.gt_boxes
    per_class = [int(a.numel() // a.shape[-1]) for a in module.anchors]
    for _ in range(b):
        for a in per_class:
            tape.temp(a * gt * FP32 + a * (INT64 + FP32), 'anchors x gt IoU matrix (per class)')
    targets = {'box_cls_labels': tape.index(b * anchors, 'box_cls_labels', INT32),
               'box_reg_targets': tape.tensor(b * anchors * code, 'box_reg_targets'),
               'reg_weights': tape.tensor(b * anchors, 'reg_weights')}
    _heads_state(tape, preds, targets)
    if module.predict_boxes_when_training:
        boxes = tape.op('generate_predicted_boxes (decoded boxes)', [preds['conv_box']],
                        b * anchors * code, save=[preds['conv_box']])
        tape.temp(3 * b * anchors * code * FP32, 'box decode temporaries')
        tape.set_batch('batch_box_preds', boxes)
        tape.drop(boxes)
    for t in list(preds.values()) + list(targets.values()):
        tape.drop(t)
    onehot = tape.tensor(b * anchors * (k + 1), 'one_hot_targets')
    flow.losses.append(pointwise_loss(tape, preds['conv_cls'], b * anchors * k, 6,
                                      'rpn cls focal loss', temps=2))
    tape.drop(onehot)
    flow.losses.append(pointwise_loss(tape, preds['conv_box'], b * anchors * code, 6,
                                      'rpn box smooth-L1 (sin difference)', temps=2))
    if 'conv_dir_cls' in preds:
        bins = preds['conv_dir_cls'].numel // max(1, b * anchors)
        dt = tape.tensor(b * anchors * bins, 'direction targets')
        flow.losses.append(pointwise_loss(tape, preds['conv_dir_cls'], b * anchors * bins, 3,
                                          'rpn dir loss'))
        tape.drop(dt)
    flow.shape_line(f'DENSE_HEAD {type(module).__name__}: {anchors:,} anchors per sample on '
                    f'{h} x {w}')


def center_head_pcdet_memory(module, tape, flow):
    """OpenPCDet's CenterHead: shared conv, one SeparateHead per class group, heatmap / box
    targets, the loss (sigmoid + clamp, CornerNet focal loss, L1 at the object indices; the IoU
    branch and IOU_REG_LOSS decode boxes over the whole map)."""
    x = flow.bev
    feat = tape.run(x, module.shared_conv, 'shared_conv')
    b, h, w = x.b, x.h, x.w
    max_objs = int(module.model_cfg.TARGET_ASSIGNER_CONFIG.NUM_MAX_OBJS)
    order = list(module.separate_head_cfg.HEAD_ORDER)
    all_preds, state = [], {}
    for hi, (names, head) in enumerate(zip(module.class_names_each_head, module.heads_list)):
        preds = {name: tape.run(feat, getattr(head, name), f'heads_list.{hi}.{name}')
                 for name in head.sep_head_dict}
        all_preds.append((hi, names, preds))
        state.update({f'pred_{hi}_{k}': v.t for k, v in preds.items()})
    code = sum(all_preds[0][2][n].c for n in order) if all_preds else 8
    targets, tstate = [], {}
    for hi, names, _ in all_preds:
        t = (tape.tensor(b * len(names) * h * w, f'head {hi} target heatmap'),
             tape.tensor(b * max_objs * code, f'head {hi} target boxes'),
             tape.index(b * max_objs, f'head {hi} target inds'),
             tape.index(b * max_objs, f'head {hi} target mask'))
        src = tape.tensor(b * max_objs * (code + 1), f'head {hi} target_boxes_src')
        targets.append(t)
        tstate.update({f'target_{hi}_{i}': v for i, v in enumerate(t + (src,))})
    _heads_state(tape, state, tstate)
    for v in list(state.values()) + list(tstate.values()):
        tape.drop(v)
    if module.predict_boxes_when_training:
        tape.temp(3 * b * h * w * (sum(len(n) for _, n, _ in all_preds) + code) * FP32,
                  'generate_predicted_boxes (sigmoid, top-k, decode)')
    tape.drop(feat.t)
    flow.losses += _center_loss(tape, all_preds, targets, order, b, h, w, max_objs)
    iou_reg = bool(module.model_cfg.get('IOU_REG_LOSS', False))
    for hi, names, preds in all_preds:
        if 'iou' not in preds and not iou_reg:
            continue
        ins = [preds[n].t for n in ('center', 'center_z', 'dim', 'rot') if n in preds]
        boxes = tape.op(f'head {hi} decode_bbox_from_pred_dicts (B, H, W, 7)', ins, b * h * w * 7,
                        save=ins, temp_fwd=4 * b * h * w * FP32)
        if 'iou' in preds:
            flow.losses.append(pointwise_loss(tape, preds['iou'].t, b * max_objs, 3,
                                              f'head {hi} iou loss'))
        if iou_reg:
            g = tape.op(f'head {hi} boxes at inds', [boxes], b * max_objs * 7,
                        save=[targets[hi][2]])
            flow.losses.append(pointwise_loss(tape, g, b * max_objs * 7, 8,
                                              f'head {hi} iou_reg loss'))
            tape.drop(g)
        tape.drop(boxes)
    flow.shape_line(f'DENSE_HEAD CenterHead: {len(all_preds)} head(s) on {h} x {w}')


def voxelnext_head_memory(module, tape, flow):
    """VoxelNeXtHead: sparse SeparateHeads (SubMConv2d) on the encoded voxels, per-voxel
    heatmap targets, FocalLossSparse / RegLossSparse (and the IoU branch: boxes decoded at
    every voxel)."""
    x = flow.sparse
    walk = SparseReplay(tape, flow)
    b = flow.batch_size
    max_objs = int(module.model_cfg.TARGET_ASSIGNER_CONFIG.NUM_MAX_OBJS)
    order = list(module.separate_head_cfg.HEAD_ORDER)
    all_preds, state = [], {}
    for hi, (names, head) in enumerate(zip(module.class_names_each_head, module.heads_list)):
        preds = {}
        for name in head.sep_head_dict:
            preds[name] = walk.run(x, getattr(head, name), f'heads_list.{hi}.{name}')
        all_preds.append((hi, names, preds))
        state.update({f'pred_{hi}_{k}': v.t for k, v in preds.items()})
    code = sum(all_preds[0][2][n].c for n in order) if all_preds else 8
    tstate = {}
    for hi, names, _ in all_preds:
        tstate[f'hm_{hi}'] = tape.tensor(x.n * len(names), f'head {hi} heatmap (N, K)')
        tstate[f'boxes_{hi}'] = tape.tensor(b * max_objs * code, f'head {hi} target boxes')
        tstate[f'inds_{hi}'] = tape.index(b * max_objs, f'head {hi} inds')
        tstate[f'mask_{hi}'] = tape.index(b * max_objs, f'head {hi} masks')
    bidx = tape.index(x.n * 4, 'voxel_indices / batch_index', INT32)
    tstate['voxel_indices'] = bidx
    _heads_state(tape, state, tstate)
    for v in list(state.values()) + list(tstate.values()):
        tape.drop(v)
    for hi, names, preds in all_preds:
        hm = preds['hm']
        flow.losses.append(pointwise_loss(tape, hm.t, hm.n * hm.c, 8, f'head {hi} hm focal loss',
                                          temps=2))
        reg = [preds[n].t for n in order]
        cat = tape.op(f'head {hi} cat box code', reg, x.n * code, grad_alias=True)
        g = tape.op(f'head {hi} gather at inds', [cat], b * max_objs * code)
        tape.drop(cat)
        flow.losses.append(pointwise_loss(tape, g, b * max_objs * code, 4, f'head {hi} reg loss'))
        tape.drop(g)
        if module.iou_branch:
            ins = [preds[n].t for n in ('center', 'center_z', 'dim', 'rot')]
            boxes = tape.op(f'head {hi} _get_predicted_boxes (N, 7)', ins, x.n * 7, save=ins,
                            temp_fwd=6 * x.n * FP32)
            flow.losses.append(pointwise_loss(tape, boxes, b * max_objs * 7, 8,
                                              f'head {hi} iou losses'))
            tape.drop(boxes)
    flow.shape_line(f'DENSE_HEAD VoxelNeXtHead: {len(all_preds)} head(s) on '
                    f'{x.n // b:,} voxels per sample')


# ============================================================================ DSVT
def _dsvt_geometry(module):
    """Per stage: (sparse shape (x, y, z), [window per shift], [shift per shift], set size,
    blocks, d_model) from OpenPCDet's DSVTInputLayer."""
    layer = module.input_layer
    out = []
    for s in range(layer.stage_num):
        out.append((tuple(int(v) for v in layer.sparse_shape_list[s]),
                    [tuple(int(v) for v in layer.window_shape[s][i]) for i in range(2)],
                    [tuple(int(v) for v in layer.shift_list[s][i]) for i in range(2)],
                    int(layer.set_info[s][0]), int(layer.set_info[s][1]), int(layer.d_model[s])))
    return out


def _dsvt_frame_counts(module, frame):
    """OpenPCDet's window / set / pooling arithmetic on one frame ((n, 3) [z, y, x]): per stage
    (voxels, [sets shift 0, sets shift 1])."""
    layer = module.input_layer
    zyx = np.asarray(frame, np.int64)
    out = []
    for s, (shape, windows, shifts, set_size, _, _) in enumerate(_dsvt_geometry(module)):
        sets = []
        for (wx, wy, wz), (sx, sy, sz) in zip(windows, shifts):
            if shape[2] == wz:
                sz = 0
            win = np.stack([(zyx[:, 2] + sx) // wx, (zyx[:, 1] + sy) // wy,
                            (zyx[:, 0] + sz) // wz], axis=1)
            _, counts = np.unique(win, axis=0, return_counts=True)
            sets.append(int(np.ceil(counts / set_size).sum()))
        out.append((len(zyx), sets))
        if s + 1 < layer.stage_num:
            dx, dy, dz = layer.downsample_stride[s]
            zyx = np.unique(zyx // np.array([dz, dy, dx]), axis=0)
    return out


def _dsvt_counts(module, flow):
    """Per stage: (voxels per sample, [sets per sample, shift 0 / 1]) and how they were had."""
    geo = _dsvt_geometry(module)
    frames = flow.sparse.frames
    if frames:
        per = flow.cached(('pcdet dsvt', id(frames), repr(geo)),
                          lambda: [_dsvt_frame_counts(module, f) for f in frames])
        k = _scale(flow, flow.sparse)
        stages = [(math.ceil(k * max(p[s][0] for p in per)),
                   [math.ceil(k * max(p[s][1][i] for p in per)) for i in range(2)])
                  for s in range(len(geo))]
        return stages, f'the densest of {len(frames)} counted frames'
    layer = module.input_layer
    cur = _per_sample(flow, flow.sparse.n)
    stages = []
    for s, (shape, windows, shifts, set_size, _, _) in enumerate(geo):
        stages.append((cur, [expected_sets(cur, _windows_per_sample(shape, windows[i], shifts[i]),
                                           set_size) for i in range(2)]))
        if s + 1 < len(geo):
            stride = layer.downsample_stride[s]
            cur = expected_occupied(cur, math.prod(geo[s + 1][0]), math.prod(stride))
    return stages, 'expected for voxels spread uniformly at random (no frames counted)'


def _mha_weights(tape, mha, q_src, k_src, v_src, sets, lq, lk, masked, label):
    """nn.MultiheadAttention(batch_first) called with need_weights left True (OpenPCDet's DSVT):
    three input projections of the transposed (non-contiguous) inputs, the explicit attention
    weights (sets x heads x lq x lk: baddbmm, softmax kept for backward), bmm with v, the
    output projection; the head-averaged weights are returned and dropped."""
    c, heads = mha.embed_dim, mha.num_heads
    in_w = tape.param(mha.in_proj_weight, f'{label}.in_proj_weight')
    in_b = tape.param(mha.in_proj_bias, f'{label}.in_proj_bias')
    nq, nk = sets * lq, sets * lk
    q = _linear_copy(tape, q_src, nq * c, c, c, in_w, in_b, f'{label} q_proj')
    k = _linear_copy(tape, k_src, nk * c, c, c, in_w, None, f'{label} k_proj')
    v = _linear_copy(tape, v_src, nk * c, c, c, in_w, None, f'{label} v_proj')
    mask = tape.tensor(sets * heads * lk, f'{label} merged float mask') if masked else None
    qs = tape.op(f'{label} q * scale', [q], nq * c)
    tape.drop(q)
    scores = tape.op(f'{label} baddbmm(q, k^T)', [qs, k], sets * heads * lq * lk,
                     save=[qs, k], kind='mm')
    tape.drop(qs, k)
    if mask is not None:
        tape.drop(mask)
    att = tape.op(f'{label} softmax', [scores], sets * heads * lq * lk, save_output=True,
                  kind='fp32')
    tape.drop(scores)
    o = tape.op(f'{label} bmm(weights, v)', [att, v], nq * c, save=[att, v], kind='mm')
    tape.drop(v)
    avg = tape.op(f'{label} weights.mean(heads)', [att], sets * lq * lk)
    tape.drop(avg, att)
    oc = tape.op(f'{label} transpose.contiguous', [o], nq * c)
    tape.drop(o)
    out = tape.linear(oc, nq, mha.out_proj, f'{label}.out_proj')
    tape.drop(oc)
    return out


def _dsvt_encoder(tape, enc, src, pos, inds, n, sets, k, act, label):
    """DSVT_EncoderLayer: SetAttention (gathers, attention, unique-inverse scatter back,
    residual + norm1, FFN, residual + norm2), then + identity and the layer norm."""
    sa = enc.win_attn
    c = sa.d_model
    rows = sets * k
    feats = tape.gather_rows(src, inds, rows, c, f'{label} src[voxel_inds]')
    pos_g = tape.gather_rows(pos, inds, rows, c, f'{label} pos[voxel_inds]')
    query = tape.add(feats, pos_g, rows * c, f'{label} query = feats + pos')
    key = tape.add(feats, pos_g, rows * c, f'{label} key = feats + pos')
    attn = _mha_weights(tape, sa.self_attn, query, key, feats, sets, k, k, True,
                        f'{label}.self_attn')
    tape.temp(4 * rows * INT64, f'{label} unique / inverse / perm of voxel_inds')
    perm = tape.index(n, f'{label} perm')
    # batch_first MHA returns a transposed view: reshape(-1, d_model) copies it
    flat = tape.op(f'{label} src2.reshape copy', [attn], rows * c)
    tape.drop(attn)
    back = tape.gather_rows(flat, perm, n, c, f'{label} src2[perm]')
    tape.drop(flat)
    s1 = tape.add(src, back, n * c, f'{label} src + src2')
    tape.drop(back)
    n2 = set_attention_ffn(tape, s1, n, sa, act, label)
    tape.drop(feats, pos_g, query, key, perm)   # SetAttention's locals die when it returns
    s3 = tape.add(n2, src, n * c, f'{label} + identity')
    tape.drop(n2)
    out = tape.layernorm(s3, n, enc.norm, f'{label}.norm')
    tape.drop(s3)
    return out


def _dsvt_reduction(tape, module, s, x, m, vol, c, label):
    """Stage pooling: the zero placeholder (M, vol, C) filled by index_put, then the reduction
    block (attention: max-pool query, key = cells + pos_embedding, MHA, norm)."""
    red = getattr(module, f'stage_{s}_reduction')
    holder = tape.op(f'{label} placeholder[mapping, index_in_pool] = output', [x], m * vol * c)
    kind = module.reduction_type
    if kind == 'linear':
        lin = tape.linear(holder, m, red.linear1, f'{label}.linear1')
        out = tape.layernorm(lin, m, red.norm, f'{label}.norm')
        tape.drop(lin)
    elif kind == 'maxpool':
        idx = tape.index(m * c, f'{label} max indices')
        out = tape.op(f'{label} maxpool', [holder], m * c, save=[idx])
        tape.drop(idx)
    else:
        idx = tape.index(m * c, f'{label} query max indices')
        query = tape.op(f'{label} query_func (max pool)', [holder], m * c, save=[idx])
        tape.drop(idx)
        pe = tape.param(red.pos_embedding, f'{label}.pos_embedding')
        rep = tape.op(f'{label} pos_embedding.repeat', [], m * vol * c, params=[pe])
        key = tape.add(holder, rep, m * vol * c, f'{label} key = cells + pos')
        tape.drop(rep)
        q2 = tape.op(f'{label} query.clone()', [query], m * c)
        att = _mha_weights(tape, red.self_attn, q2, key, holder, m, 1, vol, True,
                           f'{label}.self_attn')
        tape.drop(q2, key)
        r = tape.add(att, query, m * c, f'{label} output + src')
        tape.drop(att, query)
        out = tape.layernorm(r, m, red.norm, f'{label}.norm')
        tape.drop(r)
    tape.drop(holder)
    return out


def dsvt_pcdet_memory(module, tape, flow):
    """OpenPCDet's DSVT: the input layer (feature / coord clones, window and set partitions
    per stage and shift, position embeddings per block and shift, pooling indices and zero
    placeholders), DSVTBlocks of two encoder layers (residual clone, attention with explicit
    weights: OpenPCDet calls MultiheadAttention with need_weights=True), residual norms,
    pooling between stages; USE_CHECKPOINT recomputes each block in backward."""
    src = flow.sparse
    b = flow.batch_size
    geo = _dsvt_geometry(module)
    stages, how = _dsvt_counts(module, flow)
    x = tape.op('voxel_feats_stage0 = voxel_features.clone()', [src.t], src.n * src.c)
    coords0 = tape.index(src.n * 4, 'voxel_coors_stage0 (clone, long)')
    layouts = []
    for s, ((shape, windows, shifts, set_size, blocks, c), (n_s, sets_s)) in \
            enumerate(zip(geo, stages)):
        n = n_s * b
        keep = [tape.index(n, f'stage {s} shift {i} batch_win_inds') for i in range(2)]
        keep += [tape.index(3 * n, f'stage {s} shift {i} coors_in_win') for i in range(2)]
        sets = []
        for i in range(2):
            tape.temp(8 * n * INT64, f'stage {s} shift {i} set partition sorts / scatters')
            inds = tape.index(2 * sets_s[i] * b * set_size, f'stage {s} shift {i} set_voxel_inds')
            mask = tape.index(2 * sets_s[i] * b * set_size, f'stage {s} shift {i} mask', BOOL)
            keep.append(mask)
            sets.append((inds, sets_s[i] * b))
        dim_in = 3 if shape[2] > 1 else 2
        pos = []
        for bl in range(blocks):
            pos.append([_pos_embed(tape, module.input_layer.posembed_layers[s][bl][i]
                                   .position_embedding_head, n, dim_in, f'posembed.{s}.{bl}.{i}')
                        for i in range(2)])
        pool = None
        if s + 1 < len(geo):
            m = stages[s + 1][0] * b
            stride = module.input_layer.downsample_stride[s]
            keep += [tape.index(n, f'stage {s} pooling_mapping_index'),
                     tape.index(n, f'stage {s} pooling_index_in_pool'),
                     tape.index(4 * m, f'stage {s + 1} voxel_coors')]
            pool = (m, math.prod(stride))
        layouts.append((n, c, set_size, sets, pos, pool, keep))
        flow.shape_line(f'  DSVT stage {s} {list(shape)}: {n_s:,} voxels per sample, '
                        f'{sets_s[0]:,} / {sets_s[1]:,} sets of {set_size} (shift 0 / 1; {how})')
    act = module.model_cfg.activation
    block_id = 0
    for s, (n, c, k, sets, pos, pool, keep) in enumerate(layouts):
        for i, (block, norm) in enumerate(zip(getattr(module, f'stage_{s}'),
                                              getattr(module, f'residual_norm_stage_{s}'))):
            residual = tape.op(f'stage_{s}.{i} residual = output.clone()', [x], n * c)
            if module.use_torch_ckpt:
                tape.checkpoint_begin()
            y = x
            shift = block_id % 2
            inds, n_sets = sets[shift]
            for j, enc in enumerate(block.encoder_list):
                z = _dsvt_encoder(tape, enc, y, pos[i][j], inds, n, n_sets, k, act,
                                  f'stage_{s}.{i}.encoder_{j}')
                if y is not x:
                    tape.drop(y)
                y = z
            if module.use_torch_ckpt:
                tape.checkpoint_end(outputs=[y], inputs=[x, inds, *pos[i]])  # kept for the recompute
            r = tape.add(y, residual, n * c, f'stage_{s}.{i} output + residual')
            tape.drop(y, residual)
            x2 = tape.layernorm(r, n, norm, f'residual_norm_stage_{s}.{i}')
            tape.drop(r, x)
            x = x2
            block_id += 1
        if pool is not None:
            m, vol = pool
            x2 = _dsvt_reduction(tape, module, s, x, m, vol, c, f'stage_{s}_reduction')
            tape.drop(x)
            x = x2
    for n, c, k, sets, pos, pool, keep in layouts:
        tape.drop(*keep, *(i for i, _ in sets), *(p for pair in pos for p in pair))
    n_out = layouts[-1][0]
    tape.set_batch('voxel_features', x)
    tape.set_batch('pillar_features', x)
    tape.drop(coords0)
    shape = geo[-1][0]
    out = Sparse(x, n_out, geo[-1][5], (shape[2], shape[1], shape[0]), src.stride,
                 tape.index(4 * n_out, 'voxel_coords (last stage)'), {}, None)
    tape.set_batch('voxel_coords', out.coords)
    tape.drop(out.coords)
    flow.sparse = out
    tape.drop(x)
    if module.use_torch_ckpt:
        flow.note('DSVT USE_CHECKPOINT: block activations are recomputed in backward')


# ============================================================================ ROI heads
def _roi_count(module, flow):
    """Sampled ROIs over the batch (TARGET_CONFIG.ROI_PER_IMAGE per image)."""
    return flow.batch_size * int(module.model_cfg.TARGET_CONFIG.ROI_PER_IMAGE)


def _roi_targets(module, tape, flow):
    """proposal_layer (NMS of the first stage's boxes) and assign_targets (no grad): the rois,
    their labels and the regression targets of R sampled ROIs."""
    b = flow.batch_size
    nms = module.model_cfg.NMS_CONFIG.TRAIN
    pre, post = int(nms.NMS_PRE_MAXSIZE), int(nms.NMS_POST_MAXSIZE)
    tape.temp(pre * (-(-pre // 64)) * INT64 + pre * 7 * FP32, 'proposal NMS mask')
    rois = tape.tensor(b * post * 7, 'rois (B, NMS_POST_MAXSIZE, 7)')
    r = _roi_count(module, flow)
    tape.temp(b * post * flow.gt_boxes * FP32 * 2, 'ROI x gt IoU (target sampling)')
    kept = [tape.tensor(r * 7, 'sampled rois'), tape.tensor(r * 8, 'gt_of_rois'),
            tape.tensor(r * 8, 'gt_of_rois_src'), tape.tensor(r * 3, 'roi ious / scores / labels')]
    tape.drop(rois)
    return r, kept


def _roi_fc_losses(module, tape, flow, feats, r, label):
    """shared_fc_layer, then the cls / reg / iou stacks (OpenPCDet names them either
    ``cls_layers`` or ``cls_fc_layers`` + ``cls_pred_layer``), then the R-CNN losses (small)."""
    shared, _ = _run_rows(tape, feats, r, module.shared_fc_layer, f'{label}.shared_fc_layer')
    outs = []
    for name in ('cls', 'reg', 'iou'):
        stack = getattr(module, f'{name}_layers', None)
        if stack is not None:
            outs.append(_run_rows(tape, shared, r, stack, f'{label}.{name}_layers'))
            continue
        stack, layer = getattr(module, f'{name}_fc_layers', None), \
            getattr(module, f'{name}_pred_layer', None)
        if stack is None or layer is None:
            continue
        y, _ = _run_rows(tape, shared, r, stack, f'{label}.{name}_fc_layers')
        outs.append(_run_rows(tape, y, r, [layer], f'{label}.{name}_pred_layer'))
        tape.drop(y)
    tape.drop(shared)
    for i, (z, c) in enumerate(outs):
        tape.set_state(f'rcnn output {i}', z)
        flow.losses.append(pointwise_loss(tape, z, r * c, 6, f'{label} rcnn loss {i}'))
        tape.drop(z)


def _roi_begin(module, tape, flow):
    tape.release_prior_state()
    r, kept = _roi_targets(module, tape, flow)
    for i, t in enumerate(kept):
        tape.set_state(f'targets {i}', t)
        tape.drop(t)
    return r


def second_head_memory(module, tape, flow):
    """SECONDHead: affine_grid + grid_sample of the detached BEV map per ROI (no grad), the
    shared Conv1d FC layers, the IoU branch."""
    r = _roi_begin(module, tape, flow)
    g = int(module.model_cfg.ROI_GRID_POOL.GRID_SIZE)
    c = flow.bev.c
    pooled = tape.tensor(r * c * g * g, 'pooled features (R, C, G, G)')
    tape.temp(r // flow.batch_size * g * g * 2 * FP32, 'affine grid')
    _roi_fc_losses(module, tape, flow, pooled, r, 'SECONDHead')
    tape.drop(pooled)


def _neighbor_pool(tape, layer, feats, n_src, m, label):
    """NeighborVoxelSAModuleMSG on n_src voxels for m grid points: per scale, mlps_in on the
    voxels, the grouped (M, C, nsample) features and xyz, mlps_pos, add, ReLU, max pool,
    mlps_out. Returns [(tensor, channels)] per scale."""
    outs = []
    for k, grouper in enumerate(layer.groupers):
        ns = int(grouper.nsample)
        fin, c1 = _run_rows(tape, feats, n_src, layer.mlps_in[k], f'{label}.mlps_in.{k}')
        idx = tape.index(m * ns, f'{label} voxel query idx', INT32)
        grouped = tape.op(f'{label} grouped features (M, C, ns)', [fin], m * c1 * ns, save=[idx])
        tape.drop(fin)
        gxyz = tape.tensor(m * 3 * ns, f'{label} grouped xyz')
        pos, _ = _run_rows(tape, gxyz, m * ns, layer.mlps_pos[k], f'{label}.mlps_pos.{k}')
        tape.drop(gxyz)
        s = tape.add(grouped, pos, m * c1 * ns, f'{label} grouped + position')
        tape.drop(grouped, pos)
        r = tape.relu(s, m * c1 * ns, f'{label} relu')
        tape.drop(s)
        arg = tape.index(m * c1, f'{label} max_pool2d indices')
        pooled = tape.op(f'{label} max_pool2d over nsample', [r], m * c1, save=[arg])
        tape.drop(arg, r, idx)
        out, c2 = _run_rows(tape, pooled, m, layer.mlps_out[k], f'{label}.mlps_out.{k}')
        tape.drop(pooled)
        outs.append((out, c2))
    return outs


def voxel_rcnn_head_memory(module, tape, flow):
    """VoxelRCNNHead: ROI grid points (GRID_SIZE^3 per ROI) pooled from each source level of
    the 3D backbone with NeighborVoxelSAModuleMSG, concatenated, the shared FC layers."""
    levels = flow.pcdet_levels
    if not levels:
        raise NotModelled('VoxelRCNNHead without the 3D backbone levels it pools')
    r = _roi_begin(module, tape, flow)
    g = int(module.pool_cfg.GRID_SIZE)
    m = r * g ** 3
    parts = []
    for k, name in enumerate(module.pool_cfg.FEATURES_SOURCE):
        lv = levels[name]
        xyz = tape.tensor(lv.n * 3, f'{name} voxel centres')
        v2p = tape.index(flow.batch_size * math.prod(lv.spatial), f'{name} voxel2point index',
                         INT32)
        parts += _neighbor_pool(tape, module.roi_grid_pool_layers[k], lv.t, lv.n, m, name)
        tape.drop(xyz, v2p)
    c = sum(pc for _, pc in parts)
    cat = tape.op('pooled features cat (R, G^3 * C)', [p for p, _ in parts], m * c,
                  grad_alias=True)
    tape.drop(*(p for p, _ in parts))
    _roi_fc_losses(module, tape, flow, cat, r, 'VoxelRCNNHead')
    tape.drop(cat)


def _first_conv(seq):
    return next(m for m in seq.modules() if _is_spconv(m))


def part_a2_fc_head_memory(module, tape, flow):
    """PartA2FCHead: RoIAware pooling of the part features and the backbone's point features
    into (R, P, P, P, C) grids (no grad through the part channels), the sparse convs on the
    non-empty cells (every cell counted: an upper bound), the merged features densified to
    (R, C * P^3) for the shared Conv1d FC layers."""
    if flow.pcdet_points is None:
        raise NotModelled('PartA2FCHead without the point features of a UNetV2 backbone')
    r = _roi_begin(module, tape, flow)
    p = int(module.model_cfg.ROI_AWARE_POOL.POOL_SIZE)
    cells = r * p ** 3
    walk = SparseReplay(tape, flow)
    part_c = _first_conv(module.conv_part).in_channels
    rpn_c = _first_conv(module.conv_rpn).in_channels
    npts, _ = flow.pcdet_points
    tape.temp(r * npts * INT32 // max(1, flow.batch_size), 'RoIAware pooling point map')
    pooled_part = tape.tensor(cells * part_c, 'pooled part features (R, P, P, P, 4)')
    argmax = tape.index(cells * rpn_c, 'RoIAware argmax', INT32)
    pooled_rpn = tape.op('pooled rpn features (R, P, P, P, C)', [tape.get_batch('point_features')],
                         cells * rpn_c, save=[argmax])
    tape.drop(argmax)
    coords = tape.index(cells * 4, 'sparse_idx.int()', INT32)
    part = tape.op('part_features[sparse_idx]', [pooled_part], cells * part_c)
    rpn = tape.op('rpn_features[sparse_idx]', [pooled_rpn], cells * rpn_c, save=[coords])
    tape.drop(pooled_part, pooled_rpn)
    xs = []
    for name, t, c in (('conv_part', part, part_c), ('conv_rpn', rpn, rpn_c)):
        x = Sparse(t, cells, c, (p, p, p), (1, 1, 1), coords, {}, None)
        xs.append(walk.run(x, getattr(module, name), name))
    tape.drop(part, rpn)
    c = sum(x.c for x in xs)
    cat = tape.op('merged_feature cat(rpn, part)', [x.t for x in xs], cells * c, grad_alias=True)
    tape.drop(*(x.t for x in xs))
    dense = tape.op('shared_feature .dense() (R, C * P^3, 1)', [cat], cells * c)
    tape.drop(cat, coords)
    _roi_fc_losses(module, tape, flow, dense, r, 'PartA2FCHead')
    tape.drop(dense)


def part_offset_head_memory(module, tape, flow):
    """PointIntraPartOffsetHead: per-point FC stacks (cls, part, optional box) on the backbone's
    point features; targets by points-in-boxes; sigmoid focal + BCE losses."""
    if flow.pcdet_points is None:
        raise NotModelled('PointIntraPartOffsetHead without point features')
    n, _ = flow.pcdet_points
    feats = tape.get_batch('point_features')
    outs = []
    for name in ('cls_layers', 'part_reg_layers', 'box_layers'):
        seq = getattr(module, name, None)
        if seq is None:
            continue
        y, c = _run_rows(tape, feats, n, seq, name)
        outs.append((name, y, c))
    tape.temp(n * flow.gt_boxes * BOOL + n * INT64, 'points_in_boxes')
    tape.release_prior_state()
    for name, y, c in outs:
        tape.set_state(name, y)
        tgt = tape.tensor(n * c, f'{name} targets')
        tape.set_state(f'{name} targets', tgt)
        tape.drop(tgt)
        flow.losses.append(pointwise_loss(tape, y, n * c, 6, f'POINT_HEAD {name} loss'))
        tape.drop(y)


RULES = {
    'MeanVFE': mean_vfe_memory,
    'PillarVFE': pillar_vfe_memory,
    'DynamicVoxelVFE': dynamic_vfe_memory,
    'DynamicPillarVFE': dynamic_vfe_memory,
    'DynamicPillarVFESimple2D': dynamic_vfe_memory,
    'DynamicMeanVFE': dynamic_mean_vfe_memory,
    'VoxelBackBone8x': voxel_backbone_memory,
    'VoxelResBackBone8x': voxel_backbone_memory,
    'UNetV2': unet_v2_memory,
    'VoxelResBackBone8xVoxelNeXt': voxelnext_backbone_memory,
    'DSVT': dsvt_pcdet_memory,
    'HeightCompression': height_compression_memory,
    'PointPillarScatter': pillar_scatter_memory,
    'PointPillarScatter3d': pillar_scatter_memory,
    'BaseBEVBackbone': base_bev_backbone_memory,
    'BaseBEVResBackbone': base_bev_res_backbone_memory,
    'AnchorHeadSingle': anchor_head_memory,
    'CenterHead': center_head_pcdet_memory,
    'VoxelNeXtHead': voxelnext_head_memory,
    'SECONDHead': second_head_memory,
    'VoxelRCNNHead': voxel_rcnn_head_memory,
    'PartA2FCHead': part_a2_fc_head_memory,
    'PointIntraPartOffsetHead': part_offset_head_memory,
}


def sum_losses(model, tape, flow):
    """OpenPCDet's detectors add their heads' losses (get_training_loss)."""
    loss = tape.op('loss sum', flow.losses, 1, grad_alias=True)
    tape.drop(*flow.losses)
    return loss


LOSSES = {name: sum_losses for name in (
    'CenterPoint', 'SECONDNet', 'PointPillar', 'PillarNet', 'VoxelNeXt', 'PartA2Net',
    'SECONDNetIoU', 'PVRCNN', 'VoxelRCNN', 'PVRCNNPlusPlus', 'TransFusion', 'PointRCNN')}
