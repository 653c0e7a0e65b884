"""A minimal fake OpenPCDet (``pcdet``) package, written into a temp dir by the tests.

CI has no OpenPCDet, so the drop-in tests run against this stand-in. It reproduces only the
parts of OpenPCDet's contract that pcdet_focal relies on (see shared/docs/openpcdet-contract.md):

- module-level ``__all__`` dicts at OpenPCDet's module paths, with a few entries of its own
  (MeanVFE, DSVT, HeightCompression, BaseBEVBackbone, CenterHead, CenterPoint, KittiDataset),
  so "never overwrite OpenPCDet's entry" can be checked;
- ``pcdet.models.build_network`` -> a Detector3DTemplate-like builder that constructs every
  module from those tables *at build time* with OpenPCDet's keyword arguments, in OpenPCDet's
  order, and logs each construction in ``pcdet.models.detectors.BUILD_LOG``;
- ``pcdet.config.cfg`` / ``cfg_from_yaml_file`` with OpenPCDet's semantics (``_BASE_CONFIG_``
  relative to the current directory);
- ``pcdet.datasets.DatasetTemplate``-like datasets that only derive the geometry attributes.

``broken_ops=True`` writes a checkout whose compiled CUDA ops are missing: ``pcdet`` and
``pcdet.config`` import, ``pcdet.models`` and ``pcdet.datasets`` raise ImportError, as in a
real checkout where ``python setup.py develop`` was never run.

The fake's modules compute something simple but real (mean VFE, dense height folding, a 1x1
conv backbone and head with a loss), so a model mixing them with ours runs forward + backward.
"""
import os
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# OpenPCDet's registry modules: slot -> import path (the same paths as registry.REGISTRIES).
PCDET_TABLES = {
    'VFE': 'pcdet.models.backbones_3d.vfe',
    'BACKBONE_3D': 'pcdet.models.backbones_3d',
    'MAP_TO_BEV': 'pcdet.models.backbones_2d.map_to_bev',
    'BACKBONE_2D': 'pcdet.models.backbones_2d',
    'DENSE_HEAD': 'pcdet.models.dense_heads',
    'DETECTOR': 'pcdet.models.detectors',
    'DATASET': 'pcdet.datasets',
}
# The entries the fake ships with, per slot (OpenPCDet's own classes of the same names).
PREEXISTING = {
    'VFE': {'VFETemplate', 'MeanVFE'},
    'BACKBONE_3D': {'DSVT'},
    'MAP_TO_BEV': {'HeightCompression'},
    'BACKBONE_2D': {'BaseBEVBackbone'},
    'DENSE_HEAD': {'CenterHead'},
    'DETECTOR': {'Detector3DTemplate', 'CenterPoint'},
    'DATASET': {'DatasetTemplate', 'KittiDataset'},
}

_BROKEN_IMPORT = 'from pcdet.ops.iou3d_nms import iou3d_nms_cuda  # the .so was never built\n'

_FILES = {
    'pcdet/__init__.py': '''
        """Fake OpenPCDet written by pcdet_focal's tests."""
        __version__ = '0.6.0+fake'
    ''',
    'pcdet/ops/__init__.py': '',
    'pcdet/ops/iou3d_nms/__init__.py': '',
    'pcdet/config.py': '''
        """cfg_from_yaml_file with OpenPCDet's semantics: _BASE_CONFIG_ relative to the cwd."""
        from pathlib import Path

        import yaml
        from easydict import EasyDict


        def merge_new_config(config, new_config):
            if '_BASE_CONFIG_' in new_config:
                with open(new_config['_BASE_CONFIG_'], 'r') as f:
                    config.update(EasyDict(yaml.safe_load(f)))
            for key, val in new_config.items():
                if not isinstance(val, dict):
                    config[key] = val
                    continue
                if key not in config:
                    config[key] = EasyDict()
                merge_new_config(config[key], val)
            return config


        def cfg_from_yaml_file(cfg_file, config):
            with open(cfg_file, 'r') as f:
                merge_new_config(config, yaml.safe_load(f))
            return config


        cfg = EasyDict()
        cfg.ROOT_DIR = (Path(__file__).resolve().parent / '../').resolve()
        cfg.LOCAL_RANK = 0
    ''',
    'pcdet/models/__init__.py': '''
        {broken}from .detectors import build_detector


        def build_network(model_cfg, num_class, dataset):
            return build_detector(model_cfg=model_cfg, num_class=num_class, dataset=dataset)
    ''',
    'pcdet/models/backbones_3d/__init__.py': '''
        from torch import nn


        class DSVT(nn.Module):
            """OpenPCDet's own DSVT stand-in: passes voxel features through."""

            def __init__(self, model_cfg, input_channels=None, grid_size=None, **kwargs):
                super().__init__()
                self.model_cfg = model_cfg
                self.num_point_features = input_channels

            def forward(self, batch_dict):
                return batch_dict


        __all__ = {'DSVT': DSVT}
    ''',
    'pcdet/models/backbones_3d/vfe/__init__.py': '''
        from torch import nn


        class VFETemplate(nn.Module):
            def __init__(self, model_cfg, **kwargs):
                super().__init__()
                self.model_cfg = model_cfg


        class MeanVFE(VFETemplate):
            """Mean of the (zero-padded) points of each voxel: voxels (N, P, C) -> (N, C)."""

            def __init__(self, model_cfg, num_point_features, **kwargs):
                super().__init__(model_cfg=model_cfg)
                self.num_point_features = num_point_features

            def get_output_feature_dim(self):
                return self.num_point_features

            def forward(self, batch_dict, **kwargs):
                voxels, count = batch_dict['voxels'], batch_dict['voxel_num_points']
                mean = voxels.sum(dim=1) / count.clamp(min=1).view(-1, 1).type_as(voxels)
                batch_dict['voxel_features'] = mean.contiguous()
                return batch_dict


        __all__ = {'VFETemplate': VFETemplate, 'MeanVFE': MeanVFE}
    ''',
    'pcdet/models/backbones_2d/__init__.py': '''
        from torch import nn


        class BaseBEVBackbone(nn.Module):
            """1x1 conv to sum(NUM_UPSAMPLE_FILTERS) channels (OpenPCDet's output width)."""

            def __init__(self, model_cfg, input_channels, **kwargs):
                super().__init__()
                self.model_cfg = model_cfg
                ups = model_cfg.get('NUM_UPSAMPLE_FILTERS') or model_cfg.NUM_FILTERS[-1:]
                self.num_bev_features = int(sum(ups))
                self.conv = nn.Conv2d(input_channels, self.num_bev_features, 1)

            def forward(self, data_dict):
                data_dict['spatial_features_2d'] = self.conv(data_dict['spatial_features'])
                return data_dict


        __all__ = {'BaseBEVBackbone': BaseBEVBackbone}
    ''',
    'pcdet/models/backbones_2d/map_to_bev/__init__.py': '''
        from torch import nn


        class HeightCompression(nn.Module):
            """Dense: (B, C, D, H, W) -> (B, C*D, H, W), as OpenPCDet's."""

            def __init__(self, model_cfg, **kwargs):
                super().__init__()
                self.model_cfg = model_cfg
                self.num_bev_features = model_cfg.NUM_BEV_FEATURES

            def forward(self, batch_dict):
                dense = batch_dict['encoded_spconv_tensor'].dense()
                B, C, D, H, W = dense.shape
                batch_dict['spatial_features'] = dense.view(B, C * D, H, W)
                batch_dict['spatial_features_stride'] = batch_dict[
                    'encoded_spconv_tensor_stride']
                return batch_dict


        __all__ = {'HeightCompression': HeightCompression}
    ''',
    'pcdet/models/dense_heads/__init__.py': '''
        import torch
        from torch import nn


        class CenterHead(nn.Module):
            """1x1 conv heatmap; loss = mean sigmoid (enough to drive a backward pass)."""

            def __init__(self, model_cfg, input_channels, num_class, class_names, grid_size,
                         point_cloud_range, voxel_size, predict_boxes_when_training=True):
                super().__init__()
                self.model_cfg = model_cfg
                self.num_class = num_class
                self.class_names = class_names
                self.heatmap = nn.Conv2d(input_channels, num_class, 1)
                self.forward_ret_dict = {}

            def get_loss(self):
                loss = self.forward_ret_dict['hm'].sigmoid().mean()
                return loss, {'hm_loss_head_0': loss.item()}

            def forward(self, data_dict):
                hm = self.heatmap(data_dict['spatial_features_2d'])
                self.forward_ret_dict['hm'] = hm
                if not self.training:
                    empty = {'pred_boxes': hm.new_zeros(0, 7), 'pred_scores': hm.new_zeros(0),
                             'pred_labels': torch.zeros(0, dtype=torch.long)}
                    data_dict['final_box_dicts'] = [dict(empty)
                                                    for _ in range(data_dict['batch_size'])]
                return data_dict


        __all__ = {'CenterHead': CenterHead}
    ''',
    'pcdet/models/detectors/__init__.py': '''
        """Detector3DTemplate-like builder: OpenPCDet's order and constructor kwargs."""
        import torch
        from torch import nn

        from .. import backbones_2d, backbones_3d, dense_heads
        from ..backbones_2d import map_to_bev
        from ..backbones_3d import vfe

        BUILD_LOG = []  # (slot, NAME, class) of every module built, in order


        def _build(slot, table, cfg, **kwargs):
            cls = table[cfg.NAME]  # read at build time: runtime insertions are seen
            BUILD_LOG.append((slot, cfg.NAME, cls))
            return cls(model_cfg=cfg, **kwargs)


        class Detector3DTemplate(nn.Module):
            def __init__(self, model_cfg, num_class, dataset):
                super().__init__()
                self.model_cfg = model_cfg
                self.num_class = num_class
                self.dataset = dataset
                self.class_names = dataset.class_names
                self.register_buffer('global_step', torch.zeros(1, dtype=torch.long))

            def build_networks(self):
                cfg, ds = self.model_cfg, self.dataset
                info = {'num_point_features': ds.point_feature_encoder.num_point_features}
                modules = []

                def add(name, module):
                    self.add_module(name, module)
                    if module is not None:
                        modules.append(module)

                add('vfe', None if cfg.get('VFE') is None else _build(
                    'VFE', vfe.__all__, cfg.VFE,
                    num_point_features=info['num_point_features'],
                    point_cloud_range=ds.point_cloud_range, voxel_size=ds.voxel_size,
                    grid_size=ds.grid_size, depth_downsample_factor=ds.depth_downsample_factor))
                if self.vfe is not None:
                    info['num_point_features'] = self.vfe.get_output_feature_dim()
                add('backbone_3d', None if cfg.get('BACKBONE_3D') is None else _build(
                    'BACKBONE_3D', backbones_3d.__all__, cfg.BACKBONE_3D,
                    input_channels=info['num_point_features'], grid_size=ds.grid_size,
                    voxel_size=ds.voxel_size, point_cloud_range=ds.point_cloud_range))
                if self.backbone_3d is not None:
                    info['num_point_features'] = self.backbone_3d.num_point_features
                add('map_to_bev_module', None if cfg.get('MAP_TO_BEV') is None else _build(
                    'MAP_TO_BEV', map_to_bev.__all__, cfg.MAP_TO_BEV, grid_size=ds.grid_size))
                if self.map_to_bev_module is not None:
                    info['num_bev_features'] = self.map_to_bev_module.num_bev_features
                add('backbone_2d', None if cfg.get('BACKBONE_2D') is None else _build(
                    'BACKBONE_2D', backbones_2d.__all__, cfg.BACKBONE_2D,
                    input_channels=info.get('num_bev_features')))
                if self.backbone_2d is not None:
                    info['num_bev_features'] = self.backbone_2d.num_bev_features
                head = cfg.get('DENSE_HEAD')
                add('dense_head', None if head is None else _build(
                    'DENSE_HEAD', dense_heads.__all__, head,
                    input_channels=info.get('num_bev_features', head.get('INPUT_FEATURES')),
                    num_class=1 if head.get('CLASS_AGNOSTIC', False) else self.num_class,
                    class_names=self.class_names, grid_size=ds.grid_size,
                    point_cloud_range=ds.point_cloud_range,
                    predict_boxes_when_training=cfg.get('ROI_HEAD', False),
                    voxel_size=ds.voxel_size))
                return modules


        class CenterPoint(Detector3DTemplate):
            """OpenPCDet's CenterPoint flow: only the dense head's loss is trained."""

            def __init__(self, model_cfg, num_class, dataset):
                super().__init__(model_cfg=model_cfg, num_class=num_class, dataset=dataset)
                self.module_list = self.build_networks()

            def forward(self, batch_dict):
                for module in self.module_list:
                    batch_dict = module(batch_dict)
                if self.training:
                    loss, tb_dict = self.dense_head.get_loss()
                    return {'loss': loss}, tb_dict, {}
                return batch_dict['final_box_dicts'], {}


        __all__ = {'Detector3DTemplate': Detector3DTemplate, 'CenterPoint': CenterPoint}


        def build_detector(model_cfg, num_class, dataset):
            return __all__[model_cfg.NAME](model_cfg=model_cfg, num_class=num_class,
                                           dataset=dataset)
    ''',
    'pcdet/datasets/__init__.py': '''
        {broken}from pathlib import Path
        from types import SimpleNamespace

        import numpy as np
        import torch.utils.data


        class DatasetTemplate(torch.utils.data.Dataset):
            """Geometry attributes as OpenPCDet derives them; no frames."""

            def __init__(self, dataset_cfg=None, class_names=None, training=True,
                         root_path=None, logger=None):
                super().__init__()
                self.dataset_cfg, self.class_names = dataset_cfg, class_names
                self.training, self.logger = training, logger
                self.mode = 'train' if training else 'test'
                self.root_path = Path(root_path if root_path is not None
                                      else dataset_cfg.DATA_PATH)
                self.point_cloud_range = np.array(dataset_cfg.POINT_CLOUD_RANGE,
                                                  dtype=np.float32)
                used = dataset_cfg.POINT_FEATURE_ENCODING.used_feature_list
                self.point_feature_encoder = SimpleNamespace(num_point_features=len(used))
                step = [p for p in dataset_cfg.DATA_PROCESSOR
                        if p.NAME == 'transform_points_to_voxels'][0]
                self.voxel_size = np.array(step.VOXEL_SIZE, dtype=np.float32)
                extent = self.point_cloud_range[3:6] - self.point_cloud_range[0:3]
                self.grid_size = np.round(extent / self.voxel_size).astype(np.int64)
                self.depth_downsample_factor = None

            def __len__(self):
                return 0


        class KittiDataset(DatasetTemplate):
            pass


        __all__ = {'DatasetTemplate': DatasetTemplate, 'KittiDataset': KittiDataset}
    ''',
}


def write_fake_pcdet(root, broken_ops=False):
    """Write the fake ``pcdet`` package under ``root`` (a folder to put on sys.path)."""
    root = Path(root)
    for rel, text in _FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        text = textwrap.dedent(text).lstrip('\n')
        if '{broken}' in text:
            text = text.replace('{broken}', _BROKEN_IMPORT if broken_ops else '')
        path.write_text(text, encoding='utf-8')
    return root


def purge_pcdet_modules():
    """Forget every imported ``pcdet`` module (the next import reads the files again)."""
    for name in [m for m in sys.modules if m == 'pcdet' or m.startswith('pcdet.')]:
        del sys.modules[name]


def subprocess_env(pcdet_root=None):
    """Environment for a child Python: this checkout importable, plus the fake when given."""
    env = dict(os.environ)
    paths = [str(pcdet_root)] if pcdet_root is not None else []
    paths.append(str(REPO_ROOT))
    env['PYTHONPATH'] = os.pathsep.join(paths)
    env.pop('PCDET_FOCAL_PLUGINS', None)
    return env


def real_pcdet_installed():
    """True when a real OpenPCDet is importable here (the 'absent' tests must then skip)."""
    import importlib.util
    purge_pcdet_modules()
    return importlib.util.find_spec('pcdet') is not None


def _use(monkeypatch, root, broken_ops):
    from pcdet_focal import registry
    write_fake_pcdet(root, broken_ops=broken_ops)
    purge_pcdet_modules()
    monkeypatch.syspath_prepend(str(root))
    # A fresh "not registered yet" state per test; monkeypatch restores it afterwards.
    monkeypatch.setattr(registry, '_pcdet_host', False)
    return root


@pytest.fixture
def fake_pcdet(tmp_path, monkeypatch):
    """The fake OpenPCDet on sys.path (its root folder); removed from sys.modules after."""
    yield _use(monkeypatch, tmp_path / 'fake_pcdet', broken_ops=False)
    purge_pcdet_modules()


@pytest.fixture
def broken_pcdet(tmp_path, monkeypatch):
    """A fake OpenPCDet checkout whose compiled ops were never built."""
    yield _use(monkeypatch, tmp_path / 'broken_pcdet', broken_ops=True)
    purge_pcdet_modules()


@pytest.fixture
def no_pcdet(monkeypatch):
    """No OpenPCDet importable (skips when a real one is installed in this environment)."""
    from pcdet_focal import registry
    if real_pcdet_installed():
        pytest.skip('a real OpenPCDet is importable here')
    monkeypatch.setattr(registry, '_pcdet_host', False)
    yield
    purge_pcdet_modules()
