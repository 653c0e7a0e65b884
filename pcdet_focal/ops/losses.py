"""Focal losses: the sigmoid focal loss (RetinaNet) and CenterNet's Gaussian heatmap focal loss.

Both are element-wise over tensors of any (matching) shape and return float tensors on the
input's device; both keep the autograd graph connected even when they evaluate to zero, so
``loss.backward()`` never fails on an empty batch.
"""
import torch
import torch.nn.functional as F

from ..errors import InputError
from .distributed import global_normaliser

_REDUCTIONS = ('none', 'mean', 'sum')


def _same_shape(a, b, names, fn):
    if a.shape != b.shape:
        raise InputError(f'{fn}: {names[0]} has shape {tuple(a.shape)} but {names[1]} has '
                         f'{tuple(b.shape)}; they must match element for element')


def sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction='mean'):
    """Focal loss on raw logits (RetinaNet): ``-alpha_t (1 - p_t)^gamma log(p_t)``.

    logits: (...) float, any shape; targets: same shape, in [0, 1] (0/1 for hard labels;
    soft targets interpolate both terms). ``alpha`` weighs positives (``1 - alpha`` negatives);
    ``alpha < 0`` disables the weighting. reduction: 'none' (same shape as logits), 'mean'
    (0 for an empty input, still attached to the graph) or 'sum'.

    Stable from logits: log(p_t) is a BCE-with-logits term and 1 - p_t a sigmoid of +-logits,
    so neither saturates to log(0) for large |logits|. Computed in float32 at least (AMP-safe).
    """
    if reduction not in _REDUCTIONS:
        raise InputError(f'sigmoid_focal_loss: reduction={reduction!r}; use one of '
                         f'{", ".join(_REDUCTIONS)}')
    _same_shape(logits, targets, ('logits', 'targets'), 'sigmoid_focal_loss')
    dtype = torch.promote_types(logits.dtype, torch.float32)
    x = logits.to(dtype)
    t = targets.to(dtype)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction='none')
    # 1 - p_t = t * (1 - p) + (1 - t) * p, with 1 - p = sigmoid(-x) computed without cancellation
    one_minus_pt = t * torch.sigmoid(-x) + (1 - t) * torch.sigmoid(x)
    loss = ce * one_minus_pt.pow(gamma)
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    if reduction == 'sum':
        return loss.sum()
    if reduction == 'mean':
        return loss.sum() if loss.numel() == 0 else loss.mean()
    return loss


def gaussian_focal_loss(pred_sigmoid, gt_heatmap, alpha=2.0, beta=4.0, eps=1e-4):
    """CenterNet heatmap focal loss -> scalar, normalised by the number of positives.

    pred_sigmoid: (B, K, H, W) (any shape) probabilities after sigmoid; gt_heatmap: same shape,
    Gaussian-splatted targets in [0, 1] whose peaks are exactly 1 (the positives).

        pos (gt == 1):  -(1 - p)^alpha * log(p)
        neg (gt < 1):   -(1 - gt)^beta * p^alpha * log(1 - p)
        loss = (sum pos + sum neg) / max(#positives, 1)

    Under torch.distributed #positives is counted over all ranks (see ops.distributed): a
    collective, called by every rank.

    ``p`` is clamped to [eps, 1 - eps] first (eps = 1e-4, as CenterPoint), so log never sees 0
    or 1; like CenterPoint the clamp also stops the gradient of saturated predictions.
    """
    _same_shape(pred_sigmoid, gt_heatmap, ('pred_sigmoid', 'gt_heatmap'), 'gaussian_focal_loss')
    dtype = torch.promote_types(pred_sigmoid.dtype, torch.float32)
    pred = pred_sigmoid.to(dtype).clamp(eps, 1 - eps)
    gt = gt_heatmap.to(dtype)
    pos = gt.eq(1).to(dtype)
    neg = gt.lt(1).to(dtype)
    pos_loss = torch.log(pred) * (1 - pred).pow(alpha) * pos
    neg_loss = torch.log(1 - pred) * pred.pow(alpha) * (1 - gt).pow(beta) * neg
    num_pos = global_normaliser(pos.sum())  # over all ranks under DDP (ops.distributed)
    return -(pos_loss.sum() + neg_loss.sum()) / num_pos
