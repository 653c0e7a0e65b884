"""DENSE_HEAD ``CenterHead``: CenterPoint's anchor-free BEV head (heatmap per class + box code).

Config keys: ``CONFIG`` below (OpenPCDet's CenterHead keys). CLASS_NAMES_EACH_HEAD names not in
CLASS_NAMES are dropped (as OpenPCDet), every class of CLASS_NAMES must end up in exactly one
head; HEAD_ORDER must be [center, center_z, dim, rot] (the regression code order) and iou / vel
heads are not supported; NMS_TYPE nms_gpu / nms_normal are class-agnostic per head.
Parameter names match OpenPCDet's CenterHead (shared_conv, heads_list.N.<name>...), so
state_dicts load across the two. Reads ``spatial_features_2d`` (B, C, H, W) and, in training,
``gt_boxes`` (B, M, 8); writes ``final_box_dicts`` (list of B dicts: pred_boxes (K, 7),
pred_scores (K,), pred_labels (K,) long, 1-based into CLASS_NAMES).
"""
import math

import torch
from torch import nn

from ..errors import ConfigError, InputError
from ..ops.centernet import CODE_SIZE, assign_center_targets, decode_centers, gather_feat, \
    reg_l1_loss
from ..ops.losses import gaussian_focal_loss
from ..ops.nms import nms_rotated
from ..registry import DENSE_HEAD
from .center_head_memory import center_head_memory
from ..schema import (REQUIRED, AnyValue, Bool, Choice, Float, Int, Key, ListOf, MapOf, Schema,
                      Section, Str)

HEAD_ORDER = ('center', 'center_z', 'dim', 'rot')
HEAD_CHANNELS = {'center': 2, 'center_z': 1, 'dim': 3, 'rot': 2}
NMS_TYPES = ('nms_gpu', 'nms_normal', 'class_specific_nms')
HM_INIT_BIAS = -2.19
_PREFIX = 'MODEL.DENSE_HEAD'  # CenterPoint's prior: sigmoid(-2.19) ~ 0.1 foreground at the start


class SeparateHead(nn.Module):
    """One conv tower per output name; tower = (num_conv - 1) x [conv3x3, BN, ReLU] + conv3x3."""

    def __init__(self, channels, head_dict, use_bias, norm):
        super().__init__()
        self.names = list(head_dict)
        for name, spec in head_dict.items():
            layers = [nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=use_bias),
                                    norm(channels), nn.ReLU())
                      for _ in range(spec['num_conv'] - 1)]
            layers.append(nn.Conv2d(channels, spec['out_channels'], 3, padding=1, bias=True))
            tower = nn.Sequential(*layers)
            if name == 'hm':
                nn.init.constant_(tower[-1].bias, HM_INIT_BIAS)
            else:
                for m in tower.modules():
                    if isinstance(m, nn.Conv2d):
                        nn.init.kaiming_normal_(m.weight)
                        if m.bias is not None:
                            nn.init.zeros_(m.bias)
            self.add_module(name, tower)

    def forward(self, x):
        return {name: getattr(self, name)(x) for name in self.names}


_HEAD_SPEC = Schema('HEAD_DICT entry', [
    Key('out_channels', Int(lo=1), REQUIRED, 'values this head regresses'),
    Key('num_conv', Int(lo=1), 2, 'convs of its tower (the last one outputs)'),
])
_NMS = Schema('NMS_CONFIG', [
    Key('NMS_TYPE', Choice(*NMS_TYPES), 'nms_gpu',
        'nms_gpu / nms_normal: class-agnostic per head; class_specific_nms: per class (the '
        'same rotated-box NMS on any device)'),
    Key('NMS_THRESH', Float(lo=0, hi=1), 0.2, 'BEV IoU above which the lower score is dropped'),
    Key('NMS_PRE_MAXSIZE', Int(lo=1), 1000, 'boxes kept before NMS'),
    Key('NMS_POST_MAXSIZE', Int(lo=1), 83, 'boxes kept after NMS'),
    Key('MULTI_CLASSES_NMS', AnyValue(), None, "OpenPCDet's key (unused)"),
])


def _must_be_off(what):
    """A Bool that must stay false here (OpenPCDet's iou branch is not implemented)."""
    class Off(Bool):
        def check(self, value, path):
            value = super().check(value, path)
            if value:
                raise ConfigError(f"{path}: pcdet_focal's CenterHead has no {what}; remove the "
                                  "key or use OpenPCDet's CenterHead inside OpenPCDet")
            return value
    return Off()


@DENSE_HEAD.register()
class CenterHead(nn.Module):
    CONFIG = Schema('CenterHead', [
        Key('CLASS_AGNOSTIC', Bool(), False, 'one class for all (read by the detector builder)'),
        Key('CLASS_NAMES_EACH_HEAD', ListOf(ListOf(Str(), min_len=1), min_len=1), REQUIRED,
            'class-name lists, one heatmap head each'),
        Key('SHARED_CONV_CHANNEL', Int(lo=1), REQUIRED, 'channels of the shared 3x3 conv'),
        Key('USE_BIAS_BEFORE_NORM', Bool(), False, 'conv bias before BatchNorm'),
        Key('BN_EPS', Float(lo=0), 1e-5, 'BatchNorm eps of the head'),
        Key('BN_MOM', Float(lo=0, hi=1), 0.1, 'BatchNorm momentum of the head'),
        Key('NUM_HM_CONV', Int(lo=1), 2, 'convs of the heatmap tower'),
        Key('SEPARATE_HEAD_CFG', Section(Schema('SEPARATE_HEAD_CFG', [
            Key('HEAD_ORDER', ListOf(Str()), list(HEAD_ORDER), 'regression code order'),
            Key('HEAD_DICT', MapOf(Section(_HEAD_SPEC), 'a mapping head name -> {out_channels, '
                                   'num_conv}'), REQUIRED,
                'center 2, center_z 1, dim 3, rot 2 (cos, sin)'),
        ])), REQUIRED, 'the regression towers'),
        Key('TARGET_ASSIGNER_CONFIG', Section(Schema('TARGET_ASSIGNER_CONFIG', [
            Key('FEATURE_MAP_STRIDE', Int(lo=1), REQUIRED,
                'BEV grid cells per map cell (must equal the real stride)'),
            Key('NUM_MAX_OBJS', Int(lo=1), 500, 'targets per sample'),
            Key('GAUSSIAN_OVERLAP', Float(lo=0, hi=1, lo_open=True, hi_open=True), 0.1,
                'heatmap Gaussian radius from this box overlap'),
            Key('MIN_RADIUS', Int(lo=0), 2, 'smallest heatmap radius'),
            Key('DENSE_REG', AnyValue(), None, "OpenPCDet's key (unused)"),
        ])), REQUIRED, 'heatmap and box targets'),
        Key('LOSS_CONFIG', Section(Schema('LOSS_CONFIG', [
            Key('LOSS_WEIGHTS', Section(Schema('LOSS_WEIGHTS', [
                Key('cls_weight', Float(lo=0), 1.0, 'heatmap loss weight'),
                Key('loc_weight', Float(lo=0), 1.0, 'box loss weight'),
                Key('code_weights', ListOf(Float(), length=CODE_SIZE,
                                           what=f'{CODE_SIZE} numbers (offset x, offset y, z, '
                                                'log dx, log dy, log dz, cos, sin)'),
                    [1.0] * CODE_SIZE, 'per box-code weights'),
            ])), None, 'loss weights'),
        ])), None, 'losses'),
        Key('POST_PROCESSING', Section(Schema('POST_PROCESSING', [
            Key('SCORE_THRESH', Float(lo=0, hi=1), 0.1, 'lowest score kept'),
            Key('POST_CENTER_LIMIT_RANGE', ListOf(Float(), length=6), None,
                'box centres kept inside [x_min, y_min, z_min, x_max, y_max, z_max] (default: '
                'the point cloud range)'),
            Key('MAX_OBJ_PER_SAMPLE', Int(lo=1), 500, 'top-k per head before NMS'),
            Key('USE_IOU_TO_RECTIFY_SCORE', _must_be_off('iou head'), False, 'must be false'),
            Key('IOU_RECTIFIER', AnyValue(), None, "OpenPCDet's key (unused)"),
            Key('NMS_CONFIG', Section(_NMS), None, 'rotated-box NMS'),
        ])), None, 'decoding and NMS'),
        Key('IOU_REG_LOSS', _must_be_off('IoU branch'), False, 'must be false'),
    ])
    memory = center_head_memory

    def __init__(self, model_cfg, input_channels, num_class, class_names, grid_size,
                 point_cloud_range, predict_boxes_when_training=False, voxel_size=None,
                 **kwargs):
        super().__init__()
        self.model_cfg = model_cfg
        self.num_class = num_class
        if input_channels is None:
            raise ConfigError('MODEL.DENSE_HEAD (CenterHead) needs its input channel count '
                              '(BACKBONE_2D / MAP_TO_BEV num_bev_features)')
        for name, val in (('grid_size', grid_size), ('point_cloud_range', point_cloud_range),
                          ('voxel_size', voxel_size)):
            if val is None or val is False:
                raise ConfigError(f'MODEL.DENSE_HEAD (CenterHead) needs {name} from the dataset '
                                  '(DATA_CONFIG)')
        self.grid_size = [int(v) for v in grid_size]
        self.point_cloud_range = [float(v) for v in point_cloud_range]
        self.voxel_size = [float(v) for v in voxel_size]
        self.class_names = list(class_names)
        self.predict_boxes_when_training = bool(predict_boxes_when_training)
        cfg = self.cfg = self.CONFIG.parse(model_cfg, _PREFIX)
        self._parse_classes()
        self._parse_heads()
        self._parse_targets_and_losses()
        self._parse_post_processing()

        def norm(c):
            return nn.BatchNorm2d(c, eps=cfg.BN_EPS, momentum=cfg.BN_MOM)

        use_bias = cfg.USE_BIAS_BEFORE_NORM
        shared = cfg.SHARED_CONV_CHANNEL
        num_hm_conv = cfg.NUM_HM_CONV
        self.shared_conv = nn.Sequential(
            nn.Conv2d(int(input_channels), shared, 3, padding=1, bias=use_bias), norm(shared),
            nn.ReLU())
        self.heads_list = nn.ModuleList()
        for names in self.class_names_each_head:
            head_dict = {k: dict(v) for k, v in self.head_dict.items()}
            head_dict['hm'] = {'out_channels': len(names), 'num_conv': num_hm_conv}
            self.heads_list.append(SeparateHead(shared, head_dict, use_bias, norm))
        self.forward_ret_dict = {}

    # ---- config (checked by CONFIG.parse; the rules between keys here) ----
    def _parse_classes(self):
        each = self.cfg.CLASS_NAMES_EACH_HEAD
        # names a head lists but CLASS_NAMES lacks are dropped, as OpenPCDet does (so one
        # model config serves datasets with fewer classes)
        heads = [[n for n in h if n in self.class_names] for h in each]
        seen = [n for h in heads for n in h]
        empty = [i for i, h in enumerate(heads) if not h]
        missing = [n for n in self.class_names if n not in seen]
        twice = sorted({n for n in seen if seen.count(n) > 1})
        if empty or missing or twice:
            raise ConfigError(f'{_PREFIX}.CLASS_NAMES_EACH_HEAD={[list(h) for h in each]} '
                              f'does not split CLASS_NAMES={self.class_names} into heads '
                              f'(missing {missing}, repeated {twice}, empty heads {empty}); '
                              'list every class exactly once')
        self.class_names_each_head = heads
        # table[h, global 1-based class id] = heatmap channel in head h, or -1 (built on the
        # CPU whatever the default device: it is bookkeeping, moved with the module)
        table = torch.full((len(heads), len(self.class_names) + 1), -1, dtype=torch.long,
                           device='cpu')
        mapping = []
        for h, names in enumerate(heads):
            ids = [self.class_names.index(n) for n in names]
            table[h, torch.tensor(ids, device='cpu') + 1] = torch.arange(len(ids), device='cpu')
            mapping.append(ids)
        self.register_buffer('class_to_channel', table, persistent=False)
        self.channel_to_class = mapping  # per head: channel -> 0-based index in CLASS_NAMES

    def _parse_heads(self):
        sep = self.cfg.SEPARATE_HEAD_CFG
        field = f'{_PREFIX}.SEPARATE_HEAD_CFG'
        if sep.HEAD_ORDER != list(HEAD_ORDER):
            raise ConfigError(f'{field}.HEAD_ORDER={sep.HEAD_ORDER}: this CenterHead regresses '
                              f'exactly {list(HEAD_ORDER)} in that order')
        extra = sorted(set(sep.HEAD_DICT) - set(HEAD_ORDER))
        if extra:
            raise ConfigError(f"{field}.HEAD_DICT has {extra}: pcdet_focal's CenterHead supports "
                              f'only {list(HEAD_ORDER)} (no iou / vel heads); remove them or use '
                              "OpenPCDet's CenterHead inside OpenPCDet")
        self.head_dict = {}
        for name in HEAD_ORDER:
            spec = sep.HEAD_DICT.get(name)
            if spec is None:
                raise ConfigError(f'{field}.HEAD_DICT.{name} is required: {{out_channels: '
                                  f'{HEAD_CHANNELS[name]}, num_conv: 2}}')
            if spec.out_channels != HEAD_CHANNELS[name]:
                raise ConfigError(f'{field}.HEAD_DICT.{name}.out_channels={spec.out_channels} '
                                  f'but {name} regresses {HEAD_CHANNELS[name]} values; set '
                                  f'out_channels: {HEAD_CHANNELS[name]}')
            self.head_dict[name] = {'out_channels': spec.out_channels,
                                    'num_conv': spec.num_conv}

    def _parse_targets_and_losses(self):
        tcfg = self.cfg.TARGET_ASSIGNER_CONFIG
        self.feature_map_stride = tcfg.FEATURE_MAP_STRIDE
        self.num_max_objs = tcfg.NUM_MAX_OBJS
        self.gaussian_overlap = tcfg.GAUSSIAN_OVERLAP
        self.min_radius = tcfg.MIN_RADIUS
        weights = self.cfg.LOSS_CONFIG.LOSS_WEIGHTS
        self.cls_weight, self.loc_weight = weights.cls_weight, weights.loc_weight
        self.register_buffer('code_weights', torch.tensor(weights.code_weights,
                                                          dtype=torch.float32),
                             persistent=False)

    def _parse_post_processing(self):
        post = self.cfg.POST_PROCESSING
        self.score_thresh = post.SCORE_THRESH
        self.max_obj_per_sample = post.MAX_OBJ_PER_SAMPLE
        limit = post.POST_CENTER_LIMIT_RANGE
        self.post_center_limit_range = list(self.point_cloud_range if limit is None else limit)
        nms = post.NMS_CONFIG
        self.nms_type = nms.NMS_TYPE
        self.nms_thresh = nms.NMS_THRESH
        self.nms_pre_max = nms.NMS_PRE_MAXSIZE
        self.nms_post_max = nms.NMS_POST_MAXSIZE

    # ---- forward ----
    def expected_map_size(self):
        """(H, W) the BEV map must have: ceil(grid_size[y, x] / FEATURE_MAP_STRIDE)."""
        s = self.feature_map_stride
        return math.ceil(self.grid_size[1] / s), math.ceil(self.grid_size[0] / s)

    def _check_map_size(self, height, width):
        exp_h, exp_w = self.expected_map_size()
        if (height, width) == (exp_h, exp_w):
            return
        gx, gy = self.grid_size[0], self.grid_size[1]
        guess = max(1, round(gx / max(width, 1)))
        if (math.ceil(gy / guess), math.ceil(gx / guess)) == (height, width):
            real = f'i.e. the real stride is {guess}; set FEATURE_MAP_STRIDE: {guess}'
        else:
            real = (f'which no single stride gives (grid/map = {gx / max(width, 1):.3g} in x, '
                    f'{gy / max(height, 1):.3g} in y); check the backbones\' strides')
        raise InputError(f'{_PREFIX}.TARGET_ASSIGNER_CONFIG.FEATURE_MAP_STRIDE='
                         f'{self.feature_map_stride} expects a {exp_h} x {exp_w} (H x W) BEV map '
                         f'for grid_size {self.grid_size} (x, y, z) but spatial_features_2d is '
                         f'{height} x {width}, {real}')

    def forward(self, data_dict):
        """Reads ``spatial_features_2d`` (B, C, H, W) (+ ``gt_boxes`` (B, M, 8) in training);
        writes ``final_box_dicts`` in eval (and in training with predict_boxes_when_training)."""
        if 'spatial_features_2d' not in data_dict:
            raise InputError('CenterHead needs batch_dict["spatial_features_2d"] from the '
                             'BACKBONE_2D module; it is missing')
        feats = data_dict['spatial_features_2d']
        if feats.dim() != 4:
            raise InputError(f'spatial_features_2d must be (B, C, H, W), got {tuple(feats.shape)}')
        self._check_map_size(int(feats.shape[2]), int(feats.shape[3]))
        x = self.shared_conv(feats.contiguous())
        pred_dicts = [head(x) for head in self.heads_list]
        self.forward_ret_dict = {'pred_dicts': pred_dicts}
        if self.training:
            if 'gt_boxes' not in data_dict:
                raise InputError('CenterHead in training mode needs batch_dict["gt_boxes"] '
                                 '(B, M, 8); call model.eval() for inference')
            self.forward_ret_dict['target_dicts'] = self.assign_targets(
                data_dict['gt_boxes'], feats.shape[2:])
        if not self.training or self.predict_boxes_when_training:
            batch_size = int(data_dict.get('batch_size', feats.shape[0]))
            if batch_size != feats.shape[0]:
                raise InputError(f'batch_size={batch_size} but spatial_features_2d holds '
                                 f'{feats.shape[0]} samples')
            data_dict['final_box_dicts'] = self.generate_predicted_boxes(batch_size, pred_dicts)
        return data_dict

    def assign_targets(self, gt_boxes, feature_map_size):
        """gt_boxes (B, M, 8+) with the 1-based class id last -> one target dict per head
        (see ops.centernet.assign_center_targets); feature_map_size = (H, W)."""
        if gt_boxes.dim() != 3 or gt_boxes.shape[-1] < 8:
            raise InputError(f'gt_boxes must be (B, M, 8) [x, y, z, dx, dy, dz, heading, class '
                             f'id], got {tuple(gt_boxes.shape)}')
        cls = gt_boxes[..., -1].round().long()
        n_names = len(self.class_names)
        bad = (cls < 0) | (cls > n_names)
        if bool(bad.any()):
            raise InputError(f'gt_boxes class ids must be 1..{n_names} (CLASS_NAMES '
                             f'{self.class_names}) or 0 for padding, got '
                             f'{sorted(set(cls[bad].tolist()))}')
        targets = []
        for h, names in enumerate(self.class_names_each_head):
            labels = self.class_to_channel[h].to(cls.device)[cls]
            targets.append(assign_center_targets(
                gt_boxes[..., :7], labels, len(names), feature_map_size,
                self.point_cloud_range, self.voxel_size, self.feature_map_stride,
                num_max_objs=self.num_max_objs, gaussian_overlap=self.gaussian_overlap,
                min_radius=self.min_radius))
        return targets

    def get_loss(self, tb_dict=None):
        """Gaussian focal loss on the heatmaps + weighted masked L1 on the box code.

        Returns (loss scalar, tb_dict with hm_loss_head_i, loc_loss_head_i, rpn_loss).
        Computed in float32 (under AMP, 1 - 1e-4 is 1 in float16 and log(1 - p) would be -inf).
        """
        tb_dict = {} if tb_dict is None else tb_dict
        if 'target_dicts' not in self.forward_ret_dict:
            raise InputError('CenterHead.get_loss() needs a training-mode forward first')
        loss = 0.0
        for i, (pred, target) in enumerate(zip(self.forward_ret_dict['pred_dicts'],
                                               self.forward_ret_dict['target_dicts'])):
            hm_loss = gaussian_focal_loss(torch.sigmoid(pred['hm'].float()), target['heatmap'])
            hm_loss = hm_loss * self.cls_weight
            code = torch.cat([pred[name] for name in HEAD_ORDER], dim=1).float()
            per_dim = reg_l1_loss(gather_feat(code, target['inds']), target['target_boxes'],
                                  target['mask'])
            loc_loss = (per_dim * self.code_weights).sum() * self.loc_weight
            loss = loss + hm_loss + loc_loss
            tb_dict[f'hm_loss_head_{i}'] = hm_loss.item()
            tb_dict[f'loc_loss_head_{i}'] = loc_loss.item()
        tb_dict['rpn_loss'] = loss.item()
        return loss, tb_dict

    @torch.no_grad()
    def generate_predicted_boxes(self, batch_size, pred_dicts):
        """Per head: top-k decode, score threshold, centre-range filter, rotated NMS; heads are
        then concatenated per sample. Returns B dicts of pred_boxes (K, 7), pred_scores (K,),
        pred_labels (K,) long 1-based."""
        out = [{'pred_boxes': [], 'pred_scores': [], 'pred_labels': []}
               for _ in range(batch_size)]
        for h, pred in enumerate(pred_dicts):
            boxes, scores, labels = decode_centers(
                torch.sigmoid(pred['hm'].float()), pred['center'].float(),
                pred['center_z'].float(), pred['dim'].float(), pred['rot'].float(),
                self.point_cloud_range, self.voxel_size, self.feature_map_stride,
                k=self.max_obj_per_sample)
            limit = boxes.new_tensor(self.post_center_limit_range)
            keep = (scores > self.score_thresh) & (boxes[..., :3] >= limit[:3]).all(-1) & \
                (boxes[..., :3] <= limit[3:]).all(-1)
            to_class = torch.tensor(self.channel_to_class[h], device=boxes.device)
            for b in range(batch_size):
                bx, sc, lb = boxes[b][keep[b]], scores[b][keep[b]], labels[b][keep[b]]
                sel = self._nms(bx, sc, lb)
                out[b]['pred_boxes'].append(bx[sel])
                out[b]['pred_scores'].append(sc[sel])
                out[b]['pred_labels'].append(to_class[lb[sel]] + 1)
        return [{k: torch.cat(v, dim=0) for k, v in d.items()} for d in out]

    def _nms(self, boxes, scores, labels):
        """Indices kept by rotated-box NMS (class-agnostic, or per class), by descending score."""
        if boxes.shape[0] == 0:
            return torch.zeros(0, dtype=torch.long, device=boxes.device)
        if self.nms_type != 'class_specific_nms':
            return nms_rotated(boxes, scores, self.nms_thresh, self.nms_pre_max,
                               self.nms_post_max)
        kept = []
        for c in torch.unique(labels):
            idx = torch.nonzero(labels == c, as_tuple=True)[0]
            kept.append(idx[nms_rotated(boxes[idx], scores[idx], self.nms_thresh,
                                        self.nms_pre_max, self.nms_post_max)])
        kept = torch.cat(kept)
        order = torch.argsort(scores[kept], descending=True)
        return kept[order][:self.nms_post_max]
