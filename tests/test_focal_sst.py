"""FocalSST: focal losses, focal dilation, FocalSSTEncoder and FocalSSTDSVT.

References are written here: closed-form numpy losses, a python-loop dilation over voxels and
offsets, a dense conv3d re-computation of a focal block, numpy voxel-centre-in-box targets.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from easydict import EasyDict

from pcdet_focal.errors import ConfigError, InputError
from pcdet_focal.models.focal_sst import FocalSSTDSVT, FocalSSTEncoder
from pcdet_focal.ops.focal_dilation import focal_dilation, kernel_offsets
from pcdet_focal.ops.losses import gaussian_focal_loss, sigmoid_focal_loss

GRID = [20, 16, 8]                  # x, y, z  -> spconv [D, H, W] = [8, 16, 20]
VOXEL = [0.5, 0.5, 0.5]
PCR = [0.0, -4.0, -2.0, 10.0, 4.0, 2.0]


# ============================================================================ losses

def np_sigmoid_focal(x, t, alpha, gamma):
    p = 1.0 / (1.0 + np.exp(-x))
    pos = -alpha * t * (1 - p) ** gamma * np.log(p)
    neg = -(1 - alpha) * (1 - t) * p ** gamma * np.log(1 - p)
    return pos + neg


def test_sigmoid_focal_loss_matches_formula():
    rng = np.random.default_rng(0)
    x = rng.uniform(-6, 6, size=(7, 5))
    t = (rng.uniform(size=(7, 5)) > 0.6).astype(np.float64)
    for alpha, gamma in ((0.25, 2.0), (0.5, 0.0), (0.9, 1.5)):
        ref = np_sigmoid_focal(x, t, alpha, gamma)
        xt, tt = torch.tensor(x, dtype=torch.float32), torch.tensor(t, dtype=torch.float32)
        got = sigmoid_focal_loss(xt, tt, alpha, gamma, reduction='none')
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(sigmoid_focal_loss(xt, tt, alpha, gamma).item(), ref.mean(),
                                   rtol=1e-5)
        np.testing.assert_allclose(sigmoid_focal_loss(xt, tt, alpha, gamma, 'sum').item(),
                                   ref.sum(), rtol=1e-5)
    # alpha < 0: no class weighting = the unweighted focal term
    ref = np_sigmoid_focal(x, t, 0.5, 2.0) * 2
    got = sigmoid_focal_loss(torch.tensor(x), torch.tensor(t), -1, 2.0, 'none')
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10)


def test_sigmoid_focal_loss_is_stable_for_large_logits_and_empty_input():
    x = torch.tensor([100.0, -100.0, 100.0, -100.0, 30.0], requires_grad=True)
    t = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    loss = sigmoid_focal_loss(x, t, 0.25, 2.0, 'none')
    assert torch.isfinite(loss).all()
    # confidently right -> ~0; confidently wrong -> weight * |logit| (BCE asymptote)
    np.testing.assert_allclose(loss.detach().numpy(), [0, 0, 0.75 * 100, 0.25 * 100, 0],
                               atol=1e-6)
    loss.sum().backward()
    assert torch.isfinite(x.grad).all()
    empty = torch.zeros(0, requires_grad=True)
    zero = sigmoid_focal_loss(empty, torch.zeros(0))
    assert zero.item() == 0.0
    zero.backward()                                   # still attached to the graph
    with pytest.raises(InputError, match='reduction'):
        sigmoid_focal_loss(x, t, reduction='avg')
    with pytest.raises(InputError, match='shape'):
        sigmoid_focal_loss(x, t[:3])


def np_gaussian_focal(pred, gt, alpha=2.0, beta=4.0):
    p = np.clip(pred, 1e-4, 1 - 1e-4)
    total, npos = 0.0, 0
    for pi, gi in zip(p.ravel(), gt.ravel()):
        if gi == 1:
            total -= (1 - pi) ** alpha * math.log(pi)
            npos += 1
        else:
            total -= (1 - gi) ** beta * pi ** alpha * math.log(1 - pi)
    return total / max(npos, 1)


def test_gaussian_focal_loss_matches_formula():
    rng = np.random.default_rng(1)
    gt = rng.uniform(size=(2, 3, 6, 5)) ** 3
    gt[0, 1, 2, 3] = gt[1, 0, 4, 4] = gt[1, 2, 0, 0] = 1.0
    pred = rng.uniform(size=gt.shape)
    pred[0, 0, 0, 0], pred[0, 0, 0, 1] = 0.0, 1.0        # clamped, log stays finite
    got = gaussian_focal_loss(torch.tensor(pred, dtype=torch.float32),
                              torch.tensor(gt, dtype=torch.float32))
    assert got.dim() == 0
    np.testing.assert_allclose(got.item(), np_gaussian_focal(pred, gt), rtol=1e-5)
    for a, b in ((1.0, 2.0), (3.0, 1.0)):
        np.testing.assert_allclose(
            gaussian_focal_loss(torch.tensor(pred), torch.tensor(gt), a, b).item(),
            np_gaussian_focal(pred, gt, a, b), rtol=1e-9)
    gt_no_pos = np.minimum(gt, 0.9)                      # no positive: normalised by 1
    np.testing.assert_allclose(
        gaussian_focal_loss(torch.tensor(pred), torch.tensor(gt_no_pos)).item(),
        np_gaussian_focal(pred, gt_no_pos), rtol=1e-9)


# ============================================================================ dilation

def brute_dilation(coords, imp, shape, threshold, topk_ratio=None, k=3, max_new_ratio=None):
    """Python loops over voxels and offsets: (union coords list, important list, spawns list)."""
    coords = [tuple(int(v) for v in c) for c in coords]
    imp = np.asarray(imp, dtype=np.float64)
    r = k // 2
    offsets = [(dz, dy, dx) for dz in range(-r, r + 1) for dy in range(-r, r + 1)
               for dx in range(-r, r + 1) if (dz, dy, dx) != (0, 0, 0)]
    n = len(coords)
    if topk_ratio is None:
        important = [imp[i, -1] >= threshold for i in range(n)]
    else:
        important = [False] * n
        for b in {c[0] for c in coords}:
            members = [i for i in range(n) if coords[i][0] == b]
            members.sort(key=lambda i: (-imp[i, -1], i))
            for i in members[:int(math.floor(len(members) * topk_ratio))]:
                important[i] = True
    where = {c: i for i, c in enumerate(coords)}
    union, spawns = list(coords), []
    for i, (b, z, y, x) in enumerate(coords):
        if not important[i]:
            continue
        for j, (dz, dy, dx) in enumerate(offsets):
            if imp[i, j] < threshold:
                continue
            t = (b, z + dz, y + dy, x + dx)
            if not all(0 <= t[a + 1] < shape[a] for a in range(3)):
                continue
            if t not in where:
                where[t] = len(union)
                union.append(t)
            spawns.append((i, j, where[t]))
    if max_new_ratio is None:
        return union, important, spawns
    # cap: per sample keep the floor(r * n_b) new voxels with the best spawn importance
    # (ties: earliest first spawn), drop the spawns into the others, renumber the survivors
    best, first = {}, {}
    for pos, (i, j, dst) in enumerate(spawns):
        if dst >= n:
            best[dst] = max(best.get(dst, -1.0), imp[i, j])
            first.setdefault(dst, pos)
    kept = set()
    for b in {c[0] for c in coords}:
        members = sorted((dst for dst in best if union[dst][0] == b),
                         key=lambda dst: (-best[dst], first[dst]))
        n_b = sum(1 for c in coords if c[0] == b)
        kept.update(members[:int(math.floor(n_b * max_new_ratio))])
    spawns = [sp for sp in spawns if sp[2] < n or sp[2] in kept]
    renum, new_union = {}, list(coords)
    for _, _, dst in spawns:
        if dst >= n and dst not in renum:
            renum[dst] = len(new_union)
            new_union.append(union[dst])
    return new_union, important, [(i, j, renum.get(dst, dst)) for i, j, dst in spawns]


def random_voxels(rng, n, shape, batch=2):
    cells = set()
    while len(cells) < n:
        cells.add((int(rng.integers(batch)), *(int(rng.integers(s)) for s in shape)))
    return torch.tensor(sorted(cells, key=lambda c: rng.random()), dtype=torch.int32)


def check_against_brute(coords, imp, shape, threshold, topk_ratio=None, k=3,
                        max_new_ratio=None):
    d = focal_dilation(coords, imp, shape, threshold, topk_ratio, max_new_ratio)
    union, important, spawns = brute_dilation(coords.tolist(), imp.numpy(), shape, threshold,
                                              topk_ratio, k, max_new_ratio)
    assert d.coords.dtype == torch.int32
    assert d.coords.tolist() == [list(c) for c in union]
    assert d.num_new == len(union) - len(coords)
    assert d.important.tolist() == important
    got = list(zip(d.spawn_src.tolist(), d.spawn_offset.tolist(), d.spawn_dst.tolist()))
    assert got == spawns
    return d


def test_kernel_offsets_order():
    off = kernel_offsets(3)
    assert off.shape == (26, 3)
    assert off[0].tolist() == [-1, -1, -1] and off[1].tolist() == [-1, -1, 0]
    assert off[12].tolist() == [0, 0, -1] and off[13].tolist() == [0, 0, 1]
    assert off[-1].tolist() == [1, 1, 1]
    assert kernel_offsets(5).shape == (124, 3)


@pytest.mark.parametrize('threshold, topk', [(0.5, None), (0.3, None), (0.6, 0.3), (0.5, 1.0)])
def test_dilation_matches_brute_force(device, threshold, topk):
    rng = np.random.default_rng(2)
    shape = [3, 4, 5]
    coords = random_voxels(rng, 25, shape)
    imp = torch.rand(25, 27, dtype=torch.float64)
    d = check_against_brute(coords, imp, shape, threshold, topk)
    assert d.num_new > 5
    if device.type != 'cpu':        # same answer on the accelerator
        dd = focal_dilation(coords.to(device), imp.to(device), shape, threshold, topk)
        assert torch.equal(dd.coords.cpu(), d.coords)
        assert torch.equal(dd.spawn_dst.cpu(), d.spawn_dst)


def test_dilation_kernel_5_matches_brute_force():
    rng = np.random.default_rng(3)
    shape = [4, 5, 6]
    coords = random_voxels(rng, 12, shape)
    check_against_brute(coords, torch.rand(12, 125), shape, 0.7, None, k=5)


def test_dilation_bounds_at_grid_edges():
    shape = [3, 3, 3]
    corners = torch.tensor([[0, 0, 0, 0], [0, 2, 2, 2], [1, 0, 2, 0], [1, 1, 1, 1]],
                           dtype=torch.int32)
    imp = torch.ones(4, 27)
    d = check_against_brute(corners, imp, shape, 0.5)
    assert (d.coords[:, 1:] >= 0).all() and (d.coords[:, 1:] < 3).all()
    # sample 0: opposite corners, 7 in-grid neighbours each, sharing the centre: 2 + 7 + 6;
    # sample 1: the centre voxel's 26 neighbours fill the 3x3x3 cube
    assert (d.coords[:, 0] == 0).sum() == 15 and (d.coords[:, 0] == 1).sum() == 27
    one = check_against_brute(corners[:1], imp[:1], shape, 0.5)
    assert one.num_new == 7                             # a corner has 7 in-grid neighbours


@pytest.mark.parametrize('ratio', [0.0, 0.3, 1.0, 3.0])
def test_dilation_cap_matches_brute_force(ratio):
    rng = np.random.default_rng(7)
    shape = [5, 6, 7]
    coords = random_voxels(rng, 40, shape)
    imp = torch.from_numpy(rng.random((40, 27))).float()
    imp[0:39:3, 5] = imp[1:40:3, 5]  # equal importances: ties are broken by first spawn
    d = check_against_brute(coords, imp, shape, 0.5, max_new_ratio=ratio)
    uncapped = focal_dilation(coords, imp, shape, 0.5)
    for b in (0, 1):
        n_b = int((coords[:, 0] == b).sum())
        new_b = int((d.coords[len(coords):, 0] == b).sum())
        assert new_b <= math.floor(ratio * n_b)
        assert new_b == min(math.floor(ratio * n_b),
                            int((uncapped.coords[len(coords):, 0] == b).sum()))


def test_dilation_deduplicates_shared_and_existing_neighbours():
    # voxels at x=0 and x=2 (one z, y) both spawn x=1 only; x=4 spawns x=3 and x=5 (existing)
    coords = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 2], [0, 0, 0, 4], [0, 0, 0, 5],
                           [1, 0, 0, 1]], dtype=torch.int32)
    imp = torch.zeros(5, 27)
    imp[:, -1] = torch.tensor([0.9, 0.9, 0.9, 0.1, 0.1])
    plus_x, minus_x = 13, 12                            # offsets (0, 0, +1) and (0, 0, -1)
    imp[0, plus_x] = imp[1, minus_x] = 0.5           # exactly the threshold: passes
    imp[2, plus_x] = imp[2, minus_x] = 0.8
    imp[3, :-1] = imp[4, :-1] = 1.0                     # unimportant: never spawn
    d = check_against_brute(coords, imp, [1, 1, 8], 0.5)
    assert d.coords.tolist() == coords.tolist() + [[0, 0, 0, 1], [0, 0, 0, 3]]
    assert d.spawn_dst.tolist() == [5, 5, 6, 3]
    # the same cell in another sample is a different voxel: (1, 0, 0, 1) exists but (0, 0, 0, 1)
    # is new, and nothing is spawned into sample 1


def test_dilation_empty_and_nothing_important():
    d = focal_dilation(torch.zeros(0, 4, dtype=torch.int32), torch.zeros(0, 27), [2, 2, 2])
    assert d.coords.shape == (0, 4) and d.num_new == 0 and d.spawn_dst.numel() == 0
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 1]], dtype=torch.int32)
    d = focal_dilation(coords, torch.full((2, 27), 0.4), [2, 2, 2], 0.5)
    assert torch.equal(d.coords, coords) and d.num_new == 0
    d = focal_dilation(coords, torch.full((2, 27), 0.4), [2, 2, 2], 0.5, topk_ratio=0.4)
    assert not d.important.any()                        # floor(2 * 0.4) = 0 voxels


def test_dilation_rejects_bad_input():
    coords = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.int32)
    with pytest.raises(InputError, match='duplicate'):
        focal_dilation(coords, torch.ones(2, 27), [2, 2, 2])
    with pytest.raises(InputError, match='K\\^3'):
        focal_dilation(coords[:1], torch.ones(1, 26), [2, 2, 2])
    with pytest.raises(InputError, match='one row per voxel'):
        focal_dilation(coords[:1], torch.ones(2, 27), [2, 2, 2])
    with pytest.raises(InputError, match='topk_ratio'):
        focal_dilation(coords[:1], torch.ones(1, 27), [2, 2, 2], topk_ratio=0.0)


# ============================================================================ encoder

def encoder_cfg(**kw):
    cfg = {'NAME': 'FocalSSTEncoder', 'NUM_FILTERS': [8, 12, 16], 'KERNEL_SIZE': 3,
           'IMPORTANCE_THRESHOLD': 0.5, 'LOSS_WEIGHT': 1.0}
    cfg.update(kw)
    return EasyDict(cfg)


def build_encoder(cfg=None, in_ch=4, **kw):
    return FocalSSTEncoder(cfg if cfg is not None else encoder_cfg(), in_ch,
                           grid_size=np.array(GRID), voxel_size=VOXEL, point_cloud_range=PCR, **kw)


def scene(n=150, batch=2, in_ch=4, seed=0, device='cpu'):
    rng = np.random.default_rng(seed)
    coords = random_voxels(rng, n, GRID[::-1], batch)
    gt = torch.zeros(batch, 3, 8)
    gt[0, 0] = torch.tensor([4.0, 0.5, 0.0, 4.0, 3.0, 2.0, 0.4, 1])
    gt[0, 1] = torch.tensor([8.0, -2.0, -0.5, 2.0, 2.0, 2.0, -1.0, 2])
    if batch > 1:
        gt[1, 0] = torch.tensor([2.0, 2.0, 0.5, 3.0, 2.5, 2.0, 1.2, 1])
    return {'voxel_features': torch.randn(n, in_ch, generator=torch.Generator().manual_seed(seed))
            .to(device), 'voxel_coords': coords.to(device), 'batch_size': batch,
            'gt_boxes': gt.to(device)}


def open_own_gate(enc, bias=0.0):
    """Own-importance bias 0 (instead of the low prior) so about half the voxels dilate."""
    with torch.no_grad():
        for block in enc.blocks:
            block.imp_bias[-1] = bias


def test_encoder_forward_backward_outputs(device):
    enc = build_encoder().to(device).train()
    open_own_gate(enc)
    batch = scene(device=device)
    coords_in = batch['voxel_coords'].clone()
    out = enc(batch)
    feats, coords = out['voxel_features'], out['voxel_coords']
    assert enc.num_point_features == 16 and feats.shape == (coords.shape[0], 16)
    assert feats.device.type == device.type and coords.dtype == torch.int32
    assert torch.equal(coords[:coords_in.shape[0]], coords_in)   # input voxels first, in order
    assert coords.shape[0] > coords_in.shape[0]                  # something dilated
    assert torch.unique(coords, dim=0).shape[0] == coords.shape[0]
    hi = torch.tensor([2, *GRID[::-1]], device=device)
    assert ((coords >= 0) & (coords < hi)).all()
    sp = out['encoded_spconv_tensor']
    assert out['encoded_spconv_tensor_stride'] == 1 and list(sp.spatial_shape) == GRID[::-1]
    assert torch.equal(sp.indices, coords) and sp.features is feats
    loss, tb = enc.get_loss()
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert set(tb) >= {'focal_imp_loss', 'focal_imp_loss_0', 'focal_imp_loss_1',
                       'focal_fg_ratio_0', 'focal_new_voxels_1'}
    (loss + feats.square().mean()).backward()
    assert enc.stem_conv.weight.grad.abs().sum() > 0
    for block in enc.blocks:
        assert block.conv.weight.grad.abs().sum() > 0


def test_importance_loss_reaches_conv_imp_and_matches_formula():
    enc = build_encoder(encoder_cfg(LOSS_WEIGHT=2.5, FOCAL_ALPHA=0.4, FOCAL_GAMMA=1.5)).train()
    open_own_gate(enc)
    captured = []
    for block in enc.blocks:
        block.conv_imp.register_forward_hook(lambda m, i, o: captured.append(o.features))
    enc(scene())
    loss, _ = enc.get_loss()
    expected = 0.0
    for i, logits in enumerate(captured):
        t = enc.last_stats[f'foreground_{i}'].double().numpy()
        x = logits[:, -1].detach().double().numpy()
        expected += np_sigmoid_focal(x, t, 0.4, 1.5).mean()
    np.testing.assert_allclose(loss.item(), 2.5 * expected, rtol=1e-5)
    loss.backward()                                   # the importance loss alone
    for block in enc.blocks:
        grad = block.conv_imp.weight.grad
        assert grad[-1].abs().sum() > 0               # own-importance channel is trained
        assert block.imp_bias.grad[-1] != 0
    assert enc.stem_conv.weight.grad.abs().sum() > 0  # and the features feeding it


def test_offset_channels_get_gradient_through_spawn_targets():
    enc = build_encoder(encoder_cfg(NUM_FILTERS=[8, 8])).train()
    with torch.no_grad():                             # everything important, every offset passes
        enc.blocks[0].imp_bias.fill_(5.0)
    out = enc(scene(n=300))
    out['voxel_features'].sum().backward()
    grad = enc.blocks[0].conv_imp.weight.grad.abs().sum(dim=(1, 2, 3, 4))
    assert (grad[:-1] > 0).sum() >= 20                # most of the 26 offset channels


def np_voxel_targets(coords, gt_boxes):
    """coords (N, 4) [b, z, y, x], gt (B, M, 8) -> (N,) bool, voxel centre in a box of its
    sample (closed boxes; zero rows ignored)."""
    out = np.zeros(len(coords), dtype=bool)
    for i, (b, z, y, x) in enumerate(coords):
        centre = [(x + 0.5) * VOXEL[0] + PCR[0], (y + 0.5) * VOXEL[1] + PCR[1],
                  (z + 0.5) * VOXEL[2] + PCR[2]]
        for box in gt_boxes[b]:
            cx, cy, cz, dx, dy, dz, yaw = box[:7]
            if dx <= 0:
                continue
            ddx, ddy = centre[0] - cx, centre[1] - cy
            lx = math.cos(yaw) * ddx + math.sin(yaw) * ddy
            ly = -math.sin(yaw) * ddx + math.cos(yaw) * ddy
            if abs(lx) <= dx / 2 and abs(ly) <= dy / 2 and abs(centre[2] - cz) <= dz / 2:
                out[i] = True
    return out


def test_loss_targets_are_voxel_centres_inside_boxes_of_the_same_sample():
    enc = build_encoder().train()
    open_own_gate(enc)
    batch = scene(n=400)
    gt = batch['gt_boxes'].numpy().astype(np.float64)
    coords_in = batch['voxel_coords'].numpy()
    enc(batch)
    t0 = enc.last_stats['foreground_0'].numpy()
    ref0 = np_voxel_targets(coords_in, gt)
    np.testing.assert_array_equal(t0, ref0)
    assert 10 < ref0.sum() < len(ref0)
    # the scene is such that labelling a voxel with another sample's boxes changes targets
    assert (np_voxel_targets(coords_in, gt[[1, 0]]) != ref0).any()
    union = batch['voxel_coords'].numpy()    # the final union now
    t1 = enc.last_stats['foreground_1'].numpy()
    n1 = len(t1)   # block 1's input = block 0's union = the prefix of the final union
    assert n1 > len(coords_in)
    np.testing.assert_array_equal(t1, np_voxel_targets(union[:n1], gt))


def dense_subm(feats, coords, weight, bias, shape, batch):
    """SubM conv as a dense conv3d on a zero-filled grid, read back at the active sites."""
    c = coords.long()
    grid = feats.new_zeros((batch, feats.shape[1], *shape))
    grid[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]] = feats
    w = weight.permute(0, 4, 1, 2, 3)   # spconv (O, kz, ky, kx, I) -> torch (O, I, kz, ky, kx)
    out = F.conv3d(grid, w, bias, padding=weight.shape[1] // 2)
    return out[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]]


def bn_eval(bn, x):
    return (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias


def test_focal_block_matches_dense_reference():
    """Stem + one focal block (eval mode, float64) recomputed densely with brute-force dilation
    and the spawn-target scaling written out here."""
    enc = build_encoder(encoder_cfg(NUM_FILTERS=[6, 5], MAX_NEW_VOXELS_RATIO=None)).double().eval()
    open_own_gate(enc)
    with torch.no_grad():
        for bn in (enc.stem_bn, enc.blocks[0].bn):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    batch = scene(n=120)
    feats = batch['voxel_features'].double()
    coords = batch['voxel_coords'].clone()
    batch['voxel_features'] = feats
    out = enc(batch)
    shape = GRID[::-1]
    block = enc.blocks[0]
    with torch.no_grad():
        x = torch.relu(bn_eval(enc.stem_bn, dense_subm(feats, coords, enc.stem_conv.weight, None,
                                                       shape, 2)))
        imp = torch.sigmoid(dense_subm(x, coords, block.conv_imp.weight, block.imp_bias,
                                       shape, 2)).numpy()
        assert np.abs(imp - 0.5).min() > 1e-9          # no decision sits on the threshold
        union, important, spawns = brute_dilation(coords.tolist(), imp, shape, 0.5)
        scale = np.ones(len(coords))
        hits = {}
        for src, off, dst in spawns:
            if dst < len(coords) and important[dst]:
                hits.setdefault(dst, []).append(imp[src, off])
        for dst, vals in hits.items():
            scale[dst] = (1 + sum(vals)) / (1 + len(vals))
        assert hits and important.count(True) > 10
        xu = torch.cat([x * torch.tensor(scale)[:, None], x.new_zeros(len(union) - len(coords),
                                                                      x.shape[1])])
        uc = torch.tensor(union, dtype=torch.int32)
        ref = torch.relu(bn_eval(block.bn, dense_subm(xu, uc, block.conv.weight, None, shape, 2)))
    assert out['voxel_coords'].tolist() == [list(u) for u in union]
    torch.testing.assert_close(out['voxel_features'], ref, rtol=1e-9, atol=1e-10)


def test_top_fraction_mode_dilates_that_fraction(monkeypatch):
    from pcdet_focal.models import focal_sst
    enc = build_encoder(encoder_cfg(NUM_FILTERS=[8, 8], TOPK_RATIO=0.25)).train()
    with torch.no_grad():
        enc.blocks[0].imp_bias[:-1] = 10.0            # every offset passes the threshold
    seen = []

    def spy(*args, **kwargs):
        seen.append(focal_dilation(*args, **kwargs))
        return seen[-1]
    monkeypatch.setattr(focal_sst, 'focal_dilation', spy)
    batch = scene(n=200)
    counts = torch.bincount(batch['voxel_coords'][:, 0].long(), minlength=2)
    enc(batch)
    d = seen[0]
    b = d.coords[:200, 0].long()
    for s in range(2):   # per sample: floor(n_s * 0.25) voxels, whatever their importance
        assert d.important[b == s].sum() == math.floor(counts[s].item() * 0.25)
    assert d.num_new > 0


def test_zero_voxel_sample_in_batch_of_two(device):
    enc = build_encoder().to(device).train()
    open_own_gate(enc)
    batch = scene(n=80, device=device)
    keep = batch['voxel_coords'][:, 0] == 0
    batch['voxel_coords'] = batch['voxel_coords'][keep]
    batch['voxel_features'] = batch['voxel_features'][keep]
    out = enc(batch)
    assert (out['voxel_coords'][:, 0] == 0).all()
    assert out['encoded_spconv_tensor'].batch_size == 2
    loss, _ = enc.get_loss()
    (loss + out['voxel_features'].sum()).backward()
    assert torch.isfinite(loss)


def test_empty_and_single_voxel_batches_train_without_error():
    enc = build_encoder().train()
    batch = scene(n=1)
    out = enc(batch)
    assert out['voxel_features'].shape[0] >= 1
    running = enc.stem_bn.running_mean.clone()
    batch = scene(n=1)
    batch['voxel_coords'] = batch['voxel_coords'][:0]
    batch['voxel_features'] = batch['voxel_features'][:0]
    out = enc(batch)
    assert out['voxel_features'].shape == (0, 16)
    loss, tb = enc.get_loss()
    assert loss.item() == 0.0 and tb['focal_fg_ratio_0'] == 0.0
    loss.backward()
    assert torch.equal(enc.stem_bn.running_mean, running)   # no NaN or drift from 0 rows


def test_get_loss_needs_a_training_forward_with_boxes():
    enc = build_encoder()
    with pytest.raises(InputError, match='training-mode forward'):
        enc.get_loss()
    enc.eval()
    enc(scene())
    with pytest.raises(InputError, match='training-mode forward'):
        enc.get_loss()
    enc.train()
    batch = scene()
    del batch['gt_boxes']
    enc(batch)                                        # inference-style batch in train mode
    with pytest.raises(InputError):
        enc.get_loss()


def test_no_focal_block_gives_a_connected_zero_loss():
    enc = build_encoder(encoder_cfg(NUM_FILTERS=[8])).train()
    out = enc(scene())
    assert out['voxel_features'].shape[1] == 8 and enc.num_point_features == 8
    loss, _ = enc.get_loss()
    assert loss.item() == 0.0
    loss.backward()


def test_construction_keeps_everything_on_the_cpu():
    enc = build_encoder()
    assert all(t.device.type == 'cpu' for t in (*enc.parameters(), *enc.buffers()))
    own_bias = torch.sigmoid(enc.blocks[0].imp_bias[-1]).item()
    assert abs(own_bias - 0.01) < 1e-6                # low prior: few voxels dilate at init


@pytest.mark.parametrize('change, message', [
    ({'NUM_FILTERS': None}, 'NUM_FILTERS is required'),
    ({'NUM_FILTERS': []}, 'NUM_FILTERS'),
    ({'NUM_FILTERS': [16, 0]}, 'NUM_FILTERS'),
    ({'KERNEL_SIZE': 4}, 'KERNEL_SIZE=4 must be an odd'),
    ({'KERNEL_SIZE': 1}, 'KERNEL_SIZE'),
    ({'IMPORTANCE_THRESHOLD': 1.5}, r'IMPORTANCE_THRESHOLD=1.5 must be a number in \[0, 1\]'),
    ({'IMPORTANCE_THRESHOLD': 'high'}, 'IMPORTANCE_THRESHOLD'),
    ({'TOPK_RATIO': 0}, 'TOPK_RATIO=0 must be a number in \\(0, 1\\]'),
    ({'TOPK_RATIO': 1.2}, 'TOPK_RATIO'),
    ({'LOSS_WEIGHT': -1}, 'LOSS_WEIGHT'),
    ({'FOCAL_ALPHA': 2}, 'FOCAL_ALPHA'),
    ({'FOCAL_GAMMA': -0.5}, 'FOCAL_GAMMA'),
    ({'IMPORTANCE_TRESHOLD': 0.5}, 'IMPORTANCE_TRESHOLD: unknown key; did you mean IMPORTANCE_THRESHOLD'),
])
def test_config_errors_name_the_field(change, message):
    with pytest.raises(ConfigError, match=f'BACKBONE_3D.*{message}'):
        build_encoder(encoder_cfg(**change))


def test_constructor_argument_errors():
    with pytest.raises(ConfigError, match='input_channels'):
        build_encoder(in_ch=0)
    with pytest.raises(ConfigError, match='grid_size'):
        FocalSSTEncoder(encoder_cfg(), 4, grid_size=None, voxel_size=VOXEL, point_cloud_range=PCR)
    with pytest.raises(ConfigError, match='point_cloud_range'):
        FocalSSTEncoder(encoder_cfg(), 4, GRID, VOXEL, PCR[:3])


def test_runtime_input_errors():
    enc = build_encoder().train()
    batch = scene()
    batch['voxel_features'] = batch['voxel_features'][:, :3]
    with pytest.raises(InputError, match='voxel_features'):
        enc(batch)
    batch = scene()
    batch['voxel_coords'][0, 3] = GRID[0]              # x beyond the grid
    with pytest.raises(InputError, match='x'):
        enc(batch)
    batch = scene()
    batch['gt_boxes'] = batch['gt_boxes'][:1]
    with pytest.raises(InputError, match='gt_boxes'):
        enc(batch)
    batch = scene()
    del batch['batch_size']
    with pytest.raises(InputError, match='batch_size'):
        enc(batch)


def test_registered_names():
    from pcdet_focal.registry import BACKBONE_3D
    assert BACKBONE_3D.get('FocalSSTEncoder') is FocalSSTEncoder
    assert BACKBONE_3D.get('FocalSSTDSVT') is FocalSSTDSVT


# ============================================================================ FocalSST + DSVT

def composite_cfg(num_filters=(8, 16), d_model=16):
    return EasyDict({
        'NAME': 'FocalSSTDSVT',
        'FOCAL_ENCODER': {'NUM_FILTERS': list(num_filters), 'KERNEL_SIZE': 3},
        'DSVT': {
            'INPUT_LAYER': {
                'sparse_shape': GRID, 'input_downsample': [1, 1, 4], 'input_reduction': 'max',
                'downsample_stride': [], 'd_model': [d_model], 'set_info': [[8, 1]],
                'window_shape': [[4, 4, 2]], 'hybrid_factor': [2, 2, 1],
                'shifts_list': [[[0, 0, 0], [2, 2, 0]]], 'normalize_pos': False},
            'block_name': ['DSVTBlock'], 'set_info': [[8, 1]], 'd_model': [d_model],
            'nhead': [2], 'dim_feedforward': [16], 'dropout': 0.0, 'activation': 'gelu',
            'reduction_type': 'attention', 'output_shape': [GRID[1], GRID[0]],
            'conv_out_channel': d_model, 'USE_CHECKPOINT': False}})


def build_composite(cfg):
    return FocalSSTDSVT(cfg, 4, grid_size=np.array(GRID), voxel_size=VOXEL,
                        point_cloud_range=PCR)


def test_focalsst_dsvt_forward_backward(device):
    model = build_composite(composite_cfg()).to(device).train()
    open_own_gate(model.focal_encoder)
    batch = scene(n=120, device=device)
    out = model(batch)
    assert model.num_point_features == 16
    feats, coords = out['voxel_features'], out['voxel_coords']
    assert out['pillar_features'] is feats and feats.shape == (coords.shape[0], 16)
    assert (coords[:, 1] < 2).all()                   # DSVT merged z by 4: 8 -> 2 bins
    assert list(out['encoded_spconv_tensor'].spatial_shape) == [2, GRID[1], GRID[0]]
    loss, tb = model.get_loss()
    assert 'focal_imp_loss' in tb
    (loss + feats.square().mean()).backward()
    assert model.focal_encoder.blocks[0].conv_imp.weight.grad[-1].abs().sum() > 0
    assert model.focal_encoder.stem_conv.weight.grad.abs().sum() > 0
    grads = [p.grad for n, p in model.dsvt.named_parameters() if 'stage_0' in n]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_focalsst_dsvt_config_errors():
    with pytest.raises(ConfigError, match='FOCAL_ENCODER.NUM_FILTERS\\[-1\\]=12 but '
                                          'MODEL.BACKBONE_3D.DSVT.INPUT_LAYER.d_model\\[0\\]=16'):
        build_composite(composite_cfg(num_filters=(8, 12), d_model=16))
    cfg = composite_cfg()
    del cfg['DSVT']
    with pytest.raises(ConfigError, match='BACKBONE_3D.DSVT is required'):
        build_composite(cfg)
    cfg = composite_cfg()
    cfg['FOCAL_ENCODER']['TOPK_RATIO'] = 3
    with pytest.raises(ConfigError, match='BACKBONE_3D.FOCAL_ENCODER.TOPK_RATIO'):
        build_composite(cfg)
    cfg = composite_cfg()
    cfg['FOCAL'] = {}
    with pytest.raises(ConfigError, match='unknown key.*FOCAL'):
        build_composite(cfg)
    cfg = composite_cfg()
    cfg['DSVT']['INPUT_LAYER']['sparse_shape'] = [10, 16, 8]
    with pytest.raises(ConfigError, match='BACKBONE_3D.DSVT.INPUT_LAYER.sparse_shape'):
        build_composite(cfg)
