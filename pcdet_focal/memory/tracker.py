"""Peak memory of a block of code, on the CPU or a CUDA device.

    with PeakMemory(device) as pm:
        out = model(batch)
    pm.peak_bytes   # highest live tensor bytes inside the block, above the level at entry
    pm.net_bytes    # live tensor bytes at exit minus at entry (what the block left alive)

What is counted is *tensor memory from PyTorch's allocator*: op outputs, temporaries inside ops
(e.g. the channels-last buffer inside spconv's ``.dense()``), tensors autograd saves for backward.
Memory that libraries allocate behind PyTorch's back (BLAS workspaces, Python objects) is not.

Methods:
- CUDA: ``torch.cuda.reset_peak_memory_stats`` at entry, then ``max_memory_allocated`` minus
  ``memory_allocated`` at entry (the caching allocator's own counters; cached-but-free blocks
  are not counted).
- CPU: the PyTorch profiler with ``profile_memory=True``. Every allocation and free made by
  PyTorch's CPU allocator while it runs is recorded together with the allocator's running total
  of profiled bytes (``total_allocated``); the peak is the highest running total minus the level
  before the block's first event. The profiler sees allocations made inside ops and on
  intra-op worker threads, which a ``TorchDispatchMode`` (op outputs only) would miss.
  Caveat: a tensor created *before* the block and freed inside it is invisible to the
  profiler (its size is unknown), so such a free does not lower the level: the CPU figure is
  an upper bound in that case, exact otherwise. Not re-entrant: only one CPU ``PeakMemory``
  (or other profiler) may be active at a time.

``rss_peak_bytes`` (Linux, CPU only) is a coarse cross-check: the process's resident-set
high-water mark during the block minus its resident set at entry (reset through
``/proc/self/clear_refs``). It includes non-PyTorch memory and allocator caching, so it is
``None`` where unsupported and only roughly comparable.
"""
import contextlib
import os

import torch


@contextlib.contextmanager
def _quiet_fd2():
    """Silence file descriptor 2 (C++ profiler start/stop log lines) for a moment."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, 'wb') as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _read_status_kb(key):
    try:
        with open('/proc/self/status', encoding='ascii') as fh:
            for line in fh:
                if line.startswith(key + ':'):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_rss_peak():
    """Reset VmHWM to the current RSS; True when the kernel allowed it."""
    try:
        with open('/proc/self/clear_refs', 'w', encoding='ascii') as fh:
            fh.write('5')
        return True
    except OSError:
        return False


def allocation_events(prof):
    """CPU allocation events of a finished ``torch.profiler.profile(profile_memory=True)``.

    Returns a list of ``(start_time_ns, alloc_size, total_allocated)`` sorted by time;
    ``alloc_size`` is negative for frees, ``total_allocated`` is the allocator's running total
    of profiled bytes right after the event.
    """
    alloc_type = torch._C._profiler._ExtraFields_Allocation
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        fields = node.extra_fields
        if isinstance(fields, alloc_type) and fields.device.type == 'cpu':
            events.append((node.start_time_ns, int(fields.alloc_size),
                           int(fields.total_allocated)))
    events.sort(key=lambda e: e[0])
    return events


def peak_from_events(events):
    """``(peak, net)`` bytes above the level before the first event, from allocation_events."""
    if not events:
        return 0, 0
    _, size0, total0 = events[0]
    base = total0 - size0
    peak = max(total for _, _, total in events) - base
    net = events[-1][2] - base
    return max(peak, 0), net


_cpu_active = False  # the profiler cannot nest: one CPU PeakMemory at a time


class PeakMemory:
    """Context manager measuring the peak of live tensor bytes inside a block.

    Args:
        device: ``'cpu'``, ``'cuda'``, ``'cuda:1'`` or a torch.device.

    Attributes after the block:
        peak_bytes (int): highest live bytes above the level at entry (>= 0).
        net_bytes (int): live bytes at exit minus at entry (may be negative on CUDA).
        rss_peak_bytes (int or None): CPU only, resident-set high-water mark above entry.
        method (str): ``'profiler'`` (CPU) or ``'cuda'``.
    """

    def __init__(self, device='cpu'):
        self.device = torch.device(device)
        self.method = 'cuda' if self.device.type == 'cuda' else 'profiler'
        if self.device.type not in ('cpu', 'cuda'):
            raise ValueError(f'PeakMemory: unsupported device {self.device}; use cpu or cuda')
        self.peak_bytes = None
        self.net_bytes = None
        self.rss_peak_bytes = None
        self._prof = None

    def __enter__(self):
        if self.method == 'cuda':
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        global _cpu_active
        if _cpu_active:
            raise RuntimeError('PeakMemory(cpu) blocks cannot be nested (one profiler at a time)')
        from torch.profiler import ProfilerActivity, profile
        _cpu_active = True
        self._rss_ok = _reset_rss_peak()
        self._rss_start = _read_status_kb('VmRSS')
        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        try:
            with _quiet_fd2():
                self._prof.__enter__()
        except BaseException:
            _cpu_active = False
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.method == 'cuda':
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(torch.cuda.max_memory_allocated(self.device) - self._start, 0)
            self.net_bytes = torch.cuda.memory_allocated(self.device) - self._start
            return False
        global _cpu_active
        try:
            with _quiet_fd2():
                self._prof.__exit__(exc_type, exc, tb)
        finally:
            _cpu_active = False
        hwm = _read_status_kb('VmHWM')
        if self._rss_ok and hwm is not None and self._rss_start is not None:
            self.rss_peak_bytes = max(hwm - self._rss_start, 0)
        if exc_type is None:
            self.peak_bytes, self.net_bytes = peak_from_events(allocation_events(self._prof))
        self._prof = None
        return False


def measure_peak(fn, device='cpu'):
    """Run ``fn()`` once under :class:`PeakMemory`; returns ``(result, peak_bytes)``."""
    with PeakMemory(device) as pm:
        result = fn()
    return result, pm.peak_bytes
