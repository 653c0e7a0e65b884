"""KITTI-style R40 AP (eval/ap.py) on constructed detections, hand-computed PR curves and a
plain-Python reference (greedy matching + R40 straight from its definition)."""
import math
import warnings

import numpy as np
import pytest

from pcdet_focal.errors import InputError
from pcdet_focal.eval.ap import evaluate
from pcdet_focal.eval.iou import boxes_iou_3d, boxes_iou_bev

CLASSES = ['Car', 'Pedestrian', 'Cyclist']
SIZES = {'Car': (3.9, 1.6, 1.5), 'Pedestrian': (0.8, 0.6, 1.7), 'Cyclist': (1.8, 0.6, 1.7),
         'Van': (5.0, 2.0, 2.2), 'DontCare': (6.0, 6.0, 3.0)}


def obj(name, x, y, heading=0.0, z=-1.0):
    return name, [x, y, z, *SIZES[name], heading]


def gt_anno(objects, difficulty=None):
    names = np.array([n for n, _ in objects], dtype=str)
    boxes = np.array([b for _, b in objects], dtype=np.float64).reshape(-1, 7)
    diff = np.zeros(len(objects), dtype=np.int64) if difficulty is None else np.array(difficulty)
    return {'name': names, 'boxes_lidar': boxes, 'difficulty': diff}


def det_anno(objects, scores):
    anno = gt_anno(objects)
    del anno['difficulty']
    anno['score'] = np.array(scores, dtype=np.float64)
    return anno


def r40_by_hand(prec_at_tp, num_gt):
    """R40 from its definition: p(r) = max precision over operating points with recall >= r.

    prec_at_tp[m-1] = precision when the score threshold is the m-th TP's score."""
    total = 0.0
    for k in range(1, 41):
        need = math.ceil(k * num_gt / 40 - 1e-12)
        reachable = prec_at_tp[need - 1:]
        total += max(reachable) if reachable else 0.0
    return total / 40


def cars_scene():
    """Two frames, 3 + 2 cars, all easy."""
    f0 = [obj('Car', 10, 0, 0.1), obj('Car', 20, 5, 1.2), obj('Car', 30, -5, -2.0)]
    f1 = [obj('Car', 15, 3, 0.5), obj('Car', 40, 0, 3.0)]
    return [gt_anno(f0), gt_anno(f1)]


def test_perfect_detections_score_one():
    gts = cars_scene()
    gts[1] = gt_anno([*[(n, b) for n, b in zip(gts[1]['name'], gts[1]['boxes_lidar'])],
                      obj('Pedestrian', 5, 5), obj('Cyclist', 8, -3, 0.3)])
    dets = [det_anno(list(zip(g['name'], g['boxes_lidar'])), np.linspace(0.9, 0.5, len(g['name'])))
            for g in gts]
    _, result = evaluate(gts, dets, CLASSES)
    assert set(result) == {f'{c}_{m}_R40_{t:.2f}{s}' for c, ts in
                           [('Car', (0.7, 0.5)), ('Pedestrian', (0.5, 0.25)),
                            ('Cyclist', (0.5, 0.25))]
                           for m in ('bev', '3d') for t in ts
                           for s in ('', '_easy', '_moderate', '_hard')}
    for key, ap in result.items():
        assert ap == pytest.approx(1.0), key


def test_no_detections_and_all_false_positives_score_zero():
    gts = cars_scene()
    empty = {'name': np.zeros(0, str), 'boxes_lidar': np.zeros((0, 7)), 'score': np.zeros(0)}
    _, result = evaluate(gts, [empty, empty], ['Car'])
    assert result and all(v == 0.0 for v in result.values())
    # false positives: far from every car, or on a car but labelled Pedestrian
    dets = [det_anno([obj('Car', -30, 0), obj('Pedestrian', 10, 0)], [0.9, 0.8]),
            det_anno([obj('Car', 15, 20)], [0.7])]
    _, result = evaluate(gts, dets, ['Car'])
    assert result and all(v == 0.0 for v in result.values())


def test_known_pr_curve():
    # 4 cars; detections by score: TP .9, FP .8, TP .7, FP .6, TP .5; the 4th car is missed.
    # Recall k/40 needs ceil(4k/40) TPs: k=1..10 -> 1 TP at precision 1/1, k=11..20 -> 2 TPs
    # at 2/3, k=21..30 -> 3 TPs at 3/5, k=31..40 -> unreachable = 0 (already monotone).
    cars = [obj('Car', 10 * i, 0) for i in range(1, 5)]
    fp = [obj('Car', 10 * i, 20) for i in range(2)]
    dets = [cars[0], fp[0], cars[1], fp[1], cars[2]]
    _, result = evaluate([gt_anno(cars)], [det_anno(dets, [0.9, 0.8, 0.7, 0.6, 0.5])], ['Car'])
    expected = (10 * 1 + 10 * 2 / 3 + 10 * 3 / 5 + 10 * 0) / 40
    assert result['Car_bev_R40_0.70'] == pytest.approx(expected)
    assert result['Car_3d_R40_0.50_hard'] == pytest.approx(expected)
    assert expected == pytest.approx(r40_by_hand([1, 2 / 3, 3 / 5], 4))


def test_precision_is_interpolated_to_the_right():
    # 3 cars: TP .9, FP .8, FP .7, TP .6, TP .5. ceil(3k/40) = 1 for k<=13, 2 for k<=26, 3 after.
    # Raw precision 1, 2/4, 3/5; interpolation lifts the 2-TP positions to 3/5:
    # AP = (13 * 1 + 13 * 0.6 + 14 * 0.6) / 40 = 0.73
    cars = [obj('Car', 10 * i, 0) for i in range(1, 4)]
    dets = [cars[0], obj('Car', 0, 30), obj('Car', 10, 30), cars[1], cars[2]]
    _, result = evaluate([gt_anno(cars)], [det_anno(dets, [0.9, 0.8, 0.7, 0.6, 0.5])], ['Car'])
    assert result['Car_bev_R40_0.70'] == pytest.approx(0.73)


def test_many_gt_sampling():
    # 80 cars, detections by score TP, TP, FP, TP, TP, FP, ...: the m-th TP comes after
    # floor((m-1)/2) FPs. Recall k/40 needs m = 2k TPs -> precision 2k / (2k + k - 1).
    cars = [obj('Car', 10 * (i % 10), 10 * (i // 10)) for i in range(80)]
    dets, scores = [], []
    for m, car in enumerate(cars, start=1):
        dets.append(car)
        if m % 2 == 0:
            dets.append(obj('Car', 10 * m, -50))
    scores = np.linspace(1.0, 0.1, len(dets))
    _, result = evaluate([gt_anno(cars)], [det_anno(dets, scores)], ['Car'], iou_thresholds=0.5)
    expected = sum(2 * k / (3 * k - 1) for k in range(1, 41)) / 40
    assert result['Car_bev_R40_0.50'] == pytest.approx(expected)


def test_multiple_frames_do_not_cross_match():
    # frame 0 has a car at A, frame 1 one at B. A detection at B in frame 0 is an FP even though
    # a car sits at B in frame 1. By score: FP .9, TP .8 -> recall 1/2 at precision 1/2.
    a, b = obj('Car', 10, 0), obj('Car', 30, 0)
    gts = [gt_anno([a]), gt_anno([b])]
    dets = [det_anno([b], [0.9]), det_anno([b], [0.8])]
    _, result = evaluate(gts, dets, ['Car'])
    assert result['Car_bev_R40_0.70'] == pytest.approx(20 * 0.5 / 40)
    # the same detections with their frames swapped are both TPs
    _, result = evaluate(gts, [det_anno([a], [0.9]), det_anno([b], [0.8])], ['Car'])
    assert result['Car_bev_R40_0.70'] == pytest.approx(1.0)


def test_each_gt_matched_once_and_best_score_first():
    # two detections on one car: the higher score is the TP, the duplicate an FP
    car = obj('Car', 10, 0)
    near = obj('Car', 10.3, 0)  # IoU (3.6 * 1.6) / (2 * 6.24 - 5.76) = 0.857 > 0.7
    _, result = evaluate([gt_anno([car])], [det_anno([near, car], [0.9, 0.8])], ['Car'])
    assert result['Car_bev_R40_0.70'] == pytest.approx(1.0)  # recall 1 reached at precision 1
    _, result = evaluate([gt_anno([car])], [det_anno([near, car], [0.8, 0.9])], ['Car'])
    assert result['Car_bev_R40_0.70'] == pytest.approx(1.0)
    # duplicate scored above the only TP of a second car: TP .9, FP .85 (duplicate), TP .8
    car2 = obj('Car', 30, 0)
    _, result = evaluate([gt_anno([car, car2])],
                         [det_anno([car, near, car2], [0.9, 0.85, 0.8])], ['Car'])
    assert result['Car_bev_R40_0.70'] == pytest.approx((20 * 1 + 20 * 2 / 3) / 40)


def test_ignored_gt_by_difficulty():
    easy, hard = obj('Car', 10, 0), obj('Car', 30, 0)
    gts = [gt_anno([easy, hard], difficulty=[0, 2])]
    # both detected: the detection on the hard car is ignored at easy/moderate (not an FP)
    text, result = evaluate(gts, [det_anno([hard, easy], [0.9, 0.8])], ['Car'])
    for level in ('easy', 'moderate', 'hard'):
        assert result[f'Car_bev_R40_0.70_{level}'] == pytest.approx(1.0)
    assert 'easy' in text and 'moderate' in text and 'hard' in text
    # only the easy one detected: easy/moderate perfect, hard (2 valid GT) recall 1/2
    _, result = evaluate(gts, [det_anno([easy], [0.9])], ['Car'])
    assert result['Car_bev_R40_0.70_easy'] == pytest.approx(1.0)
    assert result['Car_bev_R40_0.70_moderate'] == pytest.approx(1.0)
    assert result['Car_bev_R40_0.70_hard'] == pytest.approx(0.5)
    assert result['Car_bev_R40_0.70'] == pytest.approx(0.5)  # all difficulties
    # only the hard one detected: no valid TP at easy -> 0 (the det is ignored, the GT missed)
    _, result = evaluate(gts, [det_anno([hard], [0.9])], ['Car'])
    assert result['Car_bev_R40_0.70_easy'] == 0.0
    assert result['Car_bev_R40_0.70_hard'] == pytest.approx(0.5)


def test_ignored_gt_dontcare_level_and_neighbour_class():
    car = obj('Car', 10, 0)
    ignored_car = obj('Car', 30, 0)          # difficulty -1
    van = obj('Van', 50, 0)                  # KITTI: Van is ignored when evaluating Car
    region = obj('DontCare', 70, 0)          # 6 x 6 region
    in_region = obj('Car', 71, 1)            # a car-sized detection fully inside it
    edge_of_region = obj('Car', 73.5, 0)     # 1.45 m of its 3.9 m inside: cover 0.37
    gts = [gt_anno([car, ignored_car, van, region], difficulty=[0, -1, 0, -1])]
    van_as_car = ('Car', [50, 0, -1, *SIZES['Van'], 0])  # a Van detected and called Car
    dets = [det_anno([ignored_car, van_as_car, in_region, car], [0.95, 0.9, 0.85, 0.5])]
    _, result = evaluate(gts, dets, ['Car'])
    for key, ap in result.items():  # everything above the TP is ignored -> perfect
        assert ap == pytest.approx(1.0), key
    # a detection only partly inside the DontCare region is a false positive
    dets = [det_anno([edge_of_region, car], [0.9, 0.5])]
    _, result = evaluate(gts, dets, ['Car'])
    assert result['Car_bev_R40_0.70'] == pytest.approx(0.5)
    # ignored GT are never missed: one valid car, detected -> 1.0 with no det on the others
    _, result = evaluate(gts, [det_anno([car], [0.5])], ['Car'])
    assert result['Car_bev_R40_0.70'] == pytest.approx(1.0)


def test_detection_prefers_valid_gt_over_ignored():
    # a detection between an ignored (better IoU) and a valid car matches the valid one
    valid, ignored = obj('Car', 10, 0), obj('Car', 10.6, 0)
    between = obj('Car', 10.4, 0)   # IoU 3.5/4.3 ~ 0.81 with valid, 3.7/4.1 ~ 0.90 with ignored
    gts = [gt_anno([valid, ignored], difficulty=[0, -1])]
    _, result = evaluate(gts, [det_anno([between], [0.9])], ['Car'])
    assert result['Car_bev_R40_0.70'] == pytest.approx(1.0)


def test_bev_versus_3d():
    # right footprint, floating 1.2 m too high: z overlap 0.3 of 1.5 -> 3D IoU 0.3/2.7 ~ 0.11
    car = obj('Car', 10, 0)
    high = obj('Car', 10, 0, z=0.2)
    _, result = evaluate([gt_anno([car])], [det_anno([high], [0.9])], ['Car'])
    assert result['Car_bev_R40_0.70'] == pytest.approx(1.0)
    assert result['Car_3d_R40_0.70'] == 0.0 and result['Car_3d_R40_0.50'] == 0.0


def test_class_without_gt_is_reported_not_nan():
    gts = cars_scene()
    dets = [det_anno([obj('Car', 10, 0, 0.1), obj('Cyclist', 0, 0)], [0.9, 0.8]),
            det_anno([], [])]
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no 0/0 RuntimeWarning anywhere
        text, result = evaluate(gts, dets, CLASSES)
    assert not any(k.startswith(('Cyclist', 'Pedestrian')) for k in result)
    assert all(np.isfinite(v) for v in result.values())
    cyclist = [line for line in text.splitlines() if line.startswith('Cyclist')]
    assert len(cyclist) == 1 and 'no valid ground truth' in cyclist[0]
    # some GT but none easy: the easy key is absent and the table says why
    gts = [gt_anno([obj('Car', 10, 0)], difficulty=[1])]
    text, result = evaluate(gts, [det_anno([obj('Car', 10, 0)], [0.9])], ['Car'])
    assert 'Car_bev_R40_0.70_easy' not in result and result['Car_bev_R40_0.70_moderate'] == 1.0
    assert 'no GT' in text


def test_single_column_when_every_gt_is_easy():
    gts = cars_scene()
    dets = [det_anno(list(zip(g['name'], g['boxes_lidar'])), [0.5] * len(g['name']))
            for g in gts]
    text, result = evaluate(gts, dets, ['Car'], difficulties=[0])
    assert set(result) == {'Car_bev_R40_0.70', 'Car_bev_R40_0.50', 'Car_3d_R40_0.70',
                           'Car_3d_R40_0.50', 'Car_bev_R40_0.70_easy', 'Car_bev_R40_0.50_easy',
                           'Car_3d_R40_0.70_easy', 'Car_3d_R40_0.50_easy'}
    header = text.splitlines()[1].split()
    assert header[-1] == 'all' and 'easy' not in header and 'moderate' not in header
    assert len([line for line in text.splitlines() if '100.00' in line]) == 4


def test_match_needs_iou_strictly_above_threshold():
    # a 2 x 1 detection inside a 2 x 2 GT: IoU = 2 / 4 = 0.5 exactly (KITTI: overlap > thresh)
    gt = gt_anno([('Pedestrian', [0, 0, 0, 2, 2, 1, 0])])
    det = det_anno([('Pedestrian', [0, 0.5, 0, 2, 1, 1, 0])], [0.9])
    _, result = evaluate([gt], [det], ['Pedestrian'], iou_thresholds=[0.5, 0.49])
    assert result['Pedestrian_bev_R40_0.50'] == 0.0
    assert result['Pedestrian_bev_R40_0.49'] == 1.0


def test_custom_thresholds():
    car = obj('Car', 10, 0)
    shifted = obj('Car', 11.35, 0)  # overlap 2.55 x 1.6 = 4.08, IoU 4.08 / (12.48 - 4.08) = 0.486
    _, result = evaluate([gt_anno([car])], [det_anno([shifted], [0.9])], ['Car'],
                         iou_thresholds={'Car': [0.45, 0.49]})
    assert result['Car_bev_R40_0.45'] == 1.0 and result['Car_bev_R40_0.49'] == 0.0
    _, result = evaluate([gt_anno([car])], [det_anno([shifted], [0.9])], ['Car'],
                         iou_thresholds=0.3)
    assert set(k for k in result if not k.endswith(('easy', 'moderate', 'hard'))) == \
        {'Car_bev_R40_0.30', 'Car_3d_R40_0.30'}


def _reference_ap(gt_annos, det_annos, cls, level, thr, iou_fn):
    """Plain-Python protocol: greedy by score per frame, then R40 from the definition."""
    records, num_gt = [], 0
    for g, d in zip(gt_annos, det_annos):
        state = []
        for name, diff in zip(g['name'], g['difficulty']):
            valid = name == cls and diff >= 0 and (level is None or diff <= level)
            state.append('valid' if valid else 'ignored' if name == cls else None)
        num_gt += state.count('valid')
        iou = iou_fn(d['boxes_lidar'], g['boxes_lidar'])
        used = set()
        mine = [j for j in range(len(d['name'])) if d['name'][j] == cls]
        for j in sorted(mine, key=lambda j: -d['score'][j]):
            for kind in ('valid', 'ignored'):
                cands = [i for i in range(len(state))
                         if state[i] == kind and i not in used and iou[j, i] > thr]
                if cands:
                    best = max(cands, key=lambda i: iou[j, i])
                    used.add(best)
                    if kind == 'valid':
                        records.append((d['score'][j], True))
                    break
            else:
                records.append((d['score'][j], False))
    if num_gt == 0:
        return None
    points = []
    for s, _ in records:
        above = [tp for score, tp in records if score >= s]
        points.append((sum(above) / num_gt, sum(above) / len(above)))
    return sum(max([p for r, p in points if r >= k / 40 - 1e-12], default=0.0)
               for k in range(1, 41)) / 40


def test_random_scenes_against_reference():
    rng = np.random.default_rng(5)
    gts, dets = [], []
    for _ in range(6):
        objects, diffs = [], []
        for i in range(rng.integers(0, 7)):
            name = str(rng.choice(CLASSES))
            objects.append(obj(name, rng.uniform(0, 40), rng.uniform(-10, 10),
                               rng.uniform(-3, 3)))
            diffs.append(int(rng.integers(-1, 3)))
        gts.append(gt_anno(objects, diffs))
        found = []
        for name, b in objects:
            for _ in range(rng.integers(0, 3)):  # 0, 1 or 2 noisy detections a GT
                noisy = np.array(b) + rng.normal(0, 1, 7) * [0.3, 0.3, 0.2, 0.2, 0.1, 0.1, 0.2]
                found.append((name if rng.uniform() < 0.9 else str(rng.choice(CLASSES)),
                              list(noisy)))
        for _ in range(rng.integers(0, 4)):  # clutter
            found.append(obj(str(rng.choice(CLASSES)), rng.uniform(0, 40), rng.uniform(-10, 10)))
        scores = np.round(rng.uniform(0, 1, len(found)), 1)  # rounded: ties happen
        dets.append(det_anno(found, scores))
    _, result = evaluate(gts, dets, CLASSES, iou_thresholds={c: [0.3, 0.6] for c in CLASSES})
    checked = 0
    for c in CLASSES:
        for metric, fn in (('bev', boxes_iou_bev), ('3d', boxes_iou_3d)):
            for thr in (0.3, 0.6):
                for level, suffix in ((0, '_easy'), (1, '_moderate'), (2, '_hard'), (None, '')):
                    ref = _reference_ap(gts, dets, c, level, thr, fn)
                    key = f'{c}_{metric}_R40_{thr:.2f}{suffix}'
                    if ref is None:
                        assert key not in result
                    else:
                        assert result[key] == pytest.approx(ref, abs=1e-12), key
                        checked += 1
    assert checked >= 30 and len({round(v, 6) for v in result.values()}) > 5


def test_bad_input_is_one_clear_line():
    gts = cars_scene()
    dets = [det_anno([], []), det_anno([], [])]
    with pytest.raises(InputError, match='2 gt annos but 1 det annos'):
        evaluate(gts, dets[:1], ['Car'])
    with pytest.raises(InputError, match=r"det_annos\[1\] has no 'score'"):
        evaluate(gts, [dets[0], {'name': [], 'boxes_lidar': np.zeros((0, 7))}], ['Car'])
    bad = det_anno([obj('Car', 1, 1)], [float('nan')])
    with pytest.raises(InputError, match=r"det_annos\[0\]\['score'\] holds NaN"):
        evaluate(gts, [bad, dets[1]], ['Car'])
    bad = det_anno([obj('Car', 1, 1)], [0.5, 0.4])
    with pytest.raises(InputError, match=r"det_annos\[0\]: 1 names but 2 'score'"):
        evaluate(gts, [bad, dets[1]], ['Car'])
    with pytest.raises(InputError, match=r'iou_thresholds\[.Car.\] holds 1.5'):
        evaluate(gts, dets, ['Car'], iou_thresholds={'Car': [1.5]})
    with pytest.raises(InputError, match='class_names'):
        evaluate(gts, dets, 'Car')
    g = dict(gts[0], frame_id='000001')
    with pytest.raises(InputError, match='frame 000001 but det_annos'):
        evaluate([g, gts[1]], [dict(dets[0], frame_id='000002'), dets[1]], ['Car'])
