"""Helpers around spconv tensors and voxel coordinates.

spconv on CPU tensors only runs ``ConvAlgo.Native``; on CUDA its implicit-GEMM kernels are
faster. :func:`match_spconv_algo` sets the algorithm of every spconv conv in a module from the
device of the data, so one module runs on both (spconv >= 2.2 keeps one weight layout for every
algorithm, so switching is free).
"""
import contextlib
import functools
import logging
import math

import torch

from ..errors import InputError


_SHAPE_ONLY = {'on': False}


@contextlib.contextmanager
def shape_only_spconv():
    """Inside: :func:`subm_conv3d` builds :class:`ShapeOnlySubMConv3d` instead of spconv's.

    For the memory estimator, which builds the real modules on the meta device to read their
    parameters and shapes: importing spconv alone takes ~10 s, and nothing there runs."""
    old = _SHAPE_ONLY['on']
    _SHAPE_ONLY['on'] = True
    try:
        yield
    finally:
        _SHAPE_ONLY['on'] = old


class ShapeOnlySubMConv3d(torch.nn.Module):
    """spconv's SubMConv3d without its kernels: the same parameters (weight (out, k, k, k, in),
    optional bias) and the attributes spconv's conv exposes; it cannot run."""

    def __init__(self, in_channels, out_channels, kernel_size, indice_key=None, bias=False):
        super().__init__()
        k = int(kernel_size)
        self.in_channels, self.out_channels, self.indice_key = in_channels, out_channels, indice_key
        self.kernel_size, self.stride, self.dilation = [k] * 3, [1] * 3, [1] * 3
        self.padding, self.subm, self.inverse, self.groups = [k // 2] * 3, True, False, 1
        self.weight = torch.nn.Parameter(torch.empty(out_channels, k, k, k, in_channels))
        self.bias = torch.nn.Parameter(torch.empty(out_channels)) if bias else None
        torch.nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x):
        raise RuntimeError('ShapeOnlySubMConv3d is built for memory estimates only')


def subm_conv3d(in_channels, out_channels, kernel_size, indice_key, bias=False):
    """spconv.SubMConv3d (stride 1, same padding), or its shape-only twin inside
    :func:`shape_only_spconv`."""
    if _SHAPE_ONLY['on']:
        return ShapeOnlySubMConv3d(in_channels, out_channels, kernel_size, indice_key, bias)
    import spconv.pytorch as spconv  # lazy: importing the package must not need spconv
    return spconv.SubMConv3d(in_channels, out_channels, kernel_size, stride=1,
                             padding=kernel_size // 2, bias=bias, indice_key=indice_key)


def spconv_algo(device):
    """The spconv ConvAlgo to use for tensors on ``device``."""
    from spconv.pytorch import ConvAlgo
    return ConvAlgo.Native if torch.device(device).type == 'cpu' else ConvAlgo.MaskImplicitGemm


def match_spconv_algo(module, device):
    """Set ``.algo`` of every spconv convolution under ``module`` for ``device`` (cached)."""
    device = torch.device(device)
    if getattr(module, '_spconv_algo_device', None) == device.type:
        return
    from spconv.pytorch.conv import SparseConvolution
    algo = spconv_algo(device)
    for m in module.modules():
        if isinstance(m, SparseConvolution):
            m.algo = algo
    object.__setattr__(module, '_spconv_algo_device', device.type)


def to_int_coords(coords, field='voxel_coords'):
    """Validate an (N, 4) ``[b, z, y, x]`` coordinate tensor and return it as int32.

    OpenPCDet moves every numpy array to the GPU as float32, coords included: float input is
    accepted when it holds whole numbers.
    """
    if not torch.is_tensor(coords):
        raise InputError(f'{field} must be a torch tensor, got {type(coords).__name__}')
    if coords.dim() != 2 or coords.shape[1] != 4:
        raise InputError(f'{field} must have shape (N, 4) [batch, z, y, x], got '
                         f'{tuple(coords.shape)}')
    if coords.is_floating_point():
        rounded = coords.round()
        if coords.numel() and not torch.equal(rounded, coords):
            raise InputError(f'{field} holds non-integer values; voxel coordinates must be '
                             'whole numbers [batch, z, y, x]')
        coords = rounded
    return coords.to(torch.int32)


def check_coords(coords, spatial_shape, batch_size, field='voxel_coords'):
    """Raise InputError unless 0 <= b < batch_size and 0 <= (z, y, x) < spatial_shape [D, H, W]."""
    if coords.shape[0] == 0:
        return
    lo = coords.min(dim=0).values.tolist()
    hi = coords.max(dim=0).values.tolist()
    limits = [int(batch_size), *[int(s) for s in spatial_shape]]
    for axis, name in enumerate(('batch', 'z', 'y', 'x')):
        if lo[axis] < 0 or hi[axis] >= limits[axis]:
            what = 'batch_size' if axis == 0 else 'spatial shape [D, H, W]'
            raise InputError(f'{field}[:, {axis}] ({name}) spans {lo[axis]}..{hi[axis]} but '
                             f'{what} is {limits[0] if axis == 0 else list(spatial_shape)}; '
                             'coordinates must lie inside the grid')


@functools.lru_cache(maxsize=None)
def _mute_spconv_fx_notice():
    """spconv wraps SparseConvTensor for torch.fx; torch >= 2.9 then logs a deprecation notice
    (``is_fx_tracing will return true ...``) on the first tensor built, which reads like a
    problem in every training log. torch prints it once through an lru_cache'd function: call
    that function once with its logger quiet, so only this one notice is skipped."""
    notice = getattr(getattr(torch.fx, '_symbolic_trace', None), 'is_fx_tracing_warning', None)
    if notice is None:
        return
    log = logging.getLogger('torch.fx._symbolic_trace')
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        notice()
    finally:
        log.setLevel(level)


def sparse_tensor(features, coords, spatial_shape, batch_size):
    """Build a spconv SparseConvTensor from (N, C) features and (N, 4) int coords [b, z, y, x]."""
    import spconv.pytorch as spconv
    _mute_spconv_fx_notice()
    return spconv.SparseConvTensor(features, coords.to(torch.int32).contiguous(),
                                   [int(s) for s in spatial_shape], int(batch_size))
