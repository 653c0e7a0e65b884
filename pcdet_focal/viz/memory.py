"""Live memory over one training step, from a memory estimate's timeline.

Reads only these fields of ``pcdet_focal.memory.estimate(cfg, ..., timeline=True)``:
``timeline`` (list of ``(live_bytes, phase, module, label)``, one per allocation or release of
the steady-state step, in replay order), ``peak_bytes`` / ``peak_phase`` / ``peak_module``,
``batch_size`` and ``cfg_file``; how the estimate is computed does not matter here.

The picture: live bytes per event (x: event number of the step), the phases (forward,
backward, optimizer step) as shaded bands, the peak marked, the budget as a dashed line, and the
largest single allocations (tensors and transient buffers) labelled with their module at the
event that allocates them.
"""
import logging
from pathlib import Path

import numpy as np

from .canvas import matplotlib_available, new_figure, save_figure

logger = logging.getLogger('pcdet_focal')

GIB = 2 ** 30
MIB = 2 ** 20
LINE_COLOR = '#1f4e9c'
PEAK_COLOR = '#e4002b'
BUDGET_COLOR = '#d9822b'
PHASE_COLORS = {'forward': '#e8f1fb', 'backward': '#fbeee6', 'optimizer step': '#eaf6ea'}
LABEL_MIN_SHARE = 0.01       # label allocations of at least 1 % of the peak


def _unit(peak):
    return (GIB, 'GiB') if peak >= GIB else (MIB, 'MiB')


def _fmt(nbytes):
    scale, unit = _unit(nbytes)
    return f'{nbytes / scale:.2f} {unit}'


def short_label(label, width=48):
    """First clause of an estimator label: 'im2col columns of Conv2d(22400->128, 3x3)'."""
    text = str(label).split(' (')[0]
    return text if len(text) <= width else text[:width - 3] + '...'


def phase_spans(phases):
    """['forward', 'forward', 'backward', ...] -> [(phase, first index, last index + 1), ...]."""
    spans = []
    for i, ph in enumerate(phases):
        if spans and spans[-1][0] == ph:
            spans[-1][2] = i + 1
        else:
            spans.append([ph, i, i + 1])
    return [tuple(s) for s in spans]


def largest_allocations(timeline, peak_bytes, top=4):
    """The ``top`` largest single allocations of the step (at least 1 % of the peak), one per
    (module, label): [(event index, bytes, module, label), ...], largest first. A transient
    (e.g. an im2col buffer) is one allocation, so the largest transients are among them."""
    live = np.array([t[0] for t in timeline], dtype=np.float64)
    jumps = np.diff(live, prepend=0.0) if len(live) else live
    best = {}
    for i in np.argsort(-jumps, kind='stable'):
        nbytes = jumps[i]
        if len(best) == top or nbytes < LABEL_MIN_SHARE * peak_bytes:
            break
        key = (timeline[i][2], timeline[i][3])
        if key not in best:
            best[key] = (int(i), int(nbytes), key[0], key[1])
    return list(best.values())


def draw_memory(estimate, path, budget_bytes=None, verdict='', top=4):
    """Write the memory-over-one-step PNG of ``estimate`` (made with ``timeline=True``) to
    ``path``; returns the Path, or None without matplotlib.

    budget_bytes: the device budget (the verdict's), drawn as a dashed line when given.
    verdict: a word for the title (e.g. 'REJECT'). top: how many allocations to label.
    """
    if getattr(estimate, 'timeline', None) is None:
        raise ValueError('draw_memory needs an estimate made with timeline=True')
    if not matplotlib_available('memory picture'):
        return None
    timeline = estimate.timeline
    live = np.array([t[0] for t in timeline], dtype=np.float64)
    peak = max(float(estimate.peak_bytes), float(live.max()) if len(live) else 0.0)
    scale, unit = _unit(max(peak, budget_bytes or 0))
    fig = new_figure(10.0, 5.0)
    ax = fig.add_axes([0.08, 0.1, 0.9, 0.74])
    x = np.arange(len(live))
    top_y = max(peak, budget_bytes or 0) / scale * 1.1 or 1.0

    for phase, a, b in phase_spans([t[1] for t in timeline]):
        ax.axvspan(a - 0.5, b - 0.5, color=PHASE_COLORS.get(phase, '#f2f2f2'), zorder=0,
                   linewidth=0)
        right = b > 0.9 * len(live) and (b - a) < 0.1 * len(live)  # a thin band at the end
        ax.text(b - 0.5 if right else (a + b - 1) / 2, 0.02 * top_y, phase, fontsize=8,
                ha='right' if right else 'center', va='bottom', color='#555555', zorder=7)
    ax.step(x, live / scale, where='post', color=LINE_COLOR, linewidth=1.3, zorder=3,
            label='live memory')
    ax.fill_between(x, live / scale, step='post', color=LINE_COLOR, alpha=0.12, zorder=2)

    i_peak = int(np.argmax(live)) if len(live) else 0
    ax.plot([i_peak], [peak / scale], marker='v', color=PEAK_COLOR, markersize=8, zorder=5,
            linestyle='none',
            label=f'peak {peak / scale:.2f} {unit} ({estimate.peak_phase}, '
                  f'{estimate.peak_module})')
    if budget_bytes:
        ax.axhline(budget_bytes / scale, color=BUDGET_COLOR, linestyle='--', linewidth=1.5,
                   zorder=4, label=f'budget {budget_bytes / scale:.2f} {unit}')

    for k, (i, nbytes, module, label) in enumerate(largest_allocations(timeline, peak, top)):
        frac = i / max(len(live) - 1, 1)
        left = frac > 0.55  # text on the side with more room
        ax.annotate(f'{_fmt(nbytes)}: {short_label(label)}\nin {module}',
                    xy=(i, live[i] / scale), xycoords='data',
                    xytext=(frac + (-0.03 if left else 0.03), 0.72 - 0.14 * k),
                    textcoords='axes fraction', ha='right' if left else 'left', fontsize=7.5,
                    color='#222222', zorder=6,
                    bbox={'boxstyle': 'round,pad=0.25', 'fc': 'white', 'ec': '#bbbbbb',
                          'alpha': 0.85},
                    arrowprops={'arrowstyle': '->', 'color': '#555555', 'lw': 0.8})

    ax.set_xlim(-0.5, max(len(live) - 0.5, 0.5))
    ax.set_ylim(0, top_y)
    ax.set_xlabel('allocation / release event of one training step (replay order)')
    ax.set_ylabel(f'live memory ({unit})')
    ax.grid(True, axis='y', color='#dddddd', zorder=1)
    fig.legend(*ax.get_legend_handles_labels(), loc='upper left', bbox_to_anchor=(0.07, 0.93),
               ncol=3, fontsize=8, frameon=False)
    name = Path(str(getattr(estimate, 'cfg_file', '') or 'config')).name
    head = f'{verdict}: ' if verdict else ''
    fig.text(0.08, 0.975, f'{head}{name}, batch {estimate.batch_size}: estimated memory over '
             'one training step', fontsize=10, ha='left', va='top')
    return save_figure(fig, path)
