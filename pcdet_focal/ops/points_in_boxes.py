"""Which rotated 3D box contains each point: pure torch, any device, bounded memory.

Boxes are OpenPCDet's LiDAR-frame 7-vectors ``(x, y, z, dx, dy, dz, heading)`` (centre, size
along the box's own axes, yaw around +z from +x); extra columns (class id, ...) are ignored.
Points are ``(x, y, z, ...)``; extra columns are ignored.

Boundaries: a box is **closed**: a point exactly on a face, edge or corner is inside
(``|local_x| <= dx / 2`` and ``|local_y| <= dy / 2`` and ``|z - zc| <= dz / 2``, local_x / local_y
being the point in the box frame). Away from axis-aligned boxes, "exactly on a rotated face" is
decided by float rounding of the rotation. A degenerate box (any of dx, dy, dz <= 0, e.g. the
zero rows that pad ``gt_boxes``) contains no point.

The (P, M) comparison is evaluated ``chunk`` points at a time so that at most about
``max_pairs`` point-box pairs (a handful of float tensors of that many elements) are alive.
"""
import torch

from ..errors import InputError

DEFAULT_MAX_PAIRS = 1 << 22  # ~4M pairs: a few 16 MiB float32 temporaries per chunk


def _check(points, boxes):
    for name, t, cols in (('points', points, 3), ('boxes', boxes, 7)):
        if not torch.is_tensor(t):
            raise InputError(f'points_in_boxes: {name} must be a torch tensor, got '
                             f'{type(t).__name__}')
        if t.dim() != 2 or t.shape[1] < cols:
            raise InputError(f'points_in_boxes: {name} must have shape ({name[0].upper()}, '
                             f'{cols}+), got {tuple(t.shape)}')
    if points.device != boxes.device:
        raise InputError(f'points_in_boxes: points are on {points.device} but boxes on '
                         f'{boxes.device}; move both to one device')


def _work_dtype(points, boxes):
    # half precision cannot resolve centimetres at 100 m: never go below float32
    dtype = torch.promote_types(points.dtype, boxes.dtype)
    return dtype if dtype == torch.float64 else torch.float32


def _box_frames(boxes, dtype):
    """(M, 7+) -> centre (M, 3), half sizes (M, 3), cos (M,), sin (M,), valid (M,) bool."""
    boxes = boxes[:, :7].to(dtype)
    half = boxes[:, 3:6] * 0.5
    valid = (boxes[:, 3:6] > 0).all(dim=1)
    return boxes[:, :3], half, torch.cos(boxes[:, 6]), torch.sin(boxes[:, 6]), valid


def _chunk_mask(pts, centre, half, cos, sin, valid):
    """pts (C, 3) -> (C, M) bool: inside the closed box (see module docstring)."""
    d = pts[:, None, :] - centre[None]                       # (C, M, 3) box centre -> point
    # rotate by -heading into the box frame
    local_x = d[..., 0] * cos + d[..., 1] * sin
    local_y = d[..., 1] * cos - d[..., 0] * sin
    return ((local_x.abs() <= half[:, 0]) & (local_y.abs() <= half[:, 1])
            & (d[..., 2].abs() <= half[:, 2]) & valid)


def _chunks(num_points, num_boxes, max_pairs):
    step = max(1, int(max_pairs) // max(num_boxes, 1))
    for start in range(0, num_points, step):
        yield start, min(start + step, num_points)


def points_in_boxes_mask(points, boxes, max_pairs=DEFAULT_MAX_PAIRS):
    """points (P, 3+), boxes (M, 7+) -> (P, M) bool, True where box m contains point p.

    The result itself is P x M bools; use :func:`points_in_boxes` when only the index of the
    containing box is needed (it never materialises the whole matrix).
    """
    _check(points, boxes)
    out = torch.zeros((points.shape[0], boxes.shape[0]), dtype=torch.bool, device=points.device)
    if out.numel() == 0:
        return out
    dtype = _work_dtype(points, boxes)
    frames = _box_frames(boxes, dtype)
    for a, b in _chunks(points.shape[0], boxes.shape[0], max_pairs):
        out[a:b] = _chunk_mask(points[a:b, :3].to(dtype), *frames)
    return out


def points_in_boxes(points, boxes, max_pairs=DEFAULT_MAX_PAIRS):
    """points (P, 3+), boxes (M, 7+) -> (P,) long: index of the box containing each point.

    -1 where no box contains the point; where boxes overlap, the lowest box index wins.
    """
    _check(points, boxes)
    out = torch.full((points.shape[0],), -1, dtype=torch.long, device=points.device)
    if points.shape[0] == 0 or boxes.shape[0] == 0:
        return out
    dtype = _work_dtype(points, boxes)
    frames = _box_frames(boxes, dtype)
    for a, b in _chunks(points.shape[0], boxes.shape[0], max_pairs):
        inside = _chunk_mask(points[a:b, :3].to(dtype), *frames)
        # argmax returns the first maximal index, i.e. the first containing box
        first = inside.to(torch.uint8).argmax(dim=1)
        out[a:b] = torch.where(inside.any(dim=1), first, torch.full_like(first, -1))
    return out
