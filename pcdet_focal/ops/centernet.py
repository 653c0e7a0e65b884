"""CenterPoint-style BEV targets and decoding: pure tensor functions, no nn.Module, no config.

Coordinate conventions (OpenPCDet's):
- boxes: (..., 7+) ``(x, y, z, dx, dy, dz, heading)`` LiDAR frame, z = box centre;
- BEV maps: (B, C, H, W) with H along y and W along x; a cell index is ``y * W + x``;
- cell coordinates: ``cx = (x - point_cloud_range[0]) / (voxel_size[0] * stride)`` (same for y),
  the object's cell is ``(floor(cx), floor(cy))`` and its offset target ``cx - floor(cx)`` in
  [0, 1). Decoding inverts exactly this, so a cell's "position" is its lower corner plus the
  predicted offset (OpenPCDet's convention, kept so weights mean the same in both hosts).
- regression code (8 values, the order of the loss's ``code_weights``):
  ``[offset_x, offset_y, z, log dx, log dy, log dz, cos heading, sin heading]``.

Everything is vectorised over batch and objects (targets are drawn with one ``scatter_reduce``),
so target assignment costs a few small tensor ops per step on the CPU.
"""
import torch

from .distributed import global_normaliser

CODE_SIZE = 8  # offset (2) + z (1) + log-size (3) + (cos, sin) heading (2)


def gaussian_radius(size_x, size_y, min_overlap=0.5):
    """Heatmap radius (in cells) for boxes of BEV size ``size_x`` x ``size_y`` (in cells).

    size_x, size_y: (N,) float tensors. Returns (N,) float (not rounded).

    This is CenterNet's three-case formula as CenterPoint and OpenPCDet ship it (each case is a
    quadratic ``a r^2 - b r + c = 0`` for "a box whose corners move by r keeps IoU
    min_overlap"), including its known root choice ``(b + sqrt(b^2 - 4ac)) / 2`` (CenterNet
    issue 110). Kept as is so heatmaps, and therefore trained weights, match OpenPCDet's.
    """
    h, w = size_x, size_y
    o = float(min_overlap)
    # corners of both boxes shifted the same way
    b1 = h + w
    c1 = w * h * (1 - o) / (1 + o)
    r1 = (b1 + torch.sqrt(torch.clamp_min(b1 * b1 - 4 * c1, 0))) / 2
    # prediction inside the ground truth
    b2 = 2 * (h + w)
    c2 = (1 - o) * w * h
    r2 = (b2 + torch.sqrt(torch.clamp_min(b2 * b2 - 16 * c2, 0))) / 2
    # prediction around the ground truth
    a3 = 4 * o
    b3 = -2 * o * (h + w)
    c3 = (o - 1) * w * h
    r3 = (b3 + torch.sqrt(torch.clamp_min(b3 * b3 - 4 * a3 * c3, 0))) / 2
    return torch.minimum(torch.minimum(r1, r2), r3)


def draw_gaussians(heatmap, batch_idx, class_idx, centers, radii):
    """Draw one Gaussian peak per object into ``heatmap`` (in place, element-wise max).

    heatmap: (B, C, H, W) float, modified in place and returned.
    batch_idx, class_idx: (K,) long, the sample and heatmap channel of each object.
    centers: (K, 2) long ``[x, y]`` cell of each peak (value exactly 1 there).
    radii: (K,) long >= 0; the Gaussian covers the (2r+1) x (2r+1) window around the centre
    with sigma = (2r+1) / 6, clipped at the map border.
    """
    if batch_idx.numel() == 0:
        return heatmap
    _, n_cls, height, width = heatmap.shape
    device = heatmap.device
    radii = radii.to(device=device, dtype=torch.long)
    r_max = int(radii.max())
    offs = torch.arange(-r_max, r_max + 1, device=device)
    dy, dx = torch.meshgrid(offs, offs, indexing='ij')
    dx, dy = dx.reshape(1, -1), dy.reshape(1, -1)  # (1, S*S) window offsets
    sigma = (2 * radii + 1).to(torch.float32) / 6
    values = torch.exp(-(dx * dx + dy * dy).to(torch.float32) / (2 * sigma[:, None] ** 2))
    xs = centers[:, 0:1].to(device) + dx
    ys = centers[:, 1:2].to(device) + dy
    keep = (dx.abs() <= radii[:, None]) & (dy.abs() <= radii[:, None])
    keep &= (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
    plane = batch_idx.to(device)[:, None] * n_cls + class_idx.to(device)[:, None]
    flat = (plane * height + ys) * width + xs
    # amax is order independent, so overlapping objects give the same map on any device
    heatmap.view(-1).scatter_reduce_(0, flat[keep], values[keep].to(heatmap.dtype),
                                     reduce='amax', include_self=True)
    return heatmap


def assign_center_targets(boxes, labels, num_classes, feature_map_size, point_cloud_range,
                          voxel_size, feature_map_stride, num_max_objs=500,
                          gaussian_overlap=0.1, min_radius=2):
    """Targets of one CenterPoint head.

    boxes: (B, M, 7+) float ``(x, y, z, dx, dy, dz, heading, ...)``.
    labels: (B, M) long, the object's heatmap channel in this head (0..num_classes-1) or -1 to
    ignore it (padding rows, classes of other heads).
    feature_map_size: (H, W) of the BEV map. point_cloud_range: 6 floats, voxel_size: 3 floats
    (x, y, z order). feature_map_stride: BEV cells per map cell.

    An object is assigned when its label is >= 0, its dx and dy are > 0 and its centre falls
    inside the map; the first ``num_max_objs`` such objects of a sample (in row order) get a
    slot, the others are dropped (neither drawn nor regressed). OpenPCDet instead clamps
    centres outside the map onto its border; here they are ignored.

    Returns a dict:
      heatmap (B, num_classes, H, W) float, 1 at each object's cell, Gaussian around it;
      target_boxes (B, num_max_objs, 8) float, the regression code (module docstring);
      inds (B, num_max_objs) long, ``y * W + x`` of the object's cell (0 in empty slots);
      mask (B, num_max_objs) bool, True for filled slots.
    """
    height, width = int(feature_map_size[0]), int(feature_map_size[1])
    n_batch = boxes.shape[0]
    device, dtype = boxes.device, torch.float32
    boxes = boxes.to(dtype)
    cell_x = float(voxel_size[0]) * feature_map_stride
    cell_y = float(voxel_size[1]) * feature_map_stride
    cx = (boxes[..., 0] - float(point_cloud_range[0])) / cell_x  # (B, M) in map cells
    cy = (boxes[..., 1] - float(point_cloud_range[1])) / cell_y
    ix, iy = torch.floor(cx), torch.floor(cy)
    valid = (labels >= 0) & (boxes[..., 3] > 0) & (boxes[..., 4] > 0)
    valid &= (ix >= 0) & (ix < width) & (iy >= 0) & (iy < height)
    rank = torch.cumsum(valid.long(), dim=1) - 1  # slot of each valid object in its sample
    valid &= rank < num_max_objs
    b_idx, m_idx = valid.nonzero(as_tuple=True)
    slot = rank[b_idx, m_idx]

    heatmap = torch.zeros((n_batch, num_classes, height, width), dtype=dtype, device=device)
    target_boxes = torch.zeros((n_batch, num_max_objs, CODE_SIZE), dtype=dtype, device=device)
    inds = torch.zeros((n_batch, num_max_objs), dtype=torch.long, device=device)
    mask = torch.zeros((n_batch, num_max_objs), dtype=torch.bool, device=device)
    if b_idx.numel() == 0:
        return {'heatmap': heatmap, 'target_boxes': target_boxes, 'inds': inds, 'mask': mask}

    sel = boxes[b_idx, m_idx]  # (K, 7+)
    sx, sy = ix[b_idx, m_idx], iy[b_idx, m_idx]
    heading = sel[:, 6]
    code = torch.stack([cx[b_idx, m_idx] - sx, cy[b_idx, m_idx] - sy, sel[:, 2],
                        torch.log(sel[:, 3]), torch.log(sel[:, 4]), torch.log(sel[:, 5]),
                        torch.cos(heading), torch.sin(heading)], dim=1)
    target_boxes[b_idx, slot] = code
    cell = torch.stack([sx, sy], dim=1).long()
    inds[b_idx, slot] = cell[:, 1] * width + cell[:, 0]
    mask[b_idx, slot] = True

    radius = gaussian_radius(sel[:, 3] / cell_x, sel[:, 4] / cell_y, gaussian_overlap)
    radius = torch.clamp_min(torch.floor(radius).long(), int(min_radius))
    draw_gaussians(heatmap, b_idx, labels[b_idx, m_idx], cell, radius)
    return {'heatmap': heatmap, 'target_boxes': target_boxes, 'inds': inds, 'mask': mask}


def gather_feat(feature_map, inds):
    """Values of a (B, C, H, W) map at flat cell indices ``inds`` (B, K) -> (B, K, C)."""
    n_batch, channels = feature_map.shape[:2]
    flat = feature_map.reshape(n_batch, channels, -1)
    index = inds[:, None, :].expand(-1, channels, -1)
    return torch.gather(flat, 2, index).transpose(1, 2)


def reg_l1_loss(pred, target, mask):
    """Masked L1 per code dimension, normalised by the number of assigned objects.

    pred, target: (B, K, D) float; mask: (B, K) bool. Returns (D,): the sum over assigned
    objects of |pred - target| divided by max(1, number of assigned objects), counted over all
    ranks under torch.distributed (a collective: see ops.distributed).
    """
    weight = mask.to(pred.dtype)[..., None]
    loss = (torch.abs(pred - target) * weight).sum(dim=(0, 1))
    return loss / global_normaliser(weight.sum())  # objects of all ranks under DDP


def decode_centers(heatmap, center, center_z, dim, rot, point_cloud_range, voxel_size,
                   feature_map_stride, k=100):
    """Top-k peaks of a head's heatmap -> boxes.

    heatmap: (B, C, H, W) scores in [0, 1] (sigmoid applied). center: (B, 2, H, W) offsets
    (x, y) in cells; center_z: (B, 1, H, W) box-centre z in metres; dim: (B, 3, H, W) log of
    (dx, dy, dz); rot: (B, 2, H, W) (cos, sin) of the heading.
    The k best (cell, class) pairs over all classes are kept (k is capped at C*H*W).

    Returns boxes (B, k, 7) ``(x, y, z, dx, dy, dz, heading)`` with heading in (-pi, pi],
    scores (B, k), labels (B, k) long = heatmap channel (0-based, within this head).
    """
    n_batch, n_cls, height, width = heatmap.shape
    k = min(int(k), n_cls * height * width)
    scores, idx = torch.topk(heatmap.reshape(n_batch, -1), k, dim=1)
    labels = torch.div(idx, height * width, rounding_mode='floor')
    pix = idx - labels * (height * width)
    ys = torch.div(pix, width, rounding_mode='floor')
    xs = pix - ys * width
    off = gather_feat(center, pix)
    z = gather_feat(center_z, pix)
    size = torch.exp(gather_feat(dim, pix))
    cos_sin = gather_feat(rot, pix)
    cell_x = float(voxel_size[0]) * feature_map_stride
    cell_y = float(voxel_size[1]) * feature_map_stride
    x = (xs.to(off.dtype) + off[..., 0]) * cell_x + float(point_cloud_range[0])
    y = (ys.to(off.dtype) + off[..., 1]) * cell_y + float(point_cloud_range[1])
    heading = torch.atan2(cos_sin[..., 1], cos_sin[..., 0])
    boxes = torch.cat([x[..., None], y[..., None], z, size, heading[..., None]], dim=-1)
    return boxes, scores, labels
