"""BACKBONE_3D ``FocalSSTEncoder`` and ``FocalSSTDSVT``: single-stride focal sparse convolutions.

FocalSSTEncoder (N voxels, C = NUM_FILTERS):
  voxel_features (N, C_in), voxel_coords (N, 4) [b, z, y, x]
  -> stem: SubMConv3d(C_in -> C[0]) + BN + ReLU
  -> per further C[i], a focal block on the current voxel set V:
       importance = sigmoid(conv_imp(V) + imp_bias), (|V|, K^3): K^3 - 1 neighbour offsets
       + own (last); the own bias starts at logit(0.01) so an untrained head dilates little
       important voxels spawn voxels at offsets whose importance passes (ops.focal_dilation);
       new voxels get zero features; V' = V + new (V first, same order)
       SubMConv3d(C[i-1] -> C[i]) + BN + ReLU on V'
  -> encoded_spconv_tensor (stride 1, spatial shape [D, H, W] = grid_size[::-1] throughout),
     voxel_features (|V'|, C[-1]) and voxel_coords (|V'|, 4) int32 of the final union.

As in OpenPCDet's FocalSparseConv, an input voxel that passed its own importance test and is
also the target of spawns from other important voxels has its features scaled by the mean of
1 and those spawn importances before the block's conv: it is the only path by which the
K^3 - 1 offset channels of ``conv_imp`` get a gradient (the importance loss trains the last one).

Importance loss (training, when ``gt_boxes`` is present): per block, sigmoid focal loss on the
own-importance logit of every voxel entering the block; target = the voxel centre
``((x, y, z) index + 0.5) * voxel_size + point_cloud_range[:3]`` lies inside one of its
sample's ground-truth boxes (closed boxes, ops.points_in_boxes). Mean over voxels, summed over
blocks, times LOSS_WEIGHT; ``get_loss()`` returns it.

The spconv sparse shape is exactly grid_size[::-1] (no OpenPCDet-style +1 in z: that padding
exists for the strided convs of its VoxelBackBone8x; every conv here is submanifold, and DSVT's
sparse_shape equals grid_size).

Config keys: ``FOCAL_CONFIG`` below (FocalSSTEncoder: at the top level of BACKBONE_3D;
FocalSSTDSVT: under FOCAL_ENCODER, with DSVT holding a DSVTDownsample config);
NUM_FILTERS[-1] must equal DSVT.INPUT_LAYER.d_model[0].
"""
import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, InputError
from ..ops.distributed import global_normaliser
from ..ops.focal_dilation import focal_dilation
from ..ops.losses import sigmoid_focal_loss
from ..ops.points_in_boxes import points_in_boxes
from ..ops.sparse import (check_coords, match_spconv_algo, sparse_tensor, subm_conv3d,
                          to_int_coords)
from ..registry import BACKBONE_3D
from ..schema import REQUIRED, Float, Int, Key, ListOf, Schema, Section
from .dsvt import DSVT_CONFIG, DSVTDownsample
from .focal_sst_memory import encoder_memory, focal_sst_dsvt_memory
from .leaf import Parameters, saved_as

# own-importance bias at init: sigmoid(bias) = 0.01 (RetinaNet's prior) so that at the start of
# training almost no voxel dilates; without it half of all voxels would spawn up to K^3 - 1
# neighbours each in the first iterations, multiplying the voxel count (and memory)
_OWN_PRIOR = 0.01


# ----------------------------------------------------------------------------- config

FOCAL_CONFIG = Schema('FocalSSTEncoder', [
    Key('NUM_FILTERS', ListOf(Int(lo=1), min_len=1), REQUIRED,
        'stem width, then one focal block per further entry; output channels = the last'),
    Key('KERNEL_SIZE', Int(lo=3, odd=True), 3,
        'every conv\'s kernel; the importance head has KERNEL_SIZE^3 outputs (last = the voxel)'),
    Key('IMPORTANCE_THRESHOLD', Float(lo=0, hi=1), 0.5,
        'a voxel whose own importance passes it spawns voxels at offsets whose importance '
        'passes it'),
    Key('TOPK_RATIO', Float(lo=0, hi=1, lo_open=True), None,
        'instead of the threshold: the top fraction of each sample\'s voxels spawn'),
    Key('MAX_NEW_VOXELS_RATIO', Float(lo=0), 1.0,
        'at most this many new voxels per input voxel, block and sample, most important '
        'first (bounds memory)', nullable=True),
    Key('LOSS_WEIGHT', Float(lo=0), 1.0, 'weight of the importance loss'),
    Key('FOCAL_ALPHA', Float(lo=0, hi=1), 0.25, 'importance focal loss: positive weight'),
    Key('FOCAL_GAMMA', Float(lo=0), 2.0, 'importance focal loss: focusing exponent'),
])


def _geometry(grid_size, voxel_size, point_cloud_range, module):
    """grid (x, y, z) ints, voxel size (3,), range (6,) from OpenPCDet's constructor kwargs."""
    def as_list(v):
        return [float(x) for x in (v.tolist() if hasattr(v, 'tolist') else v)]

    for name, v, n in (('grid_size', grid_size, 3), ('voxel_size', voxel_size, 3),
                       ('point_cloud_range', point_cloud_range, 6)):
        if v is None or len(as_list(v)) != n:
            raise ConfigError(f'{module} needs {name} ({n} numbers, x/y/z order; OpenPCDet and '
                              f'our builder pass it from DATA_CONFIG), got {v!r}')
    grid = as_list(grid_size)
    if any(g <= 0 or g != int(g) for g in grid):
        raise ConfigError(f'{module}: grid_size={grid} must be three positive integers (x, y, z)')
    vs = as_list(voxel_size)
    if any(v <= 0 for v in vs):
        raise ConfigError(f'{module}: voxel_size={vs} must be positive')
    return [int(g) for g in grid], vs, as_list(point_cloud_range)


# ----------------------------------------------------------------------------- modules

def _bn_relu(bn, feats):
    """BatchNorm1d + ReLU on (N, C) voxel features.

    Training with fewer than 2 voxels (an empty or near-empty batch) has no batch statistic:
    use the running ones instead of failing (1 voxel) or writing NaNs into them (0 voxels).
    A synchronised BatchNorm (``--sync_bn``) always runs: its statistics span all ranks, and a
    rank skipping the collective would leave the others waiting forever.
    """
    if bn.training and feats.shape[0] < 2 and type(bn) is nn.BatchNorm1d:
        feats = F.batch_norm(feats, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                             False, 0.0, bn.eps)
    else:
        feats = bn(feats)
    return F.relu(feats)


class FocalBlock(nn.Module):
    """One focal sparse conv: importance head, dilation, SubMConv3d + BN + ReLU on the union."""

    def __init__(self, in_ch, out_ch, kernel_size, threshold, topk_ratio, key,
                 max_new_ratio=None):
        super().__init__()
        k3 = kernel_size ** 3
        self.threshold, self.topk_ratio = threshold, topk_ratio
        self.max_new_ratio = max_new_ratio
        # the bias lives outside the spconv conv: spconv's CPU kernels reject a fused bias in
        # inference (no-grad) mode; on a leaf module: OpenPCDet's adam_onecycle trains leaf
        # modules' parameters only (first: parameters() keeps its order from before the move)
        self.imp = Parameters(bias=nn.Parameter(torch.zeros(k3)))
        with torch.no_grad():
            self.imp_bias[-1] = -math.log((1 - _OWN_PRIOR) / _OWN_PRIOR)
        saved_as(self, {'imp_bias': 'imp.bias'})
        self.conv_imp = subm_conv3d(in_ch, k3, kernel_size, f'{key}_imp')
        self.conv = subm_conv3d(in_ch, out_ch, kernel_size, key)
        self.bn = nn.BatchNorm1d(out_ch, eps=1e-3, momentum=0.01)

    @property
    def imp_bias(self):
        """(K^3,) bias of the importance logits."""
        return self.imp.bias

    def forward(self, x):
        """x: SparseConvTensor (N voxels, C_in) -> (SparseConvTensor on the union (N + M,
        C_out), own-importance logits (N,), ops.focal_dilation.Dilation)."""
        logits = self.conv_imp(x).features + self.imp_bias          # (N, K^3)
        imp = torch.sigmoid(logits)
        dil = focal_dilation(x.indices, imp.detach(), x.spatial_shape, self.threshold,
                             self.topk_ratio, self.max_new_ratio)
        feats = self._scale_spawn_targets(x.features, imp, dil)
        feats = torch.cat([feats, feats.new_zeros((dil.num_new, feats.shape[1]))], dim=0)
        union = sparse_tensor(feats, dil.coords, x.spatial_shape, x.batch_size)
        out = self.conv(union)
        out = out.replace_feature(_bn_relu(self.bn, out.features))
        # a copy, not the column view: a view would keep the whole (N, K^3) logits alive
        # until backward through the importance loss, which saves its input
        return out, logits[:, -1].clone(), dil

    @staticmethod
    def _scale_spawn_targets(feats, imp, dil):
        """(N, C) -> (N, C): important input voxels hit by spawns scaled by mean(1, spawn imps)."""
        n = feats.shape[0]
        on_input = dil.spawn_dst < n
        dst, src, off = (t[on_input] for t in (dil.spawn_dst, dil.spawn_src, dil.spawn_offset))
        keep = dil.important[dst]      # unimportant input voxels keep their features
        dst, src, off = dst[keep], src[keep], off[keep]
        vals = imp[src, off]
        total = imp.new_ones(n).index_add(0, dst, vals)
        count = imp.new_ones(n).index_add(0, dst, torch.ones_like(vals))
        return feats * (total / count).to(feats.dtype)[:, None]


@BACKBONE_3D.register()
class FocalSSTEncoder(nn.Module):
    """Single-stride focal sparse conv encoder (see the module docstring).

    Constructor: OpenPCDet's BACKBONE_3D signature. ``config_prefix`` names the config location
    in error messages.
    """

    CONFIG = FOCAL_CONFIG
    memory = encoder_memory

    def __init__(self, model_cfg, input_channels, grid_size=None, voxel_size=None,
                 point_cloud_range=None, config_prefix='MODEL.BACKBONE_3D', **kwargs):
        super().__init__()
        self.model_cfg = model_cfg
        cfg = self.cfg = FOCAL_CONFIG.parse(model_cfg, config_prefix)
        name = type(self).__name__
        if isinstance(input_channels, bool) or not isinstance(input_channels, numbers.Integral) \
                or input_channels <= 0:
            raise ConfigError(f'{name}: input_channels={input_channels!r} must be a positive '
                              'integer (the VFE output width)')
        grid, vs, pcr = _geometry(grid_size, voxel_size, point_cloud_range, name)
        self.input_channels = int(input_channels)
        self.sparse_shape = grid[::-1]                               # [D, H, W]
        self.output_sparse_shape = list(grid)                        # [x, y, z]: stride 1
        # plain floats, not buffers: .half() must not round voxel centres at 100 m
        self.voxel_size, self.range_min = vs, pcr[:3]                # x, y, z

        widths, k = cfg.NUM_FILTERS, cfg.KERNEL_SIZE
        self.stem_conv = subm_conv3d(input_channels, widths[0], k, 'focal_stem')
        self.stem_bn = nn.BatchNorm1d(widths[0], eps=1e-3, momentum=0.01)
        self.blocks = nn.ModuleList(
            FocalBlock(widths[i - 1], widths[i], k, cfg.IMPORTANCE_THRESHOLD, cfg.TOPK_RATIO,
                       f'focal{i}', cfg.MAX_NEW_VOXELS_RATIO)
            for i in range(1, len(widths)))
        self.num_point_features = widths[-1]
        self.backbone_channels = None
        self._block_losses = None   # set by a training forward with gt_boxes
        self.last_stats = {}        # voxel counts of the last forward (for logs / benchmarks)

    # ------------------------------------------------------------------ forward

    def _read_inputs(self, batch_dict):
        for key in ('voxel_features', 'voxel_coords', 'batch_size'):
            if key not in batch_dict:
                raise InputError(f'{type(self).__name__} needs batch_dict[{key!r}] '
                                 '(voxel_features from the VFE, voxel_coords [b, z, y, x], '
                                 'batch_size)')
        feats = batch_dict['voxel_features']
        coords = to_int_coords(batch_dict['voxel_coords'])
        if feats.dim() != 2 or feats.shape[1] != self.input_channels \
                or feats.shape[0] != coords.shape[0]:
            raise InputError(f'voxel_features has shape {tuple(feats.shape)}; '
                             f'{type(self).__name__} needs ({coords.shape[0]}, '
                             f'{self.input_channels}) (one row per voxel_coords row, '
                             'input_channels = the VFE output width)')
        batch_size = int(batch_dict['batch_size'])
        check_coords(coords, self.sparse_shape, batch_size)
        return feats, coords.to(feats.device), batch_size

    def forward(self, batch_dict):
        """Reads voxel_features (N, C_in), voxel_coords (N, 4) [b, z, y, x], batch_size and,
        when training, gt_boxes (B, M, 8). Writes encoded_spconv_tensor (spatial [D, H, W]),
        encoded_spconv_tensor_stride = 1, voxel_features (N', C_out), voxel_coords (N', 4)
        int32 of the union (the N input voxels first, in their order)."""
        feats, coords, batch_size = self._read_inputs(batch_dict)
        match_spconv_algo(self, feats.device)
        gt_boxes = self._gt_boxes(batch_dict, batch_size, feats.device)

        x = sparse_tensor(feats, coords, self.sparse_shape, batch_size)
        x = self.stem_conv(x)
        x = x.replace_feature(_bn_relu(self.stem_bn, x.features))
        losses, targets = [], None
        stats = {'voxels_in': int(coords.shape[0])}
        for i, block in enumerate(self.blocks):
            if gt_boxes is not None:   # targets of the voxels entering this block
                targets = self._targets(x.indices, gt_boxes, targets)
            x, own_logits, dil = block(x)
            stats[f'new_voxels_{i}'] = dil.num_new
            stats[f'spawns_{i}'] = int(dil.spawn_src.numel())
            if gt_boxes is not None:
                losses.append(sigmoid_focal_loss(own_logits, targets.to(own_logits.dtype),
                                                 self.cfg.FOCAL_ALPHA, self.cfg.FOCAL_GAMMA, 'sum')
                              / global_normaliser(own_logits.new_tensor(own_logits.numel())))
                stats[f'foreground_{i}'] = targets  # tensor; turned into a count in get_loss
        stats['voxels_out'] = int(x.indices.shape[0])
        self.last_stats = stats
        if gt_boxes is None:
            self._block_losses = None
        else:  # an encoder without focal blocks still returns a graph-connected zero
            self._block_losses = losses or [x.features.sum() * 0.0]

        batch_dict['encoded_spconv_tensor'] = x
        batch_dict['encoded_spconv_tensor_stride'] = 1
        batch_dict['voxel_features'] = x.features
        batch_dict['voxel_coords'] = x.indices
        return batch_dict

    # ------------------------------------------------------------------ loss

    def _gt_boxes(self, batch_dict, batch_size, device):
        """(B, M, 7+) float tensor when the importance loss is to be computed, else None."""
        if not self.training or batch_dict.get('gt_boxes') is None:
            return None
        boxes = torch.as_tensor(batch_dict['gt_boxes'], device=device)
        if boxes.dim() != 3 or boxes.shape[0] != batch_size or boxes.shape[2] < 7:
            raise InputError(f'gt_boxes has shape {tuple(boxes.shape)}; expected (batch_size='
                             f'{batch_size}, M, 8) [x, y, z, dx, dy, dz, heading, class]')
        return boxes

    def _targets(self, coords, gt_boxes, previous):
        """(N, 4) [b, z, y, x] -> (N,) bool: voxel centre inside a GT box of its sample.

        ``previous`` holds the targets of the first rows (the voxels of the previous block's
        input, which lead its union in the same order): only the new rows are computed.
        """
        start = 0 if previous is None else previous.shape[0]
        new = coords[start:].long()
        size = torch.tensor(self.voxel_size, device=coords.device)
        low = torch.tensor(self.range_min, device=coords.device)
        xyz = (new[:, [3, 2, 1]].float() + 0.5) * size + low      # voxel centres (x, y, z)
        inside = torch.zeros(new.shape[0], dtype=torch.bool, device=coords.device)
        for b in range(gt_boxes.shape[0]):
            rows = (new[:, 0] == b).nonzero().squeeze(1)
            if rows.numel():   # zero padding rows are degenerate boxes: they contain nothing
                inside[rows] = points_in_boxes(xyz[rows], gt_boxes[b, :, :7]) >= 0
        return inside if previous is None else torch.cat([previous, inside])

    def get_loss(self, tb_dict=None):
        """(LOSS_WEIGHT * sum over blocks of the mean focal loss, tb_dict) of the last
        training forward; tb_dict gets focal_imp_loss, focal_imp_loss_<i>,
        focal_fg_ratio_<i> (foreground fraction of block i's input voxels) and
        focal_new_voxels_<i>."""
        tb_dict = {} if tb_dict is None else tb_dict
        if self._block_losses is None:
            raise InputError(f'{type(self).__name__}.get_loss() needs a training-mode forward '
                             "with batch_dict['gt_boxes'] first")
        loss = sum(self._block_losses) * self.cfg.LOSS_WEIGHT
        for i in range(len(self.blocks)):
            tb_dict[f'focal_imp_loss_{i}'] = self._block_losses[i].item()
            fg = self.last_stats[f'foreground_{i}']
            tb_dict[f'focal_fg_ratio_{i}'] = fg.float().mean().item() if fg.numel() else 0.0
            tb_dict[f'focal_new_voxels_{i}'] = self.last_stats[f'new_voxels_{i}']
        tb_dict['focal_imp_loss'] = loss.item()
        return loss, tb_dict


@BACKBONE_3D.register()
class FocalSSTDSVT(nn.Module):
    """FocalSSTEncoder (FOCAL_ENCODER) then DSVTDownsample (DSVT); see the module docstring.

    Reads voxel_features (N, C_in), voxel_coords, batch_size (+ gt_boxes when training);
    writes what DSVTDownsample writes. num_point_features = DSVT d_model[-1].
    """

    CONFIG = Schema('FocalSSTDSVT', [
        Key('FOCAL_ENCODER', Section(FOCAL_CONFIG, expand=False), REQUIRED,
            'the FocalSSTEncoder keys (its table)'),
        Key('DSVT', Section(DSVT_CONFIG, expand=False), REQUIRED,
            'a DSVTDownsample config (its table); INPUT_LAYER.d_model[0] = NUM_FILTERS[-1]'),
    ])

    memory = focal_sst_dsvt_memory

    def __init__(self, model_cfg, input_channels, grid_size=None, voxel_size=None,
                 point_cloud_range=None, config_prefix='MODEL.BACKBONE_3D', **kwargs):
        super().__init__()
        self.model_cfg = model_cfg
        p = config_prefix
        cfg = self.CONFIG.parse(model_cfg, p)
        widths, d_model = cfg.FOCAL_ENCODER.NUM_FILTERS, cfg.DSVT.INPUT_LAYER.d_model
        if d_model[0] != widths[-1]:
            raise ConfigError(
                f'{p}.FOCAL_ENCODER.NUM_FILTERS[-1]={widths[-1]} but '
                f'{p}.DSVT.INPUT_LAYER.d_model[0]={d_model[0]}; DSVT has no input projection, '
                'so they must be equal')
        self.focal_encoder = FocalSSTEncoder(
            model_cfg['FOCAL_ENCODER'], input_channels, grid_size, voxel_size,
            point_cloud_range, config_prefix=f'{p}.FOCAL_ENCODER')
        self.dsvt = DSVTDownsample(
            model_cfg['DSVT'], input_channels=widths[-1], grid_size=grid_size,
            voxel_size=voxel_size, point_cloud_range=point_cloud_range,
            field_prefix=f'{p}.DSVT')
        self.output_sparse_shape = self.dsvt.output_sparse_shape
        self.num_point_features = self.dsvt.num_point_features
        self.backbone_channels = None

    def forward(self, batch_dict):
        return self.dsvt(self.focal_encoder(batch_dict))

    def get_loss(self, tb_dict=None):
        return self.focal_encoder.get_loss(tb_dict)
