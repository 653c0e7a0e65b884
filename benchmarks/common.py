"""Helpers shared by every benchmark in benchmarks/: timing, peak memory, machine limits, tables.

Import from a benchmark script (works for ``python benchmarks/x.py`` and
``python -m benchmarks.x``)::

    import sys
    from pathlib import Path
    if __package__ in (None, ''):
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.common import bench, copy_bandwidth, describe_machine, print_table

API:
- ``bench(fn, device, repeats=5, warmup=1) -> Result(time_s, peak_bytes, times, max_allocated,
  max_reserved)``: one run under the peak-memory tracker (it doubles as the first warm-up),
  ``warmup - 1`` more untimed runs, then ``repeats`` timed runs; ``time_s`` is their median.
  CUDA: each run is timed with CUDA events (synchronised), and ``max_allocated`` /
  ``max_reserved`` are ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` of the
  tracked run (absolute: everything allocated on the device, cache emptied before it); None on
  the CPU.
- ``median_time(fn, device, repeats, warmup)`` and ``peak_memory(fn, device)`` separately.
- ``copy_bandwidth(device, fresh=False)``: bytes read + written per second by a large copy
  (into mapped memory; ``fresh=True``: into a new tensor, page faults included).
- ``matmul_throughput(device)``: float32 FLOP/s of a 2048^3 matmul.
- ``available_memory(device)``: bytes that can still be allocated (MemAvailable / cudaMemGetInfo).
- ``describe_machine(device)``: one line naming the device, threads, torch version, load.
- ``print_table(headers, rows)``: a Markdown table (paste into README as is).
- ``fmt_bytes(n)``, ``fmt_time(s)``: human units.
- ``is_oom(err)``, ``requested_bytes(message)``: recognise an out-of-memory error (CUDA or CPU
  allocator) and read the size it asked for.
- ``crop_bev(cfg, nx, ny)``: a config whose BEV grid is cropped to nx x ny voxels.

Wall-clock numbers are for reading, never for gating CI.
"""
import copy
import gc
import os
import platform
import re
import statistics
import time
from collections import namedtuple

import torch

from pcdet_focal.data.processor import voxel_geometry
from pcdet_focal.memory.measure import available_ram
from pcdet_focal.memory.tracker import PeakMemory

Result = namedtuple('Result', 'time_s peak_bytes times max_allocated max_reserved',
                    defaults=(None, None))


def sync(device):
    """Wait for queued work on ``device`` (no-op on the CPU)."""
    device = torch.device(device)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def peak_memory(fn, device='cpu'):
    """Peak live tensor bytes of one ``fn()`` call above the level before it (result dropped)."""
    with PeakMemory(device) as pm:
        out = fn()
        sync(device)
    del out
    return pm.peak_bytes


def timed(fn, device='cpu'):
    """``(seconds, result)`` of one ``fn()`` call: CUDA events on a GPU (the queued work's
    device time, synchronised), wall time on the CPU."""
    device = torch.device(device)
    if device.type == 'cuda':
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sync(device)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, out
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def median_time(fn, device='cpu', repeats=5, warmup=1):
    """Median time in seconds of ``repeats`` calls of ``fn()`` after ``warmup`` calls (see
    :func:`timed`). Returns ``(median_s, [each_s])``."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        seconds, out = timed(fn, device)
        times.append(seconds)
        del out
    return statistics.median(times), times


def bench(fn, device='cpu', repeats=5, warmup=1):
    """Peak memory (first, warm-up run) and median time of ``fn()``; see module docstring."""
    device = torch.device(device)
    cuda = device.type == 'cuda'
    if cuda:  # cached blocks of earlier cases would hide this one's reserved peak
        gc.collect()
        torch.cuda.empty_cache()
    peak = peak_memory(fn, device)
    # PeakMemory reset CUDA's peak counters at entry: they now hold this run's maxima
    allocated = torch.cuda.max_memory_allocated(device) if cuda else None
    reserved = torch.cuda.max_memory_reserved(device) if cuda else None
    median, times = median_time(fn, device, repeats=repeats, warmup=max(warmup - 1, 0))
    return Result(median, peak, times, allocated, reserved)


def copy_bandwidth(device='cpu', nbytes=512 * 2**20, repeats=5, fresh=False):
    """Measured memory bandwidth in bytes/s: (bytes read + bytes written) / time of a copy.

    ``fresh=False``: ``dst.copy_(src)`` into memory already mapped (the machine's streaming
    limit). ``fresh=True``: ``src.clone()``, whose destination is newly allocated each time, so
    first-touch page faults are included (what any op writing a new large tensor pays).
    """
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    if fresh:
        fn = src.clone
    else:
        dst = torch.zeros_like(src)
        fn = lambda: dst.copy_(src)  # noqa: E731
    median, _ = median_time(fn, device, repeats=repeats, warmup=2)
    return 2 * src.numel() * 4 / median


def matmul_throughput(device='cpu', n=2048, repeats=5):
    """Measured float32 matmul throughput in FLOP/s (n x n times n x n)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    median, _ = median_time(lambda: a @ b, device, repeats=repeats, warmup=2)
    return 2 * n ** 3 / median


def available_memory(device='cpu'):
    """Bytes still available for new tensors on ``device`` (None when unknown)."""
    device = torch.device(device)
    if device.type == 'cuda':
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return available_ram()


def _cpu_name():
    try:
        with open('/proc/cpuinfo', encoding='utf-8', errors='replace') as fh:
            for line in fh:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(device='cpu'):
    """One line: device name, CPU threads, memory, torch version and load average."""
    device = torch.device(device)
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        what = f'{device}: {props.name}, {props.total_memory / 2**30:.0f} GiB'
    else:
        total = None
        try:
            with open('/proc/meminfo', encoding='ascii') as fh:
                total = int(fh.readline().split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        mem = f', {total / 2**30:.0f} GiB RAM' if total else ''
        what = f'cpu: {_cpu_name()}, {os.cpu_count()} cores{mem}'
    load = ''
    if hasattr(os, 'getloadavg'):
        load = ', load avg {:.1f}'.format(os.getloadavg()[0])
    return (f'{what}; torch {torch.__version__}, {torch.get_num_threads()} intra-op threads'
            f'{load}')


_UNITS = {'b': 1, 'bytes': 1, 'kib': 2**10, 'mib': 2**20, 'gib': 2**30, 'tib': 2**40}
# CUDA: "Tried to allocate 75.10 GiB"; CPU: "you tried to allocate 4503599627370496 bytes"
_TRIED = re.compile(r'tried to allocate ([0-9]+(?:\.[0-9]+)?) ?(bytes|b|kib|mib|gib|tib)\b',
                    re.IGNORECASE)


def is_oom(err):
    """True for an allocation failure: ``torch.OutOfMemoryError`` (CUDA) or the CPU
    allocator's RuntimeError."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ('out of memory' in text.lower()
                                              or "can't allocate memory" in text)


def requested_bytes(message):
    """Bytes an out-of-memory message says were asked for (int), or None.

    CUDA prints two decimals of the unit ("75.10 GiB"), so the figure is good to 0.005 unit.
    """
    m = _TRIED.search(str(message))
    if m is None:
        return None
    return int(round(float(m.group(1)) * _UNITS[m.group(2).lower()]))


def crop_bev(cfg, nx, ny):
    """A copy of ``cfg`` whose grid is ``nx`` x ``ny`` voxels in x, y (z and the model kept).

    Moves POINT_CLOUD_RANGE's x_max / y_max and the BEV shapes a config spells out (DSVT's
    ``sparse_shape`` [x, y, z] and ``output_shape`` [y, x]).
    """
    geom = voxel_geometry(cfg.DATA_CONFIG)
    out = copy.deepcopy(cfg)
    pcr = list(geom.point_cloud_range)
    pcr[3] = pcr[0] + nx * geom.voxel_size[0]
    pcr[4] = pcr[1] + ny * geom.voxel_size[1]
    out.DATA_CONFIG.POINT_CLOUD_RANGE = pcr

    def visit(node):
        if isinstance(node, dict):
            if isinstance(node.get('sparse_shape'), list) and len(node['sparse_shape']) == 3:
                node['sparse_shape'] = [nx, ny, node['sparse_shape'][2]]
            if isinstance(node.get('output_shape'), list) and len(node['output_shape']) == 2:
                node['output_shape'] = [ny, nx]
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)
    visit(out.MODEL)
    return out


def fmt_bytes(n):
    """``1234567`` -> ``'1.2 MB'`` (decimal units); None -> ``'-'``."""
    if n is None:
        return '-'
    for unit, size in (('GB', 1e9), ('MB', 1e6), ('kB', 1e3)):
        if abs(n) >= size:
            return f'{n / size:.1f} {unit}'
    return f'{int(n)} B'


def fmt_time(seconds):
    """Seconds -> ``'12.3 ms'`` / ``'4.56 s'``; None -> ``'-'``."""
    if seconds is None:
        return '-'
    if seconds >= 1:
        return f'{seconds:.2f} s'
    if seconds >= 1e-3:
        return f'{seconds * 1e3:.1f} ms'
    return f'{seconds * 1e6:.0f} us'


def print_table(headers, rows, file=None):
    """Print a Markdown table with aligned columns; cells are str()-ed."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row):
        return '| ' + ' | '.join(c.ljust(w) for c, w in zip(row, widths)) + ' |'

    print(line(cells[0]), file=file)
    print('|' + '|'.join('-' * (w + 2) for w in widths) + '|', file=file)
    for row in cells[1:]:
        print(line(row), file=file)
