"""CenterHead and ops/centernet.py against hand-computed targets and dense references."""
import math

import numpy as np
import pytest
import torch
from easydict import EasyDict

from pcdet_focal.errors import ConfigError, InputError
from pcdet_focal.models.center_head import CenterHead
from pcdet_focal.ops import centernet

from cfg_parts import separate_head_cfg

CLASSES = ['Car', 'Pedestrian', 'Cyclist']
PC_RANGE = [0.0, -4.0, -2.0, 8.0, 4.0, 2.0]
VOXEL = [0.2, 0.2, 0.2]
GRID = [40, 40, 20]  # x, y, z
STRIDE = 2            # -> 20 x 20 BEV map, 0.4 m cells


def head_cfg(**over):
    cfg = {
        'NAME': 'CenterHead',
        'CLASS_AGNOSTIC': False,
        'CLASS_NAMES_EACH_HEAD': [['Car'], ['Pedestrian', 'Cyclist']],
        'SHARED_CONV_CHANNEL': 8,
        'USE_BIAS_BEFORE_NORM': True,
        'NUM_HM_CONV': 2,
        'SEPARATE_HEAD_CFG': separate_head_cfg(),
        'TARGET_ASSIGNER_CONFIG': {'FEATURE_MAP_STRIDE': STRIDE, 'NUM_MAX_OBJS': 6,
                                   'GAUSSIAN_OVERLAP': 0.1, 'MIN_RADIUS': 1},
        'LOSS_CONFIG': {'LOSS_WEIGHTS': {'cls_weight': 1.0, 'loc_weight': 0.25,
                                         'code_weights': [1.0, 1.0, 2.0, 1.0, 1.0, 1.0, 1.0,
                                                          1.0]}},
        'POST_PROCESSING': {'SCORE_THRESH': 0.1,
                            'POST_CENTER_LIMIT_RANGE': [0.0, -4.0, -3.0, 8.0, 4.0, 3.0],
                            'MAX_OBJ_PER_SAMPLE': 50,
                            'NMS_CONFIG': {'NMS_TYPE': 'nms_gpu', 'NMS_THRESH': 0.1,
                                           'NMS_PRE_MAXSIZE': 100, 'NMS_POST_MAXSIZE': 20}},
    }
    for key, val in over.items():
        node = cfg
        *path, leaf = key.split('.')
        for p in path:
            node = node[p]
        node[leaf] = val
    return EasyDict(cfg)


def make_head(cfg=None, channels=16):
    return CenterHead(cfg or head_cfg(), channels, 3, CLASSES, np.array(GRID), PC_RANGE,
                      voxel_size=VOXEL)


def ref_radius(sx, sy, o):
    """CenterNet's radius, written out case by case (the formula OpenPCDet ships)."""
    b1, c1 = sx + sy, sx * sy * (1 - o) / (1 + o)
    r1 = (b1 + math.sqrt(b1 ** 2 - 4 * c1)) / 2
    b2, c2 = 2 * (sx + sy), (1 - o) * sx * sy
    r2 = (b2 + math.sqrt(b2 ** 2 - 16 * c2)) / 2
    a3, b3, c3 = 4 * o, -2 * o * (sx + sy), (o - 1) * sx * sy
    r3 = (b3 + math.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def ref_gaussian_map(h, w, cx, cy, r):
    """Dense (h, w) Gaussian window of radius r around cell (cx, cy), zero outside it."""
    ys, xs = np.mgrid[0:h, 0:w]
    sigma = (2 * r + 1) / 6
    g = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma ** 2))
    g[(np.abs(xs - cx) > r) | (np.abs(ys - cy) > r)] = 0
    return g


# hand-made scene (cells of 0.4 m; x cell = x / 0.4, y cell = (y + 4) / 0.4)
CAR = [3.3, 1.1, -0.5, 4.0, 1.8, 1.5, 0.3, 1]        # cell x 8.25 -> 8, y 12.75 -> 12
PED = [6.1, -2.3, -0.9, 0.8, 0.6, 1.7, -2.0, 2]      # cell x 15.25 -> 15, y 4.25 -> 4
CYC = [1.0, -3.0, -0.7, 1.8, 0.6, 1.6, 3.0, 3]       # cell x 2.5 -> 2, y 2.5 -> 2
OUTSIDE = [9.0, 0.0, -0.5, 4.0, 1.8, 1.5, 0.0, 1]    # x beyond the 8 m range
FLAT = [5.0, 0.0, -0.5, 0.0, 1.8, 1.5, 0.0, 3]       # dx = 0: degenerate, ignored
PAD = [0.0] * 8


def scene():
    return torch.tensor([[CAR, OUTSIDE, PED, FLAT, CYC, PAD],
                         [PED, PAD, PAD, PAD, PAD, PAD]], dtype=torch.float32)


def test_gaussian_radius_matches_hand_formula():
    sx = torch.tensor([10.0, 2.0, 4.5, 30.0])
    sy = torch.tensor([4.5, 1.5, 10.0, 12.0])
    got = centernet.gaussian_radius(sx, sy, 0.1)
    want = [ref_radius(a, b, 0.1) for a, b in zip(sx.tolist(), sy.tolist())]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    # symmetric in the two sides, grows with the box
    np.testing.assert_allclose(got[0].item(), got[2].item(), rtol=1e-6)
    assert got[3] > got[0] > got[1]


def test_draw_gaussians_matches_dense_reference():
    heat = torch.zeros(2, 3, 9, 11)
    b = torch.tensor([0, 0, 1, 0])
    c = torch.tensor([1, 1, 2, 0])
    centers = torch.tensor([[2, 3], [4, 4], [10, 0], [0, 8]])  # [x, y]; two overlap, two at edges
    radii = torch.tensor([2, 1, 3, 0])
    centernet.draw_gaussians(heat, b, c, centers, radii)
    ref = np.zeros((2, 3, 9, 11))
    for bi, ci, (x, y), r in zip(b.tolist(), c.tolist(), centers.tolist(), radii.tolist()):
        ref[bi, ci] = np.maximum(ref[bi, ci], ref_gaussian_map(9, 11, x, y, r))
    np.testing.assert_allclose(heat.numpy(), ref, atol=1e-6)
    assert heat[0, 1, 3, 2] == 1 and heat[1, 2, 0, 10] == 1 and heat[0, 0, 8, 0] == 1


def test_target_assignment_hand_made_boxes():
    head = make_head()
    targets = head.assign_targets(scene(), (20, 20))
    car_t, pc_t = targets  # head 0: Car; head 1: Pedestrian (channel 0), Cyclist (channel 1)

    # masks: sample 0 has Car in head 0 (OUTSIDE ignored), PED + CYC in head 1 (FLAT ignored)
    assert car_t['mask'][0].tolist() == [True] + [False] * 5
    assert car_t['mask'][1].sum() == 0
    assert pc_t['mask'][0].tolist() == [True, True] + [False] * 4
    assert pc_t['mask'][1].tolist() == [True] + [False] * 5

    # heatmap peak = 1 at the object's cell, right channel
    assert car_t['heatmap'].shape == (2, 1, 20, 20) and pc_t['heatmap'].shape == (2, 2, 20, 20)
    assert car_t['heatmap'][0, 0, 12, 8] == 1
    assert pc_t['heatmap'][0, 0, 4, 15] == 1 and pc_t['heatmap'][0, 1, 2, 2] == 1
    assert pc_t['heatmap'][1, 0, 4, 15] == 1 and pc_t['heatmap'][1, 1].max() == 0
    assert car_t['heatmap'][1].max() == 0
    assert (car_t['heatmap'] == 1).sum() == 1 and (pc_t['heatmap'] == 1).sum() == 3

    # Gaussian radius of the car: 4.0 x 1.8 m = 10 x 4.5 cells, min radius 1
    r = max(1, int(ref_radius(10.0, 4.5, 0.1)))
    np.testing.assert_allclose(car_t['heatmap'][0, 0].numpy(),
                               ref_gaussian_map(20, 20, 8, 12, r), atol=1e-6)
    # the pedestrian is small: MIN_RADIUS wins
    assert int(ref_radius(2.0, 1.5, 0.1)) < 1
    np.testing.assert_allclose(pc_t['heatmap'][1, 0].numpy(),
                               ref_gaussian_map(20, 20, 15, 4, 1), atol=1e-6)

    # indices y * W + x and regression codes
    assert car_t['inds'][0, 0] == 12 * 20 + 8
    assert pc_t['inds'][0, :2].tolist() == [4 * 20 + 15, 2 * 20 + 2]
    want_car = [0.25, 0.75, -0.5, math.log(4.0), math.log(1.8), math.log(1.5), math.cos(0.3),
                math.sin(0.3)]
    np.testing.assert_allclose(car_t['target_boxes'][0, 0].numpy(), want_car, atol=1e-5)
    want_ped = [0.25, 0.25, -0.9, math.log(0.8), math.log(0.6), math.log(1.7), math.cos(-2.0),
                math.sin(-2.0)]
    np.testing.assert_allclose(pc_t['target_boxes'][0, 0].numpy(), want_ped, atol=1e-5)
    np.testing.assert_allclose(pc_t['target_boxes'][1, 0].numpy(), want_ped, atol=1e-5)
    assert car_t['target_boxes'][0, 1:].abs().sum() == 0


def test_num_max_objs_caps_assigned_objects():
    boxes = torch.tensor([[PED, CYC, [4.0, 2.0, -0.5, 0.8, 0.6, 1.7, 0, 2]]])
    labels = torch.tensor([[0, 1, 0]])
    t = centernet.assign_center_targets(boxes[..., :7], labels, 2, (20, 20), PC_RANGE, VOXEL,
                                        STRIDE, num_max_objs=2, gaussian_overlap=0.1,
                                        min_radius=1)
    assert t['mask'].tolist() == [[True, True]]
    assert (t['heatmap'] == 1).sum() == 2  # the third object is neither drawn nor regressed


def test_gather_and_decode_topk_against_brute_force():
    g = torch.Generator().manual_seed(1)
    heat = torch.rand(2, 3, 5, 7, generator=g)
    center, cz = torch.rand(2, 2, 5, 7, generator=g), torch.randn(2, 1, 5, 7, generator=g)
    dim, rot = torch.randn(2, 3, 5, 7, generator=g), torch.randn(2, 2, 5, 7, generator=g)
    boxes, scores, labels = centernet.decode_centers(heat, center, cz, dim, rot, PC_RANGE, VOXEL,
                                                     STRIDE, k=9)
    for b in range(2):
        flat = heat[b].reshape(-1).numpy()
        order = np.argsort(-flat, kind='stable')[:9]
        np.testing.assert_allclose(scores[b].numpy(), flat[order])
        for j, idx in enumerate(order):
            c, rest = divmod(int(idx), 35)
            y, x = divmod(rest, 7)
            assert labels[b, j] == c
            want = [(x + center[b, 0, y, x]) * 0.4, (y + center[b, 1, y, x]) * 0.4 - 4.0,
                    cz[b, 0, y, x], *torch.exp(dim[b, :, y, x]),
                    math.atan2(rot[b, 1, y, x], rot[b, 0, y, x])]
            np.testing.assert_allclose(boxes[b, j].numpy(), torch.tensor(want).numpy(),
                                       rtol=1e-5, atol=1e-5)
    # k larger than the map is capped
    assert centernet.decode_centers(heat, center, cz, dim, rot, PC_RANGE, VOXEL, STRIDE,
                                    k=1000)[0].shape == (2, 105, 7)


def perfect_predictions(head, targets, batch=2, hw=(20, 20)):
    """Maps a perfect head would output: logits +-20 on the heatmaps, exact codes at objects."""
    preds = []
    for t in targets:
        pred = {'hm': torch.where(t['heatmap'] == 1, 20.0, -20.0)}
        code = torch.zeros(batch, 8, hw[0] * hw[1], device=t['heatmap'].device)
        for b in range(batch):
            m = t['mask'][b]
            code[b][:, t['inds'][b][m]] = t['target_boxes'][b][m].T
        code = code.view(batch, 8, *hw)
        pred.update(center=code[:, 0:2], center_z=code[:, 2:3], dim=code[:, 3:6],
                    rot=code[:, 6:8])
        preds.append(pred)
    return preds


def test_decode_round_trip_gives_back_the_boxes(device):
    head = make_head().eval().to(device)
    gt = scene().to(device)
    preds = perfect_predictions(head, head.assign_targets(gt, (20, 20)))
    out = head.generate_predicted_boxes(2, preds)
    for b, want in enumerate([[CAR, PED, CYC], [PED]]):
        want = torch.tensor(want)
        got = {k: v.cpu() for k, v in out[b].items()}
        assert out[b]['pred_boxes'].device.type == device.type
        assert got['pred_boxes'].shape == (len(want), 7)
        assert got['pred_labels'].dtype == torch.long
        # match by label (1-based into CLASSES)
        order = torch.argsort(got['pred_labels'])
        np.testing.assert_array_equal(got['pred_labels'][order].numpy(),
                                      want[:, 7].long().numpy())
        np.testing.assert_allclose(got['pred_boxes'][order].numpy(), want[:, :7].numpy(),
                                   atol=1e-4)
        assert (got['pred_scores'] > 0.99).all()


def test_decode_filters_score_range_and_nms():
    head = make_head().eval()
    gt = torch.tensor([[CAR, PED, CYC]])
    targets = head.assign_targets(gt, (20, 20))
    preds = perfect_predictions(head, targets, batch=1)
    # a duplicate car one cell to the right with a lower score: suppressed by NMS
    preds[0]['hm'][0, 0, 12, 9] = 3.0
    preds[0]['center'][0, :, 12, 9] = torch.tensor([-0.75, 0.75])
    preds[0]['center_z'][0, 0, 12, 9] = -0.5
    preds[0]['dim'][0, :, 12, 9] = preds[0]['dim'][0, :, 12, 8]
    preds[0]['rot'][0, :, 12, 9] = preds[0]['rot'][0, :, 12, 8]
    # the cyclist's score drops below SCORE_THRESH
    preds[1]['hm'][0, 1, 2, 2] = -3.0  # sigmoid = 0.047 < 0.1
    # the pedestrian's z leaves POST_CENTER_LIMIT_RANGE (|z| <= 3)
    preds[1]['center_z'][0, 0, 4, 15] = 5.0
    out = head.generate_predicted_boxes(1, preds)[0]
    assert out['pred_labels'].tolist() == [1]
    np.testing.assert_allclose(out['pred_boxes'][0].numpy(), CAR[:7], atol=1e-4)


def test_loss_zero_for_perfect_predictions_positive_otherwise():
    head = make_head().train()
    gt = scene()
    targets = head.assign_targets(gt, (20, 20))
    preds = perfect_predictions(head, targets)
    head.forward_ret_dict = {'pred_dicts': preds, 'target_dicts': targets}
    loss, tb = head.get_loss()
    assert loss.item() < 1e-5
    assert set(tb) == {'hm_loss_head_0', 'loc_loss_head_0', 'hm_loss_head_1', 'loc_loss_head_1',
                       'rpn_loss'}

    # z off by 0.5 at the car: loc loss = 0.5 * code_weight(z)=2 * loc_weight 0.25 / 1 object
    preds[0]['center_z'] = preds[0]['center_z'].clone()
    preds[0]['center_z'][0, 0, 12, 8] += 0.5
    loss, tb = head.get_loss()
    np.testing.assert_allclose(tb['loc_loss_head_0'], 0.5 * 2.0 * 0.25, rtol=1e-5)
    # an error at a cell without an object costs nothing in the regression
    preds[1]['dim'] = preds[1]['dim'].clone()
    preds[1]['dim'][1, :, 10, 10] += 3.0
    assert head.get_loss()[1]['loc_loss_head_1'] < 1e-6

    # uninformative heatmaps: positive focal loss
    preds[1]['hm'] = torch.zeros_like(preds[1]['hm'])
    loss, tb = head.get_loss()
    assert tb['hm_loss_head_1'] > 0.1 and loss.item() > 0.1


def test_forward_backward_and_eval_outputs(device):
    head = make_head().train().to(device)
    feats = torch.randn(2, 16, 20, 20, device=device, requires_grad=True)
    batch = {'spatial_features_2d': feats, 'gt_boxes': scene().to(device), 'batch_size': 2}
    head(batch)
    loss, _ = head.get_loss()
    loss.backward()
    assert torch.isfinite(loss) and feats.grad.abs().sum() > 0
    assert all(p.grad is not None for p in head.parameters())

    head.eval()
    with torch.no_grad():
        out = head({'spatial_features_2d': feats.detach(), 'batch_size': 2})['final_box_dicts']
    assert len(out) == 2
    for d in out:
        assert d['pred_boxes'].shape[1] == 7 and d['pred_boxes'].shape[0] == \
            d['pred_scores'].shape[0] == d['pred_labels'].shape[0]
        assert d['pred_boxes'].shape[0] <= 2 * 20  # NMS_POST_MAXSIZE per head
        assert ((d['pred_labels'] >= 1) & (d['pred_labels'] <= 3)).all()
        assert (d['pred_scores'] > 0.1).all()


def test_heatmap_bias_init_and_parameter_names():
    head = make_head()
    for sub in head.heads_list:
        assert torch.allclose(sub.hm[-1].bias, torch.full_like(sub.hm[-1].bias, -2.19))
    names = dict(head.named_parameters())
    # OpenPCDet's CenterHead parameter layout
    assert 'shared_conv.0.weight' in names and 'heads_list.1.hm.1.bias' in names
    assert 'heads_list.0.center.0.0.weight' in names
    assert head.heads_list[1].hm[-1].out_channels == 2


def test_feature_map_stride_mismatch_is_one_clear_error():
    head = make_head(head_cfg(**{'TARGET_ASSIGNER_CONFIG.FEATURE_MAP_STRIDE': 1})).train()
    batch = {'spatial_features_2d': torch.randn(1, 16, 20, 20), 'gt_boxes': scene()[:1],
             'batch_size': 1}
    with pytest.raises(InputError) as err:
        head(batch)
    msg = str(err.value)
    assert 'TARGET_ASSIGNER_CONFIG.FEATURE_MAP_STRIDE=1' in msg and '40 x 40' in msg
    assert 'set FEATURE_MAP_STRIDE: 2' in msg and '\n' not in msg


def test_odd_grid_uses_ceil():
    head = CenterHead(head_cfg(), 16, 3, CLASSES, np.array([41, 39, 20]), PC_RANGE,
                      voxel_size=VOXEL)
    assert head.expected_map_size() == (20, 21)


@pytest.mark.parametrize('key,val,words', [
    ('CLASS_NAMES_EACH_HEAD', [['Car'], ['Pedestrian']], 'missing'),
    ('CLASS_NAMES_EACH_HEAD', [['Car', 'Pedestrian'], ['Pedestrian', 'Cyclist']], 'repeated'),
    ('SEPARATE_HEAD_CFG.HEAD_DICT.iou', {'out_channels': 1, 'num_conv': 2}, 'iou'),
    ('SEPARATE_HEAD_CFG.HEAD_DICT.dim', {'out_channels': 2, 'num_conv': 2}, 'out_channels=2'),
    ('SEPARATE_HEAD_CFG.HEAD_ORDER', ['center', 'dim', 'center_z', 'rot'], 'HEAD_ORDER'),
    ('LOSS_CONFIG.LOSS_WEIGHTS.code_weights', [1.0] * 7, 'code_weights'),
    ('POST_PROCESSING.NMS_CONFIG.NMS_TYPE', 'circle_nms', 'NMS_TYPE'),
    ('TARGET_ASSIGNER_CONFIG.GAUSSIAN_OVERLAP', 1.5, 'GAUSSIAN_OVERLAP'),
    ('TARGET_ASSIGNER_CONFIG.FEATURE_MAP_STRIDE', 0, 'FEATURE_MAP_STRIDE'),
])
def test_config_errors_name_the_field(key, val, words):
    with pytest.raises(ConfigError) as err:
        make_head(head_cfg(**{key: val}))
    assert words in str(err.value) and '\n' not in str(err.value)


def test_bad_class_id_in_gt_boxes():
    head = make_head().train()
    gt = scene()
    gt[0, 0, 7] = 4
    with pytest.raises(InputError, match='class ids must be 1..3'):
        head.assign_targets(gt, (20, 20))


def test_assignment_many_objects_on_a_large_map():
    """2 x 50 objects on a 200 x 250 map: one slot each, one peak each (unless two share a
    cell), drawn without a per-object loop."""
    g = torch.Generator().manual_seed(0)
    n = 50
    boxes = torch.zeros(2, n, 8)
    boxes[..., 0] = torch.rand(2, n, generator=g) * 100
    boxes[..., 1] = torch.rand(2, n, generator=g) * 80 - 40
    boxes[..., 3:6] = torch.tensor([4.0, 1.8, 1.5])
    boxes[..., 7] = 1
    labels = torch.zeros(2, n, dtype=torch.long)
    t = centernet.assign_center_targets(boxes[..., :7], labels, 1, (200, 250),
                                        [0, -40, -3, 100, 40, 1], [0.4, 0.4, 0.2], 1)
    assert t['mask'].sum() == 2 * n
    for b in range(2):
        cells = set(t['inds'][b][t['mask'][b]].tolist())
        assert (t['heatmap'][b, 0].reshape(-1) == 1).nonzero().view(-1).tolist() == sorted(cells)
