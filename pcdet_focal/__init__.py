"""pcdet-focal: a sparse 3D detection plugin for OpenPCDet.

Importing this package is cheap and never imports OpenPCDet (``pcdet``) or spconv.
Model classes register themselves when ``pcdet_focal.models`` is imported; call
:func:`register_into_pcdet` to make them visible to an OpenPCDet checkout.
"""
__version__ = '0.1.0'


def register_into_pcdet(verbose=True):
    """Insert pcdet-focal's classes into OpenPCDet's registries (see registry.py)."""
    from .registry import register_into_pcdet as _register
    return _register(verbose=verbose)


__all__ = ['__version__', 'register_into_pcdet']
