"""CPU stand-ins for OpenPCDet's compiled CUDA ops, for running OpenPCDet's scripts on a machine
without a CUDA toolchain (tests only; never part of the package).

:func:`install` makes an unmodified OpenPCDet checkout (commit 8caccce) importable and runnable
on the CPU:

- a meta-path finder placed after Python's own: when ``pcdet/ops/.../<name>_cuda.so`` was never
  built, ``from . import iou3d_nms_cuda`` gets a Python module instead. The ops OpenPCDet's KITTI
  pipeline, CenterHead and DSVT call are computed with pcdet_focal's own ops (rotated BEV NMS
  and IoU, points in boxes, rank in group); any other op raises NotImplementedError naming it.
  Built extensions always win (the finder is only asked when Python found nothing);
- with no CUDA device, ``Tensor.cuda()`` / ``Module.cuda()`` return the object unchanged (its
  train.py / test.py call ``model.cuda()``, its CenterHead ``.cuda()`` in ``__init__``);
- with no CUDA device, numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) for the
  ``numba.cuda`` kernels of its KITTI evaluation (rotated IoU); this only works when set before
  numba is first imported, which ``sitecustomize.py`` here does.

Subprocesses get all of it with ``PYTHONPATH=tests/pcdet_cpu_ops`` (its ``sitecustomize.py``).
"""
import importlib.abc
import importlib.machinery
import os
import sys

_OPS = 'pcdet.ops.'
# The compiled extensions of OpenPCDet's setup.py, by import path.
EXTENSIONS = (
    'pcdet.ops.iou3d_nms.iou3d_nms_cuda',
    'pcdet.ops.roiaware_pool3d.roiaware_pool3d_cuda',
    'pcdet.ops.roipoint_pool3d.roipoint_pool3d_cuda',
    'pcdet.ops.pointnet2.pointnet2_stack.pointnet2_stack_cuda',
    'pcdet.ops.pointnet2.pointnet2_batch.pointnet2_batch_cuda',
    'pcdet.ops.bev_pool.bev_pool_ext',
    'pcdet.ops.ingroup_inds.ingroup_inds_cuda',
)


# ----------------------------------------------------------------------------- the ops
# Each mirrors the C++ binding's signature: results are written into the output tensor the
# Python wrapper in pcdet/ops/ allocated, as the CUDA kernels do.

def _descending(n):
    """Scores that keep an already score-sorted order (OpenPCDet sorts before calling NMS)."""
    import torch
    return torch.arange(n, 0, -1, dtype=torch.float32)


def nms_gpu(boxes, keep, thresh):
    """boxes (N, 7) sorted by descending score -> keep[:K] = kept positions; returns K.
    A box is dropped when its rotated BEV IoU with a kept box is > thresh."""
    from pcdet_focal.ops.nms import nms_rotated
    kept = nms_rotated(boxes, _descending(boxes.shape[0]), thresh)
    keep[:len(kept)] = kept.to(keep.device)
    return len(kept)


def nms_normal_gpu(boxes, keep, thresh):
    """As nms_gpu with axis-aligned boxes (heading ignored)."""
    flat = boxes.detach().clone()
    flat[:, 6] = 0
    return nms_gpu(flat, keep, thresh)


def boxes_iou_bev_cpu(boxes_a, boxes_b, ans_iou):
    """(N, 7), (M, 7) -> ans_iou (N, M) = rotated BEV IoU."""
    import torch
    from pcdet_focal.eval.iou import boxes_iou_bev
    ans_iou.copy_(torch.from_numpy(boxes_iou_bev(boxes_a, boxes_b)))


boxes_iou_bev_gpu = boxes_iou_bev_cpu


def boxes_overlap_bev_gpu(boxes_a, boxes_b, ans_overlap):
    """(N, 7), (M, 7) -> ans_overlap (N, M) = BEV intersection area."""
    import torch
    from pcdet_focal.eval.iou import MODE_BEV_COVER, as_box_array, overlap_matrix
    a = as_box_array(boxes_a, 'boxes_a')
    cover = overlap_matrix(a, as_box_array(boxes_b, 'boxes_b'), MODE_BEV_COVER)
    ans_overlap.copy_(torch.from_numpy(cover * (a[:, 3] * a[:, 4])[:, None]))


def points_in_boxes_cpu(boxes, pts, point_indices):
    """boxes (M, 7), pts (N, 3) -> point_indices (M, N) = 1 where box m holds point n."""
    from pcdet_focal.ops.points_in_boxes import points_in_boxes_mask
    point_indices.copy_(points_in_boxes_mask(pts, boxes).t())


def points_in_boxes_gpu(boxes, pts, box_idxs_of_pts):
    """boxes (B, T, 7), pts (B, N, 3) -> box_idxs_of_pts (B, N): a box holding the point, -1."""
    from pcdet_focal.ops.points_in_boxes import points_in_boxes
    for b in range(boxes.shape[0]):
        box_idxs_of_pts[b] = points_in_boxes(pts[b], boxes[b])


def ingroup_forward(group_inds, out_inds):
    """group_inds (N,) -> out_inds (N,): rank of each element inside its group."""
    from pcdet_focal.ops.dsvt_sets import rank_in_group
    out_inds.copy_(rank_in_group(group_inds))


IMPLEMENTED = {
    'pcdet.ops.iou3d_nms.iou3d_nms_cuda': {
        'nms_gpu': nms_gpu, 'nms_normal_gpu': nms_normal_gpu,
        'boxes_iou_bev_cpu': boxes_iou_bev_cpu, 'boxes_iou_bev_gpu': boxes_iou_bev_gpu,
        'boxes_overlap_bev_gpu': boxes_overlap_bev_gpu},
    'pcdet.ops.roiaware_pool3d.roiaware_pool3d_cuda': {
        'points_in_boxes_cpu': points_in_boxes_cpu, 'points_in_boxes_gpu': points_in_boxes_gpu},
    'pcdet.ops.ingroup_inds.ingroup_inds_cuda': {'forward': ingroup_forward},
}


# ----------------------------------------------------------------------------- the finder

def _not_written(module, name):
    def missing(*args, **kwargs):
        raise NotImplementedError(f'{module}.{name}: no CPU stand-in (tests/pcdet_cpu_ops); '
                                  "build OpenPCDet's CUDA ops to use it")
    missing.__name__ = name
    return missing


class _StandInLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None  # the default module object

    def exec_module(self, module):
        name = module.__name__
        module.__dict__.update(IMPLEMENTED.get(name, {}))
        module.__doc__ = f'CPU stand-in for OpenPCDet\'s compiled {name} (tests/pcdet_cpu_ops)'
        module.STAND_IN = True

        def __getattr__(attr):
            if attr.startswith('__'):
                raise AttributeError(attr)
            return _not_written(name, attr)

        module.__getattr__ = __getattr__


class StandInFinder(importlib.abc.MetaPathFinder):
    """Finds OpenPCDet's compiled extensions that Python's own finders did not find."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in EXTENSIONS:
            return None
        return importlib.machinery.ModuleSpec(fullname, _StandInLoader())


def _cuda_available():
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def install():
    """Install the stand-ins (idempotent); returns what was done, as a list of words."""
    done = []
    if not any(isinstance(f, StandInFinder) for f in sys.meta_path):
        sys.meta_path.append(StandInFinder())
        done.append('ops')
    if not _cuda_available():
        import torch
        if not getattr(torch.Tensor.cuda, 'stand_in', False):
            def cuda(self, *args, **kwargs):
                return self
            cuda.stand_in = True
            torch.Tensor.cuda = cuda
            torch.nn.Module.cuda = cuda
            done.append('cuda-noop')
        if 'numba' not in sys.modules:
            os.environ.setdefault('NUMBA_ENABLE_CUDASIM', '1')
            done.append('numba-cudasim')
    return done
