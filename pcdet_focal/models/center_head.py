"""DENSE_HEAD ``CenterHead``: CenterPoint's anchor-free BEV head (heatmap per class + box code).

Config keys (OpenPCDet's CenterHead keys; defaults in brackets):
  CLASS_AGNOSTIC                 read by the detector builder only (as in OpenPCDet)
  CLASS_NAMES_EACH_HEAD          list of class-name lists, one heatmap head each; names not in
                                 CLASS_NAMES are dropped (as OpenPCDet), every class of
                                 CLASS_NAMES must end up in exactly one head
  SHARED_CONV_CHANNEL            channels of the shared 3x3 conv
  USE_BIAS_BEFORE_NORM [False]   conv bias before BatchNorm
  BN_EPS [1e-5], BN_MOM [0.1]    BatchNorm of the head
  NUM_HM_CONV                    convs of the heatmap tower (last one outputs the classes)
  SEPARATE_HEAD_CFG.HEAD_ORDER   must be [center, center_z, dim, rot] (the regression code order)
  SEPARATE_HEAD_CFG.HEAD_DICT    {name: {out_channels, num_conv}}: center 2, center_z 1, dim 3,
                                 rot 2 (cos, sin); iou / vel heads are not supported
  TARGET_ASSIGNER_CONFIG         FEATURE_MAP_STRIDE (required, BEV cells per map cell),
                                 NUM_MAX_OBJS [500], GAUSSIAN_OVERLAP [0.1], MIN_RADIUS [2]
  LOSS_CONFIG.LOSS_WEIGHTS       cls_weight [1.0], loc_weight [1.0], code_weights [8 x 1.0]
  POST_PROCESSING                SCORE_THRESH [0.1], POST_CENTER_LIMIT_RANGE [the point cloud
                                 range], MAX_OBJ_PER_SAMPLE [500] (top-k per head),
                                 NMS_CONFIG {NMS_TYPE nms_gpu|nms_normal (class-agnostic per head)
                                 |class_specific_nms, NMS_THRESH [0.2], NMS_PRE_MAXSIZE [1000],
                                 NMS_POST_MAXSIZE [83]}
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

HEAD_ORDER = ('center', 'center_z', 'dim', 'rot')
HEAD_CHANNELS = {'center': 2, 'center_z': 1, 'dim': 3, 'rot': 2}
NMS_TYPES = ('nms_gpu', 'nms_normal', 'class_specific_nms')
HM_INIT_BIAS = -2.19  # CenterPoint's prior: sigmoid(-2.19) ~ 0.1 foreground at the start


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


def _number(cfg, key, field, default, kind=float, lo=None, hi=None, required=False):
    if key not in cfg or cfg[key] is None:
        if required:
            raise ConfigError(f'{field}.{key} is required')
        return default
    val = cfg[key]
    if isinstance(val, bool) or not isinstance(val, (int, float)) or \
            (kind is int and val != int(val)):
        raise ConfigError(f'{field}.{key} must be {"an integer" if kind is int else "a number"}'
                          f', got {val!r}')
    if (lo is not None and val < lo) or (hi is not None and val > hi):
        top = 'inf' if hi is None else hi
        raise ConfigError(f'{field}.{key}={val} must lie in [{lo}, {top}]')
    return kind(val)


@DENSE_HEAD.register()
class CenterHead(nn.Module):
    def __init__(self, model_cfg, input_channels, num_class, class_names, grid_size,
                 point_cloud_range, predict_boxes_when_training=False, voxel_size=None,
                 **kwargs):
        super().__init__()
        self.model_cfg = model_cfg
        self.num_class = num_class
        if input_channels is None:
            raise ConfigError('DENSE_HEAD.CenterHead needs its input channel count '
                              '(BACKBONE_2D / MAP_TO_BEV num_bev_features)')
        for name, val in (('grid_size', grid_size), ('point_cloud_range', point_cloud_range),
                          ('voxel_size', voxel_size)):
            if val is None or val is False:
                raise ConfigError(f'DENSE_HEAD.CenterHead needs {name} from the dataset '
                                  '(DATA_CONFIG)')
        self.grid_size = [int(v) for v in grid_size]
        self.point_cloud_range = [float(v) for v in point_cloud_range]
        self.voxel_size = [float(v) for v in voxel_size]
        self.class_names = list(class_names)
        self.predict_boxes_when_training = bool(predict_boxes_when_training)
        self._parse_classes()
        self._parse_heads()
        self._parse_targets_and_losses()
        self._parse_post_processing()

        bn_eps = _number(model_cfg, 'BN_EPS', 'DENSE_HEAD', 1e-5, lo=0)
        bn_mom = _number(model_cfg, 'BN_MOM', 'DENSE_HEAD', 0.1, lo=0, hi=1)

        def norm(c):
            return nn.BatchNorm2d(c, eps=bn_eps, momentum=bn_mom)

        use_bias = bool(model_cfg.get('USE_BIAS_BEFORE_NORM', False))
        shared = _number(model_cfg, 'SHARED_CONV_CHANNEL', 'DENSE_HEAD', None, int, lo=1,
                         required=True)
        num_hm_conv = _number(model_cfg, 'NUM_HM_CONV', 'DENSE_HEAD', 2, int, lo=1)
        self.shared_conv = nn.Sequential(
            nn.Conv2d(int(input_channels), shared, 3, padding=1, bias=use_bias), norm(shared),
            nn.ReLU())
        self.heads_list = nn.ModuleList()
        for names in self.class_names_each_head:
            head_dict = {k: dict(v) for k, v in self.head_dict.items()}
            head_dict['hm'] = {'out_channels': len(names), 'num_conv': num_hm_conv}
            self.heads_list.append(SeparateHead(shared, head_dict, use_bias, norm))
        self.forward_ret_dict = {}

    # ---- config parsing (validated once, at construction) ----
    def _parse_classes(self):
        each = self.model_cfg.get('CLASS_NAMES_EACH_HEAD', None)
        if not isinstance(each, (list, tuple)) or not each or \
                not all(isinstance(h, (list, tuple)) for h in each):
            raise ConfigError('DENSE_HEAD.CLASS_NAMES_EACH_HEAD must be a list of class-name '
                              f"lists, e.g. [['Car', 'Pedestrian', 'Cyclist']]; got {each!r}")
        # names a head lists but CLASS_NAMES lacks are dropped, as OpenPCDet does (so one
        # model config serves datasets with fewer classes)
        heads = [[n for n in h if n in self.class_names] for h in each]
        seen = [n for h in heads for n in h]
        empty = [i for i, h in enumerate(heads) if not h]
        missing = [n for n in self.class_names if n not in seen]
        twice = sorted({n for n in seen if seen.count(n) > 1})
        if empty or missing or twice:
            raise ConfigError(f'DENSE_HEAD.CLASS_NAMES_EACH_HEAD={[list(h) for h in each]} '
                              f'does not split CLASS_NAMES={self.class_names} into heads '
                              f'(missing {missing}, repeated {twice}, empty heads {empty}); '
                              'list every class exactly once')
        self.class_names_each_head = heads
        # table[h, global 1-based class id] = heatmap channel in head h, or -1
        table = torch.full((len(heads), len(self.class_names) + 1), -1, dtype=torch.long)
        mapping = []
        for h, names in enumerate(heads):
            ids = [self.class_names.index(n) for n in names]
            table[h, torch.tensor(ids) + 1] = torch.arange(len(ids))
            mapping.append(ids)
        self.register_buffer('class_to_channel', table, persistent=False)
        self.channel_to_class = mapping  # per head: channel -> 0-based index in CLASS_NAMES

    def _parse_heads(self):
        sep = self.model_cfg.get('SEPARATE_HEAD_CFG', None)
        if not isinstance(sep, dict) or 'HEAD_DICT' not in sep:
            raise ConfigError('DENSE_HEAD.SEPARATE_HEAD_CFG.HEAD_DICT is required ({center: '
                              '{out_channels: 2, num_conv: 2}, center_z: 1, dim: 3, rot: 2})')
        order = list(sep.get('HEAD_ORDER', HEAD_ORDER))
        if order != list(HEAD_ORDER):
            raise ConfigError(f'DENSE_HEAD.SEPARATE_HEAD_CFG.HEAD_ORDER={order}: this CenterHead '
                              f'regresses exactly {list(HEAD_ORDER)} in that order')
        head_dict = dict(sep['HEAD_DICT'] or {})
        extra = sorted(set(head_dict) - set(HEAD_ORDER))
        if extra:
            raise ConfigError(f'DENSE_HEAD.SEPARATE_HEAD_CFG.HEAD_DICT has {extra}: pcdet_focal\'s '
                              f'CenterHead supports only {list(HEAD_ORDER)} (no iou / vel heads); '
                              "remove them or use OpenPCDet's CenterHead inside OpenPCDet")
        self.head_dict = {}
        for name in HEAD_ORDER:
            field = f'DENSE_HEAD.SEPARATE_HEAD_CFG.HEAD_DICT.{name}'
            spec = head_dict.get(name)
            if not isinstance(spec, dict):
                raise ConfigError(f'{field} is required: {{out_channels: '
                                  f'{HEAD_CHANNELS[name]}, num_conv: 2}}')
            out = _number(spec, 'out_channels', field, None, int, required=True)
            if out != HEAD_CHANNELS[name]:
                raise ConfigError(f'{field}.out_channels={out} but {name} regresses '
                                  f'{HEAD_CHANNELS[name]} values; set out_channels: '
                                  f'{HEAD_CHANNELS[name]}')
            self.head_dict[name] = {'out_channels': out,
                                    'num_conv': _number(spec, 'num_conv', field, 2, int, lo=1)}

    def _parse_targets_and_losses(self):
        field = 'DENSE_HEAD.TARGET_ASSIGNER_CONFIG'
        tcfg = self.model_cfg.get('TARGET_ASSIGNER_CONFIG', None)
        if not isinstance(tcfg, dict):
            raise ConfigError(f'{field} is required (FEATURE_MAP_STRIDE, NUM_MAX_OBJS, '
                              'GAUSSIAN_OVERLAP, MIN_RADIUS)')
        self.feature_map_stride = _number(tcfg, 'FEATURE_MAP_STRIDE', field, None, int, lo=1,
                                          required=True)
        self.num_max_objs = _number(tcfg, 'NUM_MAX_OBJS', field, 500, int, lo=1)
        self.gaussian_overlap = _number(tcfg, 'GAUSSIAN_OVERLAP', field, 0.1, lo=0, hi=1)
        if not 0 < self.gaussian_overlap < 1:
            raise ConfigError(f'{field}.GAUSSIAN_OVERLAP={self.gaussian_overlap} must lie '
                              'strictly between 0 and 1 (0.1 is usual)')
        self.min_radius = _number(tcfg, 'MIN_RADIUS', field, 2, int, lo=0)

        field = 'DENSE_HEAD.LOSS_CONFIG.LOSS_WEIGHTS'
        weights = (self.model_cfg.get('LOSS_CONFIG', None) or {}).get('LOSS_WEIGHTS', None) or {}
        self.cls_weight = _number(weights, 'cls_weight', field, 1.0, lo=0)
        self.loc_weight = _number(weights, 'loc_weight', field, 1.0, lo=0)
        code = list(weights.get('code_weights', [1.0] * CODE_SIZE))
        if len(code) != CODE_SIZE or any(isinstance(c, bool) or not isinstance(c, (int, float))
                                         for c in code):
            raise ConfigError(f'{field}.code_weights={code}: give {CODE_SIZE} numbers (offset x, '
                              'offset y, z, log dx, log dy, log dz, cos, sin)')
        self.register_buffer('code_weights', torch.tensor(code, dtype=torch.float32),
                             persistent=False)
        for key in ('IOU_REG_LOSS',):
            if self.model_cfg.get(key, False):
                raise ConfigError(f'DENSE_HEAD.{key}: pcdet_focal\'s CenterHead has no IoU '
                                  'branch; remove the key or use OpenPCDet\'s CenterHead')

    def _parse_post_processing(self):
        field = 'DENSE_HEAD.POST_PROCESSING'
        post = self.model_cfg.get('POST_PROCESSING', None) or {}
        self.score_thresh = _number(post, 'SCORE_THRESH', field, 0.1, lo=0, hi=1)
        self.max_obj_per_sample = _number(post, 'MAX_OBJ_PER_SAMPLE', field, 500, int, lo=1)
        limit = post.get('POST_CENTER_LIMIT_RANGE', None)
        limit = self.point_cloud_range if limit is None else limit
        if not isinstance(limit, (list, tuple)) or len(limit) != 6 or \
                any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in limit):
            raise ConfigError(f'{field}.POST_CENTER_LIMIT_RANGE={limit}: give 6 numbers '
                              '[x_min, y_min, z_min, x_max, y_max, z_max]')
        self.post_center_limit_range = [float(v) for v in limit]
        if post.get('USE_IOU_TO_RECTIFY_SCORE', False):
            raise ConfigError(f'{field}.USE_IOU_TO_RECTIFY_SCORE needs an iou head, which '
                              "pcdet_focal's CenterHead does not have; remove it")
        nms = post.get('NMS_CONFIG', None) or {}
        field += '.NMS_CONFIG'
        self.nms_type = nms.get('NMS_TYPE', 'nms_gpu')
        if self.nms_type not in NMS_TYPES:
            raise ConfigError(f'{field}.NMS_TYPE={self.nms_type!r} is not supported; use one of '
                              f'{", ".join(NMS_TYPES)} (nms_gpu and nms_normal are the same '
                              'rotated-box NMS here, on any device)')
        self.nms_thresh = _number(nms, 'NMS_THRESH', field, 0.2, lo=0, hi=1)
        self.nms_pre_max = _number(nms, 'NMS_PRE_MAXSIZE', field, 1000, int, lo=1)
        self.nms_post_max = _number(nms, 'NMS_POST_MAXSIZE', field, 83, int, lo=1)

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
        raise InputError(f'DENSE_HEAD.TARGET_ASSIGNER_CONFIG.FEATURE_MAP_STRIDE='
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
