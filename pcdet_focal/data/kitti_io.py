"""KITTI object-detection files: calib, label_2, velodyne readers/writers and box conversions.

Frames and conventions (KITTI devkit):
- LiDAR (velodyne): x forward, y left, z up. Boxes here are OpenPCDet's
  ``(x, y, z, dx, dy, dz, heading)`` with z the box centre.
- Rectified camera (``rect``): x right, y down, z forward. A label's ``location`` is the
  *bottom* centre of the box in this frame, its dimensions are ``h w l`` and ``rotation_y`` the
  yaw around the camera's y axis; heading (LiDAR) = -(rotation_y + pi/2).
- ``p_rect = R0_rect @ Tr_velo_to_cam @ p_velo`` and ``uv ~ P2 @ p_rect``.

Every reader raises :class:`DataError` with the file (and line) in a single line.
"""
import math
import struct
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..ops.box_utils import boxes_to_corners_3d, limit_period

# KITTI's camera image size (H, W) (most frames are 375 x 1242): used when image_2 is absent.
KITTI_IMAGE_SHAPE = (375, 1242)
LABEL_FIELDS = ('type truncated occluded alpha bbox_left bbox_top bbox_right bbox_bottom '
                'height width length x y z rotation_y').split()

# A realistic calibration: KITTI's published calibration of the 2011_09_26 recordings
# (camera 2 intrinsics, rectification and the velodyne-to-camera extrinsics). Written by
# tools/make_demo_data.py next to the synthetic scans.
DEFAULT_CALIB = {
    'P0': [707.0493, 0.0, 604.0814, 0.0, 0.0, 707.0493, 180.5066, 0.0, 0.0, 0.0, 1.0, 0.0],
    'P1': [707.0493, 0.0, 604.0814, -379.7842, 0.0, 707.0493, 180.5066, 0.0, 0.0, 0.0, 1.0,
           0.0],
    'P2': [707.0493, 0.0, 604.0814, 45.75831, 0.0, 707.0493, 180.5066, -0.3454157, 0.0, 0.0,
           1.0, 0.004981016],
    'P3': [707.0493, 0.0, 604.0814, -334.1081, 0.0, 707.0493, 180.5066, 2.33066, 0.0, 0.0,
           1.0, 0.003201153],
    'R0_rect': [0.9999128, 0.01009263, -0.008511932, -0.01012729, 0.9999406, -0.004037671,
                0.008470675, 0.004123522, 0.9999556],
    'Tr_velo_to_cam': [0.006927964, -0.9999722, -0.002757829, -0.02457729, -0.001162982,
                       0.002749836, -0.9999955, -0.06127237, 0.9999753, 0.006931141,
                       -0.001143899, -0.3321029],
    'Tr_imu_to_velo': [0.9999976, 0.0007553071, -0.002035826, -0.8086759, -0.0007854027,
                       0.9998898, -0.01482298, 0.3195559, 0.002024406, 0.01482454, 0.9998881,
                       -0.7997231],
}
_CALIB_ALIASES = {'R0_rect': ('R0_rect', 'R_rect', 'R0'),
                  'Tr_velo_to_cam': ('Tr_velo_to_cam', 'Tr_velo_cam')}


def _affine(pts, mat, offset):
    """(N, 3) -> (N, 3) ``pts @ mat.T + offset``, written per column: a (N,3)x(3,3) matmul goes
    through BLAS threads and runs 10x slower than this on a busy CPU."""
    pts = np.asarray(pts, dtype=np.float64).reshape(-1, 3)
    x, y, z = pts[:, 0], pts[:, 1], pts[:, 2]
    return np.stack([mat[r, 0] * x + mat[r, 1] * y + mat[r, 2] * z + offset[r]
                     for r in range(3)], axis=1)


class Calibration:
    """P2 (3, 4), R0 (3, 3) and V2C (3, 4) of one frame, float64; transforms take (N, 3)."""

    def __init__(self, P2, R0, V2C):
        self.P2 = np.asarray(P2, dtype=np.float64).reshape(3, 4)
        self.R0 = np.asarray(R0, dtype=np.float64).reshape(3, 3)
        self.V2C = np.asarray(V2C, dtype=np.float64).reshape(3, 4)
        velo_to_rect = np.eye(4)
        velo_to_rect[:3, :4] = self.R0 @ self.V2C
        self.velo_to_rect = velo_to_rect                  # (4, 4)
        self.rect_to_velo = np.linalg.inv(velo_to_rect)   # exact inverse: round trips hold

    def lidar_to_rect(self, pts):
        return _affine(pts, self.velo_to_rect[:3, :3], self.velo_to_rect[:3, 3])

    def rect_to_lidar(self, pts):
        return _affine(pts, self.rect_to_velo[:3, :3], self.rect_to_velo[:3, 3])

    def rect_to_img(self, pts):
        """(N, 3) rect -> (N, 2) pixel (u, v) and (N,) depth in front of camera 2."""
        proj = _affine(pts, self.P2[:, :3], self.P2[:, 3])
        depth = proj[:, 2] - self.P2[2, 3]
        with np.errstate(divide='ignore', invalid='ignore'):
            uv = proj[:, :2] / proj[:, 2:3]
        return uv, depth

    def lidar_to_img(self, pts):
        """(N, 3) LiDAR -> (N, 2) pixel (u, v) and (N,) depth (one composed affine map)."""
        mat = self.P2[:, :3] @ self.velo_to_rect[:3, :3]
        offset = self.P2[:, :3] @ self.velo_to_rect[:3, 3] + self.P2[:, 3]
        proj = _affine(pts, mat, offset)
        depth = proj[:, 2] - self.P2[2, 3]
        with np.errstate(divide='ignore', invalid='ignore'):
            uv = proj[:, :2] / proj[:, 2:3]
        return uv, depth


def read_calib(path):
    """KITTI calib file -> :class:`Calibration` (needs P2, R0_rect, Tr_velo_to_cam)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f'{path}: calib file not found (every frame needs '
                        'calib/<frame>.txt with P2, R0_rect and Tr_velo_to_cam)')
    values = {}
    for lineno, line in enumerate(path.read_text(encoding='utf-8', errors='replace')
                                  .splitlines(), 1):
        if not line.strip():
            continue
        key, sep, rest = line.partition(':')
        if not sep:
            raise DataError(f'{path}:{lineno}: expected "KEY: numbers", got {line[:60]!r}')
        try:
            values[key.strip()] = [float(v) for v in rest.split()]
        except ValueError:
            raise DataError(f'{path}:{lineno}: {key.strip()} holds a non-number') from None

    def get(name, size):
        for alias in _CALIB_ALIASES.get(name, (name,)):
            if alias in values:
                if len(values[alias]) != size:
                    raise DataError(f'{path}: {alias} has {len(values[alias])} numbers, '
                                    f'expected {size}')
                return values[alias]
        raise DataError(f'{path}: no {name} line (a KITTI calib file has P0-P3, R0_rect, '
                        'Tr_velo_to_cam, Tr_imu_to_velo)')
    return Calibration(get('P2', 12), get('R0_rect', 9), get('Tr_velo_to_cam', 12))


def write_calib(path, calib=None):
    """Write a calib file (``calib``: dict KEY -> numbers; default :data:`DEFAULT_CALIB`)."""
    calib = calib or DEFAULT_CALIB
    lines = [f'{key}: ' + ' '.join(f'{v:.12e}' for v in vals) for key, vals in calib.items()]
    Path(path).write_text('\n'.join(lines) + '\n', encoding='utf-8')


def read_label(path):
    """label_2 file -> dict of arrays, one row per object (DontCare included):
    ``name`` (M,) str, ``truncated``, ``occluded`` (int), ``alpha``, ``bbox`` (M, 4)
    left top right bottom, ``dimensions`` (M, 3) **h w l**, ``location`` (M, 3) rect bottom
    centre, ``rotation_y``, ``score`` (M,) (-1 when the file has no score column)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f'{path}: label file not found')
    rows, names, scores = [], [], []
    for lineno, line in enumerate(path.read_text(encoding='utf-8', errors='replace')
                                  .splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) not in (15, 16):
            raise DataError(f'{path}:{lineno}: a label line has 15 fields ({" ".join(LABEL_FIELDS)}'
                            f') or 16 with a score, got {len(parts)}')
        try:
            nums = [float(v) for v in parts[1:]]
        except ValueError:
            raise DataError(f'{path}:{lineno}: fields 2-{len(parts)} must be numbers, got '
                            f'{line.strip()[:80]!r}') from None
        names.append(parts[0])
        rows.append(nums[:14])
        scores.append(nums[14] if len(nums) == 15 else -1.0)
    arr = np.asarray(rows, dtype=np.float64).reshape(-1, 14)
    return {'name': np.asarray(names, dtype='<U16'),
            'truncated': arr[:, 0], 'occluded': arr[:, 1].astype(np.int32), 'alpha': arr[:, 2],
            'bbox': arr[:, 3:7], 'dimensions': arr[:, 7:10], 'location': arr[:, 10:13],
            'rotation_y': arr[:, 13], 'score': np.asarray(scores, dtype=np.float64)}


def write_label(path, anno, precision=6):
    """Write ``anno`` (read_label's keys; ``score`` written when present and not all -1)."""
    n = len(anno['name'])
    with_score = 'score' in anno and n and np.any(np.asarray(anno['score']) != -1)
    f = f'{{:.{precision}f}}'
    lines = []
    for i in range(n):
        fields = [str(anno['name'][i]), f.format(anno['truncated'][i]),
                  str(int(anno['occluded'][i])),
                  f.format(anno['alpha'][i]), *(f.format(v) for v in anno['bbox'][i]),
                  *(f.format(v) for v in anno['dimensions'][i]),
                  *(f.format(v) for v in anno['location'][i]), f.format(anno['rotation_y'][i])]
        if with_score:
            fields.append(f.format(anno['score'][i]))
        lines.append(' '.join(fields))
    Path(path).write_text(''.join(line + '\n' for line in lines), encoding='utf-8')


def check_velodyne_size(path, num_features=4):
    """Raise DataError unless the file holds whole points of ``num_features`` float32."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f'{path}: velodyne file not found')
    size = path.stat().st_size
    record = 4 * num_features
    if size % record:
        raise DataError(f'{path}: {size} bytes is not a multiple of {record} (float32 x, y, z, '
                        f'intensity{", ..." if num_features > 4 else ""} per point): truncated '
                        'or not a KITTI velodyne scan')


def read_velodyne(path, num_features=4):
    """velodyne .bin -> (P, num_features) float32."""
    check_velodyne_size(path, num_features)
    return np.fromfile(str(path), dtype=np.float32).reshape(-1, num_features)


def write_velodyne(path, points):
    np.ascontiguousarray(points, dtype=np.float32).tofile(str(path))


def camera_to_lidar_boxes(location, dimensions, rotation_y, calib):
    """Label boxes -> (M, 7) LiDAR boxes (x, y, z centre, dx=l, dy=w, dz=h, heading).

    location (M, 3) rect bottom centre, dimensions (M, 3) h w l, rotation_y (M,)."""
    location = np.asarray(location, dtype=np.float64).reshape(-1, 3)
    h, w, l = (np.asarray(dimensions, dtype=np.float64).reshape(-1, 3)[:, i] for i in range(3))
    centre = calib.rect_to_lidar(location)
    centre[:, 2] += h / 2  # bottom centre -> box centre (LiDAR z is up)
    heading = limit_period(-(np.asarray(rotation_y, dtype=np.float64) + math.pi / 2))
    return np.concatenate([centre, l[:, None], w[:, None], h[:, None], heading[:, None]], axis=1)


def lidar_to_camera_boxes(boxes, calib):
    """(M, 7) LiDAR boxes -> location (M, 3) rect bottom centre, dimensions (M, 3) h w l,
    rotation_y (M,) in [-pi, pi): the exact inverse of camera_to_lidar_boxes."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
    bottom = boxes[:, :3].copy()
    bottom[:, 2] -= boxes[:, 5] / 2
    location = calib.lidar_to_rect(bottom)
    dims = boxes[:, [5, 4, 3]]
    rotation_y = limit_period(-boxes[:, 6] - math.pi / 2)
    return location, dims, rotation_y


def image_boxes(boxes, calib, image_shape=KITTI_IMAGE_SHAPE):
    """(M, 7) LiDAR boxes -> (M, 4) 2D boxes (left, top, right, bottom) clipped to the image and
    (M,) truncation (share of the unclipped 2D box outside the image). A box with a corner
    behind the camera gets (0, 0, 0, 0) and truncation 1."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
    if not len(boxes):
        return np.zeros((0, 4)), np.zeros(0)
    corners = boxes_to_corners_3d(boxes).reshape(-1, 3)
    uv, depth = calib.lidar_to_img(corners)
    uv, depth = uv.reshape(-1, 8, 2), depth.reshape(-1, 8)
    full = np.concatenate([uv.min(axis=1), uv.max(axis=1)], axis=1)
    h, w = image_shape
    clipped = np.stack([np.clip(full[:, 0], 0, w - 1), np.clip(full[:, 1], 0, h - 1),
                        np.clip(full[:, 2], 0, w - 1), np.clip(full[:, 3], 0, h - 1)], axis=1)
    area = lambda b: np.maximum(b[:, 2] - b[:, 0], 0) * np.maximum(b[:, 3] - b[:, 1], 0)  # noqa
    with np.errstate(divide='ignore', invalid='ignore'):
        truncation = np.clip(1.0 - area(clipped) / area(full), 0.0, 1.0)
    behind = (depth <= 0.1).any(axis=1) | ~np.isfinite(full).all(axis=1)
    clipped[behind] = 0.0
    truncation = np.where(behind | ~np.isfinite(truncation), 1.0, truncation)
    return clipped, truncation


def kitti_difficulty(bbox, truncated, occluded):
    """KITTI levels from the 2D box height (px), truncation and occlusion:
    0 easy (h >= 40, trunc <= 0.15, occ 0), 1 moderate (h >= 25, trunc <= 0.30, occ <= 1),
    2 hard (h >= 25, trunc <= 0.50, occ <= 2), -1 none of them (ignored in evaluation)."""
    height = np.asarray(bbox, dtype=np.float64).reshape(-1, 4)
    height = height[:, 3] - height[:, 1]  # as the official devkit's evaluation (no +1)
    truncated = np.asarray(truncated, dtype=np.float64)
    occluded = np.asarray(occluded)
    level = np.full(len(height), -1, np.int32)
    for lvl, (min_h, max_t, max_o) in reversed(list(enumerate(
            [(40, 0.15, 0), (25, 0.30, 1), (25, 0.50, 2)]))):
        level[(height >= min_h) & (truncated <= max_t) & (occluded <= max_o)] = lvl
    return level


def png_size(path):
    """(H, W) of a PNG from its header (no image library needed); None if not a PNG."""
    try:
        with open(path, 'rb') as f:
            head = f.read(24)
    except OSError:
        return None
    if len(head) < 24 or head[:8] != b'\x89PNG\r\n\x1a\n':
        return None
    w, h = struct.unpack('>II', head[16:24])
    return int(h), int(w)
