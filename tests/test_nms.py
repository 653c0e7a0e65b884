"""Rotated NMS (ops/nms.py) against a brute-force greedy NMS over the full BEV IoU matrix."""
import numpy as np
import pytest
import torch

from pcdet_focal.errors import InputError
from pcdet_focal.eval.iou import boxes_iou_bev
from pcdet_focal.ops.nms import nms_rotated


def brute_force_nms(boxes, scores, thresh, pre=None, post=None):
    """Textbook greedy NMS: full IoU matrix, visit by descending score (stable on ties)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    if pre is not None:
        order = order[:pre]
    iou = boxes_iou_bev(boxes, boxes)
    kept = []
    for i in order:
        if all(iou[i, k] <= thresh for k in kept):
            kept.append(i)
    return kept if post is None else kept[:post]


def random_boxes(n, extent, rng):
    """Car-like boxes crowded into ``extent`` metres so that many of them overlap."""
    b = np.zeros((n, 7))
    b[:, :2] = rng.uniform(0, extent, (n, 2))
    b[:, 2] = rng.uniform(-1, 1, n)
    b[:, 3] = rng.uniform(3.0, 5.0, n)
    b[:, 4] = rng.uniform(1.5, 2.0, n)
    b[:, 5] = 1.5
    b[:, 6] = rng.uniform(-np.pi, np.pi, n)
    return b


def test_hand_case():
    # A: 4 x 2 at the origin; B: A shifted 1 m along x -> overlap 3 x 2 = 6, IoU 6 / (8+8-6) = 0.6
    # C: far away. Input order is scrambled so the result must be indices into the input.
    boxes = torch.tensor([[50.0, 0, 0, 4, 2, 1.5, 0],   # C, score 0.7
                          [1.0, 0, 0, 4, 2, 1.5, 0],    # B, score 0.8
                          [0.0, 0, 0, 4, 2, 1.5, 0]])   # A, score 0.9
    scores = torch.tensor([0.7, 0.8, 0.9])
    assert nms_rotated(boxes, scores, 0.5).tolist() == [2, 0]
    assert nms_rotated(boxes, scores, 0.65).tolist() == [2, 1, 0]
    assert nms_rotated(boxes, scores, 0.6 - 1e-6).tolist() == [2, 0]   # IoU 0.6 > thresh
    assert nms_rotated(boxes, scores, 0.65, post_max_size=2).tolist() == [2, 1]
    assert nms_rotated(boxes, scores, 0.65, pre_max_size=1).tolist() == [2]
    # IoU exactly 0.5 (a 2 x 1 box inside a 2 x 2 one) is not above 0.5: both stay
    pair = torch.tensor([[0.0, 0, 0, 2, 2, 1, 0], [0.0, 0.5, 0, 2, 1, 1, 0]])
    assert nms_rotated(pair, torch.tensor([0.9, 0.8]), 0.5).tolist() == [0, 1]
    assert nms_rotated(pair, torch.tensor([0.9, 0.8]), 0.49).tolist() == [0]
    # a 90-deg-rotated copy of A: overlap 2 x 2 = 4, IoU 4 / 12 = 1/3 -> suppressed at 0.3 only
    rot = torch.tensor([[0.0, 0, 0, 4, 2, 1.5, np.pi / 2]])
    both = torch.cat([boxes[2:], rot])
    assert nms_rotated(both, torch.tensor([0.9, 0.8]), 0.3).tolist() == [0]
    assert nms_rotated(both, torch.tensor([0.9, 0.8]), 0.34).tolist() == [0, 1]


def test_empty_and_single():
    empty = nms_rotated(torch.zeros(0, 7), torch.zeros(0), 0.1)
    assert empty.dtype == torch.long and empty.shape == (0,)
    one = nms_rotated(torch.tensor([[0.0, 0, 0, 1, 1, 1, 0]]), torch.tensor([0.3]), 0.1)
    assert one.tolist() == [0] and one.dtype == torch.long
    assert nms_rotated(torch.ones(3, 7), torch.ones(3), 0.5, post_max_size=0).tolist() == []


@pytest.mark.parametrize('thresh', [0.01, 0.1, 0.5, 0.8])
def test_matches_brute_force(thresh):
    rng = np.random.default_rng(int(thresh * 100))
    boxes = random_boxes(300, 40.0, rng)
    # a third are jittered copies of others, as a detection head's neighbouring peaks are
    boxes[200:] = boxes[rng.integers(0, 200, 100)] + rng.normal(0, 1, (100, 7)) * \
        np.array([0.15, 0.15, 0.1, 0.1, 0.05, 0, 0.05])
    scores = rng.uniform(0, 1, 300)
    scores[10:20] = scores[0]  # ties must keep input order
    kept = nms_rotated(torch.from_numpy(boxes), torch.from_numpy(scores), thresh).tolist()
    expected = brute_force_nms(boxes, scores, thresh)
    assert kept == expected
    assert 0 < len(kept) < 300  # suppression happened and something was kept
    pre = nms_rotated(torch.from_numpy(boxes).float(), torch.from_numpy(scores).float(), thresh,
                      pre_max_size=120, post_max_size=25).tolist()
    assert pre == brute_force_nms(boxes.astype(np.float32), scores.astype(np.float32), thresh,
                                  pre=120, post=25)


def test_result_on_input_device_and_extra_columns(device):
    rng = np.random.default_rng(3)
    boxes = torch.from_numpy(random_boxes(64, 15.0, rng)).float()
    scores = torch.rand(64)
    with_labels = torch.cat([boxes, torch.ones(64, 2)], 1).to(device)  # e.g. velocity columns
    kept = nms_rotated(with_labels, scores.to(device), 0.2)
    assert kept.device.type == device.type and kept.dtype == torch.long
    assert kept.cpu().tolist() == brute_force_nms(boxes.double().numpy(),
                                                  scores.double().numpy(), 0.2)


def test_bad_input():
    with pytest.raises(InputError, match=r'scores has shape \(4,\)'):
        nms_rotated(torch.zeros(3, 7), torch.zeros(4), 0.1)
    with pytest.raises(InputError, match=r'boxes has shape \(3, 5\)'):
        nms_rotated(torch.zeros(3, 5), torch.zeros(3), 0.1)
    with pytest.raises(InputError, match='pre_max_size'):
        nms_rotated(torch.zeros(3, 7), torch.zeros(3), 0.1, pre_max_size=-1)
    with pytest.raises(InputError, match='torch Tensors'):
        nms_rotated(np.zeros((3, 7)), np.zeros(3), 0.1)
