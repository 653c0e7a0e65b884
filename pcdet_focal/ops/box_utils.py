"""Box geometry shared by data, losses, NMS and evaluation.

Boxes are OpenPCDet's LiDAR-frame 7-vectors ``(x, y, z, dx, dy, dz, heading)``: (x, y, z) is
the box centre, (dx, dy, dz) its size along its own (length, width, height) axes, heading the
yaw around +z measured from +x. Every function takes numpy arrays or torch tensors and returns
the same kind.
"""
import math

import numpy as np
import torch


def limit_period(angle, offset=0.5, period=2 * math.pi):
    """Wrap ``angle`` into ``[-offset * period, (1 - offset) * period)``."""
    lib = torch if torch.is_tensor(angle) else np
    return angle - lib.floor(angle / period + offset) * period


def rotate_points_along_z(points, angle):
    """Rotate points around +z (counter-clockwise by ``angle``).

    points: (N, 3+C) one shared ``angle`` (float), or (B, N, 3+C) with ``angle`` (B,).
    Extra columns (intensity, ...) are kept.
    """
    if torch.is_tensor(points):
        angle = torch.as_tensor(angle, dtype=points.dtype, device=points.device)
        cos, sin = torch.cos(angle), torch.sin(angle)
        x, y = points[..., 0], points[..., 1]
        if points.dim() == 3:
            cos, sin = cos.view(-1, 1), sin.view(-1, 1)
        xy = torch.stack([x * cos - y * sin, x * sin + y * cos], dim=-1)
        return torch.cat([xy, points[..., 2:]], dim=-1)
    angle = np.asarray(angle, dtype=points.dtype)
    cos, sin = np.cos(angle), np.sin(angle)
    if points.ndim == 3:
        cos, sin = cos.reshape(-1, 1), sin.reshape(-1, 1)
    x, y = points[..., 0], points[..., 1]
    xy = np.stack([x * cos - y * sin, x * sin + y * cos], axis=-1)
    return np.concatenate([xy, points[..., 2:]], axis=-1)


def boxes_to_corners_bev(boxes):
    """(N, 7+) boxes -> (N, 4, 2) BEV corners, counter-clockwise, starting at (+dx/2, +dy/2)."""
    lib = torch if torch.is_tensor(boxes) else np
    signs = [[1, 1], [-1, 1], [-1, -1], [1, -1]]
    if lib is torch:
        signs = torch.tensor(signs, dtype=boxes.dtype, device=boxes.device)
    else:
        signs = np.asarray(signs, dtype=boxes.dtype)
    half = boxes[:, None, 3:5] * 0.5 * signs[None]  # (N, 4, 2) in the box frame
    cos, sin = lib.cos(boxes[:, 6])[:, None], lib.sin(boxes[:, 6])[:, None]
    x = half[..., 0] * cos - half[..., 1] * sin + boxes[:, None, 0]
    y = half[..., 0] * sin + half[..., 1] * cos + boxes[:, None, 1]
    return lib.stack([x, y], -1) if lib is torch else np.stack([x, y], -1)


def boxes_to_corners_3d(boxes):
    """(N, 7+) boxes -> (N, 8, 3) corners: the 4 bottom corners (CCW) then the 4 top ones."""
    lib = torch if torch.is_tensor(boxes) else np
    bev = boxes_to_corners_bev(boxes)
    z0 = (boxes[:, 2] - boxes[:, 5] * 0.5)[:, None, None]
    z1 = (boxes[:, 2] + boxes[:, 5] * 0.5)[:, None, None]
    if lib is torch:
        bottom = torch.cat([bev, z0.expand(-1, 4, 1)], -1)
        top = torch.cat([bev, z1.expand(-1, 4, 1)], -1)
        return torch.cat([bottom, top], 1)
    bottom = np.concatenate([bev, np.broadcast_to(z0, (len(boxes), 4, 1))], -1)
    top = np.concatenate([bev, np.broadcast_to(z1, (len(boxes), 4, 1))], -1)
    return np.concatenate([bottom, top], 1)
