"""The model an estimate describes: the modules the trainer would build, on the meta device.

Standalone host: pcdet_focal's builder; pcdet host: OpenPCDet's ``build_network`` after our
classes are registered (OpenPCDet's own classes keep their names). Parameters live on the meta
device (nothing is allocated) and spconv's submanifold convs are their shape-only twins
(importing spconv takes ~10 s; nothing runs). The dataset the builders read is a stub with the
grid of the real data pipeline (:func:`pcdet_focal.data.processor.voxel_geometry`).
"""
import contextlib
from types import SimpleNamespace

import numpy as np
import torch

from ..data.processor import voxel_geometry
from ..errors import ConfigError
from ..ops.sparse import shape_only_spconv

HOSTS = ('standalone', 'pcdet')


def dataset_stub(cfg, geom=None):
    """What the builders read from a dataset (class names, grid, point features), no data;
    grid and voxel size are None for a point-based model (no voxelisation step)."""
    geom = geom or voxel_geometry(cfg.DATA_CONFIG)
    voxelised = geom.grid_size is not None
    return SimpleNamespace(
        class_names=list(cfg.get('CLASS_NAMES') or []),
        point_cloud_range=np.array(geom.point_cloud_range, dtype=np.float32),
        voxel_size=np.array(geom.voxel_size, dtype=np.float32) if voxelised else None,
        grid_size=np.array(geom.grid_size, dtype=np.int64) if voxelised else None,
        depth_downsample_factor=None,
        point_feature_encoder=SimpleNamespace(num_point_features=geom.num_point_features),
        num_point_features=geom.num_point_features,
        dataset_cfg=cfg.get('DATA_CONFIG'), training=True, mode='train')


@contextlib.contextmanager
def _no_cuda_moves():
    """OpenPCDet's CenterHead / AnchorHead call ``.cuda()`` while constructing: a no-op here."""
    saved = torch.Tensor.cuda, torch.nn.Module.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.nn.Module.cuda = saved


_INITS = ('uniform_', 'normal_', 'trunc_normal_', 'constant_', 'ones_', 'zeros_', 'eye_',
          'dirac_', 'xavier_uniform_', 'xavier_normal_', 'kaiming_uniform_', 'kaiming_normal_',
          'orthogonal_', 'sparse_')


@contextlib.contextmanager
def _no_init():
    """torch.nn.init's fills as no-ops: meta tensors hold no values, and the python reference
    kernels of random fills on meta import torch._dynamo (seconds)."""
    saved = {name: getattr(torch.nn.init, name) for name in _INITS
             if hasattr(torch.nn.init, name)}
    for name in saved:
        setattr(torch.nn.init, name, lambda tensor, *a, **k: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def build_model(cfg, host='standalone', geom=None):
    """(model in train mode on the meta device, VoxelGeometry) for ``cfg`` on ``host``.

    A config without a voxelisation step builds with no grid (VoxelGeometry.grid_size None):
    its modules then have no memory rule and the estimate names them. An exception from
    OpenPCDet's constructors (a weights download, a removed numpy alias) is one ConfigError."""
    if host not in HOSTS:
        raise ConfigError(f'host {host!r}: use one of {", ".join(HOSTS)}')
    geom = geom or voxel_geometry(cfg.DATA_CONFIG, required=False)
    if not cfg.get('CLASS_NAMES'):
        raise ConfigError('CLASS_NAMES is required to build the model')
    stub = dataset_stub(cfg, geom)
    from .. import backend
    from ..errors import PcdetFocalError
    try:
        with torch.device('meta'), shape_only_spconv(), _no_cuda_moves(), _no_init():
            model = backend.build_network(cfg.MODEL, len(cfg.CLASS_NAMES), stub, host)
    except PcdetFocalError:
        raise
    except Exception as err:  # noqa: BLE001 - OpenPCDet's constructors, reported in one line
        if host != 'pcdet':
            raise
        why = (str(err).splitlines() or [''])[0][:300]
        raise ConfigError(f'MODEL ({cfg.MODEL.get("NAME")}): OpenPCDet could not build it '
                          f'without data or a GPU: {type(err).__name__}: {why}') from None
    model.train()
    return model, geom
