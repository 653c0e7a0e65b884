"""KITTI-style average precision with 40 recall positions (R40), BEV and 3D.

Protocol (per class, metric, IoU threshold and difficulty level L):
- GT boxes of the class with ``0 <= difficulty <= L`` are *valid* (they count in recall). GT of
  the class with a higher difficulty or difficulty -1, and KITTI's neighbour classes (Van for
  Car, Person_sitting for Pedestrian), are *ignored*: a detection matched to one is neither a
  TP nor an FP. GT named 'DontCare' are regions: an otherwise unmatched detection whose BEV
  area lies more than the IoU threshold inside one is ignored too. Other classes play no part.
  Level "all" (keys without a difficulty suffix) takes every GT with difficulty >= 0 as valid.
- Matching, per frame: detections of the class in descending score order; each one takes the
  unmatched valid GT with the largest overlap > threshold (TP), else the unmatched ignored GT
  with the largest overlap > threshold (ignored), else it is an FP. Every GT is matched at most
  once. Because higher scores match first, lowering the score threshold never changes earlier
  matches, so one pass gives the whole precision/recall curve.
- R40: for k = 1..40 the score threshold t_k is the score of the TP that first brings recall to
  >= k/40; p_k = precision over all detections scoring >= t_k (0 if recall k/40 is never
  reached); precision is interpolated as max(p_j, j >= k); AP = mean of the 40 values. KITTI's
  devkit samples its thresholds from the sorted TP scores the same way but takes the TP whose
  recall is *nearest* k/40 and advances at most one position per TP: identical to within 1/GT
  for large GT counts, while with fewer than ~80 valid GT its positions fall behind (a perfect
  detector of 10 GT gets 22.5%); this sampler has no such artefact.
- Overlap = BEV IoU ('bev') or 3D IoU ('3d') from ``eval/iou.py``; a match needs IoU > threshold
  (strictly, as KITTI).

AP values are fractions in [0, 1] in ``result_dict``; the printed table shows percent.
"""
import numpy as np
from numba import njit

from ..errors import InputError
from .iou import MODE_3D_IOU, MODE_BEV_COVER, MODE_BEV_IOU, as_box_array, overlap_matrix

METRICS = (('bev', MODE_BEV_IOU), ('3d', MODE_3D_IOU))
NUM_RECALL_POSITIONS = 40
DIFFICULTY_NAMES = {0: 'easy', 1: 'moderate', 2: 'hard'}
DEFAULT_IOU_THRESHOLDS = {'Car': (0.7, 0.5)}
DEFAULT_OTHER_IOU_THRESHOLDS = (0.5, 0.25)
NEIGHBOUR_CLASSES = {'Car': ('Van',), 'Pedestrian': ('Person_sitting',)}  # ignored, as KITTI
DONT_CARE = 'DontCare'

# GT states handed to the matcher (per class and difficulty level)
_VALID, _IGNORED, _DONT_CARE, _UNUSED = 0, 1, 2, -1
# detection flags returned by the matcher
_TP, _FP, _IGNORED_DET, _OTHER_CLASS = 1, 0, -1, -2


@njit(cache=True)
def _match(det_start, gt_start, pair_start, overlaps, covers, det_order, det_active, gt_state,
           thresh):
    """Greedy score-ordered matching over all frames at once (one call per class, level,
    threshold and metric keeps numba's call overhead out of the per-frame loop).

    det_start (F+1,), gt_start (F+1,): frame f owns detections det_start[f]:det_start[f+1] and
    GT gt_start[f]:gt_start[f+1]. pair_start (F,): offset of frame f's row-major (D_f, G_f)
    block in ``overlaps`` (det x GT IoU) and ``covers`` (det x GT BEV intersection / det area,
    filled for DontCare columns). det_order (D,): global detection indices, sorted by frame
    then descending score. det_active (D,) bool: detection is of the evaluated class.
    gt_state (G,): _VALID, _IGNORED, _DONT_CARE or _UNUSED. Returns (D,) int64 flags
    (_TP, _FP, _IGNORED_DET, _OTHER_CLASS).
    """
    flags = np.full(det_order.shape[0], _OTHER_CLASS, dtype=np.int64)
    gt_used = np.zeros(gt_state.shape[0], dtype=np.bool_)
    for f in range(det_start.shape[0] - 1):
        d0 = det_start[f]
        g0 = gt_start[f]
        n_gt = gt_start[f + 1] - g0
        for k in range(d0, det_start[f + 1]):
            d = det_order[k]
            if not det_active[d]:
                continue
            row = pair_start[f] + (d - d0) * n_gt
            best_valid = -1
            best_valid_iou = thresh
            best_ignored = -1
            best_ignored_iou = thresh
            in_dont_care = False
            for g in range(n_gt):
                state = gt_state[g0 + g]
                if state == _DONT_CARE:
                    if covers[row + g] > thresh:
                        in_dont_care = True
                elif state != _UNUSED and not gt_used[g0 + g]:
                    iou = overlaps[row + g]
                    if state == _VALID and iou > best_valid_iou:
                        best_valid = g0 + g
                        best_valid_iou = iou
                    elif state == _IGNORED and iou > best_ignored_iou:
                        best_ignored = g0 + g
                        best_ignored_iou = iou
            if best_valid >= 0:
                flags[d] = _TP
                gt_used[best_valid] = True
            elif best_ignored >= 0:
                flags[d] = _IGNORED_DET
                gt_used[best_ignored] = True
            elif in_dont_care:
                flags[d] = _IGNORED_DET
            else:
                flags[d] = _FP
    return flags


def ap_r40(scores, is_tp, num_gt):
    """R40 AP from scored detections of one class (ignored ones already removed).

    scores: (D,) float, is_tp: (D,) bool, num_gt: number of valid GT (> 0).
    Returns (ap, precision) with precision (40,) the interpolated precision at recall k/40.
    """
    order = np.argsort(-scores, kind='stable')
    scores = scores[order]
    tp_cum = np.cumsum(is_tp[order])
    tp_scores = scores[is_tp[order]]  # descending
    k = np.arange(1, NUM_RECALL_POSITIONS + 1)
    needed = (k * num_gt + NUM_RECALL_POSITIONS - 1) // NUM_RECALL_POSITIONS  # ceil(k*G/40)
    reached = needed <= len(tp_scores)
    precision = np.zeros(NUM_RECALL_POSITIONS)
    thresholds = tp_scores[needed[reached] - 1]
    # every detection scoring >= t_k counts, ties with the threshold included (as KITTI)
    counted = np.searchsorted(-scores, -thresholds, side='right')
    precision[reached] = tp_cum[counted - 1] / counted
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    return float(precision.mean()), precision


def _frame_arrays(anno, index, side, need):
    """Validate one anno dict; returns (names (K,) str, boxes (K, 7) float64, extra (K,))."""
    where = f'{side}[{index}]'
    if not isinstance(anno, dict):
        raise InputError(f'{where} is a {type(anno).__name__}; expected a dict with keys '
                         f'{", ".join(need)}')
    for key in ('name', 'boxes_lidar'):
        if key not in anno:
            raise InputError(f"{where} has no '{key}'; expected keys {', '.join(need)}")
    names = np.asarray(anno['name']).reshape(-1).astype(str)
    boxes = as_box_array(anno['boxes_lidar'], f"{where}['boxes_lidar']")
    if len(boxes) != len(names):
        raise InputError(f"{where}: {len(names)} names but {len(boxes)} boxes_lidar rows; "
                         f"they must describe the same objects")
    if not np.isfinite(boxes).all():
        raise InputError(f"{where}['boxes_lidar'] holds NaN/inf values; drop or fix those boxes")
    if side == 'det_annos':
        if 'score' not in anno:
            raise InputError(f"{where} has no 'score'; expected keys {', '.join(need)}")
        extra = np.asarray(anno['score'], dtype=np.float64).reshape(-1)
        field = 'score'
    else:  # no difficulty at all (e.g. synthetic scenes) means every GT is 'easy'
        extra = np.asarray(anno.get('difficulty', np.zeros(len(names))))
        extra = extra.reshape(-1).astype(np.int64)
        field = 'difficulty'
    if len(extra) != len(names):
        raise InputError(f"{where}: {len(names)} names but {len(extra)} '{field}' values")
    if side == 'det_annos' and not np.isfinite(extra).all():
        raise InputError(f"{where}['score'] holds NaN/inf values; the model's predictions "
                         f"are not finite (check the training loss)")
    return names, boxes, extra


class _Frames:
    """All frames packed into flat arrays with per-frame offsets (for the numba matcher)."""

    def __init__(self, gt_annos, det_annos):
        if len(gt_annos) != len(det_annos):
            raise InputError(f'evaluate: {len(gt_annos)} gt annos but {len(det_annos)} det annos;'
                             f' pass one det anno per frame, same order (empty arrays when a '
                             f'frame has no detections)')
        gt, det = [], []
        for i, (g, d) in enumerate(zip(gt_annos, det_annos)):
            gt.append(_frame_arrays(g, i, 'gt_annos', ('name', 'boxes_lidar', 'difficulty')))
            det.append(_frame_arrays(d, i, 'det_annos', ('name', 'boxes_lidar', 'score')))
            if 'frame_id' in g and 'frame_id' in d and str(g['frame_id']) != str(d['frame_id']):
                raise InputError(f"evaluate: gt_annos[{i}] is frame {g['frame_id']} but "
                                 f"det_annos[{i}] is frame {d['frame_id']}; order the det "
                                 f"annos like the dataset's frames")
        self.num_frames = len(gt)
        self.gt_start = np.cumsum([0] + [len(n) for n, _, _ in gt]).astype(np.int64)
        self.det_start = np.cumsum([0] + [len(n) for n, _, _ in det]).astype(np.int64)
        sizes = [len(a[0]) * len(b[0]) for a, b in zip(det, gt)]
        self.pair_start = np.cumsum([0] + sizes)[:-1].astype(np.int64)
        self.num_pairs = int(sum(sizes))
        self._gt_boxes = [b for _, b, _ in gt]
        self._det_boxes = [b for _, b, _ in det]
        cat = (lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts
               else np.zeros(0, dtype))
        self.gt_names = cat([n for n, _, _ in gt], str)
        self.gt_difficulty = cat([x for _, _, x in gt], np.int64)
        self.det_names = cat([n for n, _, _ in det], str)
        self.det_scores = cat([x for _, _, x in det], np.float64)
        frame_of_det = np.repeat(np.arange(self.num_frames), np.diff(self.det_start))
        # by frame, then descending score; lexsort is stable so equal scores keep input order
        self.det_order = np.lexsort((-self.det_scores, frame_of_det)).astype(np.int64)
        self.is_dont_care = self.gt_names == DONT_CARE
        self._covers = None

    def overlaps(self, mode):
        """Flat per-frame (D_f, G_f) det x GT overlaps (row-major, frames concatenated)."""
        out = np.zeros(self.num_pairs)
        for f, (d, g) in enumerate(zip(self._det_boxes, self._gt_boxes)):
            if len(d) and len(g):
                out[self.pair_start[f]:self.pair_start[f] + len(d) * len(g)] = \
                    overlap_matrix(d, g, mode).ravel()
        return out

    def covers(self):
        """Like ``overlaps`` but BEV intersection / detection area, DontCare columns only."""
        if self._covers is None:
            self._covers = np.zeros(self.num_pairs)
            for f, (d, g) in enumerate(zip(self._det_boxes, self._gt_boxes)):
                dc = self.is_dont_care[self.gt_start[f]:self.gt_start[f + 1]]
                if len(d) and dc.any():
                    block = np.zeros((len(d), len(g)))
                    block[:, dc] = overlap_matrix(d, g[dc], MODE_BEV_COVER)
                    self._covers[self.pair_start[f]:self.pair_start[f] + block.size] = \
                        block.ravel()
        return self._covers

    def gt_state(self, class_name, level):
        """(G,) matcher states for ``class_name`` at difficulty ``level`` (None = all)."""
        own = self.gt_names == class_name
        d = self.gt_difficulty
        valid = own & (d >= 0) if level is None else own & (d >= 0) & (d <= level)
        ignored = (own & ~valid) | np.isin(self.gt_names, NEIGHBOUR_CLASSES.get(class_name, ()))
        state = np.full(len(own), _UNUSED, dtype=np.int64)
        state[ignored] = _IGNORED
        state[valid] = _VALID
        state[self.is_dont_care] = _DONT_CARE
        return state


def _thresholds_for(class_names, iou_thresholds):
    """-> {class: tuple of IoU thresholds}; accepts None, a float, a list or a per-class dict."""
    def check(values, where):
        values = (values,) if np.isscalar(values) else tuple(values)
        if not values:
            raise InputError(f'{where} is empty; give at least one IoU threshold such as 0.5')
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) \
                    or not 0.0 < float(v) < 1.0:
                raise InputError(f'{where} holds {v!r}; IoU thresholds are numbers in (0, 1)')
        return tuple(float(v) for v in values)

    if iou_thresholds is None:
        return {c: DEFAULT_IOU_THRESHOLDS.get(c, DEFAULT_OTHER_IOU_THRESHOLDS)
                for c in class_names}
    if isinstance(iou_thresholds, dict):
        out = {}
        for c in class_names:
            default = DEFAULT_IOU_THRESHOLDS.get(c, DEFAULT_OTHER_IOU_THRESHOLDS)
            out[c] = check(iou_thresholds.get(c, default), f'iou_thresholds[{c!r}]')
        return out
    shared = check(iou_thresholds, 'iou_thresholds')
    return {c: shared for c in class_names}


def _levels_for(difficulties):
    if difficulties is None:
        return [0, 1, 2]
    levels = [difficulties] if np.isscalar(difficulties) else list(difficulties)
    for lv in levels:
        if isinstance(lv, bool) or not isinstance(lv, (int, np.integer)) or lv < 0:
            raise InputError(f'difficulties holds {lv!r}; use levels 0 (easy), 1 (moderate), '
                             f'2 (hard)')
    return sorted(set(int(lv) for lv in levels))


def level_name(level):
    return DIFFICULTY_NAMES.get(level, f'level{level}')


def evaluate(gt_annos, det_annos, class_names, iou_thresholds=None, difficulties=None):
    """KITTI-style R40 AP for metrics 'bev' and '3d' (protocol in the module docstring).

    gt_annos: list (one per frame) of {'name': (M,) str, 'boxes_lidar': (M, 7) float,
    'difficulty': (M,) int (0 easy, 1 moderate, 2 hard, -1 ignore; missing = all 0)};
    det_annos: same length, {'name': (K,) str, 'boxes_lidar': (K, 7), 'score': (K,)}.
    class_names: classes to evaluate. iou_thresholds: None (Car 0.7/0.5, others 0.5/0.25),
    one float or list for all classes, or {class: float or list}. difficulties: levels to
    report, default [0, 1, 2].

    Returns (result_str, result_dict): a printable table (percent) and
    {'<class>_<metric>_R40_<iou:.2f>_<easy|moderate|hard>': AP in [0, 1], ...,
    '<class>_<metric>_R40_<iou:.2f>': AP over all difficulties}. A class/level without valid
    GT has no keys (its AP is undefined) and is reported as such in the table.
    """
    if isinstance(class_names, str) or not len(class_names):
        raise InputError(f'class_names={class_names!r}; pass a list such as '
                         f"['Car', 'Pedestrian', 'Cyclist']")
    class_names = list(dict.fromkeys(str(c) for c in class_names))  # keep order, drop repeats
    thresholds = _thresholds_for(class_names, iou_thresholds)
    levels = _levels_for(difficulties)
    frames = _Frames(gt_annos, det_annos)
    difficulty = frames.gt_difficulty[(frames.gt_difficulty >= 0) & ~frames.is_dont_care]
    top = int(difficulty.max()) if len(difficulty) else 0
    # levels >= the largest difficulty present select the same GT as 'all': compute once
    effective = {lv: (None if lv >= top else lv) for lv in levels}
    effective[None] = None
    covers = frames.covers()

    table = {}  # (class, metric, iou, level or None) -> AP or None (no valid GT)
    for metric, mode in METRICS:
        overlaps = frames.overlaps(mode)
        for c in class_names:
            det_active = frames.det_names == c
            cache = {}
            for lv in sorted(set(effective.values()), key=lambda x: (x is None, x)):
                state = frames.gt_state(c, lv)
                num_gt = int((state == _VALID).sum())
                for iou in thresholds[c]:
                    if num_gt == 0:
                        cache[lv, iou] = None
                        continue
                    flags = _match(frames.det_start, frames.gt_start, frames.pair_start,
                                   overlaps, covers, frames.det_order, det_active, state, iou)
                    counted = flags >= 0
                    cache[lv, iou] = ap_r40(frames.det_scores[counted], flags[counted] == _TP,
                                            num_gt)[0]
            for lv, eff in effective.items():
                for iou in thresholds[c]:
                    table[c, metric, iou, lv] = cache[eff, iou]

    result_dict = {}  # grouped by class, metric, IoU; 'all' first, then the levels
    for c in class_names:
        for metric, _ in METRICS:
            for iou in thresholds[c]:
                for lv in [None] + levels:
                    ap = table[c, metric, iou, lv]
                    if ap is not None:
                        suffix = '' if lv is None else f'_{level_name(lv)}'
                        result_dict[f'{c}_{metric}_R40_{iou:.2f}{suffix}'] = ap
    result_str = _format_table(frames, class_names, thresholds, levels, top, table)
    return result_str, result_dict


def _format_table(frames, class_names, thresholds, levels, top, table):
    """Readable table: one block per class, rows = IoU x metric, columns = difficulty."""
    if top == 0:  # every GT has difficulty 0 (synthetic scenes): one column says it all
        columns = [None]
        note = ('every GT has difficulty 0, so easy = moderate = hard = all'
                if (frames.gt_difficulty >= 0).any() else 'no ground truth at all')
    else:
        columns = list(levels) + ([None] if top > max(levels) else [])
        note = 'level k counts GT with difficulty <= k; harder GT and difficulty -1 ignored'
    names = [('all' if lv is None else level_name(lv)) for lv in columns]
    width = max(9, *(len(n) + 1 for n in names))
    cls_w = max(10, *(len(c) for c in class_names)) + 1
    frames_txt = f"{frames.num_frames} frame{'' if frames.num_frames == 1 else 's'}"
    lines = [f'AP R40 (%, 40 recall positions, KITTI-style), {frames_txt}; {note}',
             f"{'class':<{cls_w}}{'GT':>6}{'det':>7}  {'metric':<7}{'IoU':<6}"
             + ''.join(f'{n:>{width}}' for n in names)]
    for c in class_names:
        own = frames.gt_names == c
        num_gt = int((own & (frames.gt_difficulty >= 0)).sum())
        num_det = int((frames.det_names == c).sum())
        head = f'{c:<{cls_w}}{num_gt:>6}{num_det:>7}  '
        if num_gt == 0:
            lines.append(head + 'no valid ground truth: AP undefined')
            continue
        for iou in thresholds[c]:
            for metric, _ in METRICS:
                cells = []
                for lv in columns:
                    ap = table[c, metric, iou, lv]
                    cells.append(f'{"no GT" if ap is None else f"{100 * ap:.2f}":>{width}}')
                lines.append(head + f'{metric:<7}{iou:<6.2f}' + ''.join(cells))
                head = ' ' * (cls_w + 15)
    return '\n'.join(lines)
