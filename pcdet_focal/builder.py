"""Standalone model builder: the same MODEL YAML that OpenPCDet's build_network reads.

``build_network(model_cfg, num_class, dataset)`` resolves ``MODEL.NAME`` in the DETECTOR
registry (ours, or OpenPCDet's tables after ``registry.register_into_pcdet()``) and constructs
it with OpenPCDet's detector signature; the detector builds its modules the same way.
"""
from .errors import ConfigError
from .registry import lookup


def build_network(model_cfg, num_class, dataset):
    """MODEL config (EasyDict) + number of classes + dataset -> detector nn.Module.

    An unknown NAME raises ConfigError listing the registered detectors.
    """
    if not isinstance(model_cfg, dict) or not model_cfg.get('NAME'):
        raise ConfigError('MODEL.NAME is required (e.g. NAME: FocalCenterPoint)')
    detector = lookup('DETECTOR', model_cfg['NAME'], field='MODEL.NAME')
    return detector(model_cfg=model_cfg, num_class=num_class, dataset=dataset)
