"""Pictures for people: bird's-eye-view frames, training curves, memory over a training step.

- :mod:`.bev`: ``draw_bev`` (points coloured by height, ground-truth and predicted boxes with
  scores and headings, the range grid) and ``write_eval_bev`` (a few evaluated frames, written
  next to ``result.txt`` by the evaluation loop);
- :mod:`.curves`: ``draw_curves`` (loss and AP of a run's ``metrics.jsonl``);
- :mod:`.memory`: ``draw_memory`` (live bytes over one training step from an estimate's
  timeline: peak, budget and the largest allocations (tensors, transients) by module;
  ``estimate_mem.py --plot``).

matplotlib is optional (``pip install -e '.[plot]'``): without it every ``draw_*`` / ``write_*``
call logs one line with that command and returns None ([] for ``write_eval_bev``); nothing
else changes. Only matplotlib's object API is used (``Figure``, never ``pyplot``), so no global
backend or state is touched.
This package reads duck-typed inputs (arrays, an estimate's fields, a JSONL file): it imports
no model, engine or estimator code.
"""
from .canvas import INSTALL_HINT, best_effort

DEFAULT_BEV_FRAMES = 4   # BEV pictures per evaluation (tools/train.py, tools/test.py --bev_frames)

__all__ = ['DEFAULT_BEV_FRAMES', 'INSTALL_HINT', 'best_effort']
