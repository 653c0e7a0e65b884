"""Which host builds datasets and models: OpenPCDet (``pcdet``) or pcdet_focal alone.

``tools/train.py`` / ``tools/test.py --backend pcdet|standalone|auto``:

- ``standalone``: our dataset classes and our builder (``pcdet_focal.builder``); no OpenPCDet.
- ``pcdet``: our classes are inserted into OpenPCDet's registries (never replacing its own), then
  OpenPCDet's dataset table and ``pcdet.models.build_network`` build everything, so OpenPCDet
  dataset configs (KittiDataset, WaymoDataset, ...) and its model modules mix with ours.
- ``auto``: ``pcdet`` when OpenPCDet's ``pcdet.models`` and ``pcdet.datasets`` import (its
  compiled CUDA ops included), else ``standalone``.
"""
import logging

from .errors import ConfigError
from .registry import PcdetNotAvailable, _import_pcdet_module, lookup, register_into_pcdet

logger = logging.getLogger(__name__)

CHOICES = ('auto', 'pcdet', 'standalone')
# What the pcdet backend imports: the model builder and the dataset table.
_PCDET_MODULES = ('pcdet.models', 'pcdet.datasets')


def check_pcdet_importable():
    """Import the OpenPCDet modules the pcdet backend needs; PcdetNotAvailable if one fails."""
    for module in _PCDET_MODULES:
        _import_pcdet_module(module)


def resolve_backend(choice='auto'):
    """``'auto' | 'pcdet' | 'standalone'`` -> ``'pcdet'`` or ``'standalone'``.

    ``pcdet`` requested but OpenPCDet not importable -> :class:`PcdetNotAvailable` (exit code 2,
    message says how to install it). ``auto`` falls back to standalone and logs why.
    """
    if choice not in CHOICES:
        raise ConfigError(f'--backend {choice!r} is unknown; choose one of {", ".join(CHOICES)}')
    if choice == 'standalone':
        return 'standalone'
    try:
        check_pcdet_importable()
    except PcdetNotAvailable as err:
        if choice == 'pcdet':
            raise
        if not str(err).startswith('OpenPCDet is not importable'):
            # OpenPCDet is installed but broken: worth a warning, the user may expect it.
            logger.warning('backend auto: using standalone (%s)', err)
        return 'standalone'
    return 'pcdet'


def activate_backend(choice='auto'):
    """:func:`resolve_backend`, then on the pcdet host our classes go into OpenPCDet's tables:
    a config naming OpenPCDet's classes is then checked against those, not ours (call before
    loading the config)."""
    host = resolve_backend(choice)
    if host == 'pcdet':
        register_into_pcdet(verbose=False)
    return host


def build_dataset(dataset_cfg, class_names, training, backend, logger=None):
    """DATA_CONFIG (EasyDict) -> dataset (DatasetTemplate contract, see the interface spec).

    backend: ``'pcdet'`` or ``'standalone'`` (from :func:`resolve_backend`).
    pcdet: ``pcdet.datasets.__all__[DATASET](dataset_cfg, class_names, root_path=None,
    training, logger)``, OpenPCDet's own classes first, ours where it has none.
    """
    if backend == 'standalone':
        from .data.dataset import build_dataset as build_standalone
        return build_standalone(dataset_cfg, class_names, training, logger=logger)
    _require_pcdet_backend(backend)
    register_into_pcdet(verbose=False)
    name = dataset_cfg.get('DATASET') if isinstance(dataset_cfg, dict) else None
    if not name:
        raise ConfigError('DATA_CONFIG.DATASET is required (e.g. DATASET: KittiDataset)')
    dataset_cls = lookup('DATASET', name, field='DATA_CONFIG.DATASET')
    return dataset_cls(dataset_cfg=dataset_cfg, class_names=class_names, root_path=None,
                       training=training, logger=logger)


def build_network(model_cfg, num_class, dataset, backend):
    """MODEL config -> detector nn.Module, built by our builder or OpenPCDet's build_network."""
    if backend == 'standalone':
        from .builder import build_network as build_standalone
        return build_standalone(model_cfg, num_class, dataset)
    _require_pcdet_backend(backend)
    register_into_pcdet(verbose=False)
    name = model_cfg.get('NAME') if isinstance(model_cfg, dict) else None
    if not name:
        raise ConfigError('MODEL.NAME is required (e.g. NAME: FocalCenterPoint)')
    lookup('DETECTOR', name, field='MODEL.NAME')  # a clear error before OpenPCDet's KeyError
    pcdet_models = _import_pcdet_module('pcdet.models')
    return pcdet_models.build_network(model_cfg=model_cfg, num_class=num_class, dataset=dataset)


def _require_pcdet_backend(backend):
    if backend != 'pcdet':
        raise ConfigError(f'backend {backend!r} is not resolved; pass resolve_backend(...)\'s '
                          "result ('pcdet' or 'standalone')")
