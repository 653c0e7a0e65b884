"""Rotated-box overlap (IoU) in BEV and 3D, in numba.

Boxes are OpenPCDet's LiDAR-frame 7-vectors ``(x, y, z, dx, dy, dz, heading)`` (see
``ops/box_utils.py``): (x, y, z) is the box centre, heading the yaw around +z from +x.

BEV overlap = area of the convex intersection polygon of the two rotated rectangles, found by
Sutherland-Hodgman clipping of one rectangle by the other's four edges. 3D overlap = BEV overlap
area x overlap of the z intervals; IoU = intersection / (vol_a + vol_b - intersection).

Every kernel here takes C-contiguous float64 (N, 7) arrays and plain ints/floats, so numba
compiles exactly one signature per kernel (compile time is paid by the test suite; ``cache=True``
keeps it on disk).
"""
import math

import numpy as np
from numba import njit

from ..errors import InputError

MODE_BEV_IOU = 0      # BEV IoU
MODE_3D_IOU = 1       # 3D IoU
MODE_BEV_COVER = 2    # BEV intersection / BEV area of the first box (KITTI DontCare test)

_MAX_VERTS = 16       # clipping a quad by 4 half-planes gives at most 8 vertices


@njit(cache=True)
def _corners_rel(boxes, i, geo, ox, oy, out):
    """Write the 4 BEV corners of ``boxes[i]`` into ``out`` (4, 2), CCW, relative to (ox, oy).

    geo: ``_geometry(boxes)`` (cos/sin of the heading precomputed once per box, not per pair).
    Working relative to a nearby origin keeps the clipping arithmetic well conditioned for
    boxes far from the sensor (x ~ 70 m, sizes ~ 1 m).
    """
    c = geo[i, 1]
    s = geo[i, 2]
    hx = 0.5 * boxes[i, 3]
    hy = 0.5 * boxes[i, 4]
    cx = boxes[i, 0] - ox
    cy = boxes[i, 1] - oy
    # local (+hx, +hy), (-hx, +hy), (-hx, -hy), (+hx, -hy): CCW for hx, hy > 0
    out[0, 0] = cx + hx * c - hy * s
    out[0, 1] = cy + hx * s + hy * c
    out[1, 0] = cx - hx * c - hy * s
    out[1, 1] = cy - hx * s + hy * c
    out[2, 0] = cx - hx * c + hy * s
    out[2, 1] = cy - hx * s - hy * c
    out[3, 0] = cx + hx * c + hy * s
    out[3, 1] = cy + hx * s - hy * c


@njit(cache=True)
def _convex_clip_area(subject, clip, buf_a, buf_b):
    """Area of ``subject`` (4, 2) CCW quad intersected with ``clip`` (4, 2) CCW quad.

    buf_a, buf_b: (_MAX_VERTS, 2) scratch buffers (passed in so the hot loop never allocates).
    A vertex exactly on a clip edge counts as inside, so touching or collinear edges produce a
    degenerate polygon of (near) zero area instead of a missed or doubled vertex.
    """
    n = 4
    for k in range(4):
        buf_a[k, 0] = subject[k, 0]
        buf_a[k, 1] = subject[k, 1]
    src = buf_a
    dst = buf_b
    for e in range(4):
        e0x = clip[e, 0]
        e0y = clip[e, 1]
        ex = clip[(e + 1) % 4, 0] - e0x
        ey = clip[(e + 1) % 4, 1] - e0y
        m = 0
        px = src[n - 1, 0]
        py = src[n - 1, 1]
        dp = ex * (py - e0y) - ey * (px - e0x)  # >= 0: left of (inside) a CCW edge
        for k in range(n):
            qx = src[k, 0]
            qy = src[k, 1]
            dq = ex * (qy - e0y) - ey * (qx - e0x)
            if dq >= 0.0:
                if dp < 0.0:  # entering: dp < 0 <= dq so dp - dq != 0
                    t = dp / (dp - dq)
                    dst[m, 0] = px + t * (qx - px)
                    dst[m, 1] = py + t * (qy - py)
                    m += 1
                dst[m, 0] = qx
                dst[m, 1] = qy
                m += 1
            elif dp >= 0.0:  # leaving: dq < 0 <= dp
                t = dp / (dp - dq)
                dst[m, 0] = px + t * (qx - px)
                dst[m, 1] = py + t * (qy - py)
                m += 1
            px = qx
            py = qy
            dp = dq
        n = m
        if n < 3:
            return 0.0
        tmp = src
        src = dst
        dst = tmp
    area2 = 0.0  # shoelace, twice the signed area
    for k in range(n):
        j = (k + 1) % n
        area2 += src[k, 0] * src[j, 1] - src[j, 0] * src[k, 1]
    return max(0.5 * area2, 0.0)


@njit(cache=True)
def _geometry(boxes):
    """(N, 7) -> (N, 3) per-box [bounding-circle radius (half the BEV diagonal), cos, sin]."""
    out = np.empty((boxes.shape[0], 3))
    for i in range(boxes.shape[0]):
        out[i, 0] = 0.5 * math.sqrt(boxes[i, 3] * boxes[i, 3] + boxes[i, 4] * boxes[i, 4])
        out[i, 1] = math.cos(boxes[i, 6])
        out[i, 2] = math.sin(boxes[i, 6])
    return out


@njit(cache=True)
def _circles_meet(a, i, ga, b, j, gb):
    """True when the BEV bounding circles of a[i] and b[j] overlap (NaN centres never do)."""
    ddx = a[i, 0] - b[j, 0]
    ddy = a[i, 1] - b[j, 1]
    rad = ga[i, 0] + gb[j, 0]
    return ddx * ddx + ddy * ddy < rad * rad


@njit(cache=True)
def _pair_overlap(a, i, ga, b, j, gb, mode, ca, cb, buf_a, buf_b):
    """Overlap of boxes ``a[i]`` and ``b[j]`` per ``mode`` (MODE_*).

    a (N, 7), b (M, 7) float64 with ga = _geometry(a), gb = _geometry(b); scratch: ca, cb (4, 2),
    buf_a, buf_b (_MAX_VERTS, 2). Scalar indexing only (no array views in the hot loop).
    Zero-size or NaN boxes overlap nothing (0). Callers run ``_circles_meet`` first: this call
    is too large to be inlined, so the cheap rejection must sit in the caller's loop.
    """
    area_a = a[i, 3] * a[i, 4]
    area_b = b[j, 3] * b[j, 4]
    if not (area_a > 0.0 and area_b > 0.0):
        return 0.0
    height = 1.0
    if mode == MODE_3D_IOU:
        top = min(a[i, 2] + 0.5 * a[i, 5], b[j, 2] + 0.5 * b[j, 5])
        bottom = max(a[i, 2] - 0.5 * a[i, 5], b[j, 2] - 0.5 * b[j, 5])
        height = top - bottom
        if not height > 0.0:
            return 0.0
    _corners_rel(a, i, ga, a[i, 0], a[i, 1], ca)
    _corners_rel(b, j, gb, a[i, 0], a[i, 1], cb)
    inter = min(_convex_clip_area(ca, cb, buf_a, buf_b), area_a, area_b)
    if mode == MODE_BEV_COVER:
        return inter / area_a
    if mode == MODE_3D_IOU:
        inter = inter * height
        union = area_a * a[i, 5] + area_b * b[j, 5] - inter
    else:
        union = area_a + area_b - inter
    if not union > 0.0:
        return 0.0
    return inter / union


@njit(cache=True)
def _overlap_matrix(a, b, mode):
    """(N, 7) x (M, 7) float64 -> (N, M) float64 overlaps per ``mode``."""
    out = np.zeros((a.shape[0], b.shape[0]))
    ga = _geometry(a)
    gb = _geometry(b)
    ca = np.empty((4, 2))
    cb = np.empty((4, 2))
    buf_a = np.empty((_MAX_VERTS, 2))
    buf_b = np.empty((_MAX_VERTS, 2))
    for i in range(a.shape[0]):
        for j in range(b.shape[0]):
            if _circles_meet(a, i, ga, b, j, gb):
                out[i, j] = _pair_overlap(a, i, ga, b, j, gb, mode, ca, cb, buf_a, buf_b)
    return out


def as_box_array(boxes, name):
    """Boxes (N, 7+) numpy/torch/list -> C-contiguous float64 (N, 7) numpy (extra columns such
    as velocities or class ids are dropped). ``name`` is used in the error message."""
    if hasattr(boxes, 'detach'):  # torch tensor on any device
        boxes = boxes.detach().cpu().numpy()
    arr = np.asarray(boxes, dtype=np.float64)
    # no boxes: [] / (0,) / (0, 0) arrive from frames with nothing in them
    if arr.size == 0 and (arr.ndim == 1 or (arr.ndim == 2 and arr.shape[0] == 0)):
        return np.zeros((0, 7))
    if arr.ndim != 2 or arr.shape[1] < 7:
        raise InputError(f'{name} has shape {tuple(arr.shape)}; expected (N, 7) boxes '
                         f'(x, y, z, dx, dy, dz, heading)')
    return np.ascontiguousarray(arr[:, :7])


def overlap_matrix(a, b, mode):
    """(N, 7) x (M, 7) float64 arrays (already checked by ``as_box_array``) -> (N, M) float64."""
    if a.shape[0] == 0 or b.shape[0] == 0:
        return np.zeros((a.shape[0], b.shape[0]))
    return _overlap_matrix(a, b, int(mode))


def boxes_iou_bev(boxes_a, boxes_b):
    """BEV IoU of rotated boxes.

    boxes_a: (N, 7+), boxes_b: (M, 7+) ``(x, y, z, dx, dy, dz, heading)`` numpy (or CPU torch);
    columns past 7 are ignored. Returns (N, M) float64 in [0, 1]; zero-size boxes give 0.
    """
    a = as_box_array(boxes_a, 'boxes_iou_bev: boxes_a')
    b = as_box_array(boxes_b, 'boxes_iou_bev: boxes_b')
    return overlap_matrix(a, b, MODE_BEV_IOU)


def boxes_iou_3d(boxes_a, boxes_b):
    """3D IoU of z-aligned rotated boxes: BEV intersection area x z-interval overlap over the
    union volume. boxes_a: (N, 7+), boxes_b: (M, 7+) -> (N, M) float64 in [0, 1]."""
    a = as_box_array(boxes_a, 'boxes_iou_3d: boxes_a')
    b = as_box_array(boxes_b, 'boxes_iou_3d: boxes_b')
    return overlap_matrix(a, b, MODE_3D_IOU)
