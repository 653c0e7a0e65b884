"""How many voxels (and points) per sample the estimate assumes, and where the number came from.

Default: the worst case the data pipeline allows, MAX_NUMBER_OF_VOXELS['train'] per sample.
``--voxels N`` overrides it; ``--data N`` loads N frames of the configured training set and
uses the largest count seen (the mean is reported beside it).
"""
from dataclasses import dataclass

from ..errors import ConfigError, PcdetFocalError

DYNAMIC_DEFAULT = 150_000   # voxels per sample assumed for dynamic voxelisation (no cap)


@dataclass
class VoxelCounts:
    per_sample: int
    source: str
    points_per_sample: int
    data_mean: float = None
    data_max: int = None
    data_frames: int = 0
    data_points_mean: float = None

    def describe(self):
        text = f'{self.per_sample:,} voxels per sample ({self.source})'
        if self.data_frames:
            text += (f'; {self.data_frames} frames: mean {self.data_mean:,.0f}, '
                     f'max {self.data_max:,} voxels')
        return text


def resolve_counts(geom, voxels=None, data=None):
    """VoxelCounts from an explicit ``voxels`` override, measured ``data`` stats (dict from
    :func:`count_dataset_voxels`) or the config's cap."""
    volume = geom.grid[0] * geom.grid[1] * geom.grid[2]
    if voxels is not None:
        if isinstance(voxels, bool) or int(voxels) != voxels or int(voxels) <= 0:
            raise ConfigError(f'--voxels must be a positive integer, got {voxels!r}')
        n = min(int(voxels), volume)
        src = '--voxels' + (f', capped by the grid volume {volume:,}' if n < int(voxels) else '')
    elif data is not None:
        n = max(1, int(data['max']))
        src = f'--data: largest of {data["frames"]} frames'
    elif geom.max_voxels_train is not None:
        n = min(int(geom.max_voxels_train), volume)
        src = "MAX_NUMBER_OF_VOXELS['train']"
    else:
        n = min(DYNAMIC_DEFAULT, volume)
        src = (f'assumed {DYNAMIC_DEFAULT:,}: {geom.voxelizer} has no MAX_NUMBER_OF_VOXELS; '
               'pass --voxels or --data')
    if data is not None:
        points = max(1, int(data['points_max']))
    else:
        points = n * geom.max_points_per_voxel
    counts = VoxelCounts(per_sample=n, source=src, points_per_sample=points)
    if data is not None:
        counts.data_mean = data['mean']
        counts.data_max = data['max']
        counts.data_frames = data['frames']
        counts.data_points_mean = data['points_mean']
    return counts


def count_dataset_voxels(cfg, frames):
    """Load ``frames`` training frames of ``cfg.DATA_CONFIG``; voxel/point count statistics."""
    if isinstance(frames, bool) or int(frames) != frames or int(frames) <= 0:
        raise ConfigError(f'--data must be a positive number of frames, got {frames!r}')
    try:
        from ..data.dataset import build_dataset
    except ImportError as err:
        raise ConfigError(f'--data needs pcdet_focal.data ({err})') from None
    try:
        dataset = build_dataset(cfg.DATA_CONFIG, list(cfg.get('CLASS_NAMES', [])), training=True)
    except PcdetFocalError:
        raise
    except Exception as err:  # a dataset that cannot be built: one line, not a traceback
        raise ConfigError(f'--data: cannot build DATA_CONFIG.DATASET '
                          f'{cfg.DATA_CONFIG.get("DATASET")!r}: {type(err).__name__}: {err}') \
            from None
    n = min(int(frames), len(dataset))
    if n == 0:
        raise ConfigError('--data: the configured training split has no frames')
    voxels, points = [], []
    for i in range(n):
        item = dataset[i]
        voxels.append(int(len(item['voxels'])))
        points.append(int(len(item['points'])))
    return {'frames': n, 'mean': sum(voxels) / n, 'max': max(voxels),
            'points_mean': sum(points) / n, 'points_max': max(points)}
