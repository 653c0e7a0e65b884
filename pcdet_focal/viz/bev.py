"""Bird's-eye-view pictures of a frame: points coloured by height, ground-truth and predicted
boxes (predictions with their score and heading), and the range grid.

The view looks down on the LiDAR frame: +x to the right, +y up, one metre the same length on
both axes. The plot area (inside a black frame) spans exactly ``point_cloud_range``
(x_min..x_max, y_min..y_max), so a metre maps to a fixed number of pixels; gridlines every
``grid_step`` metres and dashed range rings around the sensor (the origin) every
``2 * grid_step`` metres give distances.

Boxes are OpenPCDet's LiDAR 7-vectors ``(x, y, z, dx, dy, dz, heading)``; the heading line runs
from a box's centre to the middle of its front edge (the ``+dx / 2`` side).
"""
import logging
from pathlib import Path

import numpy as np

from ..ops.box_utils import boxes_to_corners_bev
from .canvas import matplotlib_available, new_figure, save_figure

logger = logging.getLogger('pcdet_focal')

GT_COLOR = '#00a651'        # green: no colour of the height map (cividis: blue -> grey -> yellow)
PRED_COLOR = '#e4002b'      # red
FRAME_COLOR = 'black'       # the plot area's frame: exactly the range's x / y extent
POINT_CMAP = 'cividis'
AXES_MAX_IN = 7.0           # the longer side of the plot area, inches
MARGINS_IN = {'left': 0.75, 'right': 1.2, 'bottom': 0.55, 'top': 0.8}
DEFAULT_MIN_SCORE = 0.3


def bev_layout(point_cloud_range):
    """Figure size and plot-area rectangle (figure fractions) whose plot area has the aspect of
    the range's x / y extent; returns ``(fig_w_in, fig_h_in, [left, bottom, width, height])``."""
    x0, y0, _, x1, y1, _ = (float(v) for v in point_cloud_range)
    span_x, span_y = x1 - x0, y1 - y0
    scale = AXES_MAX_IN / max(span_x, span_y)           # inches per metre
    ax_w, ax_h = span_x * scale, span_y * scale
    m = MARGINS_IN
    fig_w, fig_h = m['left'] + ax_w + m['right'], m['bottom'] + ax_h + m['top']
    return fig_w, fig_h, [m['left'] / fig_w, m['bottom'] / fig_h, ax_w / fig_w, ax_h / fig_h]


def _as_boxes(boxes):
    """Any (N, 7+) array-like (or None) -> (N, 7) float64."""
    boxes = np.zeros((0, 7)) if boxes is None else np.asarray(boxes, dtype=np.float64)
    return boxes.reshape(-1, boxes.shape[-1] if boxes.ndim > 1 else 7)[:, :7]


def _real(boxes):
    """Mask of boxes with a footprint (zero rows pad OpenPCDet's gt_boxes)."""
    return (boxes[:, 3] > 0) & (boxes[:, 4] > 0)


def _box_segments(boxes):
    """(N, 7) boxes -> line segments (N * 5, 2, 2): four edges and the heading line each."""
    if not len(boxes):
        return np.zeros((0, 2, 2))
    corners = boxes_to_corners_bev(boxes)                             # (N, 4, 2)
    edges = np.stack([corners, np.roll(corners, -1, axis=1)], axis=2)  # (N, 4, 2, 2)
    centre = boxes[:, :2]
    front = centre + 0.5 * boxes[:, 3:4] * np.stack([np.cos(boxes[:, 6]),
                                                     np.sin(boxes[:, 6])], axis=1)
    heading = np.stack([centre, front], axis=1)[:, None]              # (N, 1, 2, 2)
    return np.concatenate([edges, heading], axis=1).reshape(-1, 2, 2)


def _draw_grid(ax, x0, y0, x1, y1, step):
    """Gridlines every ``step`` m, range rings every 2 * step m around the sensor (origin)."""
    ax.set_xticks(np.arange(np.ceil(x0 / step) * step, x1 + 1e-6, step))
    ax.set_yticks(np.arange(np.ceil(y0 / step) * step, y1 + 1e-6, step))
    ax.grid(True, color='#dcdcdc', linewidth=0.8, zorder=0)
    far = max(np.hypot(x, y) for x in (x0, x1) for y in (y0, y1))
    theta = np.linspace(0, 2 * np.pi, 361)
    for r in np.arange(2 * step, far + 1e-6, 2 * step):
        ax.plot(r * np.cos(theta), r * np.sin(theta), color='#9a9a9a', linewidth=0.6,
                linestyle=(0, (4, 4)), zorder=0.5)
        # label the ring where it crosses the x axis, or its first point inside the range
        a = 0.0 if (x0 <= r <= x1 and y0 <= 0 <= y1) else None
        if a is None:
            inside = [t for t in theta if x0 < r * np.cos(t) < x1 and y0 < r * np.sin(t) < y1]
            a = inside[0] if inside else None
        if a is not None:
            ax.text(r * np.cos(a), r * np.sin(a), f'{r:g} m', color='#6a6a6a', fontsize=7,
                    ha='right', va='bottom', zorder=0.6, clip_on=True)


def default_grid_step(point_cloud_range):
    """10 m for ranges up to 120 m across, 20 m beyond."""
    span = max(point_cloud_range[3] - point_cloud_range[0],
               point_cloud_range[4] - point_cloud_range[1])
    return 10.0 if span <= 120 else 20.0


def draw_bev(path, points, point_cloud_range, gt_boxes=None, pred_boxes=None, pred_scores=None,
             pred_names=None, title='', min_score=DEFAULT_MIN_SCORE, grid_step=None):
    """Write a BEV PNG of one frame; returns the Path, or None without matplotlib.

    points: (P, 3+) x, y, z (+ features), LiDAR frame; coloured by z over the range's z extent.
    point_cloud_range: (6,) x_min, y_min, z_min, x_max, y_max, z_max: the picture's extent.
    gt_boxes: (M, 7+) ground truth (extra columns ignored). pred_boxes: (K, 7+) with
    pred_scores (K,) and pred_names (K,) str; predictions scoring below ``min_score`` are left
    out (the title says how many). grid_step: metres between gridlines (default
    :func:`default_grid_step`).
    """
    if not matplotlib_available('BEV picture'):
        return None
    return _draw_bev(path, points, point_cloud_range, gt_boxes, pred_boxes, pred_scores,
                     pred_names, title, min_score, grid_step)


def _draw_bev(path, points, pcr, gt_boxes, pred_boxes, pred_scores, pred_names, title,
              min_score, grid_step):
    from matplotlib.collections import LineCollection
    from matplotlib.lines import Line2D

    pcr = [float(v) for v in pcr]
    x0, y0, z0, x1, y1, z1 = pcr
    fig_w, fig_h, rect = bev_layout(pcr)
    fig = new_figure(fig_w, fig_h)
    ax = fig.add_axes(rect)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_xlabel('x (m)')
    ax.set_ylabel('y (m)')
    ax.tick_params(labelsize=8)
    for spine in ax.spines.values():
        spine.set_color(FRAME_COLOR)
    _draw_grid(ax, x0, y0, x1, y1, grid_step or default_grid_step(pcr))

    points = np.zeros((0, 3)) if points is None else np.asarray(points, dtype=np.float64)
    points = points.reshape(-1, points.shape[-1] if points.ndim > 1 else 3)
    sc = ax.scatter(points[:, 0], points[:, 1], c=points[:, 2], s=2.5, marker='.',
                    linewidths=0, cmap=POINT_CMAP, vmin=z0, vmax=z1, zorder=1,
                    rasterized=True)
    cax = fig.add_axes([rect[0] + rect[2] + 0.2 / fig_w, rect[1], 0.15 / fig_w, rect[3]])
    bar = fig.colorbar(sc, cax=cax)
    bar.set_label('point height z (m)', fontsize=8)
    bar.outline.set_edgecolor('#9a9a9a')
    cax.tick_params(labelsize=7)

    gt = _as_boxes(gt_boxes)
    gt = gt[_real(gt)]
    ax.add_collection(LineCollection(_box_segments(gt), colors=GT_COLOR, linewidths=1.6,
                                     zorder=2))
    pred = np.zeros((0, 7))
    n_pred = 0
    if pred_boxes is not None:
        boxes = _as_boxes(pred_boxes)
        scores = np.ones(len(boxes)) if pred_scores is None else \
            np.asarray(pred_scores, dtype=np.float64).reshape(-1)
        names = np.asarray(pred_names if pred_names is not None else [''] * len(boxes))
        n_pred = len(boxes)
        keep = (scores >= min_score) & _real(boxes)
        pred, scores, names = boxes[keep], scores[keep], names[keep]
        ax.add_collection(LineCollection(_box_segments(pred), colors=PRED_COLOR,
                                         linewidths=1.2, zorder=3))
        corners = boxes_to_corners_bev(pred) if len(pred) else np.zeros((0, 4, 2))
        for c, score, name in zip(corners, scores, names):
            top = c[np.argmax(c[:, 1])]
            label = f'{str(name)[:3]} {score:.2f}'.strip()
            ax.text(top[0], top[1] + 0.3, label, color=PRED_COLOR, fontsize=6.5, ha='center',
                    va='bottom', zorder=4, clip_on=True)
    handles = [Line2D([], [], color=GT_COLOR, linewidth=1.6,
                      label=f'ground truth ({len(gt)})'),
               Line2D([], [], color=PRED_COLOR, linewidth=1.2,
                      label=f'predictions, score >= {min_score:.2f} ({len(pred)} of {n_pred})')]
    fig.legend(handles=handles, loc='upper right', ncol=2, fontsize=8, frameon=False,
               bbox_to_anchor=(1.0, 1.0))
    if title:
        fig.text(rect[0], 1 - 0.12 / fig_h, title, fontsize=10, ha='left', va='top')
    return save_figure(fig, path)


def write_eval_bev(dataset, det_annos, out_dir, num_frames=4, min_score=DEFAULT_MIN_SCORE):
    """BEV PNGs ``bev_<frame_id>.png`` of the first ``num_frames`` frames of ``dataset`` with
    their predictions from ``det_annos`` (matched by ``frame_id``: ``boxes_lidar``, ``score``,
    ``name``), in ``out_dir``. Returns the written paths.

    dataset: OpenPCDet's contract (``dataset[i]`` -> ``points``, ``gt_boxes``, ``frame_id``;
    ``point_cloud_range``). num_frames 0 writes nothing. A dataset whose samples carry no
    ``points`` gets one log line and no pictures; without matplotlib, one log line.
    """
    num_frames = min(int(num_frames), len(dataset))
    if num_frames <= 0 or not matplotlib_available(f'{num_frames} BEV picture(s)'):
        return []
    by_frame = {str(a.get('frame_id')): a for a in det_annos}
    pcr = getattr(dataset, 'point_cloud_range', None)
    written = []
    for i in range(num_frames):
        sample = dataset[i]
        if sample.get('points') is None:
            logger.info('BEV pictures skipped: the samples of %s have no points',
                        type(dataset).__name__)
            return written
        points = np.asarray(sample['points'])
        frame_id = sample.get('frame_id', i)
        anno = by_frame.get(str(frame_id), {})
        extent = pcr if pcr is not None else _extent(points)
        written.append(_draw_bev(
            Path(out_dir) / f'bev_{frame_id}.png', points, extent, sample.get('gt_boxes'),
            anno.get('boxes_lidar'), anno.get('score'), anno.get('name'),
            f'frame {frame_id}: {len(points)} points', min_score, None))
    logger.info('BEV pictures of %d frame(s) in %s', len(written), out_dir)
    return written


def _extent(points):
    """A range that holds ``points`` (datasets without ``point_cloud_range``)."""
    if not len(points):
        return [-1.0, -1.0, -1.0, 1.0, 1.0, 1.0]
    lo, hi = points[:, :3].min(axis=0), points[:, :3].max(axis=0) + 1e-3
    return [lo[0], lo[1], lo[2], hi[0], hi[1], hi[2]]
