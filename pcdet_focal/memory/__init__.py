"""Peak training memory estimator: the real modules (meta device), counts from real frames,
one memory rule beside each module, a symbolic replay of the step.

Public API (no GPU needed)::

    from pcdet_focal.memory import check_fits, estimate
    verdict = check_fits(cfg, batch_size=2, vram_gib=24, amp=False)
    verdict.word, verdict.peak_bytes, verdict.reason, verdict.suggestions, verdict.summary()
    est = estimate(cfg, batch_size=2)          # module rows, peak, geometry, notes

``tools/estimate_mem.py`` is the command line; ``--measure`` (pcdet_focal.memory.measure)
checks an estimate against a real training step.
"""
from .estimator import Estimate, estimate, prepare
from .suggest import Suggestion, write_fixed
from .verdict import ALLOCATOR_SLACK, CUDA_CONTEXT, Verdict, check_fits, max_batch_size

__all__ = ['estimate', 'prepare', 'Estimate', 'check_fits', 'Verdict', 'Suggestion',
           'write_fixed', 'max_batch_size', 'ALLOCATOR_SLACK', 'CUDA_CONTEXT']
