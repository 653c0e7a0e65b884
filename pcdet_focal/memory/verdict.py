"""FITS / REJECT against a memory budget, with the margin stated, and the batch-size search.

A config fits when its estimate is complete (every module has a memory rule), bounded (no
count without a cap) and

    peak * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT <= budget

and, on CUDA, the caching allocator serves every allocation of the step within
budget - CUDA_CONTEXT (simulated on the step's allocations, cuda.reserved_peak: fragmentation
can fail a step whose live bytes fit):

- CUDA_CONTEXT (1 GiB): the CUDA context, cuBLAS / cuDNN handles and their workspaces, which
  live outside PyTorch's allocator statistics but inside the card's memory;
- NCCL_BUFFERS (1 GiB, DDP runs only): NCCL's communicator buffers, also outside the
  allocator. Reported sizes range from about 0.5 GB (2 GPUs, NVLink, NVIDIA/nccl#964) to
  1.6 GB (NVIDIA/nccl#864); they depend on topology, channels and InfiniBand adapters, not on
  the model, so this is a stated constant, not derived;
- ALLOCATOR_SLACK (10 %): the estimate's own margin of error.
"""
import os
import shutil
import sys
from dataclasses import dataclass, field

from ..errors import ConfigError
from .estimator import estimate, prepare

GIB = 2 ** 30
CUDA_CONTEXT = 1 * GIB
NCCL_BUFFERS = 1 * GIB
ALLOCATOR_SLACK = 0.10
MAX_BATCH_SEARCH = 1024


def outside_allocator(world_size=1):
    """Device bytes outside PyTorch's allocator: the CUDA context, plus NCCL under DDP."""
    return CUDA_CONTEXT + (NCCL_BUFFERS if world_size > 1 else 0)


def required_bytes(peak, world_size=1):
    """Device memory a step with this estimated peak needs (margin included)."""
    return int(peak * (1 + ALLOCATOR_SLACK)) + outside_allocator(world_size)


def margin_text(world_size=1):
    nccl = f', +{NCCL_BUFFERS / GIB:.2f} GiB for NCCL buffers' if world_size > 1 else ''
    return (f'margin: +{ALLOCATOR_SLACK:.0%} of the peak, +{CUDA_CONTEXT / GIB:.2f} GiB for the '
            f'CUDA context / cuDNN + cuBLAS workspaces{nccl}')


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


def needed(e):
    """Bytes the device must have for estimate ``e`` (None when incomplete)."""
    return None if e.peak_bytes is None else required_bytes(e.peak_bytes, e.world_size)


def fits_budget(e, budget):
    """``e`` fits ``budget``: its margin, and (CUDA) the allocator simulation within it."""
    if e.peak_bytes is None or needed(e) > budget:
        return False
    if e.events is None:
        return True
    from .cuda import reserved_peak
    return reserved_peak(e.events, budget - outside_allocator(e.world_size))[1]


@dataclass
class Verdict:
    """The answer of :func:`check_fits`. ``word``: FITS, REJECT, UNBOUNDED (a count without a
    bound: never FITS), NOT_MODELLED (incomplete estimate) or ESTIMATE (no budget)."""

    word: str
    estimate: object                 # estimator.Estimate
    budget_bytes: object = None      # None: no budget (nothing was checked)
    budget_source: str = ''
    reason: str = ''
    suggestions: list = field(default_factory=list)
    max_batch_size: object = None    # largest batch that fits (None without a budget)

    @property
    def fits(self):
        return self.word in ('FITS', 'ESTIMATE')

    @property
    def peak_bytes(self):
        return self.estimate.peak_bytes

    @property
    def required_bytes(self):
        return needed(self.estimate)

    @property
    def has_budget(self):
        return self.budget_bytes is not None

    @property
    def top_suggestion(self):
        return self.suggestions[0] if self.suggestions else None

    def summary(self):
        """One line: verdict, peak vs budget, the reason and the top fix."""
        e = self.estimate
        if self.word == 'NOT_MODELLED':
            return (f'NOT MODELLED: no memory rule for {"; ".join(e.not_modelled)} (no estimate '
                    'is given rather than a partial one)')
        head = f'peak {gib(e.peak_bytes)} at batch {e.batch_size}'
        if self.word == 'ESTIMATE':
            bound = '' if e.bounded else f'; {self.reason}'
            return f'ESTIMATE ONLY: {head}; no budget ({self.budget_source}; pass --vram GiB)' \
                + bound
        need = f'needs {gib(self.required_bytes)} with the margin, budget {gib(self.budget_bytes)}'
        if self.word == 'FITS':
            mb = f'; largest batch that fits: {self.max_batch_size}' \
                if self.max_batch_size else ''
            return f'FITS: {head}, {need}{mb}'
        top = self.top_suggestion
        fix = f'; top suggestion: {top.title} ({gib(top.peak_bytes)})' if top else \
            '; no single suggested change fits'
        return f'{self.word}: {head}, {need}: {self.reason}{fix}'


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


def unbounded_reason(e):
    keys = [f'{key} ({why})' for key, why in e.unbounded]
    if not e.voxels.bounded:
        keys.append('DATA_CONFIG.DATA_PROCESSOR[transform_points_to_voxels]'
                    ".MAX_NUMBER_OF_VOXELS (dynamic voxelisation has no voxel cap)")
    return 'no bound on ' + '; '.join(keys) + ': set it so the estimate is a bound'


_PREPARE_KEYS = ('host', 'voxels', 'frames')


def _prepared_once(cfg, prepared, assume):
    """(prepared, the rest of ``assume``): the model built and the frames counted once for
    every estimate of a search, not once per estimate."""
    prepared = prepared or prepare(cfg, **{k: assume[k] for k in _PREPARE_KEYS if k in assume})
    return prepared, {k: v for k, v in assume.items() if k not in _PREPARE_KEYS}


def max_batch_size(cfg, budget, amp=False, start=1, prepared=None, **assume):
    """Largest batch size whose estimate fits ``budget`` (0 if batch 1 does not).

    ``assume``: estimate()'s other keyword arguments. Peak memory grows with the batch, so a
    doubling search then a bisection finds it."""
    prepared, assume = _prepared_once(cfg, prepared, assume)

    def fits(b):
        return fits_budget(estimate(cfg, batch_size=b, amp=amp, prepared=prepared, **assume),
                           budget)

    lo, hi, b = 0, None, max(1, int(start))
    while b <= MAX_BATCH_SEARCH:
        if fits(b):
            lo, b = b, b * 2
        else:
            hi = b
            break
    if hi is None:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def check_fits(cfg, batch_size=None, vram_gib=None, amp=False, suggest=True, prepared=None,
               **assume):
    """Estimate ``cfg`` at ``batch_size`` and judge it against ``vram_gib`` GiB (default: the
    current CUDA device's memory; with neither, the verdict is ESTIMATE).

    ``assume``: estimate()'s keyword arguments (target, stack, voxels, frames, host,
    world_size, gt_boxes). Returns a :class:`Verdict`; on REJECT it carries suggestions, each
    re-estimated and fitting."""
    from .suggest import suggestions as make_suggestions
    prepared, assume = _prepared_once(cfg, prepared, assume)
    e = estimate(cfg, batch_size=batch_size, amp=amp, prepared=prepared, **assume)
    if vram_gib is not None:
        if isinstance(vram_gib, bool) or not isinstance(vram_gib, (int, float)) or vram_gib <= 0:
            raise ConfigError(f'--vram must be a positive number of GiB, got {vram_gib!r}')
        budget, source = int(float(vram_gib) * GIB), f'--vram {vram_gib:g} GiB'
    else:
        budget, source = cuda_device_budget()
    if e.peak_bytes is None:
        return Verdict('NOT_MODELLED', e, budget, source,
                       reason='no memory rule for ' + '; '.join(e.not_modelled))
    if budget is None:
        return Verdict('ESTIMATE', e, None, source,
                       reason='no budget given' if e.bounded else unbounded_reason(e))
    kw = dict(amp=amp, prepared=prepared, **assume)
    if e.bounded and fits_budget(e, budget):
        v = Verdict('FITS', e, budget, source, reason='fits with margin')
        v.max_batch_size = max_batch_size(cfg, budget, start=e.batch_size, **kw)
        return v
    v = Verdict('REJECT' if e.bounded else 'UNBOUNDED', e, budget, source,
                reason=reject_reason(e) if e.bounded else unbounded_reason(e))
    v.max_batch_size = max_batch_size(cfg, budget, **kw) if e.batch_size > 1 else 0
    if suggest and e.bounded:
        v.suggestions = make_suggestions(cfg, e, budget, v.max_batch_size, prepared, **assume)
    return v
