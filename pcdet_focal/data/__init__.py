"""Datasets (synthetic scenes, KITTI format), voxelisation, augmentation, collate.

``build_dataset`` and ``DatasetTemplate`` are re-exported lazily so that importing this package
stays cheap (numba kernels compile on first use).
"""

__all__ = ['build_dataset', 'DatasetTemplate']


def __getattr__(name):
    if name in __all__:
        from . import dataset
        return getattr(dataset, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
