"""BACKBONE_3D ``DSVTDownsample``: DSVT (Dynamic Sparse Voxel Transformer) in pure PyTorch.

Accepts OpenPCDet's DSVT config unchanged and keeps its parameter names (a DSVT checkpoint
loads when ``input_downsample`` is [1, 1, 1]); adds ``INPUT_LAYER.input_downsample`` /
``input_reduction`` to merge voxels before stage 0, and writes ``encoded_spconv_tensor`` so
``SparseHeightCompression`` can follow directly. Registered as ``DSVT`` too in our own table
(inside OpenPCDet, its own ``DSVT`` keeps the name).

Data flow (N voxels, C = d_model):
  voxel_features (N, C0), voxel_coords (N, 4) [b, z, y, x]
  -> input layer: merge by input_downsample, window + set partition per stage and shift,
     learned position embeddings
  -> per stage: blocks of two set-attention layers (sets sorted along y, then along x), window
     shift alternating per block, residual LayerNorm; pooling by downsample_stride in between
  -> pillar_features = voxel_features (N', C_last), voxel_coords (N', 4) of the last stage.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError, InputError
from ..ops.dsvt_sets import ceil_shape
from ..ops.sparse import check_coords, sparse_tensor, to_int_coords
from ..registry import BACKBONE_3D
from ..schema import REQUIRED, Bool, Choice, Float, Int, Key, ListOf, Schema, Section, Triple
from .dsvt_input_layer import DSVTInputLayer
from .dsvt_memory import dsvt_memory
from .leaf import LeafMultiheadAttention

_ACTIVATIONS = {'relu': F.relu, 'gelu': F.gelu}
_REDUCTIONS = ('attention', 'maxpool', 'linear')
_INPUT_REDUCTIONS = ('max', 'mean', 'learned')
_STAGE_ATTENTION_HEADS = 8  # OpenPCDet's stage reduction attention uses 8 heads, not nhead


# ----------------------------------------------------------------------------- config

def _stage_ints(lo=1):
    return ListOf(Int(lo=lo), min_len=1, what=f'one integer >= {lo} per stage')


_PAIR = ListOf(Int(lo=1), length=2, what='[set_size, blocks]')
_SHIFTS = ListOf(Triple(0, '[x, y, z]'), length=2, what='two [x, y, z] shifts')

INPUT_LAYER = Schema('DSVT INPUT_LAYER', [
    Key('sparse_shape', Triple(1), REQUIRED, 'voxel grid DSVT receives, x y z'),
    Key('input_downsample', Triple(1), [1, 1, 1],
        'merge the voxels of each cell of this many voxels per axis before stage 0'),
    Key('input_reduction', Choice('max', 'mean', 'learned'), 'max',
        'how merged voxels combine (`learned`: attention from their max, as DSVT pooling)'),
    Key('downsample_stride', ListOf(Triple(1), what='one [sx, sy, sz] per stage transition'), [],
        'pooling between stages (stages - 1 entries)'),
    Key('d_model', _stage_ints(), REQUIRED, 'channels per stage; d_model[0] = input width'),
    Key('set_info', ListOf(_PAIR, min_len=1, what='one [set_size, blocks] per stage'), REQUIRED,
        'set size and number of blocks per stage'),
    Key('window_shape', ListOf(Triple(1), min_len=1, what='one [wx, wy, wz] per stage'),
        REQUIRED, 'window per stage'),
    Key('hybrid_factor', Triple(1), [1, 1, 1], 'window of the second shift = window x this'),
    Key('shifts_list', ListOf(_SHIFTS, min_len=1, what='per stage two [x, y, z] shifts'), None,
        'window shifts per stage (default: 0, then half the hybrid window)'),
    Key('normalize_pos', Bool(), False, 'normalise in-window positions to [-1, 1]'),
])

DSVT_CONFIG = Schema('DSVTDownsample', [
    Key('INPUT_LAYER', Section(INPUT_LAYER), REQUIRED, 'grid, windows, sets (keys below)'),
    Key('block_name', ListOf(Choice('DSVTBlock'), min_len=1,
                             what="one 'DSVTBlock' per stage"), REQUIRED, 'one block type per stage'),
    Key('set_info', ListOf(_PAIR, min_len=1, what='one [set_size, blocks] per stage'), None,
        "OpenPCDet's copy of INPUT_LAYER.set_info (must be equal)"),
    Key('d_model', _stage_ints(), None, "OpenPCDet's copy of INPUT_LAYER.d_model (must be equal)"),
    Key('nhead', _stage_ints(), REQUIRED, 'attention heads per stage (divides d_model)'),
    Key('dim_feedforward', _stage_ints(), REQUIRED, 'feed-forward width per stage'),
    Key('dropout', Float(lo=0, hi=1, hi_open=True), 0.0, 'attention dropout'),
    Key('activation', Choice(*_ACTIVATIONS), 'relu', 'feed-forward activation'),
    Key('reduction_type', Choice(*_REDUCTIONS), 'attention', 'pooling between stages'),
    Key('output_shape', ListOf(Int(lo=1), length=2, what='[ny, nx]'), None,
        "OpenPCDet's BEV size hint (unused here)"),
    Key('conv_out_channel', Int(lo=1), None, 'must equal d_model[-1] when given'),
    Key('USE_CHECKPOINT', Bool(), False,
        'activation checkpointing per block (less memory, more time)'),
])


def _per_stage(value, field, stage_num, what):
    if len(value) != stage_num:
        raise ConfigError(f'{field} must list {what} for each of the {stage_num} stages '
                          f'(len(block_name)); got {len(value)}')
    return list(value)


class DSVTConfig:
    """Validated DSVT geometry and widths from a model_cfg (OpenPCDet keys + ours)."""

    def __init__(self, model_cfg, input_channels=None, grid_size=None, prefix='MODEL.BACKBONE_3D'):
        p, il = prefix, f'{prefix}.INPUT_LAYER'
        cfg = self.parsed = DSVT_CONFIG.parse(model_cfg, prefix)
        layer = cfg.INPUT_LAYER
        n = self.stage_num = len(cfg.block_name)
        self.d_model = _per_stage(layer.d_model, f'{il}.d_model', n, 'd_model')
        set_info = _per_stage(layer.set_info, f'{il}.set_info', n, '[set_size, blocks]')
        self.set_sizes = [size for size, _ in set_info]
        self.blocks = [blocks for _, blocks in set_info]
        # the top-level copies must agree: OpenPCDet reads block counts from the top level
        # and set sizes / embeddings from INPUT_LAYER, so a mismatch silently breaks it
        for key, mine in (('d_model', self.d_model), ('set_info', set_info)):
            if cfg[key] is not None and cfg[key] != mine:
                raise ConfigError(f'{p}.{key}={cfg[key]} differs from {il}.{key}={mine}; '
                                  'they must be equal')
        self.nhead = _per_stage(cfg.nhead, f'{p}.nhead', n, 'nhead')
        self.dim_feedforward = _per_stage(cfg.dim_feedforward, f'{p}.dim_feedforward', n,
                                          'dim_feedforward')
        for s in range(n):
            if self.d_model[s] % self.nhead[s]:
                raise ConfigError(f'{p}.nhead[{s}]={self.nhead[s]} must divide '
                                  f'd_model[{s}]={self.d_model[s]}')
        self.dropout, self.activation = cfg.dropout, cfg.activation
        self.reduction_type, self.use_checkpoint = cfg.reduction_type, cfg.USE_CHECKPOINT
        self.sparse_shape = layer.sparse_shape
        self.input_downsample = layer.input_downsample
        self.input_reduction = layer.input_reduction
        if len(layer.downsample_stride) != n - 1:
            raise ConfigError(f'{il}.downsample_stride must list {n - 1} [sx, sy, sz] strides '
                              f'(one per stage transition, [] for one stage); got '
                              f'{layer.downsample_stride!r}')
        self.downsample_stride = layer.downsample_stride
        self.stage_shapes = [ceil_shape(self.sparse_shape, self.input_downsample)]
        for st in self.downsample_stride:
            self.stage_shapes.append(ceil_shape(self.stage_shapes[-1], st))

        windows = _per_stage(layer.window_shape, f'{il}.window_shape', n, '[wx, wy, wz]')
        hybrid = layer.hybrid_factor
        self.windows = []
        for s, w in enumerate(windows):
            shape = self.stage_shapes[s]
            for axis, name in enumerate('xyz'):
                if w[axis] > shape[axis]:
                    raise ConfigError(
                        f'{il}.window_shape[{s}]={w} is larger than stage {s}\'s sparse shape '
                        f'{shape} along {name} ({self._shape_origin(s)}); set window {name} '
                        f'<= {shape[axis]}')
            pair = [w, [w[a] * hybrid[a] for a in range(3)]]
            for i, win in enumerate(pair):
                # position embeddings take (x, y) when the window is flat, (x, y, z) when the
                # stage has height; both must agree or the embedding MLP gets the wrong width
                if (win[2] == 1) != (shape[2] == 1):
                    what = 'window_shape' if i == 0 else 'window_shape x hybrid_factor'
                    raise ConfigError(
                        f'{il}.{what} for stage {s} is {win} but the stage\'s sparse shape is '
                        f'{shape}: the window z must be 1 exactly when the stage has one z bin')
            self.windows.append(pair)
        shifts = layer.shifts_list
        if shifts is None:  # OpenPCDet's fallback: shift 1 moves by half the (hybrid) window
            shifts = [[[0, 0, 0], [v // 2 for v in pair[1]]] for pair in self.windows]
        self.shifts = _per_stage(shifts, f'{il}.shifts_list', n, 'two [x, y, z] shifts')
        self.normalize_pos = layer.normalize_pos

        for s in range(n - 1):
            if self.reduction_type != 'linear' and self.d_model[s + 1] != self.d_model[s]:
                raise ConfigError(f'{il}.d_model={self.d_model}: reduction_type '
                                  f'{self.reduction_type} keeps the width between stages '
                                  f'(d_model[{s + 1}] must be {self.d_model[s]}); use '
                                  'reduction_type: linear to change it')
            if self.reduction_type == 'attention' and self.d_model[s] % _STAGE_ATTENTION_HEADS:
                raise ConfigError(f'{il}.d_model[{s}]={self.d_model[s]} must be a multiple of '
                                  f'{_STAGE_ATTENTION_HEADS} for reduction_type: attention')
        if input_channels is not None and int(input_channels) != self.d_model[0]:
            raise ConfigError(
                f'{il}.d_model[0]={self.d_model[0]} but the incoming voxel features have '
                f'{int(input_channels)} channels; DSVT has no input projection: set d_model[0]: '
                f'{int(input_channels)} or make the previous module output {self.d_model[0]}')
        out_ch = cfg.conv_out_channel
        if out_ch is not None and out_ch != self.d_model[-1]:
            raise ConfigError(f'{p}.conv_out_channel={out_ch} but the last stage outputs '
                              f'd_model[-1]={self.d_model[-1]} channels; set it to '
                              f'{self.d_model[-1]}')
        if grid_size is not None:
            grid = [int(g) for g in grid_size]
            if any(g > s for g, s in zip(grid, self.sparse_shape)):
                raise ConfigError(f'{il}.sparse_shape={self.sparse_shape} is smaller than the '
                                  f'voxel grid {grid} (x, y, z); voxels would fall outside: '
                                  f'set sparse_shape: {grid}')
        self.stride = [self.input_downsample[a] * math.prod(st[a] for st in self.downsample_stride)
                       for a in range(3)]
        if self.stride[0] != self.stride[1]:
            raise ConfigError(f'{il}: total x stride {self.stride[0]} != total y stride '
                              f'{self.stride[1]} (input_downsample x downsample_stride); '
                              'encoded_spconv_tensor_stride must be one number, use equal x/y')

    def _shape_origin(self, s):
        if s == 0:
            return (f'sparse_shape {self.sparse_shape} / input_downsample '
                    f'{self.input_downsample}, ceil')
        return f'after downsample_stride {self.downsample_stride[:s]}'


# ----------------------------------------------------------------------------- blocks

class SetAttention(nn.Module):
    """Self-attention inside sets, then FFN; OpenPCDet's ``SetAttention`` parameters."""

    def __init__(self, d_model, nhead, dropout, dim_feedforward, activation, mlp_dropout=0.0):
        super().__init__()
        self.nhead = nhead
        self.d_model = d_model
        self.self_attn = LeafMultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(mlp_dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.activation = _ACTIVATIONS[activation]

    def forward(self, src, pos, padding_mask, voxel_inds, first_slot):
        """src, pos: (N, C); padding_mask, voxel_inds: (S, set_size); first_slot: (N,).

        Returns (N, C). Queries and keys carry the position embedding, values do not; each
        voxel reads the attention output at its first slot (all its slots agree within a set).
        """
        feats = src[voxel_inds]                                   # (S, set_size, C)
        if feats.shape[0]:
            qk = (src + pos)[voxel_inds]  # add on N rows, not on S * set_size slots
            attn = self.self_attn(qk, qk, feats, key_padding_mask=padding_mask,
                                  need_weights=False)[0]
        else:  # no voxels in the batch: torch's attention rejects empty batches
            attn = feats
        src = self.norm1(src + attn.reshape(-1, self.d_model)[first_slot])
        ffn = self.linear2(self.dropout(self.activation(self.linear1(src))))
        return self.norm2(src + ffn)


class DSVTEncoderLayer(nn.Module):
    """Set attention + residual LayerNorm (OpenPCDet's ``DSVT_EncoderLayer``)."""

    def __init__(self, d_model, nhead, dim_feedforward, dropout, activation):
        super().__init__()
        self.win_attn = SetAttention(d_model, nhead, dropout, dim_feedforward, activation)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, src, pos, padding_mask, voxel_inds, first_slot):
        return self.norm(src + self.win_attn(src, pos, padding_mask, voxel_inds, first_slot))


class DSVTBlock(nn.Module):
    """Two encoder layers: sets sorted along y, then along x, of one window shift."""

    def __init__(self, d_model, nhead, dim_feedforward, dropout, activation):
        super().__init__()
        self.encoder_list = nn.ModuleList(
            DSVTEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation)
            for _ in range(2))

    def forward(self, src, voxel_inds, padding_mask, first_slot, pos0, pos1):
        """voxel_inds (2, S, set_size), padding_mask (S, set_size), first_slot (2, N)."""
        for i, pos in enumerate((pos0, pos1)):
            src = self.encoder_list[i](src, pos, padding_mask, voxel_inds[i], first_slot[i])
        return src


class StageReductionLinear(nn.Module):
    """``reduction_type: linear``: concat the cell's slots (zeros when empty), Linear, LayerNorm."""

    def __init__(self, input_channel, output_channel):
        super().__init__()
        self.linear1 = nn.Linear(input_channel, output_channel, bias=False)
        self.norm = nn.LayerNorm(output_channel)

    def forward(self, cells):
        """cells: (M, volume, C) -> (M, C_next)."""
        return self.norm(self.linear1(cells.flatten(1)))


class StageReductionMax(nn.Module):
    """``reduction_type: maxpool``: max over the cell's slots, empty slots count as zeros."""

    def forward(self, cells):
        return cells.amax(dim=1)


class StageReductionAttention(nn.Module):
    """``reduction_type: attention``: the cell max queries its slots (+ slot embedding).

    As OpenPCDet's, empty slots are zero vectors that stay visible to the max and the
    attention; checkpoints were trained that way.
    """

    def __init__(self, channels, volume):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.self_attn = LeafMultiheadAttention(channels, _STAGE_ATTENTION_HEADS,
                                                batch_first=True)
        self.pos_embedding = nn.Parameter(torch.zeros(volume, channels))
        nn.init.normal_(self.pos_embedding, std=0.01)

    def forward(self, cells):
        """cells: (M, volume, C) -> (M, C)."""
        query = cells.amax(dim=1, keepdim=True)
        if not cells.shape[0]:  # no voxels: torch's attention rejects empty batches
            return self.norm(query).squeeze(1)
        out = self.self_attn(query, cells + self.pos_embedding, cells, need_weights=False)[0]
        return self.norm(out + query).squeeze(1)


# ----------------------------------------------------------------------------- backbone

@BACKBONE_3D.register(aliases=('DSVT',))
class DSVTDownsample(nn.Module):
    """DSVT with an optional downsampling input layer (see the module docstring).

    Constructor: OpenPCDet's BACKBONE_3D signature; ``input_channels`` (the incoming feature
    width) must equal ``INPUT_LAYER.d_model[0]``. ``field_prefix`` names the config location
    in error messages (e.g. ``MODEL.BACKBONE_3D.DSVT`` when nested in another backbone).
    """

    CONFIG = DSVT_CONFIG
    memory = dsvt_memory

    def __init__(self, model_cfg, input_channels=None, grid_size=None, voxel_size=None,
                 point_cloud_range=None, field_prefix='MODEL.BACKBONE_3D', **kwargs):
        super().__init__()
        self.model_cfg = model_cfg
        cfg = self.cfg = DSVTConfig(model_cfg, input_channels, grid_size, field_prefix)
        self.input_layer = DSVTInputLayer(
            cfg.sparse_shape, cfg.input_downsample, cfg.input_reduction, cfg.stage_shapes,
            cfg.windows, cfg.shifts, cfg.set_sizes, cfg.blocks, cfg.d_model,
            cfg.downsample_stride, cfg.normalize_pos, cfg.nhead[0])
        for s in range(cfg.stage_num):
            self.add_module(f'stage_{s}', nn.ModuleList(
                DSVTBlock(cfg.d_model[s], cfg.nhead[s], cfg.dim_feedforward[s], cfg.dropout,
                          cfg.activation) for _ in range(cfg.blocks[s])))
            self.add_module(f'residual_norm_stage_{s}', nn.ModuleList(
                nn.LayerNorm(cfg.d_model[s]) for _ in range(cfg.blocks[s])))
            if s + 1 < cfg.stage_num:
                volume = math.prod(cfg.downsample_stride[s])
                if cfg.reduction_type == 'linear':
                    red = StageReductionLinear(cfg.d_model[s] * volume, cfg.d_model[s + 1])
                elif cfg.reduction_type == 'maxpool':
                    red = StageReductionMax()
                else:
                    red = StageReductionAttention(cfg.d_model[s], volume)
                self.add_module(f'stage_{s}_reduction', red)
        self.stage_num = cfg.stage_num
        self.use_torch_ckpt = cfg.use_checkpoint
        self.num_point_features = cfg.d_model[-1]
        self.backbone_channels = None
        self.output_sparse_shape = cfg.stage_shapes[-1]     # [x, y, z]
        self.output_stride = cfg.stride                     # [x, y, z]
        self._reset_parameters()

    def _reset_parameters(self):
        # OpenPCDet's init: xavier on every matrix (embeddings included), 'scaler' excluded
        for name, p in self.named_parameters():
            if p.dim() > 1 and 'scaler' not in name:
                nn.init.xavier_uniform_(p)

    def _read_inputs(self, batch_dict):
        for key in ('voxel_features', 'voxel_coords', 'batch_size'):
            if key not in batch_dict:
                raise InputError(f'DSVTDownsample needs batch_dict[{key!r}] (voxel_features from '
                                 'the VFE, voxel_coords [b, z, y, x], batch_size)')
        feats = batch_dict['voxel_features']
        coords = to_int_coords(batch_dict['voxel_coords']).long()
        if feats.dim() != 2 or feats.shape[1] != self.cfg.d_model[0] \
                or feats.shape[0] != coords.shape[0]:
            raise InputError(f'voxel_features has shape {tuple(feats.shape)}; DSVTDownsample '
                             f'needs ({coords.shape[0]}, {self.cfg.d_model[0]}) (one row per '
                             'voxel_coords row, d_model[0] channels)')
        batch_size = int(batch_dict['batch_size'])
        check_coords(coords, self.cfg.sparse_shape[::-1], batch_size)
        return feats, coords, batch_size

    def forward(self, batch_dict):
        """Reads voxel_features (N, d_model[0]), voxel_coords (N, 4) [b, z, y, x], batch_size.

        Writes pillar_features = voxel_features (N', d_model[-1]), voxel_coords (N', 4) int32
        of the last stage, encoded_spconv_tensor (spatial [D', H', W']) and
        encoded_spconv_tensor_stride (total x stride).
        """
        feats, coords, batch_size = self._read_inputs(batch_dict)
        x, layouts = self.input_layer(feats, coords)
        block_id = 0  # counts blocks across stages: the window shift alternates globally
        for s, layout in enumerate(layouts):
            blocks = getattr(self, f'stage_{s}')
            norms = getattr(self, f'residual_norm_stage_{s}')
            for b, block in enumerate(blocks):
                sets = layout.sets[block_id % 2]
                args = (x, sets.voxel_inds, sets.padding_mask, sets.first_slot,
                        *layout.pos_embed[b])
                if self.use_torch_ckpt and torch.is_grad_enabled():
                    out = checkpoint(block, *args, use_reentrant=False)
                else:
                    out = block(*args)
                x = norms[b](out + x)
                block_id += 1
            if layout.pooling is not None:
                pool = layout.pooling
                cells = x.new_zeros((pool.coords.shape[0], pool.volume, x.shape[1]))
                cells = cells.index_put((pool.group, pool.slot), x)
                x = getattr(self, f'stage_{s}_reduction')(cells)
        out_coords = layouts[-1].coords.to(torch.int32)
        batch_dict['pillar_features'] = batch_dict['voxel_features'] = x
        batch_dict['voxel_coords'] = out_coords
        batch_dict['encoded_spconv_tensor'] = sparse_tensor(
            x, out_coords, self.output_sparse_shape[::-1], batch_size)
        batch_dict['encoded_spconv_tensor_stride'] = int(self.output_stride[0])
        return batch_dict
