"""DETECTOR ``FocalCenterPoint``: OpenPCDet's CenterPoint flow that also trains every module's
own loss (e.g. FocalSST's importance loss, which OpenPCDet's CenterPoint would drop).

``DetectorTemplate`` is a small Detector3DTemplate: it builds the modules named in MODEL in
OpenPCDet's order (vfe, backbone_3d, map_to_bev_module, pfe, backbone_2d, dense_head), each
through ``registry.lookup`` with OpenPCDet's constructor kwargs, passing channel counts along in
``model_info_dict`` exactly as OpenPCDet does, and checks the channel flow where it is knowable
at construction.

Config keys: ``MODEL.NAME: FocalCenterPoint``; ``MODEL.VFE / BACKBONE_3D / MAP_TO_BEV /
BACKBONE_2D / DENSE_HEAD`` (each with ``NAME``; DENSE_HEAD required); ``MODEL.POST_PROCESSING.
RECALL_THRESH_LIST`` (optional: 3D-IoU recall counters in eval). PFE, POINT_HEAD and ROI_HEAD
are refused (two-stage models are not supported).
"""
import torch
from torch import nn

from ..config import cfg_get
from ..errors import ConfigError, InputError
from ..registry import DETECTOR, lookup

# (attribute, config key, registry slot) in OpenPCDet's build order
MODULE_TOPOLOGY = (
    ('vfe', 'VFE', 'VFE'),
    ('backbone_3d', 'BACKBONE_3D', 'BACKBONE_3D'),
    ('map_to_bev_module', 'MAP_TO_BEV', 'MAP_TO_BEV'),
    ('pfe', 'PFE', None),
    ('backbone_2d', 'BACKBONE_2D', 'BACKBONE_2D'),
    ('dense_head', 'DENSE_HEAD', 'DENSE_HEAD'),
    ('point_head', 'POINT_HEAD', None),
    ('roi_head', 'ROI_HEAD', None),
)
_DATASET_ATTRS = ('class_names', 'grid_size', 'point_cloud_range', 'voxel_size')


def check_map_to_bev_channels(cfg, channels, source):
    """ConfigError when MAP_TO_BEV's config cannot take ``channels`` input channels.

    cfg: MODEL.MAP_TO_BEV; channels: C of the voxel features reaching it; source: what produced
    them, for the message (e.g. 'BACKBONE_3D (FocalSSTDSVT) output'). Only rules that hold in
    both hosts for the module NAME are checked (OpenPCDet's HeightCompression and
    PointPillarScatter3d have the same channel arithmetic as ours).
    """
    name = cfg.get('NAME')
    n_bev = cfg.get('NUM_BEV_FEATURES')
    if name == 'SparseHeightCompression':
        mode = str(cfg.get('MODE', 'max')).lower()
        n_in = cfg.get('INPUT_FEATURES')
        if mode in ('max', 'mean') and n_bev is not None and n_bev != channels:
            raise ConfigError(f'MAP_TO_BEV.NUM_BEV_FEATURES={n_bev} but MODE={mode} keeps the '
                              f'{source} C={channels} channels; set NUM_BEV_FEATURES: '
                              f'{channels} or MODE: learned')
        if n_in is not None and n_in != channels:
            raise ConfigError(f'MAP_TO_BEV.INPUT_FEATURES={n_in} but the {source} has '
                              f'C={channels} channels; set INPUT_FEATURES: {channels}')
    elif name == 'HeightCompression':
        if n_bev is not None and n_bev % channels:
            raise ConfigError(f'MAP_TO_BEV.NUM_BEV_FEATURES={n_bev} must be C x D (channels x '
                              f'height bins) but is not a multiple of the {source} '
                              f'C={channels}')
    elif name in ('PointPillarScatter3d', 'PointPillarScatter'):
        shape = cfg.get('INPUT_SHAPE')
        nz = int(shape[2]) if name == 'PointPillarScatter3d' and shape is not None else 1
        if n_bev is not None and n_bev != channels * nz:
            raise ConfigError(f'MAP_TO_BEV.NUM_BEV_FEATURES={n_bev} but {name} stacks the '
                              f'{source} C={channels} channels over nz={nz} height cells = '
                              f'{channels * nz}; set NUM_BEV_FEATURES: {channels * nz}')


class DetectorTemplate(nn.Module):
    """Builds ``module_list`` from MODEL like OpenPCDet's Detector3DTemplate (see module doc)."""

    def __init__(self, model_cfg, num_class, dataset):
        super().__init__()
        self.model_cfg = model_cfg
        self.num_class = int(num_class)
        self.dataset = dataset
        missing = [a for a in _DATASET_ATTRS if getattr(dataset, a, None) is None]
        if getattr(getattr(dataset, 'point_feature_encoder', None), 'num_point_features',
                   None) is None:
            missing.append('point_feature_encoder.num_point_features')
        if missing:
            raise ConfigError(f'the dataset ({type(dataset).__name__}) lacks {", ".join(missing)}'
                              '; build the model with a DatasetTemplate-style dataset')
        self.class_names = list(dataset.class_names)
        self.register_buffer('global_step', torch.zeros(1, dtype=torch.long))
        for key in ('PFE', 'POINT_HEAD', 'ROI_HEAD'):
            if model_cfg.get(key) is not None:
                raise ConfigError(f'MODEL.{key} is set but {type(self).__name__} is a '
                                  'single-stage detector (vfe, backbone_3d, map_to_bev, '
                                  'backbone_2d, dense_head); remove MODEL.' + key)

    @property
    def mode(self):
        return 'TRAIN' if self.training else 'TEST'

    def update_global_step(self):
        self.global_step += 1

    def build_networks(self):
        info = {
            'module_list': [],
            'num_rawpoint_features': int(self.dataset.point_feature_encoder.num_point_features),
            'num_point_features': int(self.dataset.point_feature_encoder.num_point_features),
            'grid_size': self.dataset.grid_size,
            'point_cloud_range': self.dataset.point_cloud_range,
            'voxel_size': self.dataset.voxel_size,
            'depth_downsample_factor': getattr(self.dataset, 'depth_downsample_factor', None),
        }
        for attr, key, slot in MODULE_TOPOLOGY:
            module = None
            if slot is not None and self.model_cfg.get(key) is not None:
                module = getattr(self, f'build_{attr}')(self.model_cfg[key], key, slot, info)
                info['module_list'].append(module)
            self.add_module(attr, module)
        return info['module_list']

    @staticmethod
    def _lookup(cfg, key, slot):
        if not isinstance(cfg, dict) or not cfg.get('NAME'):
            raise ConfigError(f'MODEL.{key}.NAME is required (a registered {slot} module)')
        return lookup(slot, cfg['NAME'], field=f'MODEL.{key}.NAME')

    def build_vfe(self, cfg, key, slot, info):
        module = self._lookup(cfg, key, slot)(
            model_cfg=cfg, num_point_features=info['num_rawpoint_features'],
            point_cloud_range=info['point_cloud_range'], voxel_size=info['voxel_size'],
            grid_size=info['grid_size'], depth_downsample_factor=info['depth_downsample_factor'])
        info['num_point_features'] = module.get_output_feature_dim()
        info['point_features_source'] = f'VFE ({cfg["NAME"]}) output'
        return module

    def build_backbone_3d(self, cfg, key, slot, info):
        module = self._lookup(cfg, key, slot)(
            model_cfg=cfg, input_channels=info['num_point_features'],
            grid_size=info['grid_size'], voxel_size=info['voxel_size'],
            point_cloud_range=info['point_cloud_range'])
        info['num_point_features'] = module.num_point_features
        info['backbone_channels'] = getattr(module, 'backbone_channels', None)
        info['point_features_source'] = (f'BACKBONE_3D ({cfg["NAME"]}) output '
                                         '(num_point_features)')
        return module

    def build_map_to_bev_module(self, cfg, key, slot, info):
        source = info.get('point_features_source', 'dataset point features')
        check_map_to_bev_channels(cfg, int(info['num_point_features']), source)
        module = self._lookup(cfg, key, slot)(model_cfg=cfg, grid_size=info['grid_size'])
        info['num_bev_features'] = module.num_bev_features
        return module

    def build_backbone_2d(self, cfg, key, slot, info):
        if info.get('num_bev_features') is None:
            raise ConfigError('MODEL.BACKBONE_2D needs a MODEL.MAP_TO_BEV module before it '
                              '(its NUM_BEV_FEATURES is the 2D backbone\'s input)')
        module = self._lookup(cfg, key, slot)(model_cfg=cfg,
                                              input_channels=info['num_bev_features'])
        info['num_bev_features'] = module.num_bev_features
        return module

    def build_dense_head(self, cfg, key, slot, info):
        channels = info.get('num_bev_features', cfg.get('INPUT_FEATURES'))
        if channels is None:
            raise ConfigError('MODEL.DENSE_HEAD needs its input channels: add MAP_TO_BEV / '
                              'BACKBONE_2D modules or set DENSE_HEAD.INPUT_FEATURES')
        return self._lookup(cfg, key, slot)(
            model_cfg=cfg, input_channels=channels,
            num_class=1 if cfg.get('CLASS_AGNOSTIC', False) else self.num_class,
            class_names=self.class_names, grid_size=info['grid_size'],
            point_cloud_range=info['point_cloud_range'],
            predict_boxes_when_training=bool(self.model_cfg.get('ROI_HEAD', False)),
            voxel_size=info['voxel_size'])

    # OpenPCDet's tools/train.py and tools/test.py call these two on the detector; they are
    # implemented with our checkpoint helpers (weights_only loading, key-mismatch messages).
    def load_params_from_file(self, filename, logger=None, to_cpu=False, pre_trained_path=None):
        """Load the weights whose names and shapes match (OpenPCDet's non-strict load)."""
        from ..engine.checkpoint import load_checkpoint, load_model_state
        state = dict(load_checkpoint(filename)['model_state'])
        if pre_trained_path is not None:
            state.update(load_checkpoint(pre_trained_path)['model_state'])
        loaded = load_model_state(self, state, path=str(filename), strict=False)
        if logger is not None:
            logger.info('==> loaded %d/%d tensors from %s', loaded, len(self.state_dict()),
                        filename)

    def load_params_with_optimizer(self, filename, to_cpu=False, optimizer=None, logger=None):
        """Strict load of model (+ optimizer) state to resume; returns (it, epoch)."""
        from ..engine.checkpoint import load_checkpoint, load_model_state
        ckpt = load_checkpoint(filename)
        load_model_state(self, ckpt['model_state'], path=str(filename), strict=True)
        if optimizer is not None and ckpt.get('optimizer_state') is not None:
            optimizer.load_state_dict(ckpt['optimizer_state'])
        if logger is not None:
            logger.info('==> resumed from %s', filename)
        return ckpt.get('it', 0.0), ckpt.get('epoch', -1)

    def run_modules(self, batch_dict):
        if 'batch_size' not in batch_dict:
            raise InputError('batch_dict["batch_size"] is required (the collate function '
                             'sets it)')
        for module in self.module_list:
            batch_dict = module(batch_dict)
        return batch_dict


@DETECTOR.register()
class FocalCenterPoint(DetectorTemplate):
    """CenterPoint whose training loss = dense head loss + every other module's get_loss()."""

    def __init__(self, model_cfg, num_class, dataset):
        super().__init__(model_cfg=model_cfg, num_class=num_class, dataset=dataset)
        if model_cfg.get('DENSE_HEAD') is None:
            raise ConfigError('MODEL.DENSE_HEAD is required for FocalCenterPoint (e.g. NAME: '
                              'CenterHead)')
        self.module_list = self.build_networks()

    def forward(self, batch_dict):
        """training: ({'loss': scalar}, tb_dict, disp_dict); eval: (pred_dicts, recall_dict)
        with pred_dicts[i] = {'pred_boxes' (K, 7), 'pred_scores' (K,), 'pred_labels' (K,)}."""
        batch_dict = self.run_modules(batch_dict)
        if self.training:
            loss, tb_dict, disp_dict = self.get_training_loss()
            return {'loss': loss}, tb_dict, disp_dict
        return self.post_processing(batch_dict)

    def get_training_loss(self):
        loss_rpn, head_tb = self.dense_head.get_loss()
        tb_dict = {'loss_rpn': loss_rpn.item(), **head_tb}
        loss = loss_rpn
        for attr, _, _ in MODULE_TOPOLOGY:
            module = getattr(self, attr, None)
            if attr == 'dense_head' or not callable(getattr(module, 'get_loss', None)):
                continue
            extra, extra_tb = module.get_loss()
            tb_dict.update(extra_tb or {})
            tb_dict[f'loss_{attr}'] = extra.item()
            loss = loss + extra
        return loss, tb_dict, {}

    def post_processing(self, batch_dict):
        pred_dicts = batch_dict['final_box_dicts']
        thresholds = cfg_get(self.model_cfg, 'POST_PROCESSING.RECALL_THRESH_LIST', None)
        recall_dict = {}
        if thresholds and 'gt_boxes' in batch_dict:
            recall_dict = recall_record(pred_dicts, batch_dict['gt_boxes'], thresholds)
        return pred_dicts, recall_dict


def recall_record(pred_dicts, gt_boxes, thresholds):
    """OpenPCDet-style recall counters: {'gt': n, 'roi_t': 0, 'rcnn_t': gt boxes matched by a
    prediction with 3D IoU > t}. gt_boxes (B, M, 8) zero-padded."""
    from ..eval.iou import boxes_iou_3d  # numba: compiled on first evaluation only
    record = {'gt': 0}
    for t in thresholds:
        record[f'roi_{t}'] = 0
        record[f'rcnn_{t}'] = 0
    for pred, gt in zip(pred_dicts, gt_boxes):
        gt = gt[gt[:, 3:6].abs().sum(-1) > 0][:, :7].detach().float().cpu().numpy()
        record['gt'] += len(gt)
        boxes = pred['pred_boxes'][:, :7].detach().float().cpu().numpy()
        if len(gt) == 0 or len(boxes) == 0:
            continue
        best = boxes_iou_3d(boxes, gt).max(axis=0)
        for t in thresholds:
            record[f'rcnn_{t}'] += int((best > t).sum())
    return record
