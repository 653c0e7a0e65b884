"""DSVT stage shapes from its INPUT_LAYER config (shared by the memory model and suggestions).

OpenPCDet's keys, x, y, z order: ``sparse_shape`` is the grid DSVT receives; pcdet_focal's
``input_downsample`` [sx, sy, sz] (default [1, 1, 1]) merges voxels before stage 0; each
``downsample_stride`` entry then pools between stages. Every division is a ceil division, as
DSVT's own ``ceil(shape / stride)``.
"""
from ..errors import ConfigError
from .geometry import ceil_div


def _triple(value, field, default=None):
    if value is None and default is not None:
        return list(default)
    if not isinstance(value, (list, tuple)) or len(value) != 3 or \
            not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
        raise ConfigError(f'{field} must be 3 positive integers [x, y, z], got {value!r}')
    return [int(v) for v in value]


def dsvt_stages(dsvt_cfg, field='MODEL.BACKBONE_3D', input_shape=None):
    """Per-stage sparse shapes [x, y, z] and total strides of a DSVT config.

    input_shape: [x, y, z] reaching DSVT when known (checked against ``sparse_shape``).
    Returns dict(sparse_shape, input_downsample, shapes=[[x, y, z] per stage],
    strides=[[sx, sy, sz] total per stage])."""
    il = dsvt_cfg.get('INPUT_LAYER')
    if not isinstance(il, dict):
        raise ConfigError(f'{field}.INPUT_LAYER is required (DSVT config)')
    shape = _triple(il.get('sparse_shape', input_shape), f'{field}.INPUT_LAYER.sparse_shape')
    if input_shape is not None and list(input_shape) != shape:
        raise ConfigError(f'{field}.INPUT_LAYER.sparse_shape={shape} but the voxels reaching '
                          f'DSVT lie on a {list(input_shape)} grid (x, y, z); set sparse_shape: '
                          f'{list(input_shape)}')
    down = _triple(il.get('input_downsample'), f'{field}.INPUT_LAYER.input_downsample',
                   default=[1, 1, 1])
    strides = il.get('downsample_stride') or []
    d_model = il.get('d_model') or dsvt_cfg.get('d_model') or []
    if len(strides) != max(0, len(d_model) - 1):
        raise ConfigError(f'{field}.INPUT_LAYER.downsample_stride has {len(strides)} entries for '
                          f'{len(d_model)} stages (d_model); give stages - 1 entries')
    cur = [ceil_div(s, d) for s, d in zip(shape, down)]
    total = list(down)
    shapes, totals = [cur], [list(total)]
    for i, st in enumerate(strides):
        st = _triple(st, f'{field}.INPUT_LAYER.downsample_stride[{i}]')
        cur = [ceil_div(s, d) for s, d in zip(cur, st)]
        total = [a * b for a, b in zip(total, st)]
        shapes.append(cur)
        totals.append(list(total))
    return {'sparse_shape': shape, 'input_downsample': down, 'shapes': shapes,
            'strides': totals}
