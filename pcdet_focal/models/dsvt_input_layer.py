"""DSVT's input layer: optional input downsampling, window/set partition, position embeddings.

Parameter names follow OpenPCDet's ``DSVTInputLayer`` (``posembed_layers.<stage>.<block>.<shift>
.position_embedding_head.{0,1,3}``) so its checkpoints load. The input downsampling
(``input_reduction``) is ours and only holds parameters for ``input_reduction: learned`` with an
``input_downsample`` other than [1, 1, 1].
"""
import math
from collections import namedtuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.dsvt_sets import pooling_index, size_equal_sets, window_partition
from .leaf import LeafMultiheadAttention

# One stage's precomputed layout:
# coords: (N_s, 4) long [b, z, y, x]; sets: [SetPartition of shift 0, of shift 1];
# pos_embed: pos_embed[block][i] (N_s, d_model[s]) float, used by encoder layer i of that block;
# pooling: Pooling to the next stage (None for the last stage).
StageLayout = namedtuple('StageLayout', ['coords', 'sets', 'pos_embed', 'pooling'])
# The index work of one stage (no features): coords; parts: [(window ids, coords in window) of
# shift 0, of shift 1]; sets: [SetPartition of shift 0, of shift 1]; pooling (None: last stage).
StagePartition = namedtuple('StagePartition', ['coords', 'parts', 'sets', 'pooling'])

# OpenPCDet scales normalised positions by 2 * 3.1415 (not pi); trained weights expect it.
_NORM_PI = 3.1415


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute position embedding: MLP (in_dim -> C -> C) on in-window positions."""

    def __init__(self, input_channel, num_pos_feats):
        super().__init__()
        self.position_embedding_head = nn.Sequential(
            nn.Linear(input_channel, num_pos_feats),
            nn.BatchNorm1d(num_pos_feats),
            nn.ReLU(inplace=True),
            nn.Linear(num_pos_feats, num_pos_feats))

    def forward(self, xyz):
        """xyz: (N, in_dim) float [x, y(, z)] -> (N, C)."""
        return self.position_embedding_head(xyz)


class AttentionPool(nn.Module):
    """``input_reduction: learned``: multi-head attention pooling of the sub-voxels of a cell.

    Like DSVT's own stage reduction (query = max over the cell, keys = sub-voxel features plus
    a learned embedding of their slot in the cell, LayerNorm(attention + query)), but computed
    sparsely: only occupied sub-voxels are keys, so cost and memory scale with N, never with
    cells x cell volume, and empty slots never enter the max or the softmax.
    """

    def __init__(self, channels, volume, heads):
        super().__init__()
        self.heads = heads
        # holds the q/k/v/out projections (torch's layout); applied by the scatter code below
        self.self_attn = LeafMultiheadAttention(channels, heads, batch_first=True)
        self.pos_embedding = nn.Parameter(torch.zeros(volume, channels))
        nn.init.normal_(self.pos_embedding, std=0.01)
        self.norm = nn.LayerNorm(channels)

    def forward(self, feats, group, slot, num_cells):
        """feats: (N, C); group: (N,) cell in [0, M); slot: (N,) in [0, volume) -> (M, C)."""
        n, c = feats.shape
        h = self.heads
        d = c // h
        query = _group_max(feats, group, num_cells)
        w_q, w_k, w_v = self.self_attn.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.self_attn.in_proj_bias.chunk(3)
        q = F.linear(query, w_q, b_q).view(num_cells, h, d) / math.sqrt(d)
        k = F.linear(feats + self.pos_embedding[slot], w_k, b_k).view(n, h, d)
        v = F.linear(feats, w_v, b_v).view(n, h, d)
        score = (q[group] * k).sum(-1)                                   # (N, h)
        # softmax per cell: subtract the cell max (a constant per cell, no gradient needed)
        cell_max = score.new_full((num_cells, h), float('-inf')).scatter_reduce(
            0, group[:, None].expand(-1, h), score.detach(), 'amax', include_self=True)
        e = torch.exp(score - cell_max[group])
        denom = score.new_zeros((num_cells, h)).index_add(0, group, e)
        weight = e / denom[group]
        out = feats.new_zeros((num_cells, h, d)).index_add(0, group, weight[..., None] * v)
        out = self.self_attn.out_proj(out.reshape(num_cells, c))
        return self.norm(out + query)


def _group_max(feats, group, num_groups):
    """(N, C) features -> (M, C) max over the members of each group (every group non-empty)."""
    out = feats.new_zeros((num_groups, feats.shape[1]))
    return out.scatter_reduce(0, group[:, None].expand_as(feats), feats, 'amax',
                              include_self=False)


def _group_mean(feats, group, num_groups):
    """(N, C) features -> (M, C) mean over the members of each group."""
    total = feats.new_zeros((num_groups, feats.shape[1])).index_add(0, group, feats)
    count = torch.bincount(group, minlength=num_groups).clamp_min(1).to(feats.dtype)
    return total / count[:, None]


class DSVTInputLayer(nn.Module):
    """Precomputes everything the DSVT blocks need from the voxel coordinates.

    Args (already validated by DSVTDownsample's config parser):
        sparse_shape: [x, y, z] grid of the incoming voxels.
        input_downsample: [sx, sy, sz] merge before stage 0 ([1, 1, 1]: none).
        input_reduction: 'max' | 'mean' | 'learned' (how merged voxels combine).
        stage_shapes: per stage [x, y, z] sparse shape (stage 0 = after input_downsample).
        windows: per stage [window of shift 0, window of shift 1 (x hybrid_factor)], [x, y, z].
        shifts: per stage [[x, y, z] of shift 0, of shift 1].
        set_sizes, blocks, d_model: per stage ints.
        downsample_stride: per stage transition [x, y, z].
        normalize_pos: scale in-window positions to [-pi, pi] (OpenPCDet's option).
        reduction_heads: heads of the learned input reduction.
    """

    def __init__(self, sparse_shape, input_downsample, input_reduction, stage_shapes, windows,
                 shifts, set_sizes, blocks, d_model, downsample_stride, normalize_pos,
                 reduction_heads):
        super().__init__()
        self.sparse_shape = list(sparse_shape)
        self.input_downsample = list(input_downsample)
        self.input_reduction_mode = input_reduction
        self.stage_shapes = stage_shapes
        self.windows = windows
        self.shifts = shifts
        self.set_sizes = set_sizes
        self.blocks = blocks
        self.downsample_stride = downsample_stride
        self.normalize_pos = normalize_pos
        self.merges_input = any(s > 1 for s in input_downsample)
        if self.merges_input and input_reduction == 'learned':
            volume = math.prod(input_downsample)
            self.input_reduction = AttentionPool(d_model[0], volume, reduction_heads)
        # posembed_layers[stage][block][shift]; 3-D positions unless the stage is flat in z
        self.posembed_layers = nn.ModuleList()
        for s, shape in enumerate(stage_shapes):
            in_dim = 3 if shape[2] > 1 else 2
            self.posembed_layers.append(nn.ModuleList(
                nn.ModuleList(PositionEmbeddingLearned(in_dim, d_model[s]) for _ in range(2))
                for _ in range(blocks[s])))

    def downsample_input(self, feats, coords):
        """Merge voxels sharing an ``input_downsample`` cell.

        feats: (N, C); coords: (N, 4) long [b, z, y, x] on ``sparse_shape``.
        Returns (M, C) features, (M, 4) long coords on ``stage_shapes[0]``.
        """
        if not self.merges_input:
            return feats, coords
        merge = pooling_index(coords, self.sparse_shape, self.input_downsample)
        return self.reduce_input(feats, merge), merge.coords

    def reduce_input(self, feats, merge):
        """Combine the (N, C) features of the voxels sharing an ``input_downsample`` cell
        (``merge``: the Pooling of :meth:`partition`) -> (M, C)."""
        m = merge.coords.shape[0]
        if self.input_reduction_mode == 'max':
            return _group_max(feats, merge.group, m)
        if self.input_reduction_mode == 'mean':
            return _group_mean(feats, merge.group, m)
        return self.input_reduction(feats, merge.group, merge.slot, m)

    @torch.no_grad()
    def partition(self, coords):
        """The index work of the whole input layer, without features: coords (N, 4) long
        [b, z, y, x] -> (input merge Pooling or None, [StagePartition per stage]). The memory
        estimator runs it on real frames to count voxels and sets per stage."""
        merge = None
        if self.merges_input:
            merge = pooling_index(coords, self.sparse_shape, self.input_downsample)
            coords = merge.coords
        stages = []
        for s in range(len(self.stage_shapes)):
            parts = [window_partition(coords, self.stage_shapes[s], self.windows[s][i],
                                      self.shifts[s][i]) for i in range(2)]
            sets = [size_equal_sets(win, ciw, self.windows[s][i], self.set_sizes[s])
                    for i, (win, ciw) in enumerate(parts)]
            pooling = None
            if s + 1 < len(self.stage_shapes):
                pooling = pooling_index(coords, self.stage_shapes[s], self.downsample_stride[s])
            stages.append(StagePartition(coords, parts, sets, pooling))
            if pooling is not None:
                coords = pooling.coords
        return merge, stages

    def position_input(self, coords_in_win, window):
        """(N, 3) long [z, y, x] in-window coords -> (N, 2 or 3) float [x, y(, z)] centred."""
        wx, wy, wz = window
        cz, cy, cx = coords_in_win.unbind(dim=1)
        x, y, z = cx - wx / 2, cy - wy / 2, cz - wz / 2
        if self.normalize_pos:
            x, y, z = x / wx * 2 * _NORM_PI, y / wy * 2 * _NORM_PI, z / wz * 2 * _NORM_PI
        parts = (x, y) if wz == 1 else (x, y, z)
        return torch.stack(parts, dim=-1).float()

    def forward(self, feats, coords):
        """feats: (N, d_model[0]); coords: (N, 4) long [b, z, y, x].

        Returns (stage-0 features (N0, d_model[0]), [StageLayout per stage]).
        """
        merge, stages = self.partition(coords)
        if merge is not None:
            feats = self.reduce_input(feats, merge)
        layouts = []
        for s, stage in enumerate(stages):
            with torch.no_grad():
                positions = [self.position_input(ciw, self.windows[s][i]).to(feats.dtype)
                             for i, (_, ciw) in enumerate(stage.parts)]
            # OpenPCDet feeds encoder layer i of every block the embedding of shift i (even in
            # blocks whose sets come from the other shift); trained weights depend on it.
            pos_embed = [[self.posembed_layers[s][b][i](positions[i]) for i in range(2)]
                         for b in range(self.blocks[s])]
            layouts.append(StageLayout(stage.coords, stage.sets, pos_embed, stage.pooling))
        return feats, layouts
