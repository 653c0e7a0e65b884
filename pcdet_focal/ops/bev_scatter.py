"""Sparse voxels -> dense bird's-eye-view maps, without building the dense 3D volume.

Every function takes voxel features ``features: (N, C) float`` and coordinates
``coords: (N, 4) int [b, z, y, x]`` (z < D, y < H, x < W; at most one row per voxel) and
returns a contiguous ``(B, C_out, H, W)`` map. A BEV *column* is one ``(b, y, x)``; a column
with no voxel is 0 in every output. None of them allocates a ``[B, C, D, H, W]`` or a
``[B, C*D, H, W]`` tensor except :func:`scatter_height_to_channels`, whose output *is* that
(it is OpenPCDet's PointPillarScatter3d layout). All are differentiable w.r.t. ``features``
(and ``weight``), run on CPU and CUDA, and take the device from the inputs.

Work happens on the M occupied columns: :func:`occupied_columns` gives each voxel its column
row, reductions produce an ``(M, C)`` table, :func:`columns_to_bev` writes it into the map.
Peak memory (forward): the output map + that table + a few (N,) / (M,) int64 index tensors
(+ a (D, C, F) copy of the weight for ``bev_learned``). Writing the map straight from the voxels
(no table) was measured 3x slower on the CPU (strided scatters), so the table stays.
Sums run height level by height level (z ascending): inside one level every column has at most
one voxel, so the accumulation order is fixed (z order) whatever the device - ``bev_mean`` equals
a dense sequential sum over z bit for bit, and is deterministic on CUDA too.
"""
import torch

__all__ = ['occupied_columns', 'columns_to_bev', 'height_groups', 'bev_max', 'bev_mean',
           'bev_learned', 'scatter_height_to_channels']


def occupied_columns(coords, H, W):
    """Occupied BEV columns of a set of voxels.

    Args:
        coords: (N, 4) int [b, z, y, x].
        H, W: BEV height (y cells) and width (x cells).
    Returns:
        columns: (M,) int64, sorted flat column ids ``(b * H + y) * W + x`` of the occupied
            columns.
        inverse: (N,) int64, row of ``columns`` holding each voxel's column.
    """
    c = coords.long()
    flat = (c[:, 0] * H + c[:, 2]) * W + c[:, 3]
    return torch.unique(flat, sorted=True, return_inverse=True)


def columns_to_bev(col_features, columns, batch_size, H, W):
    """Write per-column features into a zero BEV map.

    Args:
        col_features: (M, C) features of the occupied columns.
        columns: (M,) int64 flat column ids ``(b * H + y) * W + x`` (unique).
        batch_size: B (samples without a column get an all-zero map).
    Returns:
        (B, C, H, W) contiguous, zero outside ``columns``.
    """
    M, C = col_features.shape
    out = col_features.new_zeros(int(batch_size), C, H * W)
    hw = H * W
    # (b, :, yx) advanced indexing writes each column's C values straight into the
    # channel-first map: no (B, H, W, C) buffer and no permute copy.
    out[columns // hw, :, columns % hw] = col_features
    return out.view(int(batch_size), C, H, W)


def height_groups(z):
    """Voxels grouped by height level.

    Args:
        z: (N,) int height index of each voxel.
    Returns:
        list of ``(level, idx)`` with ``idx`` (n_level,) int64 the voxels at that level,
        levels ascending, empty levels left out.
    """
    z = z.long()
    order = torch.argsort(z, stable=True)
    if z.numel() == 0:
        return []
    levels, counts = torch.unique_consecutive(z[order], return_counts=True)
    groups, start = [], 0
    for level, n in zip(levels.tolist(), counts.tolist()):  # one host sync for all levels
        groups.append((level, order[start:start + n]))
        start += n
    return groups


def bev_max(features, coords, batch_size, H, W):
    """Max over the occupied voxels of each column (negative features stay negative).

    Args:
        features: (N, C) float. coords: (N, 4) int [b, z, y, x].
        batch_size: B. H, W: BEV size.
    Returns:
        (B, C, H, W): per column and channel the max over that column's voxels, 0 where empty.
        Gradient: to the maximal voxel (split evenly between exact ties).
    """
    C = features.shape[1]
    columns, inverse = occupied_columns(coords, H, W)
    # include_self=False: the zeros only fill the table, they never take part in the max.
    # The expanded index is a stride-0 view, not an (N, C) int64 tensor.
    table = features.new_zeros(columns.numel(), C).scatter_reduce_(
        0, inverse.view(-1, 1).expand(-1, C), features, 'amax', include_self=False)
    return columns_to_bev(table, columns, batch_size, H, W)


def bev_mean(features, coords, batch_size, H, W):
    """Mean over the occupied voxels of each column (empty voxels are not counted).

    Args:
        features: (N, C) float. coords: (N, 4) int [b, z, y, x].
        batch_size: B. H, W: BEV size.
    Returns:
        (B, C, H, W): per column ``sum_z f / count`` with the sum taken in z order, 0 where
        empty.
    """
    C = features.shape[1]
    columns, inverse = occupied_columns(coords, H, W)
    table = features.new_zeros(columns.numel(), C)
    for _, idx in height_groups(coords[:, 1]):
        table.index_add_(0, inverse[idx], features.index_select(0, idx))
    count = torch.bincount(inverse, minlength=columns.numel()).to(features.dtype)
    table.div_(count.view(-1, 1))
    return columns_to_bev(table, columns, batch_size, H, W)


def bev_learned(features, coords, weight, batch_size, H, W):
    """Height folded into channels then a 1x1 projection, computed on occupied voxels only.

    Equal to ``dense.view(B, C*D, H, W)`` followed by ``Conv2d(C*D, F, 1, bias=False)`` with
    this weight, where ``dense`` is the (B, C, D, H, W) volume (channel ``c * D + z``):
    ``out[b, :, y, x] = sum_z W[:, :, z] @ f[b, z, y, x]``. Each height level is one matmul of
    that level's voxels with its (C, F) slice, added into the occupied columns.

    Args:
        features: (N, C) float. coords: (N, 4) int [b, z, y, x] with z < D.
        weight: (F, C*D) or (F, C*D, 1, 1) (a 1x1 Conv2d weight), channel index ``c * D + z``.
        batch_size: B. H, W: BEV size.
    Returns:
        (B, F, H, W), 0 in empty columns.
    """
    N, C = features.shape
    F_out = weight.shape[0]
    if weight[0].numel() % C:
        raise ValueError(f'bev_learned: weight has {weight[0].numel()} input channels, not a '
                         f'multiple of C={C}')
    D = weight[0].numel() // C
    # (D, C, F): one contiguous (C, F) matrix per height level.
    per_level = weight.reshape(F_out, C, D).permute(2, 1, 0).contiguous()
    columns, inverse = occupied_columns(coords, H, W)
    table = None
    for level, idx in height_groups(coords[:, 1]):
        proj = features.index_select(0, idx) @ per_level[level]
        if table is None:  # dtype of the product (autocast may pick half)
            table = proj.new_zeros(columns.numel(), F_out)
        table.index_add_(0, inverse[idx], proj)
    if table is None:  # no voxel at all
        table = features.new_zeros(0, F_out)
    return columns_to_bev(table, columns, batch_size, H, W)


def scatter_height_to_channels(features, coords, batch_size, D, H, W):
    """Dense scatter with height stacked into channels (OpenPCDet's PointPillarScatter3d layout).

    Args:
        features: (N, C) float. coords: (N, 4) int [b, z, y, x] with z < D.
        batch_size: B. D, H, W: grid size in z, y, x.
    Returns:
        (B, C*D, H, W) with channel ``c * D + z`` (same as ``dense.view(B, C*D, H, W)``), zeros
        where no voxel is. This one *is* the dense volume: use it only for small D.
    """
    N, C = features.shape
    c = coords.long()
    out = features.new_zeros(int(batch_size), C, D * H * W)
    out[c[:, 0], :, (c[:, 1] * H + c[:, 2]) * W + c[:, 3]] = features
    return out.view(int(batch_size), C * D, H, W)
