"""FITS / REJECT against a memory budget, with the margin stated, and the batch-size search.

A config fits when  peak * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT <= budget:
- CUDA_CONTEXT (1 GiB): the CUDA context, cuBLAS / cuDNN handles and their workspaces, which
  live outside PyTorch's allocator statistics but inside the card's memory;
- ALLOCATOR_SLACK (10 %): the caching allocator's rounding and fragmentation (reserved minus
  allocated memory) on top of the live tensors the estimate counts.
"""
import os
import shutil
import sys
from dataclasses import dataclass, field

from .estimator import estimate

GIB = 2 ** 30
CUDA_CONTEXT = 1 * GIB
ALLOCATOR_SLACK = 0.10
MAX_BATCH_SEARCH = 1024


def required_bytes(peak):
    """Device memory a step with this estimated peak needs (margin included)."""
    return int(peak * (1 + ALLOCATOR_SLACK)) + CUDA_CONTEXT


def margin_text():
    return (f'margin: +{ALLOCATOR_SLACK:.0%} of the peak for allocator slack and '
            f'+{CUDA_CONTEXT / GIB:.2f} GiB for the CUDA context / cuDNN + cuBLAS workspaces')


def gib(nbytes):
    return f'{nbytes / GIB:.2f} GiB'


def cuda_device_budget():
    """(bytes, description) of the current CUDA device, or (None, reason) without one.

    torch is imported only when a CUDA driver is visible (importing it costs seconds)."""
    if 'torch' not in sys.modules and not (os.path.exists('/dev/nvidiactl')
                                           or shutil.which('nvidia-smi')):
        return None, 'no CUDA device found'
    try:
        import torch
    except ImportError:
        return None, 'torch is not installed'
    if not torch.cuda.is_available():
        return None, 'no CUDA device available to torch'
    idx = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(idx)
    return int(props.total_memory), f'cuda:{idx} {props.name}'


@dataclass
class Verdict:
    """The answer of :func:`check_fits`: ``fits`` is True when no budget is known."""

    fits: bool
    estimate: object                 # estimate.Estimate
    budget_bytes: object = None      # None: no budget (nothing was checked)
    budget_source: str = ''
    reason: str = ''
    suggestions: list = field(default_factory=list)
    max_batch_size: object = None    # largest batch that fits (None without a budget)

    @property
    def peak_bytes(self):
        return self.estimate.peak_bytes

    @property
    def required_bytes(self):
        return required_bytes(self.estimate.peak_bytes)

    @property
    def has_budget(self):
        return self.budget_bytes is not None

    @property
    def top_suggestion(self):
        for s in self.suggestions:
            if s.fits:
                return s
        return None

    def summary(self):
        """One line: verdict, peak vs budget, the reason and the top fix."""
        e = self.estimate
        lb = ' (lower bound: some modules not modelled)' if e.lower_bound else ''
        head = f'peak {gib(e.peak_bytes)}{lb} at batch {e.batch_size}'
        if not self.has_budget:
            return f'ESTIMATE ONLY: {head}; no budget ({self.budget_source}; pass --vram GiB)'
        need = f'needs {gib(self.required_bytes)} with the margin, budget {gib(self.budget_bytes)}'
        if self.fits:
            mb = f'; largest batch that fits: {self.max_batch_size}' \
                if self.max_batch_size else ''
            return f'FITS: {head}, {need}{mb}'
        top = self.top_suggestion
        fix = f'; top suggestion: {top.title} ({gib(top.peak_bytes)})' if top else \
            '; no single suggested change fits'
        return f'REJECT: {head}, {need}: {self.reason}{fix}'


def reject_reason(e):
    """Why the peak is what it is: the phase/module of the peak and its biggest item."""
    where = f'peak in the {e.peak_phase} of {e.peak_module}'
    if e.transient_bytes >= 0.25 * e.peak_bytes and e.transient_label:
        return (f'{where}; largest transient {gib(e.transient_bytes)} = {e.transient_label} '
                f'in {e.transient_module}')
    rows = [r for r in e.rows if r.kind not in ('INPUT', 'LOSS')]
    if rows:
        big = max(rows, key=lambda r: r.activations)
        return f'{where}; largest activations {gib(big.activations)} in {big.name}'
    return where


def fits_at(cfg, batch_size, budget, amp=False, **assume):
    e = estimate(cfg, batch_size=batch_size, amp=amp, **assume)
    return required_bytes(e.peak_bytes) <= budget, e


def max_batch_size(cfg, budget, amp=False, start=1, **assume):
    """Largest batch size whose estimate fits ``budget`` (0 if batch 1 does not).

    ``assume``: estimate()'s keyword arguments (voxels, target, data_counts, focal_growth).
    Peak memory grows with the batch, so a doubling search then a bisection finds it."""
    kw = dict(amp=amp, **assume)
    lo, hi = 0, None
    b = max(1, int(start))
    while b <= MAX_BATCH_SEARCH:
        if fits_at(cfg, b, budget, **kw)[0]:
            lo = b
            b *= 2
        else:
            hi = b
            break
    if hi is None:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits_at(cfg, mid, budget, **kw)[0]:
            lo = mid
        else:
            hi = mid
    return lo


def check_fits(cfg, batch_size=None, vram_gib=None, amp=False, voxels=None, target='cuda',
               suggest=True, data_counts=None, focal_growth=None):
    """Estimate ``cfg`` at ``batch_size`` and judge it against ``vram_gib`` GiB (default: the
    current CUDA device's memory; with neither, ``fits`` is True and nothing is checked).

    voxels / data_counts / focal_growth / target: see :func:`estimate.estimate`.
    Returns a :class:`Verdict`; on REJECT it carries re-estimated suggestions."""
    from .suggest import suggestions as make_suggestions
    assume = dict(voxels=voxels, target=target, data_counts=data_counts,
                  focal_growth=focal_growth)
    e = estimate(cfg, batch_size=batch_size, amp=amp, **assume)
    if vram_gib is not None:
        if isinstance(vram_gib, bool) or not isinstance(vram_gib, (int, float)) or vram_gib <= 0:
            from ..errors import ConfigError
            raise ConfigError(f'--vram must be a positive number of GiB, got {vram_gib!r}')
        budget, source = int(float(vram_gib) * GIB), f'--vram {vram_gib:g} GiB'
    else:
        budget, source = cuda_device_budget()
    if budget is None:
        return Verdict(fits=True, estimate=e, budget_bytes=None, budget_source=source,
                       reason='no budget given')
    fits = required_bytes(e.peak_bytes) <= budget
    kw = dict(amp=amp, **assume)
    v = Verdict(fits=fits, estimate=e, budget_bytes=budget, budget_source=source)
    if fits:
        v.reason = 'fits with margin'
        v.max_batch_size = max_batch_size(cfg, budget, start=e.batch_size, **kw)
    else:
        v.reason = reject_reason(e)
        v.max_batch_size = max_batch_size(cfg, budget, **kw) if e.batch_size > 1 else 0
        if suggest:
            v.suggestions = make_suggestions(cfg, e, budget, v.max_batch_size, **assume)
    return v
