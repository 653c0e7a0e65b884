"""The CUDA software stack the estimate models: which kernels PyTorch picks, and its allocator.

Large convolutions (aten/src/ATen/native/Convolution.cpp, ``needs_64bit_indexing_no_split``).
A conv whose single sample (input or output) holds more than 2**31 - 1 elements cannot be split
into 32-bit-indexable batches. torch <= 2.4 never gives it to cuDNN; torch >= 2.5 (PR #134890)
does when the cuDNN it was built against is >= 9.3 and the v8 API is on (the default). Otherwise
PyTorch runs its native conv (ConvolutionMM2d.cu), which unfolds one sample at a time into a
columns buffer of C_in*kH*kW*H_out*W_out elements, in the forward and again in the backward:
the 75.10 GiB of the users' torch 2.3.0 + cuDNN 8.9.2 report. Facts and sources:
README "Memory estimator".

A :class:`Stack` is (torch version, cuDNN version): the installed one, or one named with
``--target torch2.3.0+cudnn8.9.2``. Without a GPU here the installed torch's own CUDA wheel is
assumed to carry the cuDNN it pins on PyPI (:data:`WHEEL_CUDNN`).

Caching allocator (c10/cuda/CUDACachingAllocator.cpp, the same constants in torch 2.0-2.9):
every block is rounded up to 512 bytes (:func:`round_block`); "allocated" is the sum of live
blocks, "reserved" adds what the cache keeps in segments (requests <= 1 MiB share 2 MiB
segments, 1-10 MiB requests get 20 MiB ones, larger ones their size rounded up to 2 MiB; a
free block is split when the rest is >= 512 B in the small pool, > 1 MiB in the large one),
simulated by :func:`reserved_peak`.
"""
import re
from dataclasses import dataclass

from ..errors import ConfigError

INT32_MAX = 2 ** 31 - 1
CUDNN_LARGE_CONV = (9, 3, 0)      # first cuDNN that PyTorch trusts with 64-bit-indexed convs
TORCH_LARGE_CONV = (2, 5, 0)      # first torch that asks (PR #134890)
# cuDNN the default (CUDA) PyPI wheel of each torch minor version is built with (its
# nvidia-cudnn-cu12 / cu11 pin)
WHEEL_CUDNN = {(2, 0): (8, 5, 0), (2, 1): (8, 9, 2), (2, 2): (8, 9, 2), (2, 3): (8, 9, 2),
               (2, 4): (9, 1, 0), (2, 5): (9, 1, 0), (2, 6): (9, 1, 0), (2, 7): (9, 5, 1),
               (2, 8): (9, 10, 2), (2, 9): (9, 10, 2)}
USERS_STACK = 'torch2.3.0+cudnn8.9.2'

MIN_BLOCK = 512
SMALL_SIZE = 1 << 20          # <= 1 MiB: the small pool
SMALL_BUFFER = 2 << 20        # its segments
MIN_LARGE_ALLOC = 10 << 20    # 1-10 MiB requests share 20 MiB segments
LARGE_BUFFER = 20 << 20
ROUND_LARGE = 2 << 20


def _version(text, what):
    parts = re.findall(r'\d+', str(text))[:3]
    if not parts:
        raise ConfigError(f'--target: cannot read a {what} version from {text!r} (e.g. '
                          f'{USERS_STACK})')
    return tuple(int(p) for p in parts + ['0'] * (3 - len(parts)))


@dataclass(frozen=True)
class Stack:
    """(torch, cuDNN) versions, each a 3-tuple; cudnn None: no cuDNN at all."""

    torch: tuple
    cudnn: object
    source: str = ''

    @classmethod
    def parse(cls, text):
        """``torch2.3.0+cudnn8.9.2`` (cuDNN optional: the wheel's)."""
        match = re.fullmatch(r'torch([\d.]+)(?:\+cudnn([\d.]+))?', str(text).strip())
        if match is None:
            raise ConfigError(f'--target {text!r}: name a stack as torchX.Y.Z[+cudnnA.B.C], '
                              f'e.g. {USERS_STACK}, or cuda / cpu')
        torch_v = _version(match.group(1), 'torch')
        cudnn = _version(match.group(2), 'cuDNN') if match.group(2) else _wheel(torch_v)
        return cls(torch_v, cudnn, f'--target {text}')

    @classmethod
    def installed(cls):
        """The stack of this environment (cuDNN as loaded, else the wheel's)."""
        try:
            import torch
        except ImportError:
            return cls((2, 3, 0), (8, 9, 2), 'torch not installed: the users\' stack')
        torch_v = _version(torch.__version__, 'torch')
        code = torch.backends.cudnn.version() if torch.cuda.is_available() else None
        if code:
            from ..doctor import cudnn_tuple
            return cls(torch_v, cudnn_tuple(code), 'installed')
        return cls(torch_v, _wheel(torch_v), 'installed torch; cuDNN of its CUDA wheel')

    def large_conv_in_cudnn(self):
        return self.cudnn is not None and tuple(self.torch) >= TORCH_LARGE_CONV and \
            tuple(self.cudnn) >= CUDNN_LARGE_CONV

    def describe(self):
        cudnn = '.'.join(map(str, self.cudnn)) if self.cudnn else 'none'
        return f'torch {".".join(map(str, self.torch))} + cuDNN {cudnn}'

    def conv_columns_bytes(self, cin_per_group, kernel_area, ho, wo, dtype_bytes,
                           in_per_sample, out_per_sample, target):
        """Bytes of the native conv's columns buffer for one sample, or 0 when the conv runs
        without it (cuDNN, or a CPU target whose oneDNN kernels are modelled elsewhere)."""
        if target != 'cuda' or max(in_per_sample, out_per_sample) <= INT32_MAX:
            return 0
        if self.large_conv_in_cudnn():
            return 0
        return cin_per_group * kernel_area * ho * wo * dtype_bytes


def _wheel(torch_v):
    key = tuple(torch_v[:2])
    if key in WHEEL_CUDNN:
        return WHEEL_CUDNN[key]
    if key > max(WHEEL_CUDNN):
        return WHEEL_CUDNN[max(WHEEL_CUDNN)]
    return WHEEL_CUDNN[min(WHEEL_CUDNN)]


def round_block(nbytes):
    """The caching allocator's block size for a request of ``nbytes``."""
    if nbytes <= 0:
        return 0
    return -(-int(nbytes) // MIN_BLOCK) * MIN_BLOCK


def _segment(size):
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


def reserved_peak(events, capacity=None):
    """(peak reserved bytes, True when every request was served) of the caching allocator
    replaying ``events``: ('alloc', key, nbytes) / ('free', key) in program order.

    Model: blocks are rounded (:func:`round_block`); a request takes the smallest free block
    of its pool that fits (small pool <= 1 MiB, large pool otherwise), splitting it; else a new
    segment (:func:`_segment`) is reserved. Freed blocks merge with free neighbours in their
    segment and stay reserved. When a new segment would exceed ``capacity``, the allocator
    first releases its cached segments that hold no live block (as PyTorch does before it
    reports out-of-memory); if it still does not fit, the request fails."""
    segments = {'small': [], 'large': []}     # pool -> [segment: list of [start, size, key]]
    where = {}
    reserved = peak = 0
    ok = True
    for event in events:
        if event[0] == 'free':
            seg, block = where.pop(event[1], (None, None))
            if seg is not None:
                block[2] = None
                _merge_free(seg)
            continue
        _, key, nbytes = event
        size = round_block(nbytes)
        if size == 0:
            continue
        pool = 'small' if size <= SMALL_SIZE else 'large'
        best = None
        for seg in segments[pool]:
            for block in seg:
                if block[2] is None and block[1] >= size and \
                        (best is None or block[1] < best[1][1]):
                    best = (seg, block)
        if best is None:
            total = _segment(size)
            if capacity is not None and reserved + total > capacity:
                for name in segments:
                    empty = [sg for sg in segments[name] if all(bl[2] is None for bl in sg)]
                    reserved -= sum(sum(bl[1] for bl in sg) for sg in empty)
                    segments[name] = [sg for sg in segments[name] if sg not in empty]
                if reserved + total > capacity:
                    ok = False
            seg = [[0, total, None]]
            segments[pool].append(seg)
            reserved += total
            peak = max(peak, reserved)
            best = (seg, seg[0])
        seg, block = best
        rest_size = block[1] - size
        if (rest_size >= MIN_BLOCK) if pool == 'small' else (rest_size > SMALL_SIZE):
            rest = [block[0] + size, rest_size, None]
            seg.insert(seg.index(block) + 1, rest)
            block[1] = size
        block[2] = key
        where[key] = (seg, block)
    return peak, ok


def _merge_free(seg):
    i = 0
    while i + 1 < len(seg):
        if seg[i][2] is None and seg[i + 1][2] is None:
            seg[i][1] += seg[i + 1][1]
            del seg[i + 1]
        else:
            i += 1
