"""Rotated-box (BEV) non-maximum suppression.

Boxes are OpenPCDet's ``(x, y, z, dx, dy, dz, heading)`` (see ``ops/box_utils.py``); overlap is
the BEV IoU of ``eval/iou.py``. The greedy loop runs in numba on CPU numpy: a CUDA input is
copied to the host and the kept indices are copied back (N is at most NMS_PRE_MAXSIZE, a few
thousand boxes, so the copy is negligible next to the model).
"""
import numpy as np
import torch
from numba import njit

from ..errors import InputError
from ..eval.iou import (MODE_BEV_IOU, _MAX_VERTS, _circles_meet, _geometry, _pair_overlap,
                        as_box_array)


@njit(cache=True)
def _greedy_nms(boxes, iou_thresh, max_keep):
    """Greedy NMS over ``boxes`` (K, 7) float64 already sorted by descending score.

    IoUs are computed lazily, kept box vs still-alive later boxes only (never the full K x K
    matrix); ``_circles_meet`` rejects far pairs before any polygon clipping. A box is
    suppressed when its IoU with a kept box is > ``iou_thresh``. Stops after ``max_keep`` kept.
    Returns kept positions (int64, ascending = descending score).
    """
    k = boxes.shape[0]
    geo = _geometry(boxes)
    mode = np.int64(MODE_BEV_IOU)  # a plain int64, not a literal: reuses _overlap_matrix's build
    alive = np.ones(k, dtype=np.bool_)
    keep = np.empty(k, dtype=np.int64)
    ca = np.empty((4, 2))
    cb = np.empty((4, 2))
    buf_a = np.empty((_MAX_VERTS, 2))
    buf_b = np.empty((_MAX_VERTS, 2))
    n_keep = 0
    for i in range(k):
        if not alive[i]:
            continue
        keep[n_keep] = i
        n_keep += 1
        if n_keep >= max_keep:
            break
        for j in range(i + 1, k):
            if alive[j] and _circles_meet(boxes, i, geo, boxes, j, geo) and _pair_overlap(
                    boxes, i, geo, boxes, j, geo, mode, ca, cb, buf_a, buf_b) > iou_thresh:
                alive[j] = False
    return keep[:n_keep]


def _check_size(value, name):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise InputError(f'nms_rotated: {name}={value!r} must be a non-negative int or None')
    return int(value)


def nms_rotated(boxes, scores, iou_thresh, pre_max_size=None, post_max_size=None):
    """Greedy rotated-box NMS in BEV.

    boxes: (N, 7+) float Tensor ``(x, y, z, dx, dy, dz, heading)``, any device (columns past 7
    ignored); scores: (N,) Tensor; iou_thresh: a box is dropped when its BEV IoU with a
    higher-scoring kept box is > iou_thresh. pre_max_size: only the top-scoring
    ``pre_max_size`` boxes enter NMS; post_max_size: at most this many are returned.
    Returns: (K,) int64 indices into the input, by descending score (ties keep input order),
    on ``boxes.device``.
    """
    if not torch.is_tensor(boxes) or not torch.is_tensor(scores):
        raise InputError(f'nms_rotated: boxes and scores must be torch Tensors, got '
                         f'{type(boxes).__name__} and {type(scores).__name__}')
    if boxes.dim() != 2 or boxes.shape[1] < 7:
        raise InputError(f'nms_rotated: boxes has shape {tuple(boxes.shape)}; expected (N, 7) '
                         f'(x, y, z, dx, dy, dz, heading)')
    if scores.dim() != 1 or scores.shape[0] != boxes.shape[0]:
        raise InputError(f'nms_rotated: scores has shape {tuple(scores.shape)}; expected '
                         f'({boxes.shape[0]},), one score per box')
    iou_thresh = float(iou_thresh)
    if not iou_thresh == iou_thresh:  # NaN would keep everything silently
        raise InputError('nms_rotated: iou_thresh is NaN; pass a float such as 0.1')
    pre_max_size = _check_size(pre_max_size, 'pre_max_size')
    post_max_size = _check_size(post_max_size, 'post_max_size')
    device = boxes.device
    if boxes.shape[0] == 0 or post_max_size == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    # stable sort so equal scores keep input order: results do not depend on the device's sort
    order = torch.sort(scores.detach().cpu(), descending=True, stable=True)[1]
    if pre_max_size is not None:
        order = order[:pre_max_size]
    host = as_box_array(boxes.detach().to('cpu', torch.float64)[order], 'nms_rotated: boxes')
    max_keep = post_max_size if post_max_size is not None else host.shape[0]
    kept = _greedy_nms(host, iou_thresh, max_keep)
    return order[torch.from_numpy(kept)].to(device)
