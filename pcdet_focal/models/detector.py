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
from ..schema import AnyValue, Bool, Choice, Float, Key, ListOf, Schema, Section
from .map_to_bev import backbone_output_shape

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


def check_map_to_bev_channels(module, channels, upstream, source):
    """The cross-module rule between the 3D backbone and MAP_TO_BEV, on the built modules.

    module: the MAP_TO_BEV module; channels: C of the voxel features reaching it; upstream:
    [x, y, z] grid of those voxels when known; source: what produced them, for the message.
    Ours and OpenPCDet's HeightCompression / PointPillarScatter3d share this arithmetic.
    ConfigError naming both sides and the value to set.
    """
    name = type(module).__name__
    n_bev = int(module.num_bev_features)
    depth = upstream[2] if upstream is not None else None
    if name == 'SparseHeightCompression':
        if module.in_channels != channels:
            key = 'INPUT_FEATURES' if module.cfg.INPUT_FEATURES is not None else 'NUM_BEV_FEATURES'
            fix = f'set {key}: {channels}' if module.mode == 'learned' or key == 'INPUT_FEATURES' \
                else f'set NUM_BEV_FEATURES: {channels} or MODE: learned'
            raise ConfigError(f'MODEL.MAP_TO_BEV.{key}={module.in_channels} but MODE='
                              f'{module.mode} gets the {source} C={channels} channels; {fix}')
    elif name == 'HeightCompression':
        want = channels * depth if depth is not None else None
        if (want is not None and n_bev != want) or n_bev % channels:
            shown = f'C*D = {channels}*{depth} = {want}' if want is not None else \
                f'a multiple of the {source} C={channels}'
            raise ConfigError(f'MODEL.MAP_TO_BEV.NUM_BEV_FEATURES={n_bev} but HeightCompression '
                              f'flattens {shown} channels ({source}); set NUM_BEV_FEATURES: '
                              f'{want if want is not None else "C x D"}')
    elif name in ('PointPillarScatter3d', 'PointPillarScatter'):
        nz = int(getattr(module, 'nz', 1))
        if n_bev != channels * nz:
            raise ConfigError(f'MODEL.MAP_TO_BEV.NUM_BEV_FEATURES={n_bev} but {name} stacks the '
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
        # the grid it hands on ('unknown' when the module does not say: MAP_TO_BEV must then
        # be told, e.g. SparseHeightCompression's NUM_HEIGHT_BINS)
        info['voxel_grid'] = backbone_output_shape(module) or 'unknown'
        return module

    def build_map_to_bev_module(self, cfg, key, slot, info):
        source = info.get('point_features_source', 'dataset point features')
        upstream = info.get('voxel_grid', [int(v) for v in info['grid_size']])
        module = self._lookup(cfg, key, slot)(model_cfg=cfg, grid_size=info['grid_size'],
                                              input_shape=upstream)
        check_map_to_bev_channels(module, int(info['num_point_features']),
                                  upstream if upstream != 'unknown' else None, source)
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
        """Load the weights whose names and shapes match (OpenPCDet's non-strict load).

        Reads our checkpoints and OpenPCDet's (numpy scalars in them included) with
        weights_only=True; an unreadable file raises CheckpointError with the whole cause.
        """
        from ..engine.checkpoint import load_checkpoint, load_model_state
        ckpt = load_checkpoint(filename)
        state = dict(ckpt['model_state'])
        if pre_trained_path is not None:
            state.update(load_checkpoint(pre_trained_path)['model_state'])
        loaded = load_model_state(self, state, path=str(filename), strict=False)
        if logger is not None:
            logger.info('==> loaded %d/%d tensors from %s (checkpoint version %s)', loaded,
                        len(self.state_dict()), filename, ckpt.get('version', 'unknown'))

    def load_params_with_optimizer(self, filename, to_cpu=False, optimizer=None, logger=None):
        """Strict load of model (+ optimizer) state to resume; returns (it, epoch).

        OpenPCDet's train.py calls this inside a bare ``except:`` when it resumes by itself and
        starts over from epoch 0 when every checkpoint fails. So a failure, besides raising,
        refuses training (``refuse_training``): later calls (older checkpoints) fail with the
        same cause and the run stops at its first training step, with nothing trained or saved.
        """
        from ..engine.checkpoint import (load_checkpoint, load_model_state,
                                         load_optimizer_state, refuse_training,
                                         training_refused)
        from ..errors import CheckpointError
        try:
            if training_refused(self):
                raise CheckpointError(training_refused(self))
            ckpt = load_checkpoint(filename)
            load_model_state(self, ckpt['model_state'], path=str(filename), strict=True)
        except CheckpointError as err:
            reason = str(err)
            if 'training refused' not in reason:
                reason += ('; training refused: this run\'s checkpoint cannot be resumed and '
                           'starting over would overwrite the run (move the file away to '
                           'resume from the one before it, or pass --ckpt)')
            refuse_training(self, reason)
            if logger is not None:
                logger.error('%s', reason)
            raise CheckpointError(reason) from None
        load_optimizer_state(optimizer, ckpt.get('optimizer_state'), filename)
        if logger is not None:
            logger.info('==> resumed from %s (epoch %s, it %s, checkpoint version %s)', filename,
                        ckpt.get('epoch'), ckpt.get('it'), ckpt.get('version', 'unknown'))
        return ckpt.get('it', 0.0), ckpt.get('epoch', -1)

    def run_modules(self, batch_dict):
        if 'batch_size' not in batch_dict:
            raise InputError('batch_dict["batch_size"] is required (the collate function '
                             'sets it)')
        for module in self.module_list:
            batch_dict = module(batch_dict)
        return batch_dict


_MODULE = AnyValue()   # a slot's mapping: its NAME's class declares its keys

DETECTOR_CONFIG = Schema('FocalCenterPoint', [
    Key('VFE', _MODULE, None, 'voxel feature encoder (e.g. MeanVFE)'),
    Key('BACKBONE_3D', _MODULE, None, '3D backbone (e.g. FocalSSTDSVT, DSVT)'),
    Key('MAP_TO_BEV', _MODULE, None, 'sparse 3D -> BEV (e.g. SparseHeightCompression)'),
    Key('BACKBONE_2D', _MODULE, None, 'BEV backbone (e.g. BaseBEVBackbone)'),
    Key('DENSE_HEAD', _MODULE, None, 'the detection head (e.g. CenterHead); required'),
    Key('PFE', _MODULE, None, 'refused: single-stage detector'),
    Key('POINT_HEAD', _MODULE, None, 'refused: single-stage detector'),
    Key('ROI_HEAD', _MODULE, None, 'refused: single-stage detector'),
    Key('POST_PROCESSING', Section(Schema('MODEL.POST_PROCESSING', [
        Key('RECALL_THRESH_LIST', ListOf(Float(lo=0, hi=1)), None,
            '3D IoU thresholds of the recall counters in evaluation'),
        Key('EVAL_METRIC', Choice('kitti'), 'kitti', 'AP protocol (KITTI R40)'),
        Key('SCORE_THRESH', Float(lo=0, hi=1), None, "OpenPCDet's detector key (unused: the "
            "head's POST_PROCESSING.SCORE_THRESH applies)"),
        Key('OUTPUT_RAW_SCORE', Bool(), False, "OpenPCDet's key (unused)"),
        Key('NMS_CONFIG', AnyValue(), None, "OpenPCDet's detector NMS (unused: the head's "
            'applies)'),
    ])), None, 'evaluation options'),
])


@DETECTOR.register()
class FocalCenterPoint(DetectorTemplate):
    """CenterPoint whose training loss = dense head loss + every other module's get_loss()."""

    CONFIG = DETECTOR_CONFIG

    def __init__(self, model_cfg, num_class, dataset):
        self.CONFIG.parse(model_cfg, 'MODEL')
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

    def memory_loss(self, tape, flow):
        """Memory rule of the loss: the head's loss plus every module's own, summed."""
        loss = tape.op('loss sum', flow.losses, 1, grad_alias=True)
        tape.drop(*flow.losses)
        return loss

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
